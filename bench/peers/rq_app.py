"""RQ jobs and worker for :mod:`bench.peers.rq_bench`.

    python -m bench.peers.rq_app    # one SimpleWorker (jobs run in-process, no fork per job)

The throughput count lives in the worker process (counted in the job); the N-th job marks
``bench:end``.
"""

from __future__ import annotations

import time

from rq import Queue, SimpleWorker

from bench.peers._harness import LAT, Counter, connect, mark_ready

QUEUE = "bench"

client = connect()
counter = Counter()


def noop() -> None:
    counter.start(client)
    counter.finish(client)


def stamp(t: float) -> None:
    delay = time.monotonic() - t
    client.rpush(LAT, delay)


def main() -> None:
    worker = SimpleWorker([Queue(QUEUE, connection=client)], connection=client)
    mark_ready(client)
    worker.work(logging_level="WARNING")


if __name__ == "__main__":
    main()
