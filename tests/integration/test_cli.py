"""The ``wsq`` command in subprocesses: options, environment, logs, the demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import wsq
from tests.conftest import budget
from tests.integration.procs import ServerProcess, free_port


def run_wsq(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "wsq", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=budget(timeout),
        check=True,
    )
    return done.stdout + done.stderr


def test_version_and_help() -> None:
    assert run_wsq("--version").strip() == f"wsq, version {wsq.__version__}"
    text = run_wsq("server", "--help")
    for option in ("--host", "--port", "--data-dir", "--heartbeat-interval", "--worker-timeout"):
        assert option in text
    assert "--log-format" in text


def test_demo_runs_to_completion(tmp_path: Path) -> None:
    out = run_wsq("demo", "--once", "--port", "0", "--data-dir", str(tmp_path / "d"))
    assert out.count("completed") >= 5
    assert "demo: done" in out


async def test_environment_and_json_logs(tmp_path: Path) -> None:
    port = free_port()
    env = {"PORT": str(port), "WSQ_DATA_DIR": str(tmp_path / "env-data")}
    env |= {"WSQ_LOG_FORMAT": "json", "WSQ_WORKER_TIMEOUT": "0.5"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        server = ServerProcess(tmp_path / "unused", port)
        server.extra = []
        args_dir = tmp_path / "env-data"
        await _start_without_data_dir(server)
        async with wsq.Client(server.url) as client:
            await client.queue("logged").add(1)
        assert server.stop() == 0
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    assert (args_dir / "wsq.db").exists()
    records = [json.loads(line) for line in server.log.read_text().splitlines() if line]
    actions = [r.get("action") for r in records]
    assert {"listening", "connect", "task added", "task queued", "stopped"} <= set(actions)
    added = next(r for r in records if r.get("action") == "task added")
    assert added["queue"] == "logged"
    assert added["level"] == "INFO"


async def _start_without_data_dir(server: ServerProcess) -> None:
    """Start ``wsq server`` with no options, so port and data dir come from the env."""
    server.log.parent.mkdir(parents=True, exist_ok=True)
    with server.log.open("ab") as log:
        server.proc = subprocess.Popen(
            [sys.executable, "-m", "wsq", "server"], stdout=log, stderr=log
        )
    await server._wait_listening()
