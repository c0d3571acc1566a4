"""pgqueuer worker and jobs for :mod:`bench.peers.pgqueuer_bench`.

    python -m bench.peers.pgqueuer_app    # a QueueManager on one asyncpg connection

One asyncio process: a ``QueueManager`` over pgqueuer's ``AsyncpgDriver`` (one asyncpg
connection; pgqueuer also LISTENs on it), its tables in the run's schema (``search_path``),
``run(batch_size=BATCH_SIZE)``: each dequeue claims up to that many jobs in one statement,
and finished jobs are logged in batches of that size. The throughput count lives in the
process (counted in the job); the N-th job marks ``bench:end`` on the harness's board.
"""

from __future__ import annotations

import asyncio
import logging
import time

import asyncpg
import redis.asyncio as aioredis
from pgqueuer import AsyncpgDriver, Job, Queries, QueueManager

from bench.peers._harness import END, FIRST, LAT, READY, REDIS_URL, Counter
from bench.peers._postgres import DSN, schema

# pgqueuer's own default is 10; 100 claims more per round trip and was the faster of the two
# here (docs/performance.md, "PostgreSQL peers").
BATCH_SIZE = 100


async def connect() -> asyncpg.Connection:
    return await asyncpg.connect(DSN, server_settings={"search_path": schema()})


async def main() -> None:
    board = aioredis.Redis.from_url(REDIS_URL)
    counter = Counter()
    qm = QueueManager(Queries(AsyncpgDriver(await connect())))

    @qm.entrypoint("noop")
    async def noop(job: Job) -> None:
        if not counter.started:
            counter.started = True
            await board.set(FIRST, time.monotonic(), nx=True)
        counter.done += 1
        if counter.done == counter.total:
            await board.set(END, time.monotonic())

    @qm.entrypoint("stamp")
    async def stamp(job: Job) -> None:
        assert job.payload is not None
        delay = time.monotonic() - float(job.payload)
        await board.rpush(LAT, delay)

    await board.set(READY, time.monotonic())
    await qm.run(batch_size=BATCH_SIZE)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main())
