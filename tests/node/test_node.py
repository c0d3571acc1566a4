"""The Node tests of wsq.js (``tests/node/*.test.mjs``, Node's built-in runner), one pytest
test per file, so they run from ``./scripts/test`` and report in its closing line.

Each file starts its own ``wsq server`` subprocesses (``tests/node/server.mjs``) with this
interpreter. A file named ``postgres*.test.mjs`` gets a fresh PostgreSQL schema of the
tests' database (``tests/pg.py``): ``WSQ_TEST_PG_PORT`` is the server's port, and
``WSQ_TEST_PG_DSN`` selects the schema with ``{port}`` for the port (to put a proxy in
between). ``ws``, wsq.js's one Node dependency, comes from ``npm ci`` in
``src/wsq/web`` (``scripts/test`` runs it); a run without it fails and says so.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pg import Schema, base_dsn

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
    schema = None
    if name.startswith("postgres"):
        schema = asyncio.run(Schema(base_dsn()).create())
        env["WSQ_TEST_PG_PORT"] = str(schema.address[1])
        env["WSQ_TEST_PG_DSN"] = schema.dsn_at("127.0.0.1", 1).replace(":1/", ":{port}/", 1)
    try:
        done = _run(node, name, env)
    finally:
        if schema is not None:
            asyncio.run(schema.drop())
    print(done.stdout[-20000:], done.stderr[-5000:])
    assert done.returncode == 0, f"{name} failed:\n{done.stdout[-20000:]}\n{done.stderr[-5000:]}"


def _run(node: str, name: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [node, "--test", "--test-reporter=spec", "--test-timeout=120000", str(HERE / name)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
