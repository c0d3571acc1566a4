"""Workload 7 for wsq: many queues of large tasks, and the server's memory.

    python -m bench.wsq_window [--quick] [--json PATH] [--queues Q] [--tasks T] [--size S]

A server (a ``wsq server`` process on a fresh folder) gets Q queues of T waiting tasks
each, every task with S bytes of JSON data (default 8 x 1,000 x 128 KiB = 1 GiB; quick:
4 x 250 x 64 KiB). Nobody works on them, so each queue's in-memory window is full. The
server's RSS is read:

* ``empty``: right after start;
* ``loaded``: once every add is acknowledged (the windows hold their tasks);
* ``restarted``: after a restart on the same folder, once ``list_queues()`` answers and
  the windows have been loaded again;
* ``worked``: after a worker has taken 100 tasks of each queue (and checked their data),
  so every offer read its payload from the store.

Without a bound on what the windows hold, ``loaded`` and ``restarted`` grow by about
``min(T, 1,000) x S`` per queue; docs/architecture.md promises they do not. Memory in MiB.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import arguments, rss_bytes, write_results, wsq_server

MB = 1 << 20
IN_FLIGHT = 32


def payload(queue: int, n: int, size: int) -> dict[str, Any]:
    return {"q": queue, "n": n, "pad": "x" * size}


async def fill(url: str, queues: int, tasks: int, size: int) -> float:
    """Add every task, ``IN_FLIGHT`` at a time per queue; return the seconds it took."""
    import wsq

    start = time.perf_counter()
    async with wsq.Client(url) as client:

        async def one_queue(q: int) -> None:
            queue = client.queue(f"big-{q}")
            slots = asyncio.Semaphore(IN_FLIGHT)

            async def add(n: int) -> None:
                async with slots:
                    await queue.add(payload(q, n, size))

            await asyncio.gather(*(add(n) for n in range(tasks)))

        await asyncio.gather(*(one_queue(q) for q in range(queues)))
    return time.perf_counter() - start


async def wait_ready(url: str, queues: int) -> None:
    import wsq

    async with wsq.Client(url, backoff=lambda tries: 0.02) as client:
        found = await client.list_queues()
        if len(found) < queues:
            raise RuntimeError(f"queues missing after the restart: {found}")
    await asyncio.sleep(1.0)  # the windows' loads, which run after start-up


async def work(url: str, queues: int, per_queue: int, size: int) -> None:
    """Take ``per_queue`` tasks of each queue and check their data."""
    import wsq

    async with wsq.Client(url) as client:
        for q in range(queues):
            done = asyncio.Event()
            seen = 0

            async def handler(task: wsq.Task) -> None:
                nonlocal seen
                assert len(task.data["pad"]) == size and task.data["q"] == q  # noqa: B023
                seen += 1
                if seen >= per_queue:
                    done.set()  # noqa: B023

            worker = client.queue(f"big-{q}").process(handler, concurrency=10)
            await asyncio.wait_for(done.wait(), 300)
            await worker.stop()


def run(queues: int, tasks: int, size: int) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        data = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="wsq-bench-win-")))
        with wsq_server(data) as (url, server):
            time.sleep(0.5)
            empty = rss_bytes(server.pid)
            fill_s = asyncio.run(fill(url, queues, tasks, size))
            time.sleep(0.5)
            loaded = rss_bytes(server.pid)
        start = time.perf_counter()
        with wsq_server(data) as (url, server):
            asyncio.run(wait_ready(url, queues))
            restart_s = time.perf_counter() - start
            restarted = rss_bytes(server.pid)
            asyncio.run(work(url, queues, min(100, tasks), size))
            worked = rss_bytes(server.pid)
    return {
        "queues": queues,
        "tasks_per_queue": tasks,
        "data_bytes": size,
        "backlog_mb": queues * tasks * size / MB,
        "fill_s": fill_s,
        "restart_s": restart_s,
        "rss_mb": {
            "empty": empty / MB,
            "loaded": loaded / MB,
            "restarted": restarted / MB,
            "worked": worked / MB,
        },
    }


def main() -> None:
    parser = arguments(__doc__ or "")
    parser.add_argument("--queues", type=int, default=None)
    parser.add_argument("--tasks", type=int, default=None)
    parser.add_argument("--size", type=int, default=None)
    args = parser.parse_args()
    queues = args.queues or (4 if args.quick else 8)
    tasks = args.tasks or (250 if args.quick else 1_000)
    size = args.size or (64 << 10 if args.quick else 128 << 10)
    write_results(args.json, run(queues, tasks, size))


if __name__ == "__main__":
    main()
