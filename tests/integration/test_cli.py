"""The ``wsq`` command in subprocesses: options, environment, logs, the demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import wsq
from tests.conftest import budget
from tests.integration.procs import ServerProcess


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
    data_dir = tmp_path / "env-data"
    server = ServerProcess(data_dir)
    env = {"PORT": str(server.port), "WSQ_DATA_DIR": str(data_dir)}
    env |= {"WSQ_LOG_FORMAT": "json", "WSQ_WORKER_TIMEOUT": "0.5"}
    env |= {"WSQ_MIN_TASK_TIMEOUT": "2"}
    await server.start(env)
    async with wsq.Client(server.url) as client:
        await client.queue("logged").add(1)
        with pytest.raises(wsq.InvalidArgument, match=">= 2"):
            await client.queue("logged").add(1, timeout=1.5)
    assert server.stop() == 0
    assert (data_dir / "wsq.db").exists()
    records = [json.loads(line) for line in server.log.read_text().splitlines() if line]
    actions = [r.get("action") for r in records]
    assert {"listening", "connect", "task added", "task queued", "stopped"} <= set(actions)
    added = next(r for r in records if r.get("action") == "task added")
    assert added["queue"] == "logged"
    assert added["level"] == "INFO"


async def test_a_second_server_on_the_same_folder_or_port_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = await ServerProcess(data).start()
    try:
        for args in (
            ["--port", "0", "--data-dir", str(data)],  # the folder is in use
            ["--port", str(first.port), "--data-dir", str(tmp_path / "other")],  # the port
        ):
            done = subprocess.run(
                [sys.executable, "-m", "wsq", "server", *args],
                capture_output=True,
                text=True,
                timeout=budget(30),
            )
            assert done.returncode == 1
            assert "wsq server could not run" in done.stderr
            assert "Traceback" not in done.stderr
        assert (
            "Another wsq server is using"
            in subprocess.run(
                [sys.executable, "-m", "wsq", "server", "--port", "0", "--data-dir", str(data)],
                capture_output=True,
                text=True,
                timeout=budget(30),
            ).stderr
        )
        async with wsq.Client(first.url) as client:  # the first one is unharmed
            await client.queue("q").add(1)
    finally:
        assert first.stop() == 0
    # Once it stopped, the folder is free again.
    async with wsq.Server(data_dir=data, port=0) as again, wsq.Client(again.url) as client:
        assert len(await client.queue("q").all()) == 1
    async with wsq.Server(data_dir=data, port=0):
        with pytest.raises(wsq.ServerError, match="Another wsq server"):
            await wsq.Server(data_dir=data, port=0).start()
