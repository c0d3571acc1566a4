"""How long SqliteStateStore.open() takes on a big database, and what it costs in memory.

    python bench/store_open.py [N] [--queues Q] [--active A] [--path PATH] [--rebuild]

Builds (once; reused unless --rebuild) a database of N waiting tasks (default 1,000,000)
spread over Q queues, plus A active ones, by bulk insert that bypasses submit(); the build
runs in a child process so that its memory does not count. Then opens a fresh store,
times open(), the first LoadWaiting and close(), and prints the process RSS around open().
The page cache is warm (the build just wrote the file).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import resource
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wsq.core.task import State, Task
from wsq.storage.base import LoadWaiting
from wsq.storage.sqlite import INSERT_TASK, SqliteStateStore, _task_params, migrate

DATA = b'{"url": "https://example.com/images/000000.png", "size": [640, 480], "tags": ["a"]}'


def rows(n: int, queues: int, active: int) -> Iterator[tuple[Any, ...]]:
    now = time.time()
    for seq in range(1, n + active + 1):
        state = State.ACTIVE if seq <= active else State.WAITING
        task = Task(
            id=f"{seq:032x}",
            queue=f"queue-{seq % queues}",
            state=state,
            seq=seq,
            data=DATA,
            worker="w" if state is State.ACTIVE else None,
            created=now,
            updated=now,
        )
        yield _task_params(task)


def build(path: str, n: int, queues: int, active: int) -> None:
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = OFF")  # a bench fixture, not a store
        migrate(conn)
        conn.execute("BEGIN")
        conn.executemany(INSERT_TASK, rows(n, queues, active))
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


async def measure(path: str, queues: int) -> None:
    store = SqliteStateStore(path)
    before = rss_mib()
    start = time.perf_counter()
    recovery = await store.open()
    opened = time.perf_counter() - start
    after = rss_mib()
    start = time.perf_counter()
    [loaded] = await store.submit([LoadWaiting("queue-0", 1000)])
    load = time.perf_counter() - start
    start = time.perf_counter()
    await store.close()
    closed = time.perf_counter() - start
    print(f"open():          {opened:.4f} s")
    print(f"  next_seq={recovery.next_seq} active={len(recovery.active)}", end=" ")
    print(f"waiting_queues={len(recovery.waiting_queues)} (of {queues})")
    print(f"  RSS {before:.1f} MiB before, {after:.1f} MiB after; peak {peak_rss_mib():.1f} MiB")
    print(f"first LoadWaiting(1000): {load:.4f} s ({len(loaded)} tasks)")
    print(f"close():         {closed:.4f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("n", type=int, nargs="?", default=1_000_000)
    parser.add_argument("--queues", type=int, default=10)
    parser.add_argument("--active", type=int, default=100)
    parser.add_argument("--path", help="database file (default: a temporary directory)")
    parser.add_argument("--rebuild", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="wsq-bench-") as tmp:
        path = Path(args.path or Path(tmp) / "store.db")
        if args.rebuild:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            child = multiprocessing.get_context("spawn").Process(
                target=build, args=(str(path), args.n, args.queues, args.active)
            )
            child.start()
            child.join()
            print(f"built {args.n:,} waiting + {args.active} active tasks", end=" ")
            print(f"in {time.perf_counter() - start:.1f} s: {path.stat().st_size / 2**20:.0f} MiB")
        asyncio.run(measure(str(path), args.queues))


if __name__ == "__main__":
    main()
