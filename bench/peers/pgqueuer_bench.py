"""pgqueuer on the wsq throughput and latency workloads, on PostgreSQL.

    bench/.venv-peers/bin/python -m bench.peers.pgqueuer_bench [--quick] [--json PATH]

See :mod:`bench.peers._harness` for the workloads and how they are timed, and
:mod:`bench.peers._postgres` for the database (a fresh schema per run, installed with
pgqueuer's own ``Queries.install``).
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AbstractContextManager
from importlib.metadata import version

from bench.peers import _harness, _postgres
from bench.peers._harness import PYTHON, Peer

BULK = 1000  # jobs per enqueue call (pgqueuer enqueues lists in one statement)

WORKER = [PYTHON, "-m", "bench.peers.pgqueuer_app"]


async def _install(name: str) -> None:
    import asyncpg
    from pgqueuer import AsyncpgDriver, Queries

    conn = await asyncpg.connect(_postgres.DSN, server_settings={"search_path": name})
    try:
        await Queries(AsyncpgDriver(conn)).install()
    finally:
        await conn.close()


def fresh() -> AbstractContextManager[dict[str, str]]:
    return _postgres.fresh_schema("pgqueuer", _install)


async def _produce(count: int) -> float:
    from pgqueuer import AsyncpgDriver, Queries

    from bench.peers.pgqueuer_app import connect

    conn = await connect()
    queries = Queries(AsyncpgDriver(conn))
    try:
        start = time.perf_counter()
        for first in range(0, count, BULK):
            size = min(BULK, count - first)
            payloads = [str(n).encode() for n in range(first, first + size)]
            await queries.enqueue(["noop"] * size, list[bytes | None](payloads), [0] * size)
        elapsed = time.perf_counter() - start
    finally:
        await conn.close()
    return count / elapsed


def produce(count: int) -> float:
    return asyncio.run(_produce(count))


async def _latency(count: int) -> None:
    from pgqueuer import AsyncpgDriver, Queries

    from bench.peers.pgqueuer_app import connect

    conn = await connect()
    queries = Queries(AsyncpgDriver(conn))
    try:
        next_at = time.monotonic()
        for _ in range(count):
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            await queries.enqueue("stamp", str(time.monotonic()).encode())
            next_at += _harness.SPACING
    finally:
        await conn.close()


def latency_produce(count: int) -> None:
    asyncio.run(_latency(count))


PEER = Peer(
    name="pgqueuer",
    version=version("pgqueuer"),
    config=(
        "one worker process: QueueManager on one asyncpg connection (AsyncpgDriver), "
        "run(batch_size=100), durable tables; enqueue: Queries.enqueue of lists of "
        f"{BULK} (one INSERT each); completion: counted in the job"
    ),
    module="bench.peers.pgqueuer_bench",
    worker=WORKER,
    produce=produce,
    latency_produce=latency_produce,
    fresh=fresh,
    backend="postgresql",
)

if __name__ == "__main__":
    _harness.main(PEER)
