"""Celery app and tasks for :mod:`bench.peers.celery_bench` (the worker imports this).

Prefork tasks run in the pool's child processes, so the throughput count is a shared-memory
counter (``multiprocessing.Value``) made when the worker's main process imports this module
and inherited by the children it forks: no extra Redis round trip per task. The task that
reaches N marks ``bench:end``. No result backend; results are ignored.
"""

from __future__ import annotations

import multiprocessing
import time
from typing import Any

from celery import Celery, signals

from bench.peers._harness import LAT, REDIS_URL, Counter, connect, mark_ready

PREFETCH_MULTIPLIER = 64  # the optimizing guide: 64 or 128 for many short tasks

app = Celery("wsq_bench", broker=REDIS_URL)
app.conf.update(
    task_ignore_result=True,
    result_backend=None,
    worker_prefetch_multiplier=PREFETCH_MULTIPLIER,
    worker_disable_rate_limits=True,
    worker_send_task_events=False,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)

client = connect()  # redis-py pools reconnect after fork, so each pool child gets its own
counter = Counter()
finished = multiprocessing.Value("q", 0)  # shared with the forked pool children


@app.task(name="bench.noop")
def noop() -> None:
    counter.start(client)
    with finished.get_lock():
        finished.value += 1
        done = finished.value
    counter.finish(client, done)


@app.task(name="bench.stamp")
def stamp(t: float) -> None:
    delay = time.monotonic() - t
    client.rpush(LAT, delay)


@signals.worker_ready.connect
def ready(**_: Any) -> None:
    mark_ready(client)
