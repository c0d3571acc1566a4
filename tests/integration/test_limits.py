"""Configurable limits: each refused with a clear error while the connection, the server and
every other client go on; and a real full disk under the blob store."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

import wsq
from tests.conftest import budget, eventually
from tests.integration.rawclient import RawClient
from tests.integration.reports import held_run
from wsq import protocol
from wsq.blobs.files import FileBlobStore
from wsq.cli import parse_size
from wsq.server.connection import HELLO_TIMEOUT, MAX_SUBSCRIPTIONS


@contextlib.asynccontextmanager
async def serving(data_dir: Path, **limits: Any) -> AsyncIterator[wsq.Server]:
    async with wsq.Server(data_dir=data_dir, port=0, **limits) as server:
        yield server


def fast(url: str) -> wsq.Client:
    return wsq.Client(url, backoff=lambda tries: 0.05)


async def _count(listing: Any, expected: int) -> bool:
    return len(await listing) == expected


async def still_works(client: wsq.Client) -> None:
    task = await client.queue("after").add({"ok": True})
    assert task.id


async def test_task_data_over_the_limit_is_too_large(data_dir: Path) -> None:
    async with serving(data_dir, max_data_size=1000) as server, fast(server.url) as client:
        with pytest.raises(wsq.TooLarge, match="exceeds the limit of 1000"):
            await client.queue("q").add({"pad": "x" * 2000})
        with pytest.raises(wsq.TooLarge):
            await client.queue("q").add_many([{"n": 1}, {"pad": "x" * 2000}])
        await client.queue("q").add({"pad": "x" * 900})
        await still_works(client)


async def test_a_stream_over_the_limit_fails_its_add_and_leaves_no_blob(data_dir: Path) -> None:
    async with (
        serving(data_dir, max_stream_size=100_000) as server,
        fast(server.url) as client,
    ):
        with pytest.raises(wsq.TooLarge, match="exceeds the limit of 100000"):
            await client.queue("q").add({"blob": os.urandom(20_000_000)})  # past the window
        with pytest.raises(wsq.TooLarge):
            await client.queue("q").add({"blob": os.urandom(100_001)})
        await eventually(lambda: server.blobs.used_bytes == 0)
        task = await client.queue("q").add({"blob": b"y" * 100_000})
        assert await (await task.get_data())["blob"].read() == b"y" * 100_000
        assert server.blobs.used_bytes == 100_000
        await still_works(client)


async def test_the_blob_quota_refuses_uploads_until_space_is_freed(data_dir: Path) -> None:
    async with (
        serving(data_dir, max_blob_bytes=1_000_000) as server,
        fast(server.url) as client,
        fast(server.url) as other,
    ):
        queue = client.queue("q")
        first = await queue.add({"blob": os.urandom(600_000)})
        with pytest.raises(wsq.StorageFull, match="limit 1000000"):
            await queue.add({"blob": os.urandom(600_000)})
        with pytest.raises(wsq.StorageFull):
            await queue.add({"blob": os.urandom(30_000_000)})  # refused mid-stream
        assert isinstance(wsq.StorageFull("x"), wsq.UploadFailed)
        await still_works(other)
        await queue.add({"small": b"inline bytes are data, not blobs"})
        await first.remove()
        await eventually(lambda: server.blobs.used_bytes == 0)
        await queue.add({"blob": os.urandom(900_000)})


async def test_connections_over_the_limit_are_refused(data_dir: Path) -> None:
    async with serving(data_dir, max_connections=2) as server:
        async with fast(server.url) as one, fast(server.url) as two:
            with pytest.raises(InvalidStatus) as refused:
                await connect(server.url)
            assert refused.value.response.status_code == 503
            await still_works(one)
            await still_works(two)
        await eventually(lambda: not server.connections)
        async with fast(server.url) as three:
            await still_works(three)


async def test_requests_in_flight_over_the_limit_get_too_many(data_dir: Path) -> None:
    async with serving(data_dir, max_requests=5) as server, RawClient(server.url) as raw:
        batch = [
            {"op": "add", "id": i, "queue": "q", "data": {"n": i}, "task": f"t{i}"}
            for i in range(20)
        ]
        await raw.send(json.dumps(batch))  # one frame: all in flight at once
        answers: dict[int, dict[str, Any]] = {}
        while len(answers) < 20:
            message = await raw.receive()
            if message["op"] in ("result", "error"):
                assert message["id"] not in answers, "one answer per request"
                answers[message["id"]] = message
        codes = [answers[i].get("code", "ok") for i in range(20)]
        assert codes[:5] == ["ok"] * 5
        assert codes[5:] == ["too_many"] * 15
        assert "in flight" in answers[19]["message"]
        # Reports and credits are never refused; new requests go through once it drains.
        assert (await raw.request({"op": "queues"}))["op"] == "result"


async def test_open_uploads_over_the_limit_are_refused(data_dir: Path) -> None:
    async with serving(data_dir, max_uploads=2) as server:
        async with RawClient(server.url) as raw:
            for stream in (1, 2, 3):
                await raw.send({"op": "upload", "stream": stream})
            error = await raw.expect("stream_error")
            assert (error["stream"], error["code"]) == (3, "too_many")
            await raw.send({"op": "upload_abort", "stream": 1})
            await raw.send({"op": "upload", "stream": 4})  # a slot is free again
            await raw.send(protocol.pack_chunk(4, b"abc"))
            await raw.send({"op": "upload_end", "stream": 4})
            answer = await raw.request(
                {
                    "op": "add",
                    "queue": "q",
                    "data": {"b": None},
                    "streams": [{"path": ["b"], "upload": 4}],
                }
            )
            assert answer["op"] == "result"
        async with fast(server.url) as client:
            blobs = {f"b{i}": os.urandom(70_000) for i in range(3)}
            with pytest.raises(wsq.LimitExceeded, match="uploads open"):
                await client.queue("q").add(blobs)  # three uploads at once
            await client.queue("q").add({"b0": blobs["b0"], "b1": blobs["b1"]})
            await still_works(client)


async def test_thousands_of_uploads_stay_bounded(data_dir: Path) -> None:
    async with serving(data_dir) as server, fast(server.url) as bystander:
        async with RawClient(server.url) as raw:
            frames = [json.dumps({"op": "upload", "stream": s}) for s in range(1, 5001)]
            for start in range(0, 5000, 500):  # 500 per frame, as a hostile client might
                await raw.send("[" + ",".join(frames[start : start + 500]) + "]")
                for stream in range(start + 1, start + 501):
                    await raw.send(protocol.pack_chunk(stream, b"x" * 1000))
            refused = 0
            while refused < 4900:
                message = await raw.receive()
                if message["op"] == "stream_error":
                    assert message["code"] == "too_many"
                    refused += 1
            (connection,) = [c for c in server.connections.values() if c._uploads]
            assert len(connection._uploads) == 100
            assert len(connection._refused) <= 1000
            await still_works(bystander)
            assert (await raw.request({"op": "queues"}))["op"] == "result"
        await eventually(lambda: len(server.connections) == 1)
        await eventually(lambda: not list((data_dir / "blobs" / "tmp").iterdir()))


def test_sizes_parse_with_binary_units() -> None:
    assert parse_size("1048576") == 1 << 20
    assert parse_size("512K") == 512 << 10
    assert parse_size("64MiB") == 64 << 20
    assert parse_size("1.5g") == 3 << 29
    for bad in ("", "K", "12X", "0", "-5M", "1.5.2K"):
        with pytest.raises(ValueError):
            parse_size(bad)


# -- a slow or hostile client ---------------------------------------------------------------


async def stalled_worker(url: str, queue: str) -> Any:
    """A raw worker that takes up to 1,000 tasks of ``queue`` at a time, then stops reading
    (its offers, which carry the tasks' data, pile up in the server)."""
    ws = await connect(url, max_size=None)
    await ws.send(json.dumps({"op": "hello", "protocol": 1}))
    await ws.recv()
    await ws.send(json.dumps({"op": "work", "id": 1, "queue": queue, "concurrency": 1000}))
    await ws.recv()
    ws.transport.pause_reading()
    return ws


async def test_a_client_that_never_reads_is_dropped_and_others_go_on(data_dir: Path) -> None:
    async with (
        serving(data_dir, max_outgoing=2_000_000) as server,
        fast(server.url) as producer,
    ):
        # A worker that takes up to 1,000 tasks at a time, then stops reading: the offers
        # (which carry the tasks' data) pile up in the server.
        ws = await stalled_worker(server.url, "big")
        pad = "x" * 100_000
        for _ in range(10):
            await producer.queue("big").add_many([{"pad": pad}] * 10, retries=1)  # 10 MB
        await eventually(lambda: len(server.connections) == 1)
        await still_works(producer)
        # Nothing was lost: runs offered to the dropped worker time out unacknowledged
        # (worker timeout) and go back to waiting.
        big = producer.queue("big")
        await eventually(lambda: _count(big.waiting(), 100), timeout=10)
        ws.transport.abort()


async def test_a_burst_of_offers_larger_than_max_outgoing_is_paced_not_dropped(
    data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Workers that read: one of concurrency 1,000 on a queue of 400 KB tasks (payloads
    read from the store at offer time), one on a queue of 15 KB tasks (payloads kept in
    the window): each is offered several times ``max_outgoing`` at once. The offers leave
    as the client reads, so neither is dropped as a slow consumer: every task runs once,
    in its first run."""
    async with (
        serving(data_dir, max_outgoing=4_000_000) as server,
        fast(server.url) as producer,
        fast(server.url) as worker,
    ):
        await producer.queue("big").add_many([{"pad": "x" * 400_000}] * 60)  # 24 MB
        await producer.queue("small").add_many([{"pad": "y" * 15_000}] * 600)  # 9 MB
        runs: list[int | None] = []

        async def handler(task: wsq.Task) -> None:
            runs.append(task.run)

        worker.queue("big").process(handler, concurrency=1000)
        worker.queue("small").process(handler, concurrency=1000)
        await eventually(lambda: len(runs) >= 660, timeout=30)
        await asyncio.sleep(0.5)
        assert runs == [1] * 660
        for name in ("big", "small"):
            [queue] = [q for q in await producer.stats() if q["name"] == name]
            assert (queue["waiting"], queue["active"], queue["failed"]) == (0, 0, 0)
    assert not [r for r in caplog.records if "does not read" in r.getMessage()]


async def test_offers_come_in_messages_of_about_a_mebibyte(data_dir: Path) -> None:
    """A worker of concurrency 24 on a queue of 400 KB tasks is offered 9.6 MB at once,
    in frames of at most about 2 MiB (messages of about 1 MiB, joined up to 1 MiB), not
    in one: a frame arrives whole or not at all, and on a slow link one of many
    megabytes keeps a worker from hearing anything for longer than its heartbeat waits."""
    async with serving(data_dir) as server, fast(server.url) as producer:
        await producer.queue("big").add_many([{"pad": "x" * 400_000}] * 24)
        async with RawClient(server.url) as raw:
            assert raw.ws is not None
            await raw.send({"op": "work", "id": 1, "queue": "big", "concurrency": 24,
                            "worker": "w"})  # fmt: skip
            sizes: list[int] = []
            offered = 0
            while offered < 24:
                frame = await asyncio.wait_for(raw.ws.recv(), budget(10))
                decoded = json.loads(frame)
                for message in decoded if isinstance(decoded, list) else [decoded]:
                    if message["op"] == "offer":
                        offered += len(message["tasks"])
                        sizes.append(len(frame))
            assert max(sizes) < 2_200_000, sizes


async def test_a_listing_larger_than_max_outgoing_comes_in_pages_cut_by_size(
    data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """300 failed tasks with 60 KB errors: a page of all of them would be 18 MB, past
    ``max_outgoing`` (4 MB here), and the client asking would be dropped as a slow
    consumer. Pages are cut by size instead; following their cursors gives every task,
    once, in order."""
    async with (
        serving(data_dir, max_outgoing=4_000_000) as server,
        fast(server.url) as client,
    ):
        queue = client.queue("errors")
        added = [t.id for t in await queue.add_many(list(range(300)), retries=0)]

        async def handler(task: wsq.Task) -> None:
            raise RuntimeError("x" * 60_000)

        queue.process(handler, concurrency=50)
        await eventually(lambda: _count(queue.failed(), 300), timeout=30)
        async with RawClient(server.url) as raw:
            answer = await raw.request(
                {"op": "list", "queue": "errors", "state": "failed", "limit": 300}
            )
        page = answer["result"]
        assert 0 < len(page["tasks"]) < 300 and page["cursor"] is not None  # cut by size
        assert all(len(t["error"]) >= 60_000 for t in page["tasks"])
        listed = await queue.failed()  # every page, following the cursors
        assert [t.id for t in listed] == added
    assert not [r for r in caplog.records if "does not read" in r.getMessage()]


async def test_queues_and_stats_larger_than_max_outgoing_come_in_pages(
    data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """2,000 queues with 195-character names: the answer to ``queues`` or ``stats`` for
    all of them at once would be 400 KB or more, past ``max_outgoing`` (200 KB here), and
    the client asking (a dashboard, say) would be dropped as a slow consumer, every time.
    They come in pages cut by count and by size instead, in name order; the clients
    follow the cursors."""
    names = sorted(f"{n:04}-" + "q" * 190 for n in range(2000))
    async with serving(data_dir, max_outgoing=200_000) as server:
        async with RawClient(server.url) as raw:
            for start in range(0, 2000, 100):
                batch = [
                    {"op": "add", "id": n, "queue": names[n], "data": n}
                    for n in range(start, start + 100)
                ]
                await raw.send(json.dumps(batch))
                for _ in range(100):
                    assert (await raw.expect("result"))["op"] == "result"
            for op in ("queues", "stats"):
                page = (await raw.request({"op": op, "limit": 3}))["result"]
                listed = [q if op == "queues" else q["name"] for q in page["queues"]]
                assert listed == names[:3] and page["cursor"] == names[2]
                page = (await raw.request({"op": op, "limit": 3, "cursor": names[2]}))["result"]
                listed = [q if op == "queues" else q["name"] for q in page["queues"]]
                assert listed == names[3:6]
                page = (await raw.request({"op": op, "limit": 5, "cursor": names[-2]}))["result"]
                assert len(page["queues"]) == 1 and page["cursor"] is None
                page = (await raw.request({"op": op, "limit": 2000}))["result"]
                assert 0 < len(page["queues"]) < 2000 and page["cursor"] is not None  # by size
            bad = await raw.request({"op": "stats", "limit": 0})
            assert bad["op"] == "error"
        async with fast(server.url) as client:
            assert [q.name for q in await client.list_queues()] == names
            stats = await client.stats()
            assert [q["name"] for q in stats] == names
            assert all(q["waiting"] == 1 for q in stats)
    assert not [r for r in caplog.records if "does not read" in r.getMessage()]


async def test_workers_larger_than_max_outgoing_come_in_pages(
    data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """600 workers with long queue names: a ``workers`` answer holding them all would be
    about 150 KB, past ``max_outgoing`` (100 KB here), and the observer asking would be
    dropped. They come in pages in (node, id) order; the clients follow the cursors."""
    queue = "w" * 190
    ids = sorted(f"worker-{n:04}" for n in range(600))
    async with serving(data_dir, max_outgoing=100_000) as server, RawClient(server.url) as raw:
        for start in range(0, 600, 100):
            batch = [
                {"op": "work", "id": n, "queue": queue, "worker": ids[n]}
                for n in range(start, start + 100)
            ]
            await raw.send(json.dumps(batch))
            for _ in range(100):
                assert (await raw.expect("result"))["op"] == "result"
        async with RawClient(server.url) as observer:
            page = (await observer.request({"op": "workers", "limit": 2}))["result"]
            assert [w["id"] for w in page["workers"]] == ids[:2]
            cursor = page["cursor"]
            assert json.loads(cursor) == [server.node_name, ids[1]]
            page = (await observer.request({"op": "workers", "cursor": cursor}))["result"]
            assert 0 < len(page["workers"]) < 598 and page["cursor"] is not None  # by size
            assert [w["id"] for w in page["workers"]] == ids[2 : 2 + len(page["workers"])]
            bad = await observer.request({"op": "workers", "cursor": "[1]"})
            assert bad["code"] == "invalid_argument"
        async with fast(server.url) as client:
            assert [w["id"] for w in await client.workers()] == ids
            assert [w["id"] for w in await client.workers(queue)] == ids
    assert not [r for r in caplog.records if "does not read" in r.getMessage()]


async def test_a_client_sending_byte_by_byte_slows_nobody(data_dir: Path) -> None:
    async with serving(data_dir) as server, fast(server.url) as client:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        request = (
            f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        hello = json.dumps({"op": "hello", "protocol": 1}).encode()
        mask = b"\x01\x02\x03\x04"
        frame = bytes([0x81, 0x80 | len(hello)]) + mask
        frame += bytes(b ^ mask[i % 4] for i, b in enumerate(hello))

        async def drip() -> None:
            for byte in request + frame:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.002)

        dripping = asyncio.create_task(drip())
        done = 0
        while not dripping.done():  # the others are served meanwhile
            await asyncio.wait_for(client.queue("busy").add({"n": done}), budget(2))
            done += 1
        await dripping
        response = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), budget(5))
        assert response.startswith(b"HTTP/1.1 101")
        welcome = await asyncio.wait_for(reader.read(2000), budget(5))
        assert b'"welcome"' in welcome
        assert done > 10
        writer.close()


# -- a full disk ----------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs: a real filesystem that fills up (needs root, as CI has)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_a_full_disk_fails_adds_clearly_and_recovers(
    data_dir: Path, small_disk: Path
) -> None:
    blobs = FileBlobStore(small_disk / "blobs")
    async with (
        wsq.Server(data_dir=data_dir, port=0, blob_store=blobs) as server,
        fast(server.url) as client,
    ):
        queue = client.queue("disk")
        kept = await queue.add({"blob": b"a" * 1_500_000})
        second = await queue.add({"blob": b"b" * 1_500_000})
        with pytest.raises(wsq.StorageFull, match="disk is full"):
            await queue.add({"blob": os.urandom(3_000_000)})
        assert not list((small_disk / "blobs" / "tmp").iterdir()), "no partial file left"
        await still_works(client)  # the state store is elsewhere and fine
        await second.remove()
        third = await queue.add({"blob": b"c" * 1_500_000})  # space came back
        assert await (await kept.get_data())["blob"].read() == b"a" * 1_500_000
        assert await (await third.get_data())["blob"].read() == b"c" * 1_500_000
    with sqlite3.connect(data_dir / "wsq.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def fill(folder: Path) -> Path:
    """A file in ``folder`` that takes up all the space left there."""
    filler = folder / "filler"
    with open(filler, "wb") as out, contextlib.suppress(OSError):
        while True:
            out.write(b"\0" * 65536)
            out.flush()
    return filler


def stored_runs(data_dir: Path) -> list[tuple[str, int]]:
    with contextlib.closing(sqlite3.connect(data_dir / "wsq.db")) as db:
        return db.execute("SELECT state, run FROM tasks").fetchall()


async def test_a_report_the_full_disk_could_not_store_is_sent_again_and_nothing_sticks(
    small_disk: Path, tmp_path: Path
) -> None:
    """The state store's disk fills while a worker runs a task: its report cannot be
    stored, so the server answers unavailable (not OK), tells no one the task ended, and,
    a moment later, sets its state right from the file; the worker sends the report
    again; once there is room it is stored: the task ends once, in its first run, and
    the counts are the file's."""
    async with (
        wsq.Server(data_dir=small_disk, port=0, blob_store=FileBlobStore(tmp_path)) as server,
        fast(server.url) as client,
        fast(server.url) as observer,
    ):
        held = await held_run(client, observer, "disk")
        # The run's start is stored first (an offer leaves before it is durable: a start
        # the full disk refused is the next test's case).
        await eventually(lambda: stored_runs(small_disk) == [("active", 1)])
        filler = fill(small_disk)
        held.go.set()
        await asyncio.sleep(2.5)  # refused, sent again and refused; the state set right
        assert held.ends == []  # nothing stored: nothing told
        filler.unlink()
        await eventually(lambda: held.ends == [("task completed", held.task.id)])
        await asyncio.sleep(0.5)
        assert held.runs == [1] and held.ends == [("task completed", held.task.id)]
        assert server.core.lookup(held.task.id) is None
        [queue] = [q for q in await observer.stats() if q["name"] == "disk"]
        assert (queue["active"], queue["completed"]) == (0, 1)
    with sqlite3.connect(small_disk / "wsq.db") as db:
        assert db.execute("SELECT state, run FROM tasks").fetchall() == [("completed", 1)]


async def test_a_run_whose_start_the_full_disk_could_not_store_is_not_offered_again(
    small_disk: Path, tmp_path: Path
) -> None:
    """An offer goes out before its write is durable: with the disk full, the start of
    the run is not stored. The resyncs that follow keep the run (its worker is running
    it) instead of loading its task, still waiting in the file, and offering it again;
    once there is room the start and the end are stored: one run, ended once."""
    async with (
        wsq.Server(data_dir=small_disk, port=0, blob_store=FileBlobStore(tmp_path)) as server,
        fast(server.url) as client,
        fast(server.url) as observer,
    ):
        ends: list[str] = []
        observer.queue("disk").on("task completed", lambda t, *_: ends.append(t.id))
        await observer.stats()  # the subscription (sent before it) is in place
        task = await client.queue("disk").add(None, timeout=30.0, retries=0)
        filler = fill(small_disk)
        runs: list[int | None] = []
        go = asyncio.Event()

        async def handler(task: wsq.Task) -> str:
            runs.append(task.run)
            await go.wait()
            return "ok"

        client.queue("disk").process(handler)
        await asyncio.sleep(3.5)  # the start refused; the state set right, again and again
        assert runs == [1]
        filler.unlink()
        await asyncio.sleep(1.5)  # the start written again
        go.set()
        await eventually(lambda: ends == [task.id])
        await asyncio.sleep(0.5)
        assert runs == [1] and ends == [task.id]
        [queue] = [q for q in await observer.stats() if q["name"] == "disk"]
        assert (queue["waiting"], queue["active"], queue["completed"]) == (0, 0, 1)
    with sqlite3.connect(small_disk / "wsq.db") as db:
        assert db.execute("SELECT state, run FROM tasks").fetchall() == [("completed", 1)]


async def test_a_run_whose_start_and_end_the_full_disk_could_not_store_runs_once(
    small_disk: Path, tmp_path: Path
) -> None:
    """The disk is full from the offer on: neither the run's start nor its worker's report
    is stored, and the server has ended the run before a resync reads the file (which
    still has the task waiting). The run is held again, its start written again, so the
    report the worker sends again is accepted: the task is not offered again, its run
    ends once (the handler ran four times before)."""
    async with (
        wsq.Server(data_dir=small_disk, port=0, blob_store=FileBlobStore(tmp_path)) as server,
        fast(server.url) as client,
        fast(server.url) as observer,
    ):
        ends: list[str] = []
        observer.queue("disk").on("task completed", lambda t, *_: ends.append(t.id))
        await observer.stats()  # the subscription (sent before it) is in place
        task = await client.queue("disk").add(None, timeout=30.0, retries=0)
        filler = fill(small_disk)
        runs: list[int | None] = []

        async def handler(task: wsq.Task) -> str:
            runs.append(task.run)
            return "ok"

        client.queue("disk").process(handler)
        await asyncio.sleep(3.5)  # start and report refused; resyncs, again and again
        assert runs == [1] and ends == []
        filler.unlink()
        await eventually(lambda: ends == [task.id], timeout=15)
        await asyncio.sleep(0.5)
        assert runs == [1] and ends == [task.id]
        [queue] = [q for q in await observer.stats() if q["name"] == "disk"]
        assert (queue["waiting"], queue["active"], queue["completed"]) == (0, 0, 1)
    with sqlite3.connect(small_disk / "wsq.db") as db:
        assert db.execute("SELECT state, run FROM tasks").fetchall() == [("completed", 1)]


async def test_downloads_count_against_requests_in_flight(data_dir: Path) -> None:
    async with serving(data_dir, max_requests=3) as server:
        async with fast(server.url) as client:
            task = await client.queue("q").add({"blob": os.urandom(9 << 20)})  # > one window
        async with RawClient(server.url) as raw:
            for stream in range(1, 6):  # credit is never granted: all stay open
                await raw.send({"op": "download", "stream": stream, "task": task.id, "index": 0})
            error = await raw.expect("stream_error")
            assert (error["stream"], error["code"]) == (4, "too_many")
            assert (await raw.expect("stream_error"))["stream"] == 5
            refused = await raw.request({"op": "get", "task": task.id})
            assert refused["code"] == "too_many"
            for stream in range(1, 4):
                await raw.send({"op": "cancel", "stream": stream})
            assert (await raw.request({"op": "get", "task": task.id}))["op"] == "result"


# -- connections that never say hello ------------------------------------------------------


async def _silent(url: str) -> Any:
    """A connection that completes the WebSocket handshake and then says nothing."""
    return await connect(url, max_size=None)


async def test_connections_that_never_say_hello_are_closed_and_lock_nobody_out(
    data_dir: Path,
) -> None:
    async with serving(data_dir, max_connections=2) as server:
        silent = [await _silent(server.url) for _ in range(10)]
        # They do not take the two places: clients that greet get them at once.
        async with fast(server.url) as one, fast(server.url) as two:
            await still_works(one)
            await still_works(two)
        for ws in silent:  # and each is closed after the hello deadline
            await asyncio.wait_for(ws.wait_closed(), budget(HELLO_TIMEOUT + 5))


async def test_partial_frames_before_hello_share_the_servers_buffer_budget(
    data_dir: Path,
) -> None:
    # Each connection that has not said hello may buffer up to one frame (here 4 * 64 KiB
    # plus a chunk): a budget of three such frames keeps at most three of them open.
    reserve = 4 * 65536 + protocol.CHUNK
    async with serving(data_dir, max_message_size=65536, max_buffered=3 * reserve) as server:
        silent, writers = [], []
        for _ in range(8):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(
                f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n".encode()
            )
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
            # A text frame announcing 200 KB, of which only half ever comes.
            writer.write(bytes([0x81, 0xFF]) + (200_000).to_bytes(8, "big") + b"\0" * 4)
            writer.write(b"x" * 100_000)
            silent.append(reader)
            writers.append(writer)

        async def closed(reader: asyncio.StreamReader) -> bool:
            try:
                return await asyncio.wait_for(reader.read(), 0.05) is not None
            except TimeoutError:
                return False

        async def open_count() -> int:
            return sum([not await closed(reader) for reader in silent])

        await eventually(lambda: _at_most(open_count(), 3), timeout=3)
        async with fast(server.url) as client:  # the newest pending ones make way too
            await still_works(client)
        for writer in writers:
            writer.close()


async def _at_most(count: Any, limit: int) -> bool:
    return bool(await count <= limit)


async def test_outgoing_bytes_of_all_connections_share_the_buffer_budget(
    data_dir: Path,
) -> None:
    async with (
        serving(data_dir, max_buffered=3_000_000, max_message_size=256 << 10) as server,
        fast(server.url) as producer,
    ):
        ws = await stalled_worker(server.url, "big")
        pad = "x" * 100_000
        for _ in range(50):
            await producer.queue("big").add_many([{"pad": pad}] * 2, retries=1)  # 10 MB
        # Under the per-connection limit (64 MiB), over the server's total: dropped.
        await eventually(lambda: len(server.connections) == 1)
        await still_works(producer)
        assert server.buffered < 3_000_000
        ws.transport.abort()
        await eventually(lambda: server.buffered == 0)  # everything given back


# -- workers --------------------------------------------------------------------------------


async def test_worker_registrations_per_connection_are_limited(data_dir: Path) -> None:
    async with serving(data_dir, max_workers=3) as server, RawClient(server.url) as raw:
        for n in range(3):
            answer = await raw.request({"op": "work", "queue": f"q{n}", "worker": f"w{n}"})
            assert answer["op"] == "result"
        refused = await raw.request({"op": "work", "queue": "q", "worker": "w3"})
        assert refused["code"] == "too_many"
        assert "3 workers" in refused["message"]
        assert (await raw.request({"op": "stop", "worker": "w0"}))["op"] == "result"
        assert (await raw.request({"op": "work", "queue": "q", "worker": "w3"}))["op"] == "result"
        async with RawClient(server.url) as other:  # the limit is per connection
            assert (await other.request({"op": "work", "queue": "q"}))["op"] == "result"


async def test_stop_finds_workers_in_the_connections_own_index(data_dir: Path) -> None:
    """``stop`` looks in the connection's own workers (not a scan of the server's): a
    worker taken over by a new connection of the same session moves between indexes."""
    session = "one-session-0123456789"
    async with serving(data_dir) as server:
        first = RawClient(server.url, session=session)
        second = RawClient(server.url, session=session)
        async with first, second:
            work = {"op": "work", "queue": "q", "worker": "w1"}
            assert (await first.request(work))["op"] == "result"
            assert (await second.request(work))["op"] == "result"  # taken over
            refused = await first.request({"op": "stop", "worker": "w1"})
            assert refused["code"] == "invalid_argument"
            assert (await second.request({"op": "stop", "worker": "w1"}))["op"] == "result"
            unknown = await second.request({"op": "stop", "worker": "w1"})
            assert unknown["code"] == "invalid_argument"
        await eventually(lambda: not server.connections)
        assert server.core.stats() == [] or all(not q["workers"] for q in server.core.stats())


async def test_subscriptions_per_connection_are_limited(data_dir: Path) -> None:
    async with serving(data_dir) as server, RawClient(server.url) as raw:
        for start in range(0, MAX_SUBSCRIPTIONS, 1000):
            batch = [
                {"op": "subscribe", "id": n, "queue": f"q{n}"} for n in range(start, start + 1000)
            ]
            await raw.send(json.dumps(batch))
            for _ in range(1000):
                assert (await raw.expect("result"))["op"] == "result"
        refused = await raw.request({"op": "subscribe", "queue": "one-more"})
        assert refused["code"] == "too_many"
        assert (await raw.request({"op": "subscribe", "queue": "q7"}))["op"] == "result"
        assert (await raw.request({"op": "unsubscribe", "queue": "q7"}))["op"] == "result"
        assert (await raw.request({"op": "subscribe", "queue": "one-more"}))["op"] == "result"
