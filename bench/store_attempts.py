"""What a task's attempts cost the state stores: finishing runs with and without their
attempt records, and the bytes a record takes.

    python -m bench.store_attempts [--quick] [--tasks N] [--database URL] [--json PATH]

For each store, ``N`` active tasks are finished (completed) in batches of 1,000 (each
batch awaited, so each is one commit), a third each way: the task's Update alone (as
before attempts were recorded), the Update followed by its RecordAttempt (a record apart:
how every run that does not complete is recorded), and the Update carrying the record
(``Update.attempt``: how the core records a completion, in the task's row); the three
alternate batch by batch so the machine's drift hits all alike. Then each task gets two
more attempts, and the attempts table's size (SQLite: ``dbstat``; PostgreSQL:
``pg_total_relation_size``, its index included) is divided by its rows. The records
carry a 32-character worker id, a client and a node name, and failures a short error
text.

PostgreSQL is the one at ``--database`` (default ``WSQ_TEST_DATABASE``, else
postgresql://postgres@127.0.0.1:5432/test), in a schema of its own dropped afterwards;
SQLite is a file in a temporary folder. ``--quick`` runs a few thousand tasks: it checks
that the bench runs, and its numbers mean little.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import statistics
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg

from bench.common import arguments, write_results
from wsq.core.task import State, Task
from wsq.storage.base import Attempt, AttemptOutcome, Insert, Op, RecordAttempt, StateStore, Update
from wsq.storage.postgres import PostgresStateStore, quote_ident
from wsq.storage.sqlite import SqliteStateStore

BATCH = 1000
WORKER = "9f1c2a7b0e3d4c5f8a6b1d2e3f4a5b6c"


def active(n: int) -> list[Task]:
    now = time.time()
    return [
        Task(id=f"t{i:08d}", queue="bench", state=State.ACTIVE, seq=i + 1, data=b"{}",
             run=1, worker=WORKER, created=now, updated=now)
        for i in range(n)
    ]  # fmt: skip


def attempt(task: Task, run: int, outcome: AttemptOutcome) -> Attempt:
    error = "RuntimeError: disk full" if outcome is AttemptOutcome.FAILED else None
    began = task.updated + run
    return Attempt(
        task.id, run, WORKER, "wsq-python", "host-a:4242", began, began + 0.01, began + 3.0,
        outcome, error, 0.5,
    )  # fmt: skip


def finishes(tasks: list[Task], record: str) -> list[Op]:
    """Completions of ``tasks``: with no record (``record == ""``), a record ``"apart"``
    or one ``"in the row"``."""
    ops: list[Op] = []
    for task in tasks:
        done = replace(task, state=State.COMPLETED, progress=1.0)
        made = attempt(task, 1, AttemptOutcome.COMPLETED)
        ops.append(Update(done, State.ACTIVE, made if record == "in the row" else None))
        if record == "apart":
            ops.append(RecordAttempt(made))
    return ops


async def timed(store: StateStore, ops: list[Op]) -> float:
    start = time.perf_counter()
    results = await store.submit(ops)
    elapsed = time.perf_counter() - start
    assert all(results), results
    return elapsed


async def measure(store: StateStore, n: int) -> dict[str, float]:
    """Finishes per second (median batch) without their attempts, with them apart, and
    with them in the row."""
    tasks = active(n)
    for i in range(0, n, BATCH):
        await store.submit([Insert(t) for t in tasks[i : i + BATCH]])
    third = n // 3 // BATCH * BATCH
    times: dict[str, list[float]] = {"": [], "apart": [], "in the row": []}
    for i in range(0, third, BATCH):
        for j, (record, timings) in enumerate(times.items()):
            first = j * third + i
            timings.append(await timed(store, finishes(tasks[first : first + BATCH], record)))
    for i in range(0, n, BATCH):  # two more runs each, the earlier ones failures
        extra = [
            RecordAttempt(attempt(t, run, AttemptOutcome.FAILED))
            for t in tasks[i : i + BATCH]
            for run in (2, 3)
        ]
        await store.submit(extra)
    return {
        "finish_per_s": BATCH / statistics.median(times[""]),
        "finish_with_attempt_apart_per_s": BATCH / statistics.median(times["apart"]),
        "finish_with_attempt_in_row_per_s": BATCH / statistics.median(times["in the row"]),
    }


async def sqlite_size(path: Path) -> float:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        (rows,) = conn.execute("SELECT count(*) FROM attempts").fetchone()
        (size,) = conn.execute("SELECT sum(pgsize) FROM dbstat WHERE name = 'attempts'").fetchone()
    return float(size) / rows


async def main() -> None:
    parser = arguments(__doc__ or "")
    parser.add_argument("--tasks", type=int, default=40_000)
    parser.add_argument("--database", default=os.environ.get("WSQ_TEST_DATABASE"))
    args = parser.parse_args()
    n = 4000 if args.quick else args.tasks
    dsn = args.database or "postgresql://postgres@127.0.0.1:5432/test"
    results: dict[str, Any] = {"tasks": n}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "s.db"
        store: StateStore = SqliteStateStore(path)
        await store.open()
        try:
            results["sqlite"] = await measure(store, n)
        finally:
            await store.close()
        results["sqlite"]["bytes_per_attempt"] = await sqlite_size(path)
    schema = f"wsq_bench_{uuid.uuid4().hex[:12]}"
    store = PostgresStateStore(dsn, schema=schema)
    await store.open()
    conn = await asyncpg.connect(dsn)
    try:
        results["postgres"] = await measure(store, n)
        await store.close()
        await conn.execute(f"SET search_path = {quote_ident(schema)}")
        size = await conn.fetchval("SELECT pg_total_relation_size('wsq_attempts')")
        rows = await conn.fetchval("SELECT count(*) FROM wsq_attempts")
        results["postgres"]["bytes_per_attempt"] = size / rows
    finally:
        await store.close()
        await conn.execute(f"DROP SCHEMA IF EXISTS {quote_ident(schema)} CASCADE")
        await conn.close()
    print_table(results)
    write_results(args.json, results)


def print_table(results: dict[str, Any]) -> None:
    print(f"{'':>10} {'finishes/s':>12} {'record apart':>13} {'in the row':>11} {'bytes/att':>10}")
    for name in ("sqlite", "postgres"):
        row = results[name]
        print(
            f"{name:>10} {row['finish_per_s']:>12,.0f}"
            f" {row['finish_with_attempt_apart_per_s']:>13,.0f}"
            f" {row['finish_with_attempt_in_row_per_s']:>11,.0f}"
            f" {row['bytes_per_attempt']:>10,.0f}"
        )


if __name__ == "__main__":
    asyncio.run(main())
