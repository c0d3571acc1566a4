"""Restarts, kill -9, dropped connections and heartbeats: nothing acknowledged is lost."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

import wsq
from tests.conftest import budget, completed_count_is, eventually
from tests.integration.procs import ServerProcess, free_port
from tests.integration.proxy import proxy_to
from tests.integration.rawclient import RawClient


def fast(url: str) -> wsq.Client:
    return wsq.Client(url, backoff=lambda tries: 0.05)


async def test_waiting_tasks_survive_restart_in_fifo_order(data_dir: Path) -> None:
    async with wsq.Server(data_dir=data_dir, port=0) as server, fast(server.url) as c:
        for n in range(30):
            await c.queue("q").add(n)
    async with wsq.Server(data_dir=data_dir, port=0) as server, fast(server.url) as c:
        order: list[int] = []
        c.queue("q").process(lambda t: order.append(t.data))
        await eventually(lambda: len(order) == 30)
        assert order == list(range(30))


async def test_backlog_larger_than_the_window_survives_restart(data_dir: Path) -> None:
    async with wsq.Server(data_dir=data_dir, port=0, window=16) as server, fast(server.url) as c:
        await asyncio.gather(*(c.queue("deep").add(n) for n in range(300)))
    async with wsq.Server(data_dir=data_dir, port=0, window=16) as server, fast(server.url) as c:
        order: list[int] = []
        c.queue("deep").process(lambda t: order.append(t.data), concurrency=4)
        await eventually(lambda: len(order) == 300)
        assert sorted(order) == list(range(300))
        assert len(server.core._waiting) <= 16


async def test_active_task_survives_restart_and_its_report_is_accepted(data_dir: Path) -> None:
    port = free_port()
    release = asyncio.Event()
    started = asyncio.Event()

    async def handler(task: wsq.Task) -> None:
        started.set()
        await release.wait()

    server = wsq.Server(data_dir=data_dir, port=port)
    await server.start()
    async with fast(server.url) as worker_client, fast(server.url) as producer:
        queue = worker_client.queue("long")
        task = await producer.queue("long").add("x", timeout=30)
        worker_client.queue("long").process(handler)
        await asyncio.wait_for(started.wait(), budget(10))
        await server.close()
        server = wsq.Server(data_dir=data_dir, port=port)
        await server.start()
        try:
            [active] = await queue.active()
            assert active.id == task.id
            release.set()
            await eventually(lambda: queue.completed())
            assert await queue.failed() == []
        finally:
            await server.close()


async def test_worker_reconnect_keeps_its_run(server: wsq.Server) -> None:
    release = asyncio.Event()
    started = asyncio.Event()

    async def handler(task: wsq.Task) -> None:
        started.set()
        await release.wait()

    async with fast(server.url) as c:
        disconnected = asyncio.Event()
        c.on("disconnect", disconnected.set)
        queue = c.queue("drop")
        await queue.add(1, timeout=30)
        await queue.add(2, timeout=30)
        queue.process(handler, concurrency=1)
        await asyncio.wait_for(started.wait(), budget(10))
        for connection in list(server.connections.values()):
            await connection.ws.close()
        await asyncio.wait_for(disconnected.wait(), budget(10))
        await eventually(lambda: c.connected)
        # The running task still holds the worker's only slot after the reconnect.
        await asyncio.sleep(0.2)
        assert len(await queue.active()) == 1
        release.set()
        await eventually(lambda: completed_count_is(queue, 2))


async def test_a_worker_id_moves_to_the_client_s_new_connection(server: wsq.Server) -> None:
    """The client noticed a dead path first and came back while the server still holds the
    old connection: the new connection takes its worker over, runs included."""
    session = "client-session-0123456789"
    old = RawClient(server.url, session=session)
    new = RawClient(server.url, session=session)
    async with old, new, RawClient(server.url, session="another-session-0123456") as other:
        assert (await old.request({"op": "work", "queue": "mv", "worker": "w1"}))["op"] == (
            "result"
        )
        refused = await other.request({"op": "work", "queue": "mv", "worker": "w1"})
        assert refused["code"] == "invalid_argument"  # another client's worker: not its
        async with fast(server.url) as producer:
            first = await producer.queue("mv").add(1, timeout=30)
            offer = await old.expect("offer")
            assert offer["tasks"][0]["task"]["id"] == first.id
            run = offer["tasks"][0]["run"]
            answer = await new.request({"op": "work", "queue": "mv", "worker": "w1"})
            assert answer == {**answer, "op": "result", "result": {"worker": "w1"}}
            assert server.core.workers_of(new.welcome["connection"]) == ["w1"]
            assert server.core.workers_of(old.welcome["connection"]) == []
            # The run offered on the old connection is still the worker's: reported from
            # the new one, it completes.
            done = await new.request({"op": "complete", "task": first.id, "run": run})
            assert done["op"] == "result"
            second = await producer.queue("mv").add(2)
            offer = await new.expect("offer")
            assert offer["tasks"][0]["task"]["id"] == second.id
            # The old connection closing at last does not take the worker away.
            assert old.ws is not None
            await old.ws.close()
            await eventually(lambda: old.welcome["connection"] not in server.connections)
            assert server.core.workers_of(new.welcome["connection"]) == ["w1"]


async def test_calls_made_while_disconnected_wait(data_dir: Path) -> None:
    port = free_port()
    async with wsq.Server(data_dir=data_dir, port=port) as server:
        c = fast(server.url)
        await c.connect()
    try:
        await eventually(lambda: not c.connected)
        pending = asyncio.create_task(c.queue("later").add("hello"))
        await asyncio.sleep(0.2)
        assert not pending.done()
        async with wsq.Server(data_dir=data_dir, port=port):
            task = await asyncio.wait_for(pending, budget(10))
            assert task.state == "waiting"
            assert len(await c.queue("later").all()) == 1
    finally:
        await c.close()


async def numbered(count: int, seed: int) -> AsyncIterator[bytes]:
    for n in range(count):
        yield hashlib.sha256(f"{seed}:{n}".encode()).digest() * 2048


async def test_kill_9_loses_no_acknowledged_task_or_blob(data_dir: Path) -> None:
    def check_database() -> None:
        with contextlib.closing(sqlite3.connect(data_dir / "wsq.db")) as db:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)

    await kill_9_under_load(lambda: ServerProcess(data_dir).start(), check_database)


async def kill_9_under_load(
    start: Callable[[], Awaitable[ServerProcess]], killed: Callable[[], None] = lambda: None
) -> None:
    """Four producers add tasks (some with a blob) to the server ``start`` starts; once 300
    are acknowledged it gets kill -9 and ``killed`` runs; then ``start`` starts it again,
    and every acknowledged task must be there with its blob intact."""
    server = await start()
    acknowledged: dict[str, str] = {}

    async def produce(c: wsq.Client, worker: int) -> None:
        for n in range(10_000):
            data: dict[str, object] = {"worker": worker, "n": n}
            if n % 10 == 0:
                data["blob"] = numbered(8, n)
            task = await c.queue("crash").add(data)
            acknowledged[task.id] = f"{worker}:{n}"

    c = fast(server.url)
    await c.connect()
    producers = [asyncio.create_task(produce(c, w)) for w in range(4)]
    await eventually(lambda: len(acknowledged) >= 300, timeout=30)
    server.kill()
    # Adds in flight now wait for a reconnect (or fail, if they were uploading): stop them.
    for producer in producers:
        producer.cancel()
    await asyncio.gather(*producers, return_exceptions=True)
    await c.close()
    snapshot = dict(acknowledged)
    killed()

    server = await start()
    try:
        async with fast(server.url) as c2:
            stored = {t.id: t for t in await c2.queue("crash").all()}
            missing = set(snapshot) - set(stored)
            assert not missing, f"{len(missing)} acknowledged tasks lost"
            with_blobs = 0
            for task_id in snapshot:
                data = await stored[task_id].get_data()
                if "blob" in data:
                    with_blobs += 1
                    expected = b"".join([b async for b in numbered(8, data["n"])])
                    assert await data["blob"].read() == expected
            assert with_blobs > 0
    finally:
        server.stop()


async def test_sigterm_shuts_down_cleanly(data_dir: Path) -> None:
    server = await ServerProcess(data_dir).start()
    async with fast(server.url) as c:
        await c.queue("t").add(1)
    assert server.stop() == 0
    assert "wsq server stopped" in server.log.read_text()


async def test_server_drops_a_client_that_stops_answering_pings(data_dir: Path) -> None:
    async with (
        wsq.Server(data_dir=data_dir, port=0, heartbeat_interval=0.2) as server,
        proxy_to(server.url) as proxy,
        fast(server.url) as observer,
        fast(proxy.url) as victim,
    ):
        removed = asyncio.Event()
        observer.on("worker removed", lambda worker: removed.set())
        victim.queue("hb").process(lambda t: None)
        await eventually(lambda: server.core.queue_names() == ["hb"])
        proxy.blackhole()  # the path dies without a close: no pongs come back
        await asyncio.wait_for(removed.wait(), budget(5))


async def test_client_notices_a_frozen_server_and_reconnects(data_dir: Path) -> None:
    server = await ServerProcess(data_dir, None, "--heartbeat-interval", "0.2").start()
    try:
        async with fast(server.url) as c:
            disconnected = asyncio.Event()
            reconnected = asyncio.Event()
            c.on("disconnect", disconnected.set)
            c.on("connect", reconnected.set)
            await c.queue("hb").add(1)
            server.signal(signal.SIGSTOP)
            try:
                await asyncio.wait_for(disconnected.wait(), budget(5))
            finally:
                server.signal(signal.SIGCONT)
            await asyncio.wait_for(reconnected.wait(), budget(10))
            assert len(await c.queue("hb").all()) == 1
    finally:
        server.stop()


@pytest.mark.slow
async def test_one_gib_stream_round_trip_with_bounded_memory(data_dir: Path) -> None:
    psutil = pytest.importorskip("psutil")
    size = 1 << 30
    chunk = os.urandom(1 << 20)
    expected = hashlib.sha256()
    for n in range(size // len(chunk)):
        expected.update(n.to_bytes(8, "big") + chunk[8:])

    async def source() -> AsyncIterator[bytes]:
        for n in range(size // len(chunk)):
            yield n.to_bytes(8, "big") + chunk[8:]

    server = await ServerProcess(data_dir).start()
    server_proc = psutil.Process(server.pid)
    me = psutil.Process()
    peaks = {"server": 0, "client": 0}
    base_client = me.memory_info().rss

    async def sample() -> None:
        while True:
            peaks["server"] = max(peaks["server"], server_proc.memory_info().rss)
            peaks["client"] = max(peaks["client"], me.memory_info().rss - base_client)
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample())
    try:
        async with fast(server.url) as c:
            queue = c.queue("big")
            await queue.add({"blob": source()}, timeout=120)
            got = hashlib.sha256()
            received = 0

            async def handler(task: wsq.Task) -> None:
                nonlocal received
                async for part in task.data["blob"]:
                    got.update(part)
                    received += len(part)

            queue.process(handler)
            await eventually(lambda: queue.completed(), timeout=300)
            assert received == size
            assert got.hexdigest() == expected.hexdigest()
    finally:
        sampler.cancel()
        server.stop()
    assert peaks["server"] < 150 << 20, f"server peak RSS {peaks['server'] >> 20} MiB"
    assert peaks["client"] < 150 << 20, f"client RSS grew {peaks['client'] >> 20} MiB"


async def test_a_shared_storage_sweep_spares_other_servers_pending_blobs(tmp_path: Path) -> None:
    """Two servers on one ``--storage`` folder: a blob another server committed for an add
    it has not inserted yet is unreferenced here, and must survive this server's start-up
    sweep; an unreferenced blob older than the grace is an orphan and goes."""
    from wsq.blobs.files import FileBlobStore

    shared = tmp_path / "shared"
    other = FileBlobStore(shared)
    await other.open()
    pending = await other.create()
    await pending.write(b"another server's upload, its add not inserted yet")
    await pending.commit()
    orphan = await other.create()
    await orphan.write(b"left by a crash long ago")
    await orphan.commit()
    old = time.time() - 2 * 86400
    os.utime(shared / orphan.key[:2] / orphan.key, (old, old))
    uploading = await other.create()  # an upload still in progress there
    await uploading.write(b"half")
    storage = f"file://{shared}"
    async with wsq.Server(data_dir=tmp_path / "d", port=0, storage=storage) as server:
        assert server.sweep_grace == 86400
        await eventually(lambda: not (shared / orphan.key[:2] / orphan.key).exists())
        assert (shared / pending.key[:2] / pending.key).exists()
        assert (shared / "tmp" / uploading.key).exists()
    await uploading.abort()
    await other.close()


async def test_two_databases_cannot_share_one_storage(tmp_path: Path) -> None:
    """Each server would sweep the other's streams as orphans: the second is refused at
    start; the first starts again on the same storage (same database) as before."""
    storage = f"file://{tmp_path / 'shared'}"
    async with wsq.Server(data_dir=tmp_path / "a", port=0, storage=storage) as server:  # noqa: SIM117
        async with fast(server.url) as client:
            await client.queue("q").add({"blob": b"x" * 100_000})
    with pytest.raises(wsq.ServerError, match="another wsq database"):
        await wsq.Server(data_dir=tmp_path / "b", port=0, storage=storage).start()
    async with wsq.Server(data_dir=tmp_path / "a", port=0, storage=storage) as server:  # noqa: SIM117
        async with fast(server.url) as client:
            (task,) = await client.queue("q").waiting()
            assert len(await (await task.get_data())["blob"].read()) == 100_000


async def test_orphaned_blobs_are_swept_at_start(data_dir: Path) -> None:
    """A crash between storing an upload and inserting its task leaves an orphan blob."""
    from wsq.blobs.files import FileBlobStore

    async with wsq.Server(data_dir=data_dir, port=0) as server, fast(server.url) as c:
        task = await c.queue("keep").add({"blob": os.urandom(1 << 20)})
    store = FileBlobStore(data_dir / "blobs")
    await store.open()
    writer = await store.create()
    await writer.write(b"orphan")
    orphan = writer.key
    await writer.commit()
    await store.close()
    async with wsq.Server(data_dir=data_dir, port=0) as server, fast(server.url) as c:
        await eventually(lambda: not any(data_dir.rglob(orphan)))
        data = await wsq.Task(c, {"id": task.id, "queue": "keep"}).get_data()
        assert len(await data["blob"].read()) == 1 << 20
