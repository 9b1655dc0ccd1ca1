"""Compiles the detector's per-event modules with Cython (see docs/performance.md, round 6).

The ``.py`` files stay the source and the reference: Cython compiles them as
they are, and ``detectors/__init__.py`` runs a module from its ``.py`` when it
has no build or its ``.py`` changed since the build (``_build.json`` below). A
machine without a C compiler gets a working, slower, pure-Python install.
"""

import hashlib
import json
import os
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

# The modules each scored event runs through; the rest of detectors/ stays interpreted.
COMPILED = ("catalog", "sketches", "entities", "reputation", "features", "contracts", "events",
            "rounding", "model", "anomaly", "content", "rules", "fusion", "decisions", "pipeline", "worker_state")

# A profile-guided build (streams/profiled_build.py, run by `make install`): compiled once to count
# what a training run executes ("generate"), then again with those counts ("use"). The two builds'
# object files must have the same paths, under which gcc files the counts: hence build_temp below.
PROFILE = os.environ.get("ABUSE_BUILD_PROFILE", "")
PROFILE_DIR = os.environ.get("ABUSE_BUILD_PROFILE_DIR", "")
PROFILE_BUILD_TEMP = "build/profiled"
PROFILE_FLAGS = {
    "": ([], []),
    "generate": ([f"-fprofile-generate={PROFILE_DIR}"], [f"-fprofile-generate={PROFILE_DIR}"]),
    # a function the training run never reached is compiled as without counts, not for size
    "use": ([f"-fprofile-use={PROFILE_DIR}", "-fprofile-partial-training", "-fprofile-correction",
             "-Wno-missing-profile"], []),
}
if PROFILE not in PROFILE_FLAGS:
    raise SystemExit(f"ABUSE_BUILD_PROFILE={PROFILE!r}: use generate, use, or leave it unset")
if PROFILE and not PROFILE_DIR:
    raise SystemExit("ABUSE_BUILD_PROFILE needs ABUSE_BUILD_PROFILE_DIR, the directory of the counts")
compile_args, link_args = PROFILE_FLAGS[PROFILE]

extensions = cythonize(
    [Extension(f"detectors.{name}", [f"detectors/{name}.py"], extra_compile_args=compile_args,
               extra_link_args=link_args) for name in COMPILED],
    compiler_directives={"language_level": 3, "autotestdict": False},  # doctests stay in the docstrings
    nthreads=2,
    quiet=True,
)
for extension in extensions:
    extension.optional = True  # no C compiler: skip it (cythonize drops this if given to Extension)

# Written by streams/profiled_build.py between its in-place build with the counts and the wheel's;
# any other build has none.
if PROFILE != "use":
    Path("detectors/_build_profile.json").unlink(missing_ok=True)
# What each build was compiled from: detectors/__init__.py runs a module whose .py differs from it from source.
Path("detectors/_build.json").write_text(json.dumps(
    {name: hashlib.sha256(Path(f"detectors/{name}.py").read_bytes()).hexdigest() for name in COMPILED}, indent=1))

build_ext_options = {"parallel": 2, **({"build_temp": PROFILE_BUILD_TEMP} if PROFILE else {})}
setup(ext_modules=extensions, options={"build_ext": build_ext_options})
