"""The Python and npm packages carry one version, written in src/wsq/_version.py."""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

import wsq

WEB = Path(wsq.__file__).parent / "web"


def test_the_npm_package_has_the_python_packages_version() -> None:
    assert json.loads((WEB / "package.json").read_text())["version"] == wsq.__version__
    lock = json.loads((WEB / "package-lock.json").read_text())
    assert lock["version"] == lock["packages"][""]["version"] == wsq.__version__


def test_the_installed_distribution_reports_the_same_version() -> None:
    assert version("wsqueue") == wsq.__version__
