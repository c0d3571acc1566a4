"""One node against two: wsq on PostgreSQL with its tasks served by one server process, then
by two sharing the database (a cluster), on this one machine.

    python -m bench.wsq_cluster [--quick] [--json PATH] [--tasks N] [--database URL]

For each size (1, then 2 nodes), on a fresh schema: two producer processes add N tasks
between them (pipelined adds), each connected to node ``i % nodes``; then two worker
processes (concurrency 50 each), each on node ``i % nodes``, drain them. Enqueue rate: N
over the time until both producers are done. Drain rate: N over the time until
PostgreSQL counts them all completed (polled every 20 ms). With two nodes, the second
node's workers hear of the first node's adds by notification (``LISTEN/NOTIFY``).

On a 2-core machine, two nodes share the same two cores with PostgreSQL and the clients:
the numbers show what a second node costs (claims, notifications, counts), not what a
second machine would add; ``docs/scaling.md`` has the model for more machines.
"""

from __future__ import annotations

import asyncio
import contextlib
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
    postgres_dsn,
    postgres_problem,
    postgres_schema,
    run_role,
    write_results,
    wsq_server,
)
from bench.wsq_tasks import produce

WORKER_CONCURRENCY = 50


async def work(url: str, count: int) -> dict[str, Any]:
    """Run no-op tasks until killed."""
    import wsq

    async with wsq.Client(url) as client:
        client.queue("bench").process(lambda task: None, concurrency=WORKER_CONCURRENCY)
        print("ready", flush=True)
        await asyncio.Event().wait()
    return {}


ROLES = {"produce": produce, "work": work}


def child(role: str, url: str, count: int) -> list[str]:
    return [PYTHON, "-m", "bench.wsq_cluster", "--role", role, "--url", url, "--count", str(count)]


@contextlib.contextmanager
def nodes(database: str, count: int) -> Iterator[list[str]]:
    with contextlib.ExitStack() as stack:
        urls = []
        for n in range(count):
            url, _ = stack.enter_context(
                wsq_server(None, "--database", database, "--node-name", f"n{n}")
            )
            urls.append(url)
        yield urls


async def completed(database: str) -> int:
    import asyncpg

    conn = await asyncpg.connect(database)
    try:
        found: int = await conn.fetchval(
            "SELECT coalesce(sum(n), 0) FROM wsq_counts WHERE queue = 'bench'"
            " AND state = 'completed'"
        )
        return found
    finally:
        await conn.close()


def run_size(dsn: str, size: int, tasks: int) -> dict[str, Any]:
    with postgres_schema(dsn) as database, nodes(database, size) as urls:
        half = tasks // 2
        start = time.perf_counter()
        producers = [
            subprocess.Popen(
                child("produce", urls[i % size], half), cwd=ROOT, stdout=subprocess.DEVNULL
            )
            for i in range(2)
        ]
        for proc in producers:
            if proc.wait(600) != 0:
                raise RuntimeError("a producer failed")
        enqueue = 2 * half / (time.perf_counter() - start)
        workers = [
            subprocess.Popen(
                child("work", urls[i % size], 0), cwd=ROOT, stdout=subprocess.PIPE, text=True
            )
            for i in range(2)
        ]
        try:
            assert workers[0].stdout is not None
            workers[0].stdout.readline()  # the drain starts with the first worker's start
            start = time.perf_counter()
            deadline = start + 600
            while asyncio.run(completed(database)) < 2 * half:
                if time.perf_counter() > deadline:
                    raise RuntimeError("the drain did not finish")
                time.sleep(0.02)
            drain = 2 * half / (time.perf_counter() - start)
        finally:
            for worker in workers:
                worker.kill()
                worker.wait()
    return {"nodes": size, "enqueue_per_s": enqueue, "drain_per_s": drain}


def main() -> None:
    parser = arguments(__doc__ or "")
    parser.add_argument("--tasks", type=int, default=None)
    parser.add_argument("--database", default=None)
    add_role_arguments(parser, ROLES)
    args = parser.parse_args()
    if run_role(args, ROLES):
        return
    dsn = args.database or postgres_dsn()
    problem = postgres_problem(dsn)
    if problem is not None:
        print(f"skipped: {problem}", file=sys.stderr)
        return
    tasks = args.tasks or (400 if args.quick else 20_000)
    sizes = [run_size(dsn, size, tasks) for size in (1, 2)]
    results = {"tasks": tasks, "sizes": sizes}
    for row in sizes:
        print(
            f"{row['nodes']} node(s): enqueue {row['enqueue_per_s']:,.0f}/s,"
            f" drain {row['drain_per_s']:,.0f}/s",
            file=sys.stderr,
        )
    write_results(args.json, results)


if __name__ == "__main__":
    main()
