"""The ``wsq`` command in subprocesses: options, environment, logs, the demo."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import wsq
from tests.conftest import budget
from tests.integration.procs import ServerProcess
from tests.integration.rawclient import RawClient


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
    assert "demo: done. The server stops (--once)." in out
    assert "keeps running" not in out
    assert re.search(r"dashboard is at http://127\.0\.0\.1:\d+/ ", out), out
    added = re.findall(r"added   file-\d\.bin as task (\S+)", out)
    assert len(added) == 5 and len(set(added)) == 5, out
    completed = set(re.findall(r"task (\S+) completed", out))
    assert completed == set(added), out


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


@pytest.mark.parametrize(
    ("args", "env", "option"),
    [
        (["--heartbeat-interval", "-1"], {}, "--heartbeat-interval"),
        (["--heartbeat-interval", "inf"], {}, "--heartbeat-interval"),
        (["--worker-timeout", "0"], {}, "--worker-timeout"),
        (["--worker-timeout", "nan"], {}, "--worker-timeout"),
        ([], {"WSQ_WORKER_TIMEOUT": "-2"}, "--worker-timeout"),
        (["--port", "70000"], {}, "--port"),
        (["--max-connections", "0"], {}, "--max-connections"),
        (["--max-message", "0"], {}, "--max-message"),
        (["--log-format", "xml"], {}, "--log-format"),
        (["--tls-cert", __file__], {}, "--tls-key"),
        (["--node-name", "bad name\nforged"], {}, "--node-name"),
        ([], {"WSQ_NODE_NAME": "-leading-dash"}, "--node-name"),
    ],
)
@pytest.mark.parametrize("command", ["server", "demo"])
def test_a_bad_option_is_one_line_naming_it_and_exit_2(
    tmp_path: Path, command: str, args: list[str], env: dict[str, str], option: str
) -> None:
    if command == "demo" and option.startswith(("--max", "--tls")):
        pytest.skip("server-only option")
    done = subprocess.run(
        [sys.executable, "-m", "wsq", command, "--data-dir", str(tmp_path / "d"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=budget(30),
    )
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert option in lines[0] and "Traceback" not in lines[0]


async def test_heartbeat_interval_0_turns_the_heartbeat_off(data_dir: Path) -> None:
    async with wsq.Server(data_dir=data_dir, port=0, heartbeat_interval=0) as server:  # noqa: SIM117
        async with RawClient(server.url) as silent, wsq.Client(server.url) as client:
            assert silent.welcome["heartbeat"] == 0
            queue = client.queue("no-heartbeat")
            await queue.add(1)
            done = asyncio.Event()
            queue.process(lambda task: done.set())
            await asyncio.wait_for(done.wait(), budget(10))
            # A peer that never answers pings is not dropped: none are sent.
            assert await silent.request({"op": "ping"}) == {
                "op": "result",
                "id": 1000,
                "result": None,
            }


@pytest.mark.parametrize(
    "settings",
    [
        {"heartbeat_interval": -1.0},
        {"worker_timeout": 0.0},
        {"worker_timeout": float("inf")},
        {"port": -1},
    ],
)
def test_the_embedded_server_refuses_bad_settings_by_name(settings: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(settings))):
        wsq.Server(**settings)  # type: ignore[arg-type]
