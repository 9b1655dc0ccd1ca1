"""Compiles the detector's per-event modules with Cython (see docs/performance.md, round 6).

The ``.py`` files stay the source and the reference: Cython compiles them as
they are, and ``detectors/__init__.py`` runs a module from its ``.py`` when it
has no build or its ``.py`` changed since the build (``_build.json`` below). A
machine without a C compiler gets a working, slower, pure-Python install.
"""

import hashlib
import json
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

# The modules each scored event runs through; the rest of detectors/ stays interpreted.
COMPILED = ("catalog", "sketches", "entities", "reputation", "features", "contracts", "events",
            "rounding", "model", "anomaly", "content", "rules", "fusion", "decisions", "pipeline", "worker_state")

extensions = cythonize(
    [Extension(f"detectors.{name}", [f"detectors/{name}.py"]) for name in COMPILED],
    compiler_directives={"language_level": 3, "autotestdict": False},  # doctests stay in the docstrings
    nthreads=2,
    quiet=True,
)
for extension in extensions:
    extension.optional = True  # no C compiler: skip it (cythonize drops this if given to Extension)

# What each build was compiled from: detectors/__init__.py runs a module whose .py differs from it from source.
Path("detectors/_build.json").write_text(json.dumps(
    {name: hashlib.sha256(Path(f"detectors/{name}.py").read_bytes()).hexdigest() for name in COMPILED}, indent=1))

setup(ext_modules=extensions, options={"build_ext": {"parallel": 2}})
