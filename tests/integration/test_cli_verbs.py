"""The client verbs of the ``wsq`` command, each run as a subprocess against a real server."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

import wsq
from tests.conftest import budget, completed_count_is, eventually


async def cli(
    *args: str, url: str | None = None, cwd: Path | None = None, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """Run ``wsq ARGS`` to its end; its exit code, standard output and error."""
    process = await _start(*args, url=url, cwd=cwd, env=env)
    out, err = await asyncio.wait_for(process.communicate(), budget(60))
    assert process.returncode is not None
    return process.returncode, out.decode(errors="surrogateescape"), err.decode()


async def _start(
    *args: str, url: str | None = None, cwd: Path | None = None, env: dict[str, str] | None = None
) -> asyncio.subprocess.Process:
    environment = {**os.environ, **(env or {})}
    if url is not None:
        environment["WSQ_URL"] = url
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "wsq",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=cwd,
        env=environment,
    )


async def cli_json(*args: str, url: str) -> Any:
    code, out, err = await cli(*args, "--json", url=url)
    assert code == 0, err
    return json.loads(out)


async def test_add_inspect_download_and_fix_tasks(server: wsq.Server, tmp_path: Path) -> None:
    url = server.url
    video = tmp_path / "video.bin"
    video.write_bytes(os.urandom(3 << 20))
    code, out, err = await cli(
        "add", "encode", '{"args": ["-crf", "28"]}', "--file", "media.video=" + str(video),
        "--retries", "2", "--id", "job-1", url=url,
    )  # fmt: skip
    assert (code, out.strip()) == (0, "job-1"), err
    assert await cli_json("queues", url=url) == ["encode"]
    (stats,) = await cli_json("stats", url=url)
    assert (stats["name"], stats["waiting"]) == ("encode", 1)
    listing = await cli_json("tasks", "encode", "--state", "waiting", url=url)
    assert [t["id"] for t in listing["tasks"]] == ["job-1"] and listing["cursor"] is None
    shown = await cli_json("show", "job-1", url=url)
    assert shown["options"]["retries"] == 2 and shown["queue"] == "encode"
    assert shown["data"] == {
        "args": ["-crf", "28"],
        "media": {"video": {"stream": {"size": 3 << 20}}},
    }
    copy = tmp_path / "copy.bin"
    code, _, err = await cli("get", "job-1", "media.video", "-o", str(copy), url=url)
    assert code == 0, err
    assert hashlib.sha256(copy.read_bytes()).digest() == hashlib.sha256(video.read_bytes()).digest()
    code, out, _ = await cli("get", "job-1", "media.video", url=url)  # to standard output
    assert code == 0 and out.encode(errors="surrogateescape") == video.read_bytes()
    # Human output is a table with the whole id.
    code, out, _ = await cli("tasks", "encode", url=url)
    assert code == 0 and "job-1" in out and "waiting" in out
    # Refusals: exit code 1 with the server's reason, the other ids still handled.
    code, out, err = await cli("retry", "job-1", url=url)
    assert code == 1 and "only failed tasks retry" in err
    code, out, err = await cli("rm", "nope", "job-1", url=url)
    assert code == 1 and out.split() == ["job-1"] and "nope" in err
    assert await cli_json("tasks", "encode", url=url) == {"tasks": [], "cursor": None}
    code, _, err = await cli("show", "job-1", url=url)
    assert code == 1 and "No task" in err


async def test_usage_and_connection_errors_have_their_exit_codes(tmp_path: Path) -> None:
    code, _, err = await cli("stats", "--connect-timeout", "0.5", url="ws://127.0.0.1:9")
    assert code == 3 and "no wsq server answered" in err
    code, _, err = await cli("add", "q", "{not json", url="ws://127.0.0.1:9")
    assert code == 2 and "not JSON" in err and len(err.splitlines()) == 1
    code, _, err = await cli("add", "q", "--file", "novalue", url="ws://127.0.0.1:9")
    assert code == 2 and "KEY=PATH" in err
    code, _, err = await cli("worker", "nosuchmodule:run", "-q", "q", url="ws://127.0.0.1:9")
    assert code == 2 and "cannot import" in err


async def test_add_wait_prints_the_end_and_fails_with_the_task(client: wsq.Client) -> None:
    def handler(task: wsq.Task) -> None:
        if task.data["fail"]:
            raise RuntimeError("bad input")

    client.queue("waited").process(handler)
    code, out, err = await cli("add", "waited", '{"fail": false}', "--wait", url=client.address)
    assert code == 0 and out.split()[1] == "completed", err
    code, out, err = await cli(
        "add", "waited", '{"fail": true}', "--wait", "--json", url=client.address
    )
    assert code == 1 and "bad input" in err
    assert json.loads(out)["state"] == "failed" and json.loads(out)["error"] == "bad input"


async def test_show_lists_a_task_s_attempts(client: wsq.Client) -> None:
    queue = client.queue("shown")
    task = await queue.add({"n": 1}, retries=1)

    async def handler(run: wsq.Task) -> None:
        if run.run == 1:
            raise RuntimeError("first try broke")

    worker = queue.process(handler)
    await eventually(lambda: completed_count_is(queue, 1))
    await worker.stop()
    shown = await cli_json("show", task.id, url=client.address)
    assert [(a["run"], a["outcome"]) for a in shown["attempts"]] == [
        (1, "failed"),
        (2, "completed"),
    ]
    assert shown["attempts"] == await task.attempts()
    code, out, err = await cli("show", task.id, url=client.address)
    assert code == 0, err
    attempts = out[out.index("attempts:") :]
    assert "failed: first try broke" in attempts and "completed" in attempts
    assert worker.id in attempts and "wsq-python" in attempts


async def test_workers_lists_each_worker_and_the_runs_it_holds(client: wsq.Client) -> None:
    release = asyncio.Event()

    async def handler(task: wsq.Task) -> None:
        await task.update_progress(0.5)
        await release.wait()

    busy = client.queue("busy").process(handler, concurrency=2)
    idle = client.queue("idle").process(handler)
    task = await client.queue("busy").add({"n": 1})
    await eventually(lambda: _progress_is(client, "busy", 0.5))
    try:
        (listed,) = await cli_json("workers", "busy", url=client.address)
        assert (listed["queue"], listed["concurrency"]) == ("busy", 2)
        (run,) = listed["runs"]
        assert (run["task"], run["run"], run["progress"]) == (task.id, 1, 0.5)
        assert run["started"] is not None and listed["since"] <= run["started"]
        everything = await cli_json("workers", url=client.address)
        assert sorted(w["queue"] for w in everything) == ["busy", "idle"]
        code, out, err = await cli("workers", url=client.address)
        assert code == 0, err
        assert listed["id"] in out and f"{task.id} run 1 50% started" in out
        assert "1/2" in out and "0/1" in out and "idle" in out
        code, out, err = await cli("workers", "nobody", url=client.address)
        assert code == 0 and "worker" in out and listed["id"] not in out, out
    finally:
        release.set()
        await busy.stop()
        await idle.stop()


async def _progress_is(client: wsq.Client, queue: str, progress: float) -> bool:
    active = await client.queue(queue).active()
    return bool(active) and active[0].progress == progress


async def test_watch_prints_events_until_a_signal(client: wsq.Client) -> None:
    watcher = await _start("watch", "--json", "seen", url=client.address)
    assert watcher.stdout is not None and watcher.stderr is not None
    # It says so on standard error once it is subscribed.
    ready = await asyncio.wait_for(watcher.stderr.readline(), budget(30))
    assert ready.startswith(b"watching seen at ws://")
    await client.queue("unseen").add(0)
    await client.queue("seen").add(1)
    client.queue("seen").process(lambda task: None)
    events: list[str] = []
    while "task completed" not in events:
        line = await asyncio.wait_for(watcher.stdout.readline(), budget(20))
        event = json.loads(line)
        assert event["args"][0]["queue"] == "seen"
        events.append(event["event"])
    assert events[:2] == ["task added", "task queued"] and "task started" in events
    watcher.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(watcher.wait(), budget(20)) == 0


HANDLERS = """
import asyncio, hashlib, pathlib, time

def checksum(task):  # sync: runs in a thread
    time.sleep(task.data.get("sleep", 0))
    pathlib.Path(task.data["out"]).write_text(str(sum(task.data["numbers"])))

def digest(task):  # sync, with a stream read as a file and progress reported
    hashed = hashlib.sha256()
    while chunk := task.data["file"].read(1 << 20):
        hashed.update(chunk)
        task.update_progress(0.5)
    pathlib.Path(task.data["out"]).write_text(hashed.hexdigest())

async def slow(task):
    await asyncio.sleep(task.data["sleep"])
"""


async def test_worker_runs_a_module_function_and_stops_gracefully(
    client: wsq.Client, tmp_path: Path
) -> None:
    (tmp_path / "jobs.py").write_text(HANDLERS)
    queue = client.queue("sums")
    args = ("worker", "jobs:checksum", "-q", "sums", "-c", "2")
    worker = await _start(*args, url=client.address, cwd=tmp_path)
    try:
        for n in range(4):
            await queue.add({"numbers": [n, 1, 2], "out": str(tmp_path / f"out{n}")})
        await eventually(lambda: completed_count_is(queue, 4), timeout=30)
        assert [(tmp_path / f"out{n}").read_text() for n in range(4)] == ["3", "4", "5", "6"]
        # SIGTERM with a task running: it finishes (within --grace), then the worker exits.
        await queue.add({"numbers": [9], "out": str(tmp_path / "late"), "sleep": 1.0})
        await eventually(lambda: _active(queue), timeout=20)
        worker.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(worker.wait(), budget(30)) == 0
        assert (tmp_path / "late").read_text() == "9"
        await eventually(lambda: completed_count_is(queue, 5))
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()


async def test_worker_aborts_what_outlives_the_grace_period(
    client: wsq.Client, tmp_path: Path
) -> None:
    (tmp_path / "jobs.py").write_text(HANDLERS)
    queue = client.queue("slow")
    await queue.add({"sleep": 60}, timeout=1.0)
    args = ("worker", "jobs:slow", "-q", "slow", "--grace", "0.5")
    worker = await _start(*args, url=client.address, cwd=tmp_path)
    await eventually(lambda: _active(queue), timeout=20)
    worker.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(worker.wait(), budget(20)) == 0
    assert worker.stderr is not None
    assert b"aborting" in await worker.stderr.read()
    # The server fails the abandoned run when its timeout passes; nothing is stuck.
    await eventually(lambda: _failed_with(queue, "Timed out."), timeout=20)


async def _active(queue: wsq.Queue) -> bool:
    return bool(await queue.active())


async def _failed_with(queue: wsq.Queue, error: str) -> bool:
    return [t.error for t in await queue.failed()] == [error]


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
async def test_shell_completion_scripts(shell: str) -> None:
    code, out, _ = await cli(env={"_WSQ_COMPLETE": f"{shell}_source"})
    assert code == 0 and "_WSQ_COMPLETE" in out


async def test_a_sync_handler_reads_streams_as_files_and_reports_progress(
    client: wsq.Client, tmp_path: Path
) -> None:
    (tmp_path / "jobs.py").write_text(HANDLERS)
    queue = client.queue("digests")
    blob = os.urandom(3 << 20)
    await queue.add({"file": blob, "out": str(tmp_path / "digest")})
    progressed = asyncio.Event()
    queue.on("task progress", lambda task, fraction: progressed.set())
    args = ("worker", "jobs:digest", "-q", "digests")
    worker = await _start(*args, url=client.address, cwd=tmp_path)
    try:
        await eventually(lambda: completed_count_is(queue, 1), timeout=30)
        assert (tmp_path / "digest").read_text() == hashlib.sha256(blob).hexdigest()
        assert progressed.is_set()
    finally:
        worker.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(worker.wait(), budget(30)) == 0


async def test_with_an_auth_file_add_prints_the_scoped_id_the_other_verbs_take(
    tmp_path: Path,
) -> None:
    """``wsq add --id job-1`` prints the id the server gave (``<principal>/job-1``), and
    ``--wait`` follows the task by that id (docs/protocol.md §4.3, "Task ids")."""
    auth = tmp_path / "auth.toml"
    auth.write_text('[tokens.ops]\ntoken = "cli-ops-token-0123456"\nadmin = ["*"]\n')
    env = {"WSQ_TOKEN": "cli-ops-token-0123456"}
    async with (
        wsq.Server(data_dir=tmp_path / "data", port=0, auth=auth) as server,
        wsq.Client(server.url, token="cli-ops-token-0123456") as client,
    ):
        code, out, err = await cli("add", "scoped", "{}", "--id", "job-1", url=server.url, env=env)
        assert (code, out.strip()) == (0, "ops/job-1"), err
        code, out, err = await cli("show", "ops/job-1", "--json", url=server.url, env=env)
        assert code == 0 and json.loads(out)["id"] == "ops/job-1", err
        code, _, err = await cli("show", "job-1", url=server.url, env=env)
        assert code == 1 and "No task" in err  # a bare id is never resolved
        client.queue("scoped").process(lambda task: None)
        code, out, err = await cli(
            "add", "scoped", "{}", "--id", "job-2", "--wait", url=server.url, env=env
        )
        assert (code, out.split()) == (0, ["ops/job-2", "completed"]), err
