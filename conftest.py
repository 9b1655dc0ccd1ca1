"""Test-session settings shared by every directory."""

import os

# The compiled detector modules (setup.py) are imported from their build, not the
# .py pytest collects the doctests from; their docstrings are the same.
os.environ.setdefault("PY_IGNORE_IMPORTMISMATCH", "1")
