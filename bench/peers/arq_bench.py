"""arq on the wsq throughput and latency workloads.

    bench/.venv-peers/bin/python -m bench.peers.arq_bench [--quick] [--json PATH]

See :mod:`bench.peers._harness` for the workloads and how they are timed.
"""

from __future__ import annotations

import asyncio
import time
from importlib.metadata import version

from bench.peers import _harness
from bench.peers._harness import PYTHON, Peer

IN_FLIGHT = 100  # concurrent enqueue_job calls (each holds a pooled connection: WATCH/MULTI)


WORKER = [PYTHON, "-m", "bench.peers.arq_app"]


async def _produce(count: int) -> float:
    from arq import create_pool

    from bench.peers.arq_app import WorkerSettings

    redis = await create_pool(WorkerSettings.redis_settings)
    limit = asyncio.Semaphore(IN_FLIGHT)

    async def one() -> None:
        async with limit:
            await redis.enqueue_job("noop")

    try:
        await one()  # connect
        start = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(count - 1)))
        elapsed = time.perf_counter() - start
    finally:
        await redis.aclose()
    return (count - 1) / elapsed


def produce(count: int) -> float:
    return asyncio.run(_produce(count))


async def _latency(count: int) -> None:
    from arq import create_pool

    from bench.peers.arq_app import WorkerSettings

    redis = await create_pool(WorkerSettings.redis_settings)
    try:
        next_at = time.monotonic()
        for _ in range(count):
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            await redis.enqueue_job("stamp", time.monotonic())
            next_at += _harness.SPACING
    finally:
        await redis.aclose()


def latency_produce(count: int) -> None:
    asyncio.run(_latency(count))


PEER = Peer(
    name="arq",
    version=version("arq"),
    config=(
        "one worker process (run_worker), max_jobs 100, poll_delay 5 ms, keep_result 0, "
        f"logging at WARNING; enqueue: enqueue_job with {IN_FLIGHT} in flight on one pool "
        "(asyncio.gather; arq has no bulk enqueue); completion: counted in the job"
    ),
    module="bench.peers.arq_bench",
    worker=WORKER,
    produce=produce,
    latency_produce=latency_produce,
)

if __name__ == "__main__":
    _harness.main(PEER)
