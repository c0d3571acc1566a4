"""Workloads 1 and 2 for wsq: throughput of no-op tasks, and enqueue->start latency.

    python -m bench.wsq_tasks [--quick] [--json PATH] [--tasks N] [--runs R]
                              [--database postgresql://...]

Throughput: a producer process adds N no-op tasks (many adds in flight on its one
connection), then one worker process (concurrency 100) drains them; then a producer adds
N more with ``add_many`` in chunks of 1,000 (the bulk path, like BullMQ's ``addBulk``).
A fresh server and data folder per run; the median of R runs.

Latency: a worker process waits idle; a producer adds 1,000 tasks one at a time, 5 ms
apart, stamping each just before ``add``; the handler stamps on entry (both
``time.monotonic()``, the same clock on Linux).

``--database URL``: the server keeps its state in that PostgreSQL database, a fresh
schema per run (dropped after), instead of SQLite. ``--history N`` (with ``--database``):
the schema holds N completed tasks, each with its attempt, before the run, and
PostgreSQL's statistics were taken while it was empty (as for a history that grew since
the last ``ANALYZE``). ``--concurrency C``: the draining worker's (default 100). With
``--database`` on this machine, the CPU time of the server's PostgreSQL sessions per add
and per task drained is reported too (``postgres_cpu_us_per_*``, from /proc). Each run
reports the CPU time of the server (from /proc), of the one-by-one producer per add and
of the draining worker per task (``producer_cpu_us_per_add``, ``worker_cpu_us_per_task``:
each process's own ``time.process_time()`` over its timed part), so that the share of
the two cores each process takes is known; likewise for the bulk path, per task added
(``server_cpu_us_per_bulk_add``, ``producer_cpu_us_per_bulk_add``, and with
``--database`` ``postgres_cpu_us_per_bulk_add``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

from bench.common import (
    PYTHON,
    ROOT,
    add_role_arguments,
    arguments,
    cpu_seconds,
    median,
    percentile,
    postgres_cpu_seconds,
    postgres_schema,
    run_role,
    write_results,
    wsq_server,
)

IN_FLIGHT = 1000
BULK = 1000
CONCURRENCY = 100


async def produce(url: str, count: int, queue_name: str = "bench") -> dict[str, Any]:
    import wsq

    async with wsq.Client(url) as client:
        queue = client.queue(queue_name)
        limit = asyncio.Semaphore(IN_FLIGHT)

        async def one(n: int) -> None:
            async with limit:
                await queue.add(n)

        start, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(one(n) for n in range(count)))
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"enqueue_per_s": count / elapsed, "producer_cpu_us_per_add": cpu / count * 1e6}


async def produce_bulk(url: str, count: int) -> dict[str, Any]:
    """The bulk path, as BullMQ's addBulk and RQ's enqueue_many: add_many of 1,000."""
    import wsq

    async with wsq.Client(url) as client:
        queue = client.queue("bench-bulk")
        start, cpu = time.perf_counter(), time.process_time()
        for first in range(0, count, BULK):
            await queue.add_many(range(first, min(first + BULK, count)))
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {
        "enqueue_bulk_per_s": count / elapsed,
        "producer_cpu_us_per_bulk_add": cpu / count * 1e6,
    }


async def drain(url: str, count: int, queue_name: str = "bench") -> dict[str, Any]:
    import wsq

    concurrency = int(os.environ.get("WSQ_BENCH_CONCURRENCY") or CONCURRENCY)
    done = 0
    finished = asyncio.Event()

    def handler(task: wsq.Task) -> None:
        nonlocal done
        done += 1
        if done == count:
            finished.set()

    async with wsq.Client(url) as client:
        start, cpu = time.perf_counter(), time.process_time()
        worker = client.queue(queue_name).process(handler, concurrency=concurrency)
        await asyncio.wait_for(finished.wait(), 600)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        await worker.stop()
    return {"e2e_per_s": count / elapsed, "worker_cpu_us_per_task": cpu / count * 1e6}


async def latency_worker(url: str, count: int) -> dict[str, Any]:
    import wsq

    delays: list[float] = []
    finished = asyncio.Event()

    def handler(task: wsq.Task) -> None:
        delays.append(time.monotonic() - task.data["t"])
        if len(delays) == count:
            finished.set()

    async with wsq.Client(url) as client:
        added = asyncio.Event()
        client.on("worker added", lambda worker: added.set())
        client.queue("latency").process(handler)
        await added.wait()
        print("ready", flush=True)
        await finished.wait()
    ms = [d * 1000 for d in delays]
    return {"p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99), "max_ms": max(ms)}


async def latency_producer(url: str, count: int) -> dict[str, Any]:
    import wsq

    async with wsq.Client(url) as client:
        queue = client.queue("latency")
        next_at = time.monotonic()
        for n in range(count):
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            await queue.add({"n": n, "t": time.monotonic()})
            next_at += 0.005
    return {}


ROLES = {
    "produce": produce,
    "produce-bulk": produce_bulk,
    "drain": drain,
    "latency-worker": latency_worker,
    "latency-producer": latency_producer,
}


def child(role: str, url: str, count: int) -> list[str]:
    return [PYTHON, "-m", "bench.wsq_tasks", "--role", role, "--url", url, "--count", str(count)]


def run_child(role: str, url: str, count: int) -> dict[str, Any]:
    done = subprocess.run(
        child(role, url, count), capture_output=True, text=True, check=True, cwd=ROOT
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


DATABASE: str | None = None  # --database
HISTORY = 0  # --history


@contextlib.contextmanager
def server() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A fresh server: SQLite in a new folder, or a new schema of ``--database`` (with
    ``--history`` completed tasks in it)."""
    if DATABASE is None:
        with wsq_server() as started:
            yield started
        return
    global SCHEMA_URL
    with postgres_schema(DATABASE) as url, wsq_server(None, "--database", url) as started:
        if HISTORY:
            asyncio.run(_history(url, HISTORY))
        SCHEMA_URL = url
        try:
            yield started
        finally:
            SCHEMA_URL = None


async def _history(url: str, count: int) -> None:
    """``count`` completed tasks of another queue, each with its attempt, inserted after
    the server made (and PostgreSQL analyzed) the empty tables."""
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "ALTER TABLE wsq_tasks SET (autovacuum_enabled = false);"
            " ALTER TABLE wsq_attempts SET (autovacuum_enabled = false);"
            " ANALYZE wsq_tasks; ANALYZE wsq_attempts"
        )
        await conn.execute(
            "INSERT INTO wsq_tasks (id, queue, state, seq, data, opt_timeout, opt_retries,"
            " opt_autoremove, progress, retries, run, worker, created, updated)"
            " SELECT 'old' || n, 'old', 'completed', n, '\\x7b7d', -1, 0, false, 0, 0, 1,"
            " 'w', 0, 0 FROM generate_series(1, $1::int) AS n",
            count,
        )
        await conn.execute(
            "INSERT INTO wsq_attempts (task, run, ended, outcome)"
            " SELECT 'old' || n, 1, 0, 'completed' FROM generate_series(1, $1::int) AS n",
            count,
        )
    finally:
        await conn.close()


def throughput_run(count: int) -> dict[str, Any]:
    with server() as (url, server_proc):
        before = cpu_seconds(server_proc.pid), _postgres_cpu()
        produced = run_child("produce", url, count)
        middle = cpu_seconds(server_proc.pid), _postgres_cpu()
        drained = run_child("drain", url, count)
        after = cpu_seconds(server_proc.pid), _postgres_cpu()
        bulk = run_child("produce-bulk", url, count)
        last = cpu_seconds(server_proc.pid), _postgres_cpu()
    cpu = {
        "server_cpu_us_per_add": (middle[0] - before[0]) / count * 1e6,
        "server_cpu_us_per_task": (after[0] - middle[0]) / count * 1e6,
        "server_cpu_us_per_bulk_add": (last[0] - after[0]) / count * 1e6,
    }
    pg = before[1], middle[1], after[1], last[1]
    if all(point is not None for point in pg):
        pg_before, pg_middle, pg_after, pg_last = pg
        cpu["postgres_cpu_us_per_add"] = (pg_middle - pg_before) / count * 1e6
        cpu["postgres_cpu_us_per_task"] = (pg_after - pg_middle) / count * 1e6
        cpu["postgres_cpu_us_per_bulk_add"] = (pg_last - pg_after) / count * 1e6
    return produced | drained | bulk | cpu


SCHEMA_URL: str | None = None  # the running server's --database URL, with --database


def _postgres_cpu() -> float | None:
    """CPU seconds of the server's PostgreSQL sessions so far (None: not measurable)."""
    return None if SCHEMA_URL is None else postgres_cpu_seconds(SCHEMA_URL)


def latency_run(count: int) -> dict[str, Any]:
    with server() as (url, _):
        worker = subprocess.Popen(
            child("latency-worker", url, count), stdout=subprocess.PIPE, text=True, cwd=ROOT
        )
        assert worker.stdout is not None
        assert worker.stdout.readline().strip() == "ready"
        run_child("latency-producer", url, count)
        out, _ = worker.communicate(timeout=120)
        if worker.returncode != 0:
            raise RuntimeError("latency worker failed")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = arguments(__doc__ or "")
    parser.add_argument("--tasks", type=int, default=None)
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--database", default=None)
    parser.add_argument("--history", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=None)
    add_role_arguments(parser, ROLES)
    args = parser.parse_args()
    if run_role(args, ROLES):
        return
    global DATABASE, HISTORY
    DATABASE, HISTORY = args.database, args.history
    if HISTORY and DATABASE is None:
        parser.error("--history needs --database")
    if args.concurrency is not None:
        os.environ["WSQ_BENCH_CONCURRENCY"] = str(args.concurrency)
    concurrency = args.concurrency or CONCURRENCY
    tasks = args.tasks or (500 if args.quick else 20_000)
    runs = args.runs or (1 if args.quick else 3)
    latency_tasks = 50 if args.quick else 1000
    rounds = [throughput_run(tasks) for _ in range(runs)]
    print(f"throughput rounds: {rounds}", file=sys.stderr)
    results = {
        "tasks": tasks,
        "runs": runs,
        "enqueue_per_s": median([r["enqueue_per_s"] for r in rounds]),
        "enqueue_bulk_per_s": median([r["enqueue_bulk_per_s"] for r in rounds]),
        "e2e_per_s": median([r["e2e_per_s"] for r in rounds]),
        "server_cpu_us_per_add": median([r["server_cpu_us_per_add"] for r in rounds]),
        "server_cpu_us_per_task": median([r["server_cpu_us_per_task"] for r in rounds]),
        "producer_cpu_us_per_add": median([r["producer_cpu_us_per_add"] for r in rounds]),
        "worker_cpu_us_per_task": median([r["worker_cpu_us_per_task"] for r in rounds]),
        "server_cpu_us_per_bulk_add": median([r["server_cpu_us_per_bulk_add"] for r in rounds]),
        "producer_cpu_us_per_bulk_add": median([r["producer_cpu_us_per_bulk_add"] for r in rounds]),
        **{
            key: median([r[key] for r in rounds])
            for key in (
                "postgres_cpu_us_per_add",
                "postgres_cpu_us_per_task",
                "postgres_cpu_us_per_bulk_add",
            )
            if all(key in r for r in rounds)
        },
        "config": f"enqueue: pipelined add(), {IN_FLIGHT} in flight (bulk: add_many of"
        f" {BULK}); one worker process, concurrency {concurrency}"
        + (f"; {HISTORY} completed tasks of history" if HISTORY else ""),
        "latency": {"tasks": latency_tasks, **latency_run(latency_tasks)},
    }
    write_results(args.json, results)


if __name__ == "__main__":
    main()
