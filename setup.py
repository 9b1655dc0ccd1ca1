"""Compiles the detector's per-event modules with Cython (see docs/performance.md, round 6).

The ``.py`` files stay the source and the reference: Cython compiles them as
they are, and ``detectors/__init__.py`` falls back to the source of any module
whose build is missing or older than its ``.py``. A machine without a C
compiler gets a working, slower, pure-Python install.
"""

import hashlib
import json
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

# The modules each scored event runs through; the rest of detectors/ stays interpreted.
COMPILED = ("catalog", "sketches", "entities", "reputation", "features", "events",
            "model", "anomaly", "content", "rules", "fusion", "decisions", "pipeline")

extensions = cythonize(
    [Extension(f"detectors.{name}", [f"detectors/{name}.py"], optional=True) for name in COMPILED],
    compiler_directives={"language_level": 3, "autotestdict": False},  # doctests stay in the docstrings
    nthreads=2,
    quiet=True,
)
for extension in extensions:
    extension.optional = True  # cythonize copies the fields it knows, not this one

# What each build was compiled from: detectors/__init__.py runs a module whose .py differs from its source.
Path("detectors/_build.json").write_text(json.dumps(
    {name: hashlib.sha256(Path(f"detectors/{name}.py").read_bytes()).hexdigest() for name in COMPILED}, indent=1))

setup(ext_modules=extensions, options={"build_ext": {"parallel": 2}})
