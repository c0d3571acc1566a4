"""Several servers (nodes) on one PostgreSQL schema and one blob folder: any client may
use any node. Dispatch claims tasks in PostgreSQL; each node publishes its events with
its writes (NOTIFY), so observers on every node see every task's events, and idle
workers on other nodes hear of new tasks at once (no polling: the tests turn it off).

Nodes hold leases: a node killed with SIGKILL stops renewing its own, and another takes
its running tasks over, so their timeouts still hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

import wsq
from tests.conftest import budget, eventually
from tests.integration.procs import ServerProcess
from tests.integration.proxy import Proxy
from tests.integration.test_postgres_storage import rows
from tests.integration.test_s3_storage import (
    PREFIX,
    objects,
    stream_bytes,
    unfinished_uploads,
)
from tests.pg import Schema
from tests.s3emulator import MotoServer
from wsq.storage.postgres import PostgresStateStore

NO_POLL = 3600.0  # a node hears of others' tasks by notification only
LEASE = 1.0


@contextlib.asynccontextmanager
async def cluster(
    schema: Schema,
    tmp_path: Path,
    names: tuple[str, ...] = ("a", "b", "c"),
    dsn: str | None = None,
    storage: str | None = None,
) -> AsyncIterator[list[wsq.Server]]:
    """Nodes on the schema (through ``dsn`` when given: a proxy's address), their streams
    in ``storage`` (default: one folder for all, as S3 would be)."""
    storage = storage or (tmp_path / "blobs").as_uri()
    async with contextlib.AsyncExitStack() as stack:
        servers = []
        for name in names:
            store = PostgresStateStore(dsn or schema.dsn, node=name, lease=LEASE)
            server = wsq.Server(
                data_dir=tmp_path / name,
                port=0,
                state_store=store,
                storage=storage,
                node_name=name,
                heartbeat_interval=1.0,
            )
            server.core.poll_interval = NO_POLL
            servers.append(await stack.enter_async_context(server))
        yield servers


@contextlib.asynccontextmanager
async def client(server: wsq.Server) -> AsyncIterator[wsq.Client]:
    async with wsq.Client(server.url, backoff=lambda tries: 0.05) as c:
        yield c


async def test_a_task_added_on_one_node_runs_on_another_and_a_third_sees_it_all(
    pg_schema: Schema, tmp_path: Path
) -> None:
    async with (
        cluster(pg_schema, tmp_path) as (a, b, c),
        client(a) as producer,
        client(b) as worker,
        client(c) as observer,
    ):
        events: list[tuple[str, str]] = []
        for name in ("task added", "task queued", "task started", "task completed"):
            observer.queue("q").on(name, lambda task, *_, name=name: events.append((name, task.id)))
        await observer.stats()  # the subscription (sent before it) is in place
        done = asyncio.Event()
        ran: list[tuple[str, int | None]] = []

        async def handler(task: wsq.Task) -> str:
            ran.append((task.id, task.run))
            if len(ran) == 10:
                done.set()
            return "ok"

        worker.queue("q").process(handler, concurrency=3)
        await eventually(lambda: b.core.worker_counts().get("q") == 1)
        await asyncio.sleep(0.2)  # its first claim found nothing: it waits to be told
        tasks = [await producer.queue("q").add({"n": n}) for n in range(10)]
        await asyncio.wait_for(done.wait(), budget(10))
        assert sorted(ran) == sorted((task.id, 1) for task in tasks)  # each once, run 1
        want = [
            (name, task.id)
            for task in tasks
            for name in ("task added", "task queued", "task started", "task completed")
        ]
        await eventually(lambda: len(events) == len(want))
        assert sorted(events) == sorted(want)
        for task in tasks:  # each task's events in their order, on a node that saw none
            assert [name for name, tid in events if tid == task.id] == [
                "task added",
                "task queued",
                "task started",
                "task completed",
            ]
        # Stats on any node count every node's tasks.
        for node in (producer, worker, observer):
            [queue] = [q for q in await node.stats() if q["name"] == "q"]
            assert (queue["waiting"], queue["active"], queue["completed"]) == (0, 0, 10)
            assert "q" in [q.name for q in await node.list_queues()]
            # Its charts too: every node's history counts every node's tasks.
            history = await node.history("q")
            assert (sum(history["added"]), sum(history["completed"])) == (10, 10)


async def test_a_lone_node_publishes_again_once_another_starts(
    pg_schema: Schema, tmp_path: Path
) -> None:
    """A node alone (no other node alive) publishes nothing; a node that starts waits
    until it publishes again. Tasks added on the lone node, before and after, run on the
    new node's worker, and each node's observer sees the events of every task from the
    new node's start on, in order."""
    async with contextlib.AsyncExitStack() as stack:
        (a,) = await stack.enter_async_context(cluster(pg_schema, tmp_path, ("a",)))
        await eventually(lambda: a._alone)
        producer = await stack.enter_async_context(client(a))
        seen_a: list[tuple[str, str]] = []
        seen_b: list[tuple[str, str]] = []
        names = ("task added", "task started", "task completed")
        observer_a = await stack.enter_async_context(client(a))
        for name in names:
            observer_a.queue("q").on(name, lambda t, *_, n=name: seen_a.append((n, t.id)))
        await observer_a.stats()
        early = await producer.queue("q").add({"n": 0})  # told on a only
        await eventually(lambda: ("task added", early.id) in seen_a)

        store = PostgresStateStore(pg_schema.dsn, node="b", lease=LEASE)
        b = wsq.Server(data_dir=tmp_path / "b", port=0, state_store=store, node_name="b")
        b.core.poll_interval = NO_POLL
        await stack.enter_async_context(b)
        assert not a._alone  # b's start waited for a's answer
        observer_b = await stack.enter_async_context(client(b))
        for name in names:
            observer_b.queue("q").on(name, lambda t, *_, n=name: seen_b.append((n, t.id)))
        await observer_b.stats()
        late = await producer.queue("q").add({"n": 1})
        worker = await stack.enter_async_context(client(b))
        worker.queue("q").process(lambda task: None)
        for seen in (seen_a, seen_b):
            await eventually(lambda seen=seen: ("task completed", late.id) in seen)
            await eventually(lambda seen=seen: ("task completed", early.id) in seen)
            assert [n for n, tid in seen if tid == late.id] == list(names)
        assert [n for n, tid in seen_a if tid == early.id] == list(names)
        assert [n for n, tid in seen_b if tid == early.id] == ["task started", "task completed"]


async def test_a_starting_node_is_answered_at_once_not_at_the_lone_node_s_next_heartbeat(
    pg_schema: Schema, tmp_path: Path
) -> None:
    """A lone node renews its lease every fifth of it (here 12 s); a node that starts
    tells it so on the store's channel, and it answers at once: the start does not wait
    for that heartbeat."""
    lease = 60.0
    async with contextlib.AsyncExitStack() as stack:
        servers = []
        for name in ("a", "b"):
            store = PostgresStateStore(pg_schema.dsn, node=name, lease=lease)
            servers.append(
                wsq.Server(data_dir=tmp_path / name, port=0, state_store=store, node_name=name)
            )
        a, b = servers
        await stack.enter_async_context(a)
        await eventually(lambda: a._alone)
        started = time.monotonic()
        await stack.enter_async_context(b)
        assert time.monotonic() - started < 6  # a's next heartbeat was 12 s away
        assert not a._alone and not b._alone


async def test_a_lone_node_whose_lease_is_in_doubt_publishes_again(
    pg_schema: Schema, tmp_path: Path
) -> None:
    """PostgreSQL out of a lone node's reach: before its lease can run out (and another
    node start beside it unasked), it publishes again."""
    proxy = await Proxy(*pg_schema.address).start()
    try:
        async with cluster(
            pg_schema, tmp_path, ("a",), dsn=pg_schema.dsn_at("127.0.0.1", proxy.port)
        ) as (a,):
            await eventually(lambda: a._alone)
            proxy.refuse()
            await eventually(lambda: not a._alone, timeout=LEASE * 0.8)
            proxy.restore()
            await eventually(lambda: a._alone, timeout=budget(10))
    finally:
        await proxy.close()


async def test_workers_on_every_node_share_the_tasks_of_producers_on_every_node(
    pg_schema: Schema, tmp_path: Path
) -> None:
    async with cluster(pg_schema, tmp_path) as servers, contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(client(server)) for server in servers]
        ran: dict[str, list[str]] = {}
        total = 90

        async def work(node: str, task: wsq.Task) -> None:
            ran.setdefault(task.id, []).append(node)
            await asyncio.sleep(0.001)

        for node, c in zip("abc", clients, strict=True):
            c.queue("shared").process(lambda task, node=node: work(node, task), concurrency=4)
        for server in servers:
            await eventually(lambda server=server: server.core.worker_counts().get("shared"))

        async def produce(c: wsq.Client, count: int) -> list[Any]:
            return [await c.queue("shared").add(n) for n in range(count)]

        added = await asyncio.gather(*(produce(c, total // 3) for c in clients))
        ids = sorted(task.id for tasks in added for task in tasks)
        await eventually(lambda: len(ran) == total, timeout=30)
        assert sorted(ran) == ids
        assert all(len(nodes) == 1 for nodes in ran.values())  # none ran twice
        assert len({nodes[0] for nodes in ran.values()}) > 1  # the work was spread

        async def counted() -> bool:
            [queue] = [q for q in await clients[0].stats() if q["name"] == "shared"]
            return bool(queue["completed"] == total and queue["waiting"] == queue["active"] == 0)

        await eventually(counted)


async def test_stats_and_workers_on_any_node_list_every_node_s_workers(
    pg_schema: Schema, tmp_path: Path
) -> None:
    """Workers on a and b, an observer on c: c lists them all, each with its node, its
    client and peer, and the runs it holds; once a "worker added" or "worker removed"
    event reached c, c's listings agree with it; a worker that leaves is gone from them."""
    async with (
        cluster(pg_schema, tmp_path) as (a, b, c),
        client(a) as on_a,
        client(b) as on_b,
        client(c) as observer,
    ):
        seen: list[tuple[str, str]] = []
        for name in ("worker added", "worker removed"):
            observer.queue("listed").on(
                name, lambda worker, *_, name=name: seen.append((name, worker["id"]))
            )
        await observer.stats()  # the subscription (sent before it) is in place
        release = asyncio.Event()

        async def hold(task: wsq.Task) -> None:
            await task.update_progress(0.5)
            await release.wait()

        on_a.queue("listed").process(hold, concurrency=2)
        busy = on_b.queue("listed").process(hold)
        await eventually(lambda: len(seen) == 2)
        [stats] = [q for q in await observer.stats() if q["name"] == "listed"]
        assert sorted((w["node"], w["concurrency"], w["running"]) for w in stats["workers"]) == [
            ("a", 2, 0),
            ("b", 1, 0),
        ]
        task = await on_a.queue("listed").add(None)

        async def running() -> list[dict[str, Any]]:
            listed = await observer.workers("listed")
            return [w for w in listed if w["runs"] and w["runs"][0]["progress"] == 0.5]

        await eventually(running)
        [holder] = await running()
        assert holder["runs"][0]["task"] == task.id and holder["client"] == "wsq-python"
        assert holder["peer"].startswith("127.0.0.1:")
        everyone = await observer.workers()
        assert sorted(w["node"] for w in everyone) == ["a", "b"]
        assert {w["id"] for w in everyone} == {w["id"] for w in stats["workers"]}
        release.set()
        await busy.stop()
        await eventually(lambda: ("worker removed", busy.id) in seen)
        assert [w["node"] for w in await observer.workers("listed")] == ["a"]
        [stats] = [q for q in await observer.stats() if q["name"] == "listed"]
        assert [w["node"] for w in stats["workers"]] == ["a"]


async def test_a_stream_uploaded_through_one_node_is_read_through_another(
    pg_schema: Schema, tmp_path: Path
) -> None:
    blob = stream_bytes(3 << 20, seed=11)
    async with (
        cluster(pg_schema, tmp_path, ("a", "b")) as (a, b),
        client(a) as producer,
        client(b) as worker,
    ):
        seen: list[bytes] = []

        async def handler(task: wsq.Task) -> None:
            seen.append(await task.data["file"].read())

        worker.queue("files").process(handler)
        await producer.queue("files").add({"file": blob})
        await eventually(lambda: seen, timeout=20)
        assert seen == [blob]


@pytest.mark.parametrize("report", ["complete", "fail", "progress"])
async def test_a_worker_that_moves_to_another_node_keeps_its_runs(
    pg_schema: Schema, tmp_path: Path, report: str
) -> None:
    """The worker's connection to node b breaks while b stays up; its client moves to
    node a (its next address) and reports there: a takes the run over (b forgets it, so
    b's timers no longer end it), and the report is accepted, as after a restart."""
    async with cluster(pg_schema, tmp_path, ("a", "b")) as (a, b), client(a) as producer:
        proxy = await Proxy("127.0.0.1", b.port).start()
        try:
            async with wsq.Client([proxy.url, a.url], backoff=lambda tries: 0.05) as worker:
                events: list[tuple[str, str]] = []
                for name in ("task queued", "task started", "task completed", "task failed"):
                    producer.queue("moved").on(
                        name, lambda task, *_, name=name: events.append((name, task.id))
                    )
                running, finish = asyncio.Event(), asyncio.Event()
                runs: list[int | None] = []

                async def handler(task: wsq.Task) -> str:
                    runs.append(task.run)
                    running.set()
                    await finish.wait()
                    if report == "progress":
                        await task.update_progress(0.5)
                        return "after progress"
                    if report == "fail":
                        raise RuntimeError("no luck")
                    return "done"

                worker.queue("moved").process(handler)
                await eventually(lambda: b.core.worker_counts().get("moved") == 1)
                task = await producer.queue("moved").add(None, timeout=2.0, retries=0)
                await asyncio.wait_for(running.wait(), budget(10))
                assert b.core.lookup(task.id) is not None
                # Its ack has reached b (an ack lost with the connection is not sent
                # again: the run is then held as started, with no event, as after a
                # restart).
                await eventually(lambda: ("task started", task.id) in events)
                proxy.refuse()  # b is up, but the worker cannot reach it any more
                await eventually(lambda: a.url in str(worker.address))
                finish.set()
                end = "failed" if report == "fail" else "completed"

                async def ended() -> bool:
                    return [t.id for t in await getattr(producer.queue("moved"), end)()] == [
                        task.id
                    ]

                await eventually(ended)
                assert b.core.lookup(task.id) is None  # b heard that a holds it
                await asyncio.sleep(2.5)  # past the task timeout b's timer had
                [done] = await getattr(producer.queue("moved"), end)()
                failures = 1 if report == "fail" else 0
                assert (done.id, done.retries, runs) == (task.id, failures, [1])
                assert [e for e, _ in events] == ["task queued", "task started", f"task {end}"]
                [attempt] = await producer.attempts(task.id)
                assert attempt["outcome"] == end
        finally:
            await proxy.close()


async def test_the_end_of_a_run_another_node_took_over_is_told_to_no_one(
    pg_schema: Schema, tmp_path: Path
) -> None:
    """Node a ends a run (its worker completes it) that another node took over before a
    heard of it (here: the row moved under a's feet, as a takeover moves it): a's write
    does not apply, so neither a's observers nor b's hear of an end that did not happen."""
    async with (
        cluster(pg_schema, tmp_path, ("a", "b")) as (a, b),
        client(a) as worker,
        client(a) as here,
        client(b) as there,
    ):
        events: list[tuple[str, str, str]] = []
        for name, observer in (("a", here), ("b", there)):
            for event in ("task started", "task completed", "task failed", "task progress"):
                observer.queue("q").on(
                    event, lambda task, *_, e=event, n=name: events.append((n, e, task.id))
                )
            await observer.stats()  # the subscription (sent before it) is in place
        running, finish = asyncio.Event(), asyncio.Event()

        async def handler(task: wsq.Task) -> str:
            running.set()
            await finish.wait()
            with contextlib.suppress(wsq.WsqError):
                await task.update_progress(0.5)
            return "done"

        worker.queue("q").process(handler)
        task = await here.queue("q").add(None)
        await asyncio.wait_for(running.wait(), budget(10))
        started = [("a", "task started", task.id), ("b", "task started", task.id)]
        await eventually(lambda: sorted(events) == started)
        await pg_schema.execute(f"UPDATE wsq_tasks SET node = 'b' WHERE id = '{task.id}'")
        finish.set()
        await eventually(lambda: a.core.lookup(task.id) is None)  # a ended the run
        await asyncio.sleep(0.5)
        assert sorted(events) == started  # no progress, no completion told anywhere
        [row] = await pg_schema.fetch("SELECT state, node FROM wsq_tasks")
        assert tuple(row) == ("active", "b")


async def test_a_node_killed_mid_run_has_its_run_taken_over_and_the_worker_reports_to_the_heir(
    pg_schema: Schema, tmp_path: Path
) -> None:
    """Node b (a process of its own) is killed with SIGKILL while its worker runs a task.
    The worker's client moves to node a (its next address); a, once b's lease has run out,
    holds b's run, so the worker's report of run 1 is accepted there: completed once,
    with no attempt failed."""
    shared = tmp_path / "blobs"
    b = ServerProcess(
        tmp_path / "b",
        None,
        *("--database", pg_schema.dsn, "--node-name", "b", "--lease", str(LEASE)),
        *("--storage", shared.as_uri()),
    )
    await b.start()
    try:
        store = PostgresStateStore(pg_schema.dsn, node="a", lease=LEASE)
        async with (
            wsq.Server(
                data_dir=tmp_path / "a", port=0, state_store=store, storage=shared.as_uri()
            ) as a,
            wsq.Client([b.url, a.url], backoff=lambda tries: 0.05) as worker,
            client(a) as producer,
        ):
            a.core.poll_interval = NO_POLL
            running, finish = asyncio.Event(), asyncio.Event()
            runs: list[int | None] = []

            async def handler(task: wsq.Task) -> str:
                runs.append(task.run)
                running.set()
                await finish.wait()
                return "done"

            queue = worker.queue("killed")
            queue.process(handler)
            await eventually(lambda: b.url in str(worker.address))
            task = await producer.queue("killed").add(None, timeout=60)
            await asyncio.wait_for(running.wait(), budget(10))
            b.kill()
            await eventually(lambda: a.core.lookup(task.id) is not None)  # b's run, a's now
            await eventually(lambda: a.core.worker_counts().get("killed") == 1)
            finish.set()
            await eventually(lambda: producer.queue("killed").completed())
            [done] = await producer.queue("killed").completed()
            assert (done.id, done.retries, runs) == (task.id, 0, [1])
            assert await producer.queue("killed").failed() == []
    finally:
        b.kill()


async def test_nodes_killed_under_load_lose_nothing_and_complete_nothing_twice(
    pg_schema: Schema, tmp_path: Path, moto_server: MotoServer, bucket: str
) -> None:
    """Nodes b and c (processes of their own) are killed with SIGKILL in turn, twice each,
    and started again, while producers and workers connected to every node add and run
    tasks (every 8th with a stream of 3 MiB, every 24th of 9 MiB: a multipart upload)
    through S3 and an observer on node a watches. Then every acknowledged task is
    completed, once (in the store and in the events), no task is left waiting or active,
    every run that read a stream read it whole, and S3 holds no orphan: no unfinished
    upload, and no object but those of the tasks (none once they are removed)."""
    storage = f"s3://{bucket}/{PREFIX}"
    total = 96

    def node(name: str) -> ServerProcess:
        return ServerProcess(
            tmp_path / name,
            None,
            *("--database", pg_schema.dsn, "--node-name", name, "--lease", str(LEASE)),
            *("--storage", storage, "--heartbeat-interval", "0.5"),
        )

    b, c = node("b"), node("c")
    await b.start()
    await c.start()
    store = PostgresStateStore(pg_schema.dsn, node="a", lease=LEASE)
    try:
        async with (
            wsq.Server(data_dir=tmp_path / "a", port=0, state_store=store, storage=storage) as a,
            contextlib.AsyncExitStack() as stack,
        ):
            producers, workers, completed = await load_clients(stack, [a.url, b.url, c.url])
            expected: dict[str, str] = {}  # acknowledged task -> sha256 of its stream
            read_ok: list[bool] = []
            for worker in workers:
                worker.queue("load").process(checking(read_ok, pause=0.01), concurrency=3)

            await asyncio.wait_for(
                asyncio.gather(
                    kill_in_turn(expected, [(15, b), (35, c), (55, b), (75, c)]),
                    *(
                        produce(p, range(i, total, 3), expected, big=True)
                        for i, p in enumerate(producers)
                    ),
                ),
                budget(180),
            )
            assert len(expected) == total
            await each_once_and_no_orphan(
                pg_schema, moto_server, bucket, expected, completed, read_ok
            )
            for task in await producers[0].queue("load").completed():
                await task.remove()
            await eventually(lambda: objects(moto_server, bucket) == [], timeout=budget(30))
    finally:
        b.kill()
        c.kill()


async def test_a_node_killed_mid_upload_leaves_no_upload_and_no_object(
    pg_schema: Schema, tmp_path: Path, moto_server: MotoServer, bucket: str
) -> None:
    """Node b (a process of its own) is killed with SIGKILL while a producer's stream goes
    through it into S3 as a multipart upload. Once b's lease has run out, node a aborts
    the upload: nothing of it is left in the bucket, unfinished or whole."""
    storage = f"s3://{bucket}/{PREFIX}"
    # Longer than LEASE: a heartbeat of b's late on a loaded machine would have a sweep
    # b's upload while b is alive (as it must, once the lease has run out).
    lease = 3 * LEASE

    def uploads() -> list[str]:
        return unfinished_uploads(moto_server, bucket)

    b = ServerProcess(
        tmp_path / "b",
        None,
        *("--database", pg_schema.dsn, "--node-name", "b", "--lease", str(lease)),
        *("--storage", storage, "--heartbeat-interval", "0.5"),
    )
    await b.start()
    store = PostgresStateStore(pg_schema.dsn, node="a", lease=lease)
    stalled = asyncio.Event()
    try:
        async with (
            wsq.Server(data_dir=tmp_path / "a", port=0, state_store=store, storage=storage),
            wsq.Client(b.url, backoff=lambda tries: 0.05) as producer,
        ):

            async def stream() -> AsyncIterator[bytes]:
                for _ in range(10):  # more than a part: S3 holds an unfinished upload
                    yield stream_bytes(1 << 20, seed=3)
                await stalled.wait()  # never set: the node dies first

            adding = asyncio.ensure_future(producer.queue("big").add({"blob": stream()}))
            await eventually(lambda: len(uploads()) == 1, timeout=budget(30))
            (key,) = await pg_schema.fetch("SELECT key FROM wsq_blobs WHERE task IS NULL")
            assert uploads() == [f"{PREFIX}/{key[0]}"]
            b.kill()
            with pytest.raises(wsq.WsqError):
                await asyncio.wait_for(adding, budget(10))
            await eventually(lambda: uploads() == [], timeout=budget(30))
            assert objects(moto_server, bucket) == []
            assert await pg_schema.fetch("SELECT swept FROM wsq_blobs") == [(True,)]
    finally:
        b.kill()


async def test_postgres_away_under_load_loses_nothing_and_leaves_nothing_stuck(
    pg_schema: Schema, tmp_path: Path
) -> None:
    """Nodes a and b reach PostgreSQL through a proxy that refuses everything twice while
    producers and workers on both add and run tasks and an observer on a watches: once
    for less than a lease, once for longer (each node's lease runs out, and the first
    back takes the other's runs over). Adds and reports made meanwhile fail with
    unavailable and are made again by the clients. Then every acknowledged task is
    completed in the store, none is left active, and each was told completed once (events
    another node committed while a's listening connection was away come from wsq_records
    once it is back)."""
    total = 60
    proxy = await Proxy(*pg_schema.address).start()
    dsn = pg_schema.dsn_at("127.0.0.1", proxy.port)
    try:
        async with (
            cluster(pg_schema, tmp_path, ("a", "b"), dsn=dsn) as (a, b),
            contextlib.AsyncExitStack() as stack,
        ):
            for server in (a, b):
                server.core.poll_interval = 0.5  # a node may miss notifications meanwhile
            producers, workers, completed = await load_clients(stack, [a.url, b.url])
            expected: dict[str, str] = {}

            async def handler(task: wsq.Task) -> None:
                await asyncio.sleep(0.02)

            for worker in workers:
                worker.queue("load").process(handler, concurrency=3)

            async def outages() -> None:
                for at, seconds in ((15, 0.5), (35, LEASE * 2)):
                    await eventually(lambda at=at: len(expected) >= at, timeout=60)
                    proxy.refuse()
                    await asyncio.sleep(seconds)
                    proxy.restore()

            await asyncio.wait_for(
                asyncio.gather(
                    outages(),
                    *(produce(p, range(i, total, 2), expected) for i, p in enumerate(producers)),
                ),
                budget(120),
            )
            assert len(expected) == total

            try:
                await eventually(lambda: states_are(pg_schema, expected, "completed"), timeout=60)
            except AssertionError:
                unfinished = await pg_schema.fetch(
                    "SELECT id, state, run, node, worker FROM wsq_tasks WHERE state <> 'completed'"
                )
                left = [
                    (*row, [n.node_name for n in (a, b) if n.core.lookup(row[0])])
                    for row in unfinished
                ]
                raise AssertionError(f"not completed (and held by): {left}") from None
            await eventually(lambda: set(completed) >= set(expected))
            await asyncio.sleep(0.5)
            assert sorted(completed) == sorted(expected)  # each once
    finally:
        await proxy.close()


async def test_s3_away_under_load_loses_nothing_and_leaves_no_orphan(
    pg_schema: Schema,
    tmp_path: Path,
    moto_server: MotoServer,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Nodes a and b reach S3 through a proxy that refuses everything twice, for two
    seconds each, while producers and workers on both add and run tasks with streams of
    3 and 9 MiB. Adds with streams fail with unavailable meanwhile and are made again,
    reads fail and their runs are retried. Then every acknowledged task is completed once,
    every stream read whole, and S3 holds no orphan: uploads cut off by the outage are
    aborted once S3 is back, and no object is left but the tasks'."""
    proxy = await Proxy("127.0.0.1", moto_server.port).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    total = 48

    try:
        async with (
            cluster(pg_schema, tmp_path, ("a", "b"), storage=f"s3://{bucket}/{PREFIX}") as (a, b),
            contextlib.AsyncExitStack() as stack,
        ):
            producers, workers, completed = await load_clients(stack, [a.url, b.url])
            expected: dict[str, str] = {}
            read_ok: list[bool] = []  # a read fails while S3 is away: its run is retried
            for worker in workers:
                worker.queue("load").process(checking(read_ok), concurrency=3)

            async def outages() -> None:
                for at in (8, 24):
                    await eventually(lambda at=at: len(expected) >= at, timeout=60)
                    proxy.refuse()
                    await asyncio.sleep(2.0)
                    proxy.restore()

            await asyncio.wait_for(
                asyncio.gather(
                    outages(),
                    *(
                        produce(p, range(i, total, 2), expected, big=True)
                        for i, p in enumerate(producers)
                    ),
                ),
                budget(120),
            )
            assert len(expected) == total
            await each_once_and_no_orphan(
                pg_schema, moto_server, bucket, expected, completed, read_ok
            )
    finally:
        await proxy.close()


def checking(read_ok: list[bool], pause: float = 0.0) -> Callable[[wsq.Task], Awaitable[None]]:
    """A handler that reads a task's stream, if it has one, and appends to ``read_ok``
    whether its sha256 is the one the producer recorded."""

    async def handler(task: wsq.Task) -> None:
        if "blob" in task.data:
            got = await task.data["blob"].read()
            read_ok.append(hashlib.sha256(got).hexdigest() == task.data["sha"])
        await asyncio.sleep(pause)

    return handler


async def each_once_and_no_orphan(
    schema: Schema,
    moto_server: MotoServer,
    bucket: str,
    expected: dict[str, str],
    completed: list[str],
    read_ok: list[bool],
) -> None:
    """Every acknowledged task (``expected``: id -> sha256 of its stream, every eighth
    one has a stream) completed, each once; every stream read whole; S3 holds no orphan
    and one object per stream."""
    await eventually(lambda: states_are(schema, expected, "completed"), timeout=60)
    await eventually(lambda: set(completed) >= set(expected))
    assert sorted(completed) == sorted(expected)  # each once
    assert read_ok and all(read_ok)
    await eventually(lambda: no_orphan(schema, moto_server, bucket), timeout=budget(30))
    assert len(objects(moto_server, bucket)) == len(expected) // 8


async def no_orphan(schema: Schema, moto_server: MotoServer, bucket: str) -> bool:
    """Whether S3 holds no unfinished upload and no object but the stored tasks' blobs."""
    referenced = await schema.fetch("SELECT key FROM wsq_blobs WHERE task IS NOT NULL")
    blobs = {f"{PREFIX}/{key}" for (key,) in referenced}
    unfinished = unfinished_uploads(moto_server, bucket)
    return unfinished == [] and set(objects(moto_server, bucket)) == blobs


async def produce(
    producer: wsq.Client, numbers: range, expected: dict[str, str], big: bool = False
) -> None:
    """Add a task per number (every 8th with a 1 MiB stream; ``big``: 3 MiB, and 9 MiB
    every 24th), recording each acknowledged one with its stream's sha256. An add cut off
    by a kill is added again, with its id."""
    for n in numbers:
        data: dict[str, Any] = {"n": n}
        if n % 8 == 0:
            size = (9 if n % 24 == 0 else 3) if big else 1
            blob = stream_bytes(size << 20, seed=n)
            data |= {"blob": blob, "sha": hashlib.sha256(blob).hexdigest()}
        for _ in range(60):  # 6 s: a kill, or PostgreSQL away for two leases
            try:
                # The same id each time: an add cut off after the server stored it is
                # answered as that task, never made twice.
                task = await producer.queue("load").add(
                    data, timeout=3.0, retries=-1, id=f"load-{n}"
                )
                break
            except wsq.WsqError:
                await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"task {n} could not be added")
        expected[task.id] = data.get("sha", "")


async def kill_in_turn(expected: dict[str, str], plan: list[tuple[int, ServerProcess]]) -> None:
    """Once ``at`` tasks are acknowledged, kill -9 the node, and start it again once its
    lease has run out."""
    for at, victim in plan:
        await eventually(lambda at=at: len(expected) >= at, timeout=60)
        victim.kill()
        await asyncio.sleep(LEASE * 1.5)
        await victim.start()


async def load_clients(
    stack: contextlib.AsyncExitStack, urls: list[str]
) -> tuple[list[wsq.Client], list[wsq.Client], list[str]]:
    """A producer and a worker client per node (each with every node's address, its own
    first), and the ids an observer on the first node is told completed, in order."""
    rotations = [urls[i:] + urls[:i] for i in range(len(urls))]
    producers = [
        await stack.enter_async_context(wsq.Client(r, backoff=lambda t: 0.05)) for r in rotations
    ]
    workers = [
        await stack.enter_async_context(wsq.Client(r, backoff=lambda t: 0.05)) for r in rotations
    ]
    observer = await stack.enter_async_context(wsq.Client(urls[0], backoff=lambda t: 0.05))
    completed: list[str] = []
    observer.queue("load").on("task completed", lambda task: completed.append(task.id))
    await observer.stats()  # the subscription (sent before it) is in place
    return producers, workers, completed


async def states_are(schema: Schema, expected: dict[str, str], state: str) -> bool:
    """Whether every task in ``expected``, and no other, is stored in ``state``."""
    found = await rows(schema)
    return set(found) == set(expected) and set(found.values()) == {state}
