"""Several servers (nodes) on one PostgreSQL schema and one blob folder: any client may
use any node. Dispatch claims tasks in PostgreSQL; each node publishes its events with
its writes (NOTIFY), so observers on every node see every task's events, and idle
workers on other nodes hear of new tasks at once (no polling: the tests turn it off).

Until takeover of a dead node's runs is built, a shared schema needs
``PostgresStateStore(exclusive=False)``; a server started with ``--database`` still
refuses a second one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import wsq
from tests.conftest import budget, eventually
from tests.integration.test_s3_storage import stream_bytes
from tests.pg import Schema
from wsq.storage.postgres import PostgresStateStore

NO_POLL = 3600.0  # a node hears of others' tasks by notification only


@contextlib.asynccontextmanager
async def cluster(
    schema: Schema, tmp_path: Path, names: tuple[str, ...] = ("a", "b", "c")
) -> AsyncIterator[list[wsq.Server]]:
    shared = tmp_path / "blobs"  # one blob store for all, as S3 would be
    async with contextlib.AsyncExitStack() as stack:
        servers = []
        for name in names:
            store = PostgresStateStore(schema.dsn, node=name, exclusive=False)
            server = wsq.Server(
                data_dir=tmp_path / name,
                port=0,
                state_store=store,
                storage=shared.as_uri(),
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
