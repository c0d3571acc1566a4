"""procrastinate on the wsq throughput and latency workloads, on PostgreSQL.

    bench/.venv-peers/bin/python -m bench.peers.procrastinate_bench [--quick] [--json PATH]

See :mod:`bench.peers._harness` for the workloads and how they are timed, and
:mod:`bench.peers._postgres` for the database (a fresh schema per run, installed with
procrastinate's own ``schema_manager.apply_schema_async``).
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AbstractContextManager
from importlib.metadata import version

from bench.peers import _harness, _postgres
from bench.peers._harness import PYTHON, Peer

BULK = 1000  # jobs per batch_defer_async call (one INSERT each)

WORKER = [PYTHON, "-m", "bench.peers.procrastinate_app"]


async def _install(name: str) -> None:
    from bench.peers.procrastinate_app import make_app

    app = make_app(name)
    async with app.open_async():
        await app.schema_manager.apply_schema_async()


def fresh() -> AbstractContextManager[dict[str, str]]:
    return _postgres.fresh_schema("procrastinate", _install)


async def _produce(count: int) -> float:
    from bench.peers.procrastinate_app import app, noop

    async with app.open_async():
        start = time.perf_counter()
        for first in range(0, count, BULK):
            chunk = range(first, min(first + BULK, count))
            await noop.batch_defer_async(*({"n": n} for n in chunk))
        elapsed = time.perf_counter() - start
    return count / elapsed


def produce(count: int) -> float:
    return asyncio.run(_produce(count))


async def _latency(count: int) -> None:
    from bench.peers.procrastinate_app import app, stamp

    async with app.open_async():
        next_at = time.monotonic()
        for _ in range(count):
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            await stamp.defer_async(t=time.monotonic())
            next_at += _harness.SPACING


def latency_produce(count: int) -> None:
    asyncio.run(_latency(count))


PEER = Peer(
    name="procrastinate",
    version=version("procrastinate"),
    config=(
        "one worker process: run_worker_async, concurrency 100, async tasks, "
        "PsycopgConnector (psycopg[binary], pool of 10), LISTEN/NOTIFY; enqueue: "
        f"batch_defer_async of {BULK}; completion: counted in the job (drained over 5,000 tasks)"
    ),
    module="bench.peers.procrastinate_bench",
    worker=WORKER,
    produce=produce,
    latency_produce=latency_produce,
    tasks=5_000,  # it drains a few hundred a second here: 20,000 would take minutes a run
    fresh=fresh,
    backend="postgresql",
)

if __name__ == "__main__":
    _harness.main(PEER)
