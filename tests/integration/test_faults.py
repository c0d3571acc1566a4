"""Fault injection on loopback: a server killed under load, a worker process killed
mid-task, and a network path that dies silently under a working worker.

Every test is bounded (each wait has a :func:`budget`) and asserts outcomes, not speed.
Handler execution in wsq is at least once: a run can be handed out again around a crash
or a timeout, so the tests count executions and assert on what the store ends up with.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import signal
import sqlite3
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import wsq
from tests.conftest import budget, eventually
from tests.integration.procs import ServerProcess
from tests.integration.proxy import proxy_to

SEED = int(os.environ.get("WSQ_FAULT_SEED", "20240607"))
INLINE_MAX = 64 << 10


def fast(url: str) -> wsq.Client:
    return wsq.Client(url, backoff=lambda tries: 0.05)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def settle(check: Any, timeout: float) -> None:
    """Like :func:`eventually`, but returns on timeout: the caller asserts with details."""
    with contextlib.suppress(AssertionError):
        await eventually(check, timeout=timeout)


# -- 1. kill -9 of the server under load ---------------------------------------------------


class Load:
    """Producers and workers on their own clients, and what they saw."""

    queue = "load"

    def __init__(self, url: str) -> None:
        self.url = url
        self.acked: dict[str, str] = {}  # task id -> sha256 of its stream, once add() returned
        self.executions: dict[str, list[tuple[int | None, str]]] = {}  # id -> (run, sha256)
        self.completed_events: Counter[str] = Counter()
        self.disconnects: Counter[int] = Counter()
        self.stop_adding = asyncio.Event()
        self.clients: list[wsq.Client] = []

    def client(self) -> wsq.Client:
        c = fast(self.url)
        index = len(self.clients)
        c.on("disconnect", lambda: self.disconnects.update([index]))
        self.clients.append(c)
        return c

    def acked_at_least(self, count: int) -> Callable[[], bool]:
        return lambda: len(self.acked) >= count

    async def produce(self, c: wsq.Client, producer: int) -> None:
        """Up to 75 adds, paced; a third carry 100-300 KiB (uploaded), the rest 1-4096
        bytes (inline). Each add is retried with the same id until acknowledged."""
        prng = random.Random(f"{SEED}-{producer}")
        queue = c.queue(self.queue)
        for n in range(75):
            if self.stop_adding.is_set():
                return
            size = prng.randint(100 << 10, 300 << 10) if n % 3 == 0 else prng.randint(1, 4096)
            blob = prng.randbytes(size)
            task_id = f"p{producer}-{n}"
            while True:
                try:
                    # Sent again after a lost connection with the same id, it answers the
                    # existing task if the first attempt was stored.
                    task = await queue.add(
                        {"producer": producer, "n": n, "blob": blob},
                        timeout=budget(3.0),
                        retries=5,
                        id=task_id,
                    )
                    break
                except wsq.ConnectionLost:
                    # Only an add whose blob was uploading raises this; others wait.
                    assert size > INLINE_MAX
                    await asyncio.sleep(0.02)
            assert task.id == task_id
            self.acked[task_id] = sha256(blob)
            await asyncio.sleep(prng.uniform(0.03, 0.07))

    async def handle(self, task: wsq.Task) -> None:
        stream = task.data["blob"]
        while True:
            try:
                content = await stream.read()
                break
            except wsq.ConnectionLost:
                # A stream belongs to its connection (issue 9): get the data again, on
                # the next connection (get_data waits for it), and read from the start.
                await asyncio.sleep(0.02)
                stream = (await task.get_data())["blob"]
        assert len(content) == stream.size
        self.executions.setdefault(task.id, []).append((task.run, sha256(content)))

    async def drained(self) -> bool:
        if not set(self.acked) <= set(self.executions):
            return False
        return len(await self.clients[0].queue(self.queue).completed()) >= len(self.acked)


async def check_load_outcome(load: Load) -> None:
    queue = load.clients[0].queue(load.queue)
    everything = await queue.all()
    ids = Counter(t.id for t in everything)
    assert [i for i, count in ids.items() if count > 1] == [], "duplicate task records"
    missing = set(load.acked) - set(ids)
    assert not missing, f"{len(missing)} acknowledged tasks lost: {sorted(missing)[:5]}"
    assert set(ids) == set(load.acked), f"unacknowledged extras: {set(ids) - set(load.acked)}"
    states = Counter(t.state for t in everything)
    assert states == {"completed": len(load.acked)}, f"seed {SEED}: {states}"
    assert sorted(t.id for t in await queue.completed()) == sorted(load.acked)
    assert await queue.waiting() == [] and await queue.active() == []
    assert await queue.failed() == []
    # Handlers run at least once: every acknowledged task was executed, and every
    # execution read exactly the bytes its producer sent. A repeat around a crash is
    # allowed (a run offered but not yet recorded is offered again after the restart).
    assert set(load.executions) == set(load.acked)
    bad = [i for i, runs in load.executions.items() if any(h != load.acked[i] for _, h in runs)]
    assert not bad, f"streams read back wrong: {bad[:5]}"
    # The store moves a task to completed once, and the event goes out only after that
    # write is durable: no completion is announced twice (one may be lost in a crash).
    assert max(load.completed_events.values()) == 1
    assert set(load.completed_events) <= set(load.acked)


async def test_server_killed_under_load_loses_and_duplicates_nothing(data_dir: Path) -> None:
    """8 producers add tasks while 4 workers (concurrency 2) read and hash each task's
    stream; the server is killed with SIGKILL 3 times at seeded random moments and
    restarted on the same port and data dir. Every acknowledged add must end completed
    exactly once, and every execution must have read the bytes that were sent."""
    rng = random.Random(SEED)
    server = await ServerProcess(data_dir).start()
    load = Load(server.url)
    try:
        observer = load.client()
        observer.queue(load.queue).on(
            "task completed", lambda t: load.completed_events.update([t.id])
        )
        worker_clients = [load.client() for _ in range(4)]
        producer_clients = [load.client() for _ in range(8)]
        for c in load.clients:
            await c.connect()
        workers = [c.queue(load.queue).process(load.handle, concurrency=2) for c in worker_clients]
        producers = [
            asyncio.create_task(load.produce(c, p)) for p, c in enumerate(producer_clients)
        ]

        for _ in range(3):
            # Load runs (again) before each kill: adds are being acknowledged.
            await eventually(load.acked_at_least(len(load.acked) + 10), timeout=15)
            await asyncio.sleep(rng.uniform(0.3, 1.0))
            assert not any(p.done() for p in producers), "load ended before the kill"
            server.kill()
            await asyncio.sleep(rng.uniform(0.0, 0.3))
            await server.start()
            await eventually(lambda: all(c.connected for c in load.clients), timeout=15)

        await asyncio.sleep(rng.uniform(0.3, 1.0))
        load.stop_adding.set()
        results = await asyncio.wait_for(
            asyncio.gather(*producers, return_exceptions=True), budget(20)
        )
        assert [r for r in results if r is not None] == []
        # Paced to ~300-500 adds here; the floor only guards against a load that stalled.
        assert 100 <= len(load.acked) <= 600, len(load.acked)

        await settle(load.drained, timeout=15)
        for worker in workers:
            await asyncio.wait_for(worker.stop(), budget(10))
        await check_load_outcome(load)
        # Every client was connected at every kill, and noticed it.
        assert load.disconnects == Counter(dict.fromkeys(range(len(load.clients)), 3))
    finally:
        for c in load.clients:
            await c.close()
        if server.proc is not None and server.proc.poll() is None:
            assert server.stop() == 0
        server.kill()

    with contextlib.closing(sqlite3.connect(data_dir / "wsq.db")) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


# -- 2. a worker process killed mid-task ---------------------------------------------------

WORKER_SCRIPT = """
import asyncio, sys
import pytest

import wsq

async def main() -> None:
    client = wsq.Client(sys.argv[1], backoff=lambda tries: 0.05)
    await client.connect()

    async def handler(task: wsq.Task) -> None:
        print("started", task.id, task.run, flush=True)
        while True:  # alive and reporting until killed
            await asyncio.sleep(0.1)
            await task.touch()

    worker = client.queue(sys.argv[2]).process(handler)
    print("ready", worker.id, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_worker_process_killed_mid_task_is_retried_elsewhere(
    data_dir: Path, tmp_path: Path
) -> None:
    """A worker in a subprocess starts a task and is SIGKILLed. The server drops the worker
    at once but keeps the run until the task timeout; then the attempt fails ("Timed
    out."), the task is queued again and a second worker completes it as run 2."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER_SCRIPT)
    timeout = budget(1.5)
    async with wsq.Server(data_dir=data_dir, port=0, heartbeat_interval=1.0) as server:
        observer = fast(server.url)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(script), server.url, "jobs", stdout=asyncio.subprocess.PIPE
        )
        try:
            await observer.connect()
            removed: list[str] = []
            failed: list[tuple[str | None, int, bool]] = []
            added: list[str] = []
            observer.on("worker added", lambda w: added.append(w["id"]))
            observer.on("worker removed", lambda w: removed.append(w["id"]))
            observer.on("task failed", lambda t, again: failed.append((t.error, t.retries, again)))

            async def line() -> list[str]:
                assert proc.stdout is not None
                raw = await asyncio.wait_for(proc.stdout.readline(), budget(20))
                return raw.decode().split()

            ready, far_worker = await line()
            assert ready == "ready"
            queue = observer.queue("jobs")
            task = await queue.add("payload", timeout=timeout, retries=1)
            assert await line() == ["started", task.id, "1"]

            runs: list[int | None] = []
            async with fast(server.url) as near:
                near_worker = near.queue("jobs").process(lambda t: runs.append(t.run))
                await eventually(lambda: near_worker.id in added)
                proc.send_signal(signal.SIGKILL)
                assert await asyncio.wait_for(proc.wait(), budget(10)) == -signal.SIGKILL

                await eventually(lambda: far_worker in removed)
                # The dead worker's run is kept until it times out: still active now.
                [active] = await queue.active()
                assert active.id == task.id and active.worker == far_worker
                assert runs == []

                await eventually(lambda: runs, timeout=10)
                await eventually(lambda: queue.completed())
                assert removed == [far_worker]
                await near_worker.stop()
            assert runs == [2]
            assert failed == [("Timed out.", 1, True)]
            [done] = await queue.all()
            assert (done.id, done.state, done.retries) == (task.id, "completed", 1)
            assert done.worker == near_worker.id
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await observer.close()


# -- 3. a network path that dies without a FIN or RST --------------------------------------
#
# What happens in wsq, measured with heartbeat 0.2 s on both ends: nothing moves on the
# path, so each end's heartbeat misses its pong for 3 intervals and starts a closing
# handshake, which cannot finish either; after the close timeout (2 s) that end drops its
# TCP connection, and the proxy passes the drop on to the other end. So the client sees
# 'disconnect' and the server removes the worker about 3 s after the blackhole, in either
# order. The client then opens a new connection at once (no backoff after a session); here
# the path comes back just then (the 'disconnect' handler restores the proxy), because a
# handshake sent into the blackhole would hang for the client's 10 s open timeout. The old
# connection stays dead; the new one registers the worker again with the same id.


class Victim:
    """A worker client connected through a proxy, and what it went through."""

    def __init__(self, url: str, on_disconnect: Callable[[], None]) -> None:
        self.client = fast(url)
        self.connects = 0
        self.disconnects: list[float] = []
        self.errors: list[BaseException] = []
        self._on_disconnect = on_disconnect
        self.client.on("connect", self._connected)
        self.client.on("disconnect", self._disconnected)
        self.client.on("error", self.errors.append)

    def _connected(self) -> None:
        self.connects += 1

    def _disconnected(self) -> None:
        self.disconnects.append(_now())
        self._on_disconnect()


class Observer:
    """A direct client recording a queue's events."""

    def __init__(self, url: str) -> None:
        self.client = fast(url)
        self.added: list[str] = []
        self.removed: list[str] = []
        self.failed: list[tuple[str | None, int, bool]] = []
        self.completed: list[tuple[str, int]] = []
        self.client.on("worker added", lambda w: self.added.append(w["id"]))
        self.client.on("worker removed", lambda w: self.removed.append(w["id"]))
        self.client.on(
            "task failed", lambda t, again: self.failed.append((t.error, t.retries, again))
        )
        self.client.on("task completed", lambda t: self.completed.append((t.id, t.retries)))


def _now() -> float:
    return asyncio.get_running_loop().time()


async def test_blackholed_worker_reconnects_and_keeps_its_run(data_dir: Path) -> None:
    """The path dies while the handler reports progress, for less than the task timeout:
    both ends notice and drop the connection, the run stays active on the server, the
    handler's pending progress report is sent again on the new connection and accepted,
    and the same run completes (no failure, no second execution)."""
    async with (
        wsq.Server(data_dir=data_dir, port=0, heartbeat_interval=0.2) as server,
        proxy_to(server.url) as proxy,
    ):
        observer = Observer(server.url)
        victim = Victim(proxy.url, proxy.restore)
        progressed: list[float] = []  # when each update_progress call returned
        runs: list[int | None] = []
        finish = asyncio.Event()

        async def handler(task: wsq.Task) -> None:
            runs.append(task.run)
            step = 0
            while not finish.is_set():
                step += 1
                await task.update_progress(min(step / 1000, 1.0))
                progressed.append(_now())
                await asyncio.sleep(0.05)

        try:
            await observer.client.connect()
            await victim.client.connect()
            queue = observer.client.queue("bh")
            worker = victim.client.queue("bh").process(handler)
            task = await queue.add("x", timeout=budget(30))
            await eventually(lambda: len(progressed) >= 3)

            proxy.blackhole()
            cut = _now()
            await eventually(lambda: victim.disconnects and worker.id in observer.removed)
            # Nothing was answered during the outage: the handler sat in update_progress.
            assert [t for t in progressed if cut + 0.2 < t < victim.disconnects[0]] == []
            # The run outlived the connection: still active, held by this worker.
            [active] = await queue.active()
            assert (active.id, active.worker, active.retries) == (task.id, worker.id, 0)

            await eventually(lambda: victim.connects == 2 and observer.added.count(worker.id) == 2)
            resumed = len(progressed)
            await eventually(lambda: len(progressed) >= resumed + 3)
            finish.set()
            await eventually(lambda: observer.completed)

            assert observer.completed == [(task.id, 0)]
            assert observer.failed == []
            assert runs == [1]
            assert victim.errors == []
            assert len(victim.disconnects) == 1
            [done] = await queue.all()
            assert (done.state, done.retries, done.worker) == ("completed", 0, worker.id)
            await worker.stop()
        finally:
            await victim.client.close()
            await observer.client.close()


async def test_blackholed_worker_whose_run_times_out_gets_the_task_again(
    data_dir: Path,
) -> None:
    """The path dies for longer than the task timeout (0.5 s). On the server, in order:
    run 1 times out ("Timed out.") during the outage and the task is offered again to the
    same worker, which is still registered: that offer (run 2) goes into the dead path and
    is lost. When the client reconnects, its re-sent progress report for run 1 is refused
    (StaleRun, raised in the handler; its failure report is refused too, emitted as
    'error'), and the lost run 2 keeps the worker's one slot until the worker timeout
    ("Worker <id> didn't respond."). Run 3 is offered on the new connection and completes:
    2 failed attempts, 2 executions (runs 1 and 3)."""
    worker_timeout = budget(4.0)  # > the ~3 s until the server drops the dead connection
    async with (
        wsq.Server(
            data_dir=data_dir, port=0, heartbeat_interval=0.2, worker_timeout=worker_timeout
        ) as server,
        proxy_to(server.url) as proxy,
    ):
        observer = Observer(server.url)
        victim = Victim(proxy.url, proxy.restore)
        runs: list[int | None] = []
        refused: list[tuple[int | None, BaseException]] = []
        running = asyncio.Event()

        async def handler(task: wsq.Task) -> None:
            runs.append(task.run)
            if task.run != 1:
                return  # well inside the 0.5 s timeout even on a loaded machine
            for step in range(1, 10_001):  # run 1 reports until it is refused
                try:
                    await task.update_progress(step / 10_000)
                except wsq.StaleRun as exc:
                    refused.append((task.run, exc))
                    raise
                running.set()
                await asyncio.sleep(0.05)

        try:
            await observer.client.connect()
            await victim.client.connect()
            queue = observer.client.queue("bh")
            worker = victim.client.queue("bh").process(handler)
            task = await queue.add("x", timeout=0.5, retries=5)
            await asyncio.wait_for(running.wait(), budget(10))

            proxy.blackhole()
            await eventually(lambda: observer.failed)
            # The run timed out while the worker was still registered (not yet noticed).
            assert observer.failed == [("Timed out.", 1, True)]
            assert victim.disconnects == [] and worker.id not in observer.removed

            await eventually(lambda: victim.disconnects and worker.id in observer.removed)
            await eventually(lambda: victim.connects == 2 and observer.added.count(worker.id) == 2)
            await eventually(lambda: refused and victim.errors)
            assert [(run, type(exc)) for run, exc in refused] == [(1, wsq.StaleRun)]
            assert [type(exc) for exc in victim.errors] == [wsq.StaleRun]

            await eventually(lambda: observer.completed, timeout=14)
            assert observer.failed == [
                ("Timed out.", 1, True),
                (f"Worker {worker.id} didn't respond.", 2, True),
            ]
            assert observer.completed == [(task.id, 2)]
            assert runs == [1, 3]
            assert len(victim.errors) == 1 and len(victim.disconnects) == 1
            [done] = await queue.all()
            assert (done.state, done.retries, done.worker) == ("completed", 2, worker.id)
            await worker.stop()
        finally:
            await victim.client.close()
            await observer.client.close()


async def test_an_add_whose_connection_dropped_after_its_upload_is_connection_lost(
    server: wsq.Server,
) -> None:
    """The uploads went to a connection that is gone (and the server dropped its streams
    with it): the add is not sent on the next connection naming streams that no longer
    exist (the server would refuse it as invalid), it raises ConnectionLost, which a
    producer retries."""
    async with proxy_to(server.url) as proxy:
        client = wsq.Client(proxy.url, backoff=lambda tries: 0.05)
        await client.connect()
        upload_all = client._upload_all

        async def then_drop(found: Any) -> Any:
            streams = await upload_all(found)
            generation = client._generation
            proxy.drop()
            await eventually(lambda: client._generation > generation and client.connected)
            return streams

        client._upload_all = then_drop  # type: ignore[method-assign]
        try:
            with pytest.raises(wsq.ConnectionLost):
                await client.queue("up").add({"blob": b"x" * (200 << 10)})
            client._upload_all = upload_all  # type: ignore[method-assign]
            task = await client.queue("up").add({"blob": b"y" * (200 << 10)})
            assert task.state == "waiting"
        finally:
            await client.close()


async def test_an_add_whose_stream_source_stalls_fails_when_the_connection_drops(
    server: wsq.Server,
) -> None:
    """An async iterable source that has not yielded its next piece does not hold the add
    once the connection is gone: it raises ConnectionLost at once, and the source is
    closed."""
    closed = asyncio.Event()

    async def stalled() -> Any:
        try:
            yield b"x" * 1000
            await asyncio.Event().wait()  # never yields again
        finally:
            closed.set()

    async with (
        proxy_to(server.url) as proxy,
        wsq.Client(proxy.url, backoff=lambda tries: 0.05) as client,
    ):
        adding = asyncio.ensure_future(client.queue("up").add({"blob": stalled()}))
        await eventually(lambda: client._uploads != {})
        proxy.drop()
        with pytest.raises(wsq.ConnectionLost):
            await asyncio.wait_for(adding, budget(5))
        assert closed.is_set()


# -- 5. a slow link to a worker --------------------------------------------------------------


async def test_offers_on_a_slow_link_are_not_timed_out_while_they_arrive(data_dir: Path) -> None:
    """A worker behind a slow link is offered more bytes of task data than the link
    carries within the worker timeout (1 s): its offers take seconds to arrive, and the
    link keeps carrying them. No run times out unacknowledged, the worker is not dropped
    as a slow consumer, and each task runs once. (The timeout counted from the offer:
    runs failed with "didn't respond" while their bytes were still on their way.) The
    offers come in messages of about 1 MiB: one of them all would keep the worker from
    hearing anything for longer than three heartbeat intervals."""
    count, size = 24, 400_000  # 9.6 MB of data at 2 MB/s: about 5 s on the link
    async with (
        wsq.Server(data_dir=data_dir, port=0, heartbeat_interval=1.0) as server,
        proxy_to(server.url, down_rate=2_000_000) as proxy,
    ):
        observer = Observer(server.url)
        worker_client = wsq.Client(proxy.url)
        ran: Counter[str] = Counter()
        disconnects: list[Any] = []
        worker_client.on("disconnect", lambda *args: disconnects.append(args))

        def handler(task: wsq.Task) -> None:
            ran[task.id] += 1

        try:
            await observer.client.connect()
            await worker_client.connect()
            queue = observer.client.queue("slow-link")
            added = await queue.add_many(["x" * size] * count)
            worker = worker_client.queue("slow-link").process(handler, concurrency=count)
            await settle(lambda: len(observer.completed) == count, budget(60))
            assert observer.failed == []
            assert disconnects == []
            assert sorted(ran) == sorted(task.id for task in added)
            assert set(ran.values()) == {1}
            assert sorted(observer.completed) == sorted((task.id, 0) for task in added)
            await worker.stop()
        finally:
            await worker_client.close()
            await observer.client.close()


async def test_an_upload_on_a_slow_link_is_not_taken_for_a_dead_connection(
    data_dir: Path,
) -> None:
    """A client uploads a stream over a slow link: its socket holds seconds of data, and
    the pongs (of both ends' heartbeats) wait behind them past three heartbeat intervals;
    each chunk (1 MiB) takes longer than that to arrive, and so does the server's credit
    for it. Neither end drops the connection while the link carries the upload (they
    did: "No pong", and the add failed with connection_lost); the stream arrives whole."""
    blob = os.urandom(3_000_000)  # 5 s at 600 KB/s; the heartbeat gives up after 1.5 s
    async with (
        wsq.Server(data_dir=data_dir, port=0, heartbeat_interval=0.5) as server,
        proxy_to(server.url, up_rate=600_000) as proxy,
    ):
        producer = wsq.Client(proxy.url)
        reader = wsq.Client(server.url)
        disconnects: list[Any] = []
        producer.on("disconnect", lambda *args: disconnects.append(args))
        try:
            await producer.connect()
            await reader.connect()
            task = await asyncio.wait_for(producer.queue("up").add({"f": blob}), budget(60))
            assert disconnects == []
            [stored] = [t for t in await reader.queue("up").all() if t.id == task.id]
            data = await stored.get_data()
            assert sha256(await data["f"].read()) == sha256(blob)
        finally:
            await producer.close()
            await reader.close()


async def test_a_download_on_a_slow_link_is_not_taken_for_a_dead_connection(
    data_dir: Path,
) -> None:
    """The same towards a worker: it reads a stream over a slow link, whose chunks hold
    the pings and pongs back. The run completes once, the stream read whole."""
    blob = os.urandom(4_000_000)  # 7 s at 600 KB/s; a chunk (1 MiB) arrives every 1.7 s
    async with (
        wsq.Server(data_dir=data_dir, port=0, heartbeat_interval=1.0) as server,
        proxy_to(server.url, down_rate=600_000) as proxy,
    ):
        observer = Observer(server.url)
        worker_client = wsq.Client(proxy.url)
        disconnects: list[Any] = []
        worker_client.on("disconnect", lambda *args: disconnects.append(args))
        read: list[str] = []

        async def handler(task: wsq.Task) -> None:
            read.append(sha256(await task.data["f"].read()))

        try:
            await observer.client.connect()
            await worker_client.connect()
            task = await observer.client.queue("down").add({"f": blob}, timeout=budget(60))
            worker = worker_client.queue("down").process(handler)
            await settle(lambda: observer.completed or observer.failed, budget(60))
            assert observer.failed == []
            assert observer.completed == [(task.id, 0)]
            assert read == [sha256(blob)]
            assert disconnects == []
            await worker.stop()
        finally:
            await worker_client.close()
            await observer.client.close()


async def test_a_client_closed_while_it_reconnects_stops(server: wsq.Server) -> None:
    """close() lands at any point of a reconnection (the path was cut a moment before):
    it returns, and no session goes on behind it. (Once in CI it waited for good: on
    Python 3.11 wait_for() may swallow a cancel that comes as its connect completes, and
    the client then ran the new session although closed.)"""
    rng = random.Random(SEED)
    async with proxy_to(server.url) as proxy:
        for _ in range(30):
            client = wsq.Client(proxy.url, backoff=lambda tries: 0.0)
            await client.connect()
            proxy.drop()
            await asyncio.sleep(rng.uniform(0, 0.01))
            await asyncio.wait_for(client.close(), budget(10))
            assert client._ws is None
