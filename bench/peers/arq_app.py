"""arq worker settings and jobs for :mod:`bench.peers.arq_bench`.

    python -m bench.peers.arq_app    # run_worker(WorkerSettings), logging at WARNING

The worker is one asyncio process, so the throughput count lives in it (counted in the job);
the N-th job marks ``bench:end``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from arq.connections import RedisSettings
from arq.worker import run_worker

from bench.peers._harness import END, FIRST, LAT, READY, REDIS_URL, Counter

MAX_JOBS = 100
POLL_DELAY = 0.005

counter = Counter()


async def noop(ctx: dict[str, Any]) -> None:
    if not counter.started:
        counter.started = True
        await ctx["redis"].set(FIRST, time.monotonic(), nx=True)
    counter.done += 1
    if counter.done == counter.total:
        await ctx["redis"].set(END, time.monotonic())


async def stamp(ctx: dict[str, Any], t: float) -> None:
    delay = time.monotonic() - t
    await ctx["redis"].rpush(LAT, delay)


async def startup(ctx: dict[str, Any]) -> None:
    await ctx["redis"].set(READY, time.monotonic())


class WorkerSettings:
    functions = [noop, stamp]
    redis_settings = RedisSettings.from_dsn(REDIS_URL)
    max_jobs = MAX_JOBS
    poll_delay = POLL_DELAY
    keep_result = 0  # no result kept (the others ignore results too)
    on_startup = startup


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    run_worker(WorkerSettings)  # type: ignore[arg-type]
