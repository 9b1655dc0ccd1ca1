"""Detection in plain Python: features, models, rules and decisions (no Kafka, no Faust).

The modules each scored event runs through are compiled with Cython when the
package is installed (``setup.py``). Their ``.py`` files are the source and the
reference: Cython compiles them unchanged, and a module runs from its ``.py``
instead of its build when

* it has no build (no C compiler at install time),
* its ``.py`` changed since the build (edited after ``make install``; a warning
  says so), or
* ``ABUSE_PURE_PYTHON=1`` is set, to test or debug the reference.

``compiled_modules()`` names the modules that run compiled.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
import warnings
from pathlib import Path

PURE_PYTHON_ENV = "ABUSE_PURE_PYTHON"
BUILD_RECORD = "_build.json"  # module -> sha256 of the .py it was compiled from, written by setup.py
BUILD_PROFILE_RECORD = "_build_profile.json"  # written after a profile-guided build (streams/profiled_build.py)

_HERE = Path(__file__).parent


def pure_python_requested() -> bool:
    """``ABUSE_PURE_PYTHON`` is set (to anything but ``0``): every module runs from its source."""
    return os.environ.get(PURE_PYTHON_ENV, "") not in ("", "0")


def source_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def built_modules(package: Path) -> set[str]:
    return {path.name.split(".")[0] for suffix in importlib.machinery.EXTENSION_SUFFIXES
            for path in package.glob(f"*{suffix}")}


def modules_from_source(package: Path, built: set[str]) -> set[str]:
    """The built modules to import from their ``.py``: all of them under
    ``ABUSE_PURE_PYTHON=1``, else those whose ``.py`` is not what they were built from."""
    if pure_python_requested():
        return set(built)
    try:
        recorded = json.loads((package / BUILD_RECORD).read_text())
    except (OSError, ValueError):
        recorded = {}
    stale = {name for name in built
             if (package / f"{name}.py").exists() and recorded.get(name) != source_digest(package / f"{name}.py")}
    if stale:
        warnings.warn(
            f"detectors: {', '.join(sorted(stale))} changed since compiled; running from source "
            "(slower). Run `make install` (or `pip install -e .`) to recompile.", RuntimeWarning, stacklevel=2)
    return stale


class _SourceFinder(importlib.abc.MetaPathFinder):
    """Imports the named detector modules from their ``.py`` even where a build exists."""

    def __init__(self, names: set[str]):
        self.names = names

    def find_spec(self, fullname, path=None, target=None):  # noqa: ARG002 - the finder protocol
        package, _, name = fullname.rpartition(".")
        if package != __name__ or name not in self.names:
            return None
        return importlib.util.spec_from_file_location(fullname, _HERE / f"{name}.py")


_BUILT = built_modules(_HERE)
_FROM_SOURCE = modules_from_source(_HERE, _BUILT)
if _FROM_SOURCE:
    sys.meta_path.insert(0, _SourceFinder(_FROM_SOURCE))


def build_profile() -> dict | None:
    """What the compiled modules' profile-guided build trained on (``streams/profiled_build.py``),
    or None: built without a profile, or not built."""
    try:
        return json.loads((_HERE / BUILD_PROFILE_RECORD).read_text())
    except (OSError, ValueError):
        return None


def compiled_modules() -> tuple[str, ...]:
    """The detector modules that run compiled, e.g. ``("entities", "features", ...)``; empty in pure Python."""
    return tuple(sorted(_BUILT - _FROM_SOURCE))
