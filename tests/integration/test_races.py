"""State races a careless or hostile client can start (issue 10, "State races").

Each test misbehaves over a :class:`RawClient` (several requests in one frame, a stream id
used again at once, a worker id another principal uses) and then checks that the server's
state is what the store says and that every acknowledged task is whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import wsq
from tests.conftest import eventually
from tests.integration.rawclient import RawClient
from wsq import protocol

BIG = protocol.WINDOW + 3 * protocol.CHUNK // 2  # more than one window of credit


def _content(size: int) -> bytes:
    block = hashlib.sha256(b"race").digest() * (1 << 15)  # 1 MiB
    return (block * (size // len(block) + 1))[:size]


def _open_files() -> dict[int, str]:
    found = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            found[int(fd)] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
    return found


def _stored_blobs(server: wsq.Server) -> list[str]:
    root = server.data_dir / "blobs"
    files = [p.relative_to(root) for p in root.rglob("*") if p.is_file()]
    return [str(p) for p in files if p.parts[0] != "tmp"]


def _download_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("wsq-download-")]


async def _read_download(raw: RawClient, stream: int) -> bytes:
    """The bytes of download ``stream`` until its ``end``, granting credit as they come."""
    received = bytearray()
    while True:
        message = await raw.receive(timeout=10)
        if message["op"] == "_binary":
            frame = message["frame"]
            if int.from_bytes(frame[:4], "big") == stream:
                received += frame[4:]
                credit = {"op": "credit", "stream": stream, "bytes": len(frame) - 4}
                await raw.send(credit)
        elif message["op"] == "end" and message["stream"] == stream:
            assert message["size"] == len(received)
            return bytes(received)
        elif message["op"] == "stream_error":
            raise AssertionError(message)


# -- downloads -----------------------------------------------------------------------------


async def test_download_stream_id_reused_after_cancel_is_a_new_download(
    server: wsq.Server, client: wsq.Client
) -> None:
    """Cancel a download that used up its credit and ask again under the same id in the
    same frame: the new download gets credit and delivers every byte; nothing leaks."""
    content = _content(BIG)
    task = await client.queue("dl").add({"file": content})
    async with RawClient(server.url) as raw:
        # A first download of the same blob opens the server's lazily opened files.
        await raw.send({"op": "download", "stream": 1, "task": task.id, "index": 0, "offset": 0})
        await _read_download(raw, 1)
        files_before = _open_files()
        await raw.send({"op": "download", "stream": 9, "task": task.id, "index": 0, "offset": 0})
        received = 0
        while received < protocol.WINDOW:  # the first window, then the server stops
            message = await raw.receive(timeout=10)
            if message["op"] == "_binary":
                received += len(message["frame"]) - 4
        again = {"op": "download", "stream": 9, "task": task.id, "index": 0, "offset": 0}
        await raw.send([{"op": "cancel", "stream": 9}, again])
        assert await _read_download(raw, 9) == content
        await eventually(lambda: not _download_tasks())
        await eventually(lambda: set(_open_files()) <= set(files_before))


# -- uploads -------------------------------------------------------------------------------


async def test_upload_abort_cannot_delete_the_blob_of_an_accepted_add(
    server: wsq.Server,
) -> None:
    """An add names two uploads; the first is stored, then the client aborts it while the
    second is still open. Whatever the add's answer, an acknowledged task's streams are
    all readable."""
    first, second = _content(1000), _content(2000)
    async with RawClient(server.url) as raw:
        assert raw.ws is not None
        for stream in (1, 2):
            await raw.send({"op": "upload", "stream": stream})
        await raw.ws.send(b"\x00\x00\x00\x01" + first)
        await raw.send({"op": "upload_end", "stream": 1})
        add = {
            "op": "add",
            "id": 7,
            "queue": "up",
            "data": {"a": None, "b": None},
            "streams": [{"path": ["a"], "upload": 1}, {"path": ["b"], "upload": 2}],
        }
        await raw.send(add)
        await eventually(lambda: _stored_blobs(server))  # the first upload is stored
        await raw.send({"op": "upload_abort", "stream": 1, "error": "changed my mind"})
        await raw.ws.send(b"\x00\x00\x00\x02" + second)
        await raw.send({"op": "upload_end", "stream": 2})
        while (answer := await raw.receive())["op"] not in ("result", "error") or answer.get(
            "id"
        ) != 7:
            pass
        if answer["op"] == "error":
            assert await server.store.list() == []
            return
        task_id = answer["result"]["id"]
        await raw.send({"op": "download", "stream": 11, "task": task_id, "index": 0, "offset": 0})
        assert await _read_download(raw, 11) == first
        await raw.send({"op": "download", "stream": 12, "task": task_id, "index": 1, "offset": 0})
        assert await _read_download(raw, 12) == second


# -- removes and retries racing ("Counts never drift", issue 9) -----------------------------

STATES = ("waiting", "active", "completed", "failed")


async def _store_counts(server: wsq.Server) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for task in await server.store.list(limit=1 << 30):
        per_state = counts.setdefault(task.queue, dict.fromkeys(STATES, 0))
        per_state[task.state.value] += 1
    return counts


async def _stats_counts(raw: RawClient) -> dict[str, dict[str, int]]:
    answer = await raw.request({"op": "stats"})
    return {
        q["name"]: {s: q[s] for s in STATES}
        for q in answer["result"]["queues"]
        if any(q[s] for s in STATES)
    }


async def _stats_match_store(server: wsq.Server, raw: RawClient) -> bool:
    return await _stats_counts(raw) == await _store_counts(server)


async def _answers(raw: RawClient, ids: list[int]) -> dict[int, dict[str, Any]]:
    found: dict[int, dict[str, Any]] = {}
    while len(found) < len(ids):
        message = await raw.receive(timeout=10)
        if message.get("id") in ids and message["op"] in ("result", "error"):
            found[message["id"]] = message
    return found


async def _failed_tasks(raw: RawClient, queue: str, count: int, window_fill: int = 0) -> list[str]:
    """``count`` failed tasks of ``queue`` (a worker takes and fails each), then
    ``window_fill`` waiting ones behind them."""
    ids = []
    for n in range(count):
        answer = await raw.request({"op": "add", "queue": queue, "data": {"n": n}})
        ids.append(answer["result"]["id"])
    async with RawClient(raw.url) as worker:
        work = {"op": "work", "queue": queue, "worker": "fw", "concurrency": count}
        await worker.send({**work, "id": 1})
        failed = 0
        while failed < count:
            message = await worker.receive(timeout=10)
            for run in message.get("tasks", []) if message["op"] == "offer" else []:
                task = {"task": run["task"]["id"], "run": run["run"]}
                await worker.send({"op": "fail", "id": 2, **task, "error": "no"})
                failed += 1
        await worker.request({"op": "stop", "worker": "fw"})
    for n in range(window_fill):
        await raw.request({"op": "add", "queue": queue, "data": {"fill": n}})
    return ids


async def test_remove_then_retry_in_one_frame_never_runs_the_removed_task(
    server: wsq.Server,
) -> None:
    async with RawClient(server.url) as raw, RawClient(server.url) as worker:
        ids = await _failed_tasks(raw, "rr", 20)
        await worker.request({"op": "work", "queue": "rr", "worker": "w", "concurrency": 100})
        frame = []
        for n, task_id in enumerate(ids):
            frame += [
                {"op": "remove", "id": 2 * n, "task": task_id},
                {"op": "retry", "id": 2 * n + 1, "task": task_id},
            ]
        await raw.send(frame)
        answers = await _answers(raw, list(range(2 * len(ids))))
        assert all(answers[2 * n]["op"] == "result" for n in range(len(ids))), answers
        assert all(answers[2 * n + 1]["op"] == "error" for n in range(len(ids))), answers
        await raw.request({"op": "ping"})
        with contextlib.suppress(TimeoutError):
            offer = await worker.expect("offer", timeout=0.5)
            raise AssertionError(f"a removed task was offered: {offer}")
        await eventually(lambda: _stats_match_store(server, raw))
        assert await _store_counts(server) == {}


@pytest.fixture
async def small_window(data_dir: Path) -> AsyncIterator[wsq.Server]:
    async with wsq.Server(data_dir=data_dir, port=0, window=4) as server:
        yield server


async def test_double_remove_and_double_retry_keep_stats_equal_to_the_store(
    small_window: wsq.Server,
) -> None:
    """In one frame each, also with the queue longer than the in-memory window."""
    server = small_window
    async with RawClient(server.url) as raw:
        ids = await _failed_tasks(raw, "dd", 10, window_fill=12)
        retries = [{"op": "retry", "id": n, "task": ids[n // 2]} for n in range(10)]
        removes = [{"op": "remove", "id": 100 + n, "task": ids[5 + n // 2]} for n in range(10)]
        await raw.send(retries + removes)
        answers = await _answers(raw, [m["id"] for m in retries + removes])
        ok = [n for n, a in answers.items() if a["op"] == "result"]
        assert sorted(ok) == [0, 2, 4, 6, 8, 100, 102, 104, 106, 108], answers
        await eventually(lambda: _stats_match_store(server, raw))
        counts = await _store_counts(server)
        assert counts == {"dd": {"waiting": 17, "active": 0, "completed": 0, "failed": 0}}


# -- a task cannot spin the server --------------------------------------------------------


async def _add_with_timeout(raw: RawClient, timeout: float) -> dict[str, Any]:
    return await raw.request(
        {"op": "add", "queue": "floor", "data": 1, "options": {"timeout": timeout}}
    )


async def test_task_timeouts_under_the_floor_are_refused(server: wsq.Server) -> None:
    assert server.min_task_timeout == 0.1
    async with RawClient(server.url) as raw:
        for timeout in (0.0, 0.01, 0.0999):
            answer = await _add_with_timeout(raw, timeout)
            assert answer["op"] == "error" and answer["code"] == "invalid_argument"
            assert ">= 0.1" in answer["message"]
        for timeout in (0.1, -1, 5):
            assert (await _add_with_timeout(raw, timeout))["op"] == "result"
    assert len(await server.store.list()) == 3


async def test_the_floor_is_a_server_option(data_dir: Path) -> None:
    async with (
        wsq.Server(data_dir=data_dir, port=0, min_task_timeout=0) as server,
        RawClient(server.url) as raw,
    ):
        assert (await _add_with_timeout(raw, 0.0))["op"] == "result"
    with pytest.raises(ValueError, match="min_task_timeout"):
        wsq.Server(data_dir=data_dir, port=0, min_task_timeout=-1)


# -- worker ids are scoped to their principal ----------------------------------------------

ALICE, BOB, ADMIN = "alice-token-0123456789", "bob-token-0123456789", "admin-token-0123456789"
WORKERS_AUTH = f"""
[tokens.alice]
token = "{ALICE}"
work = ["jobs"]
produce = ["jobs"]

[tokens.bob]
token = "{BOB}"
work = ["jobs"]

[tokens.admin]
token = "{ADMIN}"
admin = ["*"]
"""


@pytest.fixture
async def two_principals(tmp_path: Path) -> AsyncIterator[wsq.Server]:
    auth = tmp_path / "auth.toml"
    auth.write_text(WORKERS_AUTH)
    async with wsq.Server(data_dir=tmp_path / "data", port=0, auth=auth) as server:
        yield server


async def test_a_worker_id_of_another_principal_is_a_fresh_worker(
    two_principals: wsq.Server,
) -> None:
    """Alice's worker "w" holds a run and disconnects; Bob registers "w": he gets the
    waiting task at once (Alice's run does not count against him) and never her abort."""
    server = two_principals
    async with RawClient(server.url, token=ALICE) as alice:
        first = (await alice.request({"op": "add", "queue": "jobs", "data": 1}))["result"]
        await alice.request({"op": "work", "queue": "jobs", "worker": "w", "concurrency": 1})
        offer = await alice.expect("offer")
        assert offer["tasks"][0]["task"]["id"] == first["id"]
        ack = {"op": "ack", "runs": [[first["id"], 1]]}
        answer = await alice.request(ack)
        assert answer["op"] == "result", answer
        second = (await alice.request({"op": "add", "queue": "jobs", "data": 2}))["result"]
    async with RawClient(server.url, token=BOB) as bob, RawClient(server.url, token=ADMIN) as admin:
        await eventually(lambda: len(server.connections) == 2)
        work = {"op": "work", "queue": "jobs", "worker": "w", "concurrency": 1}
        assert (await bob.request(work))["result"] == {"worker": "w"}
        offer = await bob.expect("offer")
        assert [t["task"]["id"] for t in offer["tasks"]] == [second["id"]]
        assert (await admin.request({"op": "remove", "task": first["id"]}))["op"] == "result"
        await bob.request({"op": "ping"})
        with contextlib.suppress(TimeoutError):
            message = await bob.expect("abort", timeout=0.5)
            raise AssertionError(f"Bob got Alice's abort: {message}")


# -- task ids chosen by clients are scoped to their principal -------------------------------


async def test_the_same_task_ids_added_at_once_by_two_principals_make_two_tasks_each(
    two_principals: wsq.Server,
) -> None:
    """Alice and the admin send adds of the same chosen ids at once, each twice (a re-send):
    whichever insert lands first, each principal gets its own task per id, the second
    send answers that same task, and nobody is told an id is in use."""
    server = two_principals
    ids = [f"same-{n}" for n in range(50)]
    async with (
        RawClient(server.url, token=ALICE) as alice,
        RawClient(server.url, token=ADMIN) as admin,
    ):
        frames = {
            raw: [
                {"op": "add", "id": n, "queue": "jobs", "task": task_id, "data": name}
                for n, task_id in enumerate(ids + ids)
            ]
            for raw, name in ((alice, "alice"), (admin, "admin"))
        }
        await asyncio.gather(*(raw.send(json.dumps(batch)) for raw, batch in frames.items()))
        for raw, principal in ((alice, "alice"), (admin, "admin")):
            answered: dict[int, Any] = {}
            while len(answered) < 2 * len(ids):
                message = await raw.receive()
                if message["op"] in ("result", "error"):
                    answered[message["id"]] = message
            answers = [answered[n] for n in range(2 * len(ids))]
            assert all(a["op"] == "result" for a in answers), answers
            assert [a["result"]["id"] for a in answers] == [f"{principal}/{i}" for i in ids + ids]
        listed = await admin.request({"op": "list", "queue": "jobs", "limit": 1000})
        assert len(listed["result"]["tasks"]) == 2 * len(ids)
