"""procrastinate app, tasks and worker for :mod:`bench.peers.procrastinate_bench`.

    python -m bench.peers.procrastinate_app    # run_worker_async, concurrency 100

procrastinate 3's asynchronous connector, ``PsycopgConnector`` (psycopg 3 with its C
speedups, ``psycopg[binary]``, and a ``psycopg_pool`` pool of POOL connections), its tables
in the run's schema (``search_path``). One worker process runs async tasks with
``concurrency=CONCURRENCY``, woken by LISTEN/NOTIFY (``listen_notify``, the default; the
5 s poll is only its fallback); finished jobs are kept (``delete_jobs="never"``, the
default, as wsq keeps completed tasks). The throughput count lives in the process (counted
in the job); the N-th job marks ``bench:end`` on the harness's board.
"""

from __future__ import annotations

import asyncio
import logging
import time

import procrastinate
import redis.asyncio as aioredis

from bench.peers._harness import END, FIRST, LAT, READY, REDIS_URL, Counter
from bench.peers._postgres import DSN, schema

CONCURRENCY = 100
POOL = 10  # the pool's min and max size (each running job's status write takes one)


def make_app(name: str) -> procrastinate.App:
    connector = procrastinate.PsycopgConnector(
        conninfo=DSN, kwargs={"options": f"-c search_path={name}"}, min_size=POOL, max_size=POOL
    )
    return procrastinate.App(connector=connector)


app = make_app(schema())
counter = Counter()
board: aioredis.Redis | None = None


def get_board() -> aioredis.Redis:
    global board
    if board is None:
        board = aioredis.Redis.from_url(REDIS_URL)
    return board


@app.task(name="noop", queue="bench")
async def noop(n: int) -> None:
    if not counter.started:
        counter.started = True
        await get_board().set(FIRST, time.monotonic(), nx=True)
    counter.done += 1
    if counter.done == counter.total:
        await get_board().set(END, time.monotonic())


@app.task(name="stamp", queue="latency")
async def stamp(t: float) -> None:
    delay = time.monotonic() - t
    await get_board().rpush(LAT, delay)


async def main() -> None:
    async with app.open_async():
        await get_board().set(READY, time.monotonic())
        await app.run_worker_async(concurrency=CONCURRENCY)  # every queue


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main())
