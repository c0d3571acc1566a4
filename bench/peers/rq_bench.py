"""RQ on the wsq throughput and latency workloads.

    bench/.venv-peers/bin/python -m bench.peers.rq_bench [--quick] [--json PATH]

See :mod:`bench.peers._harness` for the workloads and how they are timed. RQ drains slowly
(a few hundred jobs/s), so its full-size N is 5,000 rather than 20,000.
"""

from __future__ import annotations

import time
from importlib.metadata import version

from bench.peers import _harness
from bench.peers._harness import PYTHON, Peer

TASKS = 5_000
CHUNK = 1_000  # jobs per enqueue_many pipeline


WORKER = [PYTHON, "-m", "bench.peers.rq_app"]


def produce(count: int) -> float:
    from rq import Queue

    from bench.peers.rq_app import QUEUE

    queue = Queue(QUEUE, connection=_harness.connect())
    job = Queue.prepare_data("bench.peers.rq_app.noop")
    queue.enqueue_many([job])  # connect
    left = count - 1
    start = time.perf_counter()
    while left:
        size = min(CHUNK, left)
        queue.enqueue_many([Queue.prepare_data("bench.peers.rq_app.noop") for _ in range(size)])
        left -= size
    elapsed = time.perf_counter() - start
    return (count - 1) / elapsed


def latency_produce(count: int) -> None:
    from rq import Queue

    from bench.peers.rq_app import QUEUE

    queue = Queue(QUEUE, connection=_harness.connect())
    _harness.paced(count, lambda n, t: queue.enqueue("bench.peers.rq_app.stamp", t))


PEER = Peer(
    name="rq",
    version=version("rq"),
    config=(
        "one SimpleWorker process (no fork per job), logging at WARNING, default result_ttl "
        "(result_ttl=0 is slower: deleting a job costs more than keeping it); enqueue: "
        f"Queue.enqueue_many pipelines of {CHUNK} jobs; completion: counted in the job"
    ),
    module="bench.peers.rq_bench",
    worker=WORKER,
    produce=produce,
    latency_produce=latency_produce,
    tasks=TASKS,
)

if __name__ == "__main__":
    _harness.main(PEER)
