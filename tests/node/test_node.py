"""The Node tests of wsq.js (``tests/node/*.test.mjs``, Node's built-in runner), one pytest
test per file, so they run from ``./scripts/test`` and report in its closing line.

Each file starts its own ``wsq server`` subprocesses (``tests/node/server.mjs``) with this
interpreter. ``ws``, wsq.js's one Node dependency, comes from ``npm ci`` in
``src/wsq/web`` (``scripts/test`` runs it); a run without it fails and says so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
WEB = ROOT / "src" / "wsq" / "web"
FILES = sorted(path.name for path in HERE.glob("*.test.mjs"))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", FILES)
def test_node(name: str) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is missing: install Node >= 20 (Debian: apt-get install nodejs npm)")
    if not (WEB / "node_modules" / "ws").is_dir():
        pytest.fail(f"run `npm ci` in {WEB} first (scripts/test does)")
    env = {**os.environ, "WSQ_PYTHON": sys.executable}
    done = subprocess.run(
        [node, "--test", "--test-reporter=spec", "--test-timeout=120000", str(HERE / name)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    print(done.stdout[-20000:], done.stderr[-5000:])
    assert done.returncode == 0, f"{name} failed:\n{done.stdout[-20000:]}\n{done.stderr[-5000:]}"
