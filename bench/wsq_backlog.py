"""Workload 4 for wsq: a server on a deep backlog, against the same server empty.

    python -m bench.wsq_backlog [--quick] [--json PATH] [--depth N] [--tasks T] [--runs R]

Builds a data folder whose SQLite database holds N waiting no-op tasks in one queue
(default 1,000,000; quick: 20,000) by bulk insert in a child process
(:func:`bench.store_open.build`, bypassing the server). The database is cached under the
temp directory, keyed by N and a hash of the schema scripts, and copied for each run (a
run mutates it). Then:

* start-up: a server starts on the copy; the time from spawning it until a client is
  connected and ``list_queues()`` answers, and the server's RSS right then;
* at depth N: a producer process adds T tasks (default 10,000) to the same deep queue,
  1,000 adds in flight on its connection; then a worker process (concurrency 100)
  processes T tasks of that queue (the oldest first); the server's RSS afterwards;
* at depth 0: the same two on a fresh, empty server, running beside the deep one.

R rounds (default 5; quick: 1) alternate between the deep and the empty server; each
rate is the median. The deep queue stays about N deep throughout (each round adds T and
takes T). Memory in MiB.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import multiprocessing
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import wsq_tasks as tasks
from bench.common import (
    PYTHON,
    ROOT,
    add_role_arguments,
    arguments,
    median,
    rss_bytes,
    run_role,
    write_results,
    wsq_server,
)
from bench.store_open import build
from wsq.storage.sqlite import MIGRATIONS

MB = 1 << 20
QUEUE = "queue-0"  # the name bench.store_open.build gives its only queue


# -- children -------------------------------------------------------------------------------


async def produce(url: str, count: int) -> dict[str, Any]:
    result = await tasks.produce(url, count, QUEUE)
    return {"add_per_s": result["enqueue_per_s"]}


async def drain(url: str, count: int) -> dict[str, Any]:
    result = await tasks.drain(url, count, QUEUE)
    return {"dispatch_per_s": result["e2e_per_s"]}


ROLES = {"produce": produce, "drain": drain}


def run_child(role: str, url: str, count: int) -> dict[str, Any]:
    args = [PYTHON, "-m", "bench.wsq_backlog", "--role", role, "--url", url]
    done = subprocess.run(
        [*args, "--count", str(count)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        timeout=600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{role} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# -- the backlog ----------------------------------------------------------------------------


def cached_db(depth: int) -> Path:
    """The cached database of ``depth`` waiting tasks, built first if missing."""
    schema = hashlib.sha256("".join(MIGRATIONS).encode()).hexdigest()[:12]
    folder = Path(tempfile.gettempdir()) / f"wsq-bench-backlog-{schema}-{depth}"
    db = folder / "wsq.db"
    if db.exists():
        return db
    building = Path(tempfile.mkdtemp(prefix=f"{folder.name}-building-", dir=folder.parent))
    try:
        start = time.perf_counter()
        child = multiprocessing.get_context("spawn").Process(
            target=build, args=(str(building / "wsq.db"), depth, 1, 0)
        )
        child.start()
        child.join(600)
        if child.exitcode != 0:
            child.kill()
            raise RuntimeError(f"building the backlog failed ({child.exitcode})")
        size = (building / "wsq.db").stat().st_size / MB
        print(
            f"built {depth:,} waiting tasks in {time.perf_counter() - start:.1f} s"
            f" ({size:.0f} MiB) in {folder}",
            file=sys.stderr,
        )
        try:
            building.rename(folder)  # atomic: a concurrent run finds all or nothing
        except OSError:
            if not db.exists():
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return db


async def probe(url: str) -> list[str]:
    """Connect (retrying every 5 ms) and list the queues."""
    import wsq

    async with wsq.Client(url, backoff=lambda tries: 0.005) as client:
        return [queue.name for queue in await client.list_queues()]


def measure(url: str, tasks: int, adds: list[float], dispatches: list[float]) -> None:
    """One round: add ``tasks``, then process ``tasks``."""
    adds.append(run_child("produce", url, tasks)["add_per_s"])
    dispatches.append(run_child("drain", url, tasks)["dispatch_per_s"])


def run(depth: int, tasks: int, runs: int) -> dict[str, Any]:
    import wsq  # noqa: F401  (imported before the clock starts)

    db = cached_db(depth)
    deep: tuple[list[float], list[float]] = ([], [])
    empty: tuple[list[float], list[float]] = ([], [])
    with contextlib.ExitStack() as stack:
        data = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="wsq-bench-backlog-")))
        start = time.perf_counter()
        shutil.copyfile(db, data / "wsq.db")
        print(f"copied the backlog in {time.perf_counter() - start:.2f} s", file=sys.stderr)
        start = time.perf_counter()
        deep_url, server = stack.enter_context(wsq_server(data))
        queues = asyncio.run(probe(deep_url))
        startup_s = time.perf_counter() - start
        startup_rss = rss_bytes(server.pid)
        if QUEUE not in queues:
            raise RuntimeError(f"the backlog queue is missing: {queues}")
        empty_url, _ = stack.enter_context(wsq_server())
        # Rounds alternate between the two servers, so that drift in the machine (disk,
        # page cache) hits both sides alike.
        for _ in range(runs):
            measure(deep_url, tasks, *deep)
            measure(empty_url, tasks, *empty)
        rss_after = rss_bytes(server.pid)
    for name, (adds, dispatches) in (("deep", deep), ("empty", empty)):
        print(f"{name}: add/s {adds}\n  dispatch/s {dispatches}", file=sys.stderr)
    add_deep, dispatch_deep = median(deep[0]), median(deep[1])
    add_empty, dispatch_empty = median(empty[0]), median(empty[1])
    return {
        "depth": depth,
        "startup_s": startup_s,
        "startup_rss_mb": startup_rss / MB,
        "rss_after_mb": rss_after / MB,
        "add_per_s": {"deep": add_deep, "empty": add_empty},
        "dispatch_per_s": {"deep": dispatch_deep, "empty": dispatch_empty},
        "add_ratio": add_deep / add_empty,
        "dispatch_ratio": dispatch_deep / dispatch_empty,
    }


def main() -> None:
    parser = arguments(__doc__ or "")
    parser.add_argument("--depth", type=int, default=None)
    parser.add_argument("--tasks", type=int, default=None)
    parser.add_argument("--runs", type=int, default=None)
    add_role_arguments(parser, ROLES)
    args = parser.parse_args()
    if run_role(args, ROLES):
        return
    depth = args.depth or (20_000 if args.quick else 1_000_000)
    tasks = args.tasks or (2_000 if args.quick else 10_000)
    runs = args.runs or (1 if args.quick else 5)
    write_results(args.json, run(depth, tasks, runs))


if __name__ == "__main__":
    main()
