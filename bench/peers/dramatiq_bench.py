"""Dramatiq (Redis broker) on the wsq throughput and latency workloads.

    bench/.venv-peers/bin/python -m bench.peers.dramatiq_bench [--quick] [--json PATH]

See :mod:`bench.peers._harness` for the workloads and how they are timed.
"""

from __future__ import annotations

import time
from importlib.metadata import version

from bench.peers import _harness
from bench.peers._harness import PYTHON, Peer

PROCESSES, THREADS = 1, 16


WORKER = [
    *(PYTHON, "-m", "dramatiq", "bench.peers.dramatiq_app"),
    *("--processes", str(PROCESSES), "--threads", str(THREADS)),
]


def produce(count: int) -> float:
    from bench.peers.dramatiq_app import noop

    noop.send()  # connect, load the scripts
    start = time.perf_counter()
    for _ in range(count - 1):
        noop.send()
    elapsed = time.perf_counter() - start
    return (count - 1) / elapsed


def latency_produce(count: int) -> None:
    from bench.peers.dramatiq_app import stamp

    _harness.paced(count, lambda n, t: stamp.send(t))


PEER = Peer(
    name="dramatiq",
    version=version("dramatiq"),
    config=(
        f"RedisBroker, `dramatiq --processes {PROCESSES} --threads {THREADS}`, default "
        "middleware, prefetch (2 x threads) and worker_timeout (an idle consumer polls Redis "
        "with a backoff of up to 1 s), max_retries=0, no results middleware; enqueue: "
        "actor.send() in a loop (Dramatiq has no bulk enqueue); completion: counted in the "
        "actor (one worker process)"
    ),
    module="bench.peers.dramatiq_bench",
    worker=WORKER,
    produce=produce,
    latency_produce=latency_produce,
)

if __name__ == "__main__":
    _harness.main(PEER)
