"""wsq's version: the one place it is written. The Python package reads it here (pyproject's
dynamic version); ``scripts/version`` copies it into the npm package (src/wsq/web), and
``tests/unit/test_version.py`` fails if the two differ."""

VERSION = "0.2.0"
