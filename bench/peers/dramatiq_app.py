"""Dramatiq broker and actors for :mod:`bench.peers.dramatiq_bench` (the worker imports this).

The worker is one process with 16 threads, so the throughput count lives in that process
(a counter under a lock in the actor); the N-th task marks ``bench:end``.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import Middleware

from bench.peers._harness import LAT, REDIS_URL, Counter, connect, mark_ready

client = connect()
counter = Counter()
lock = threading.Lock()


class Ready(Middleware):
    def after_worker_boot(self, broker: Any, worker: Any) -> None:
        mark_ready(client)


broker = RedisBroker(url=REDIS_URL)
broker.add_middleware(Ready())
dramatiq.set_broker(broker)


@dramatiq.actor(actor_name="noop", max_retries=0)
def noop() -> None:
    with lock:
        counter.start(client)
        counter.finish(client)


@dramatiq.actor(actor_name="stamp", max_retries=0)
def stamp(t: float) -> None:
    delay = time.monotonic() - t
    client.rpush(LAT, delay)
