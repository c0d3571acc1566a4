"""Celery (Redis broker) on the wsq throughput and latency workloads.

    bench/.venv-peers/bin/python -m bench.peers.celery_bench [--quick] [--json PATH]

See :mod:`bench.peers._harness` for the workloads and how they are timed.
"""

from __future__ import annotations

import time
from importlib.metadata import version

from bench.peers import _harness
from bench.peers._harness import PYTHON, Peer
from bench.peers.celery_app import PREFETCH_MULTIPLIER

CONCURRENCY = 2


WORKER = [
    *(PYTHON, "-m", "celery", "-A", "bench.peers.celery_app", "worker"),
    *("--pool", "prefork", "--concurrency", str(CONCURRENCY), "--loglevel", "WARNING"),
    *("--without-gossip", "--without-mingle", "--without-heartbeat"),
]


def produce(count: int) -> float:
    from bench.peers.celery_app import app, noop

    with app.producer_or_acquire() as producer:
        noop.apply_async(producer=producer)  # connect, declare the queue
        start = time.perf_counter()
        for _ in range(count - 1):
            noop.apply_async(producer=producer)
        elapsed = time.perf_counter() - start
    return (count - 1) / elapsed


def latency_produce(count: int) -> None:
    from bench.peers.celery_app import app, stamp

    with app.producer_or_acquire() as producer:
        _harness.paced(count, lambda n, t: stamp.apply_async((t,), producer=producer))


PEER = Peer(
    name="celery",
    version=version("celery"),
    config=(
        f"prefork pool, concurrency {CONCURRENCY}, worker_prefetch_multiplier "
        f"{PREFETCH_MULTIPLIER}, no result backend (task_ignore_result), rate limits disabled, "
        "--without-gossip/mingle/heartbeat, fair scheduling (the default, so -O fair changes "
        "nothing); enqueue: apply_async in a loop on one reused producer (kombu has no bulk "
        "publish); completion: counted in the task (a shared-memory counter the prefork "
        "children inherit)"
    ),
    module="bench.peers.celery_bench",
    worker=WORKER,
    produce=produce,
    latency_produce=latency_produce,
)

if __name__ == "__main__":
    _harness.main(PEER)
