"""State store write throughput: SQLite next to PostgreSQL, by batch size.

    python -m bench.store_pg [--quick] [--tasks N] [--database URL] [--json PATH]

For each store and each batch size B, ``N`` tasks go through the store the way the server
sends them: ``submit`` of B inserts, then of B starts (waiting -> active), then of B
finishes (active -> completed), each batch awaited before the next (so every batch is one
commit: the numbers show what a commit costs and how it spreads over its ops). A last row,
"mixed", submits one op per call, 999 calls at a time without awaiting: inserts of new
tasks, starts of the previous round's and finishes of the round before, in turn; the
store's group commit then makes the batches (a loaded server's steady state).

PostgreSQL is the one at ``--database`` (default ``WSQ_TEST_DATABASE``, else
postgresql://postgres@127.0.0.1:5432/test), in a schema of its own dropped afterwards;
SQLite is a file in a temporary folder. Both commit durably (fsync; PostgreSQL with
``synchronous_commit = on``). ``--quick`` runs a few hundred tasks: it checks that the
bench runs, and its numbers mean nothing.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from itertools import zip_longest
from pathlib import Path
from typing import Any

import asyncpg

from bench.common import arguments, write_results
from wsq.core.task import State, Task
from wsq.storage.base import Insert, Op, StateStore, Update
from wsq.storage.postgres import PostgresStateStore, quote_ident
from wsq.storage.sqlite import SqliteStateStore

DATA = b'{"url": "https://example.com/images/000000.png", "size": [640, 480], "tags": ["a"]}'
BATCHES = [1, 10, 100, 1000]


def tasks(prefix: str, n: int) -> list[Task]:
    now = time.time()
    return [
        Task(id=f"{prefix}{i}", queue="bench", state=State.WAITING, seq=i + 1, data=DATA,
             created=now, updated=now)
        for i in range(n)
    ]  # fmt: skip


def started(task: Task) -> Task:
    return replace(task, state=State.ACTIVE, run=1, worker="w", updated=task.updated + 1)


def finished(task: Task) -> Task:
    return replace(task, state=State.COMPLETED, progress=1.0, updated=task.updated + 2)


async def in_batches(store: StateStore, ops: list[Op], size: int) -> float:
    """Submit ``ops`` ``size`` at a time, awaiting each; return ops per second."""
    start = time.perf_counter()
    for i in range(0, len(ops), size):
        results = await store.submit(ops[i : i + size])
        assert all(results), results
    return len(ops) / (time.perf_counter() - start)


async def by_batch_size(store: StateStore, n: int, size: int) -> dict[str, float]:
    fresh = tasks(f"b{size}-", n)
    active = [started(t) for t in fresh]
    return {
        "insert": await in_batches(store, [Insert(t) for t in fresh], size),
        "start": await in_batches(store, [Update(t, State.WAITING) for t in active], size),
        "finish": await in_batches(
            store, [Update(finished(t), State.ACTIVE) for t in active], size
        ),
    }


async def mixed(store: StateStore, n: int) -> float:
    """Ops per second with 999 one-op submits in flight at once (group commit makes the
    batches): each round inserts 333 tasks while the previous round's start and the one
    before's finish, one op of each kind in turn, as a loaded server's writes come."""
    fresh = tasks("m-", n)
    chunks = [fresh[i : i + 333] for i in range(0, n, 333)]
    rounds: list[list[Op]] = []
    for r in range(len(chunks) + 2):
        inserts = [Insert(t) for t in chunks[r]] if r < len(chunks) else []
        starts = (
            [Update(started(t), State.WAITING) for t in chunks[r - 1]]
            if 0 < r <= len(chunks)
            else []
        )
        ends = [Update(finished(started(t)), State.ACTIVE) for t in chunks[r - 2]] if r >= 2 else []
        rounds.append([op for trio in zip_longest(inserts, starts, ends) for op in trio if op])
    count = sum(len(ops) for ops in rounds)
    start = time.perf_counter()
    for ops in rounds:
        results = await asyncio.gather(*(store.submit([op]) for op in ops))
        assert all(r == [True] for r in results)
    return count / (time.perf_counter() - start)


async def measure(open_store: Callable[[], Awaitable[StateStore]], n: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for size in BATCHES:
        store = await open_store()
        try:
            count = min(n, size * 200)  # small batches: enough commits to average over
            results[str(size)] = await by_batch_size(store, count, size)
        finally:
            await store.close()
    store = await open_store()
    try:
        results["mixed"] = await mixed(store, n)
        results["commits_mixed"] = getattr(store, "commits", None)
    finally:
        await store.close()
    return results


async def main() -> None:
    parser = arguments(__doc__ or "")
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--database", default=os.environ.get("WSQ_TEST_DATABASE"))
    args = parser.parse_args()
    n = 300 if args.quick else args.tasks
    dsn = args.database or "postgresql://postgres@127.0.0.1:5432/test"
    results: dict[str, Any] = {"tasks": n}
    with tempfile.TemporaryDirectory() as folder:
        count = iter(range(1000))

        async def sqlite() -> StateStore:
            store = SqliteStateStore(Path(folder) / f"s{next(count)}.db")
            await store.open()
            return store

        results["sqlite"] = await measure(sqlite, n)
    schemas: list[str] = []

    async def postgres() -> StateStore:
        schemas.append(f"wsq_bench_{uuid.uuid4().hex[:12]}")
        store = PostgresStateStore(dsn, schema=schemas[-1])
        await store.open()
        return store

    try:
        results["postgres"] = await measure(postgres, n)
    finally:
        conn = await asyncpg.connect(dsn)
        for schema in schemas:
            await conn.execute(f"DROP SCHEMA IF EXISTS {quote_ident(schema)} CASCADE")
        await conn.close()
    print_table(results)
    write_results(args.json, results)


def print_table(results: dict[str, Any]) -> None:
    print(f"{'ops/s':>12} {'batch':>6} {'insert':>10} {'start':>10} {'finish':>10}")
    for store in ("sqlite", "postgres"):
        for size in BATCHES:
            row = results[store][str(size)]
            cells = " ".join(f"{row[k]:>10,.0f}" for k in ("insert", "start", "finish"))
            print(f"{store:>12} {size:>6} {cells}")
        print(f"{store:>12} {'mixed':>6} {results[store]['mixed']:>10,.0f}")


if __name__ == "__main__":
    asyncio.run(main())
