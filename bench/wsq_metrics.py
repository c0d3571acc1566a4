"""What a /metrics scrape and a ``history`` answer cost the server's event loop.

    python -m bench.wsq_metrics [--quick] [--json PATH] [--queues N ...]

For each N (default 10, 100, 1,000; quick: 10, 50), an in-process server with
``--metrics-max-queues N`` gets one task added to each of N queues (so every queue has a
label of its own), then its scrape is rendered 5 times, each after the render cache has
expired (``RENDER_REUSE``). Reported: the median render time in ms (time the event loop
spends building the text: picows's HTTP hook cannot wait, so it happens there), the size
of the text, and ms per labelled queue.

Then one queue's ring of the last hour (``wsq.core.history``), busy every second (tasks
added, started with a wait, completed, failed, and a waiting depth), answers the page's
two requests: the whole hour, and the seconds since the previous answer (what the
dashboard asks once a second). Reported: the time to build each (median of 20) and the
size of its JSON.

Last, why the per-task numbers are plain integers: one update of prometheus-client's own
``Counter.labels(q).inc()`` and ``Histogram.labels(q).observe()`` against the server's
``_Buckets.observe`` (best of 5 timeit runs, µs per call).
"""

from __future__ import annotations

import asyncio
import statistics
import time
import timeit
from typing import Any

import msgspec

import wsq
from bench.common import arguments, write_results
from wsq.blobs.memory import MemoryBlobStore
from wsq.core import observations as seen
from wsq.core.history import History
from wsq.server.metrics import RENDER_REUSE, TASK_BUCKETS, _Buckets
from wsq.storage.memory import MemoryStateStore

RENDERS = 5


async def measure(queues: int) -> dict[str, Any]:
    server = wsq.Server(
        port=0,
        state_store=MemoryStateStore(),
        blob_store=MemoryBlobStore(),
        metrics_max_queues=queues,
    )
    async with server, wsq.Client(server.url) as client:
        for start in range(0, queues, 100):
            names = range(start, min(start + 100, queues))
            await asyncio.gather(*(client.queue(f"queue-{n}").add({"n": n}) for n in names))
        times, size = [], 0
        clock = time.monotonic()
        for n in range(RENDERS):
            began = time.perf_counter()
            body = server.metrics.render(now=clock + (n + 1) * (RENDER_REUSE + 1))
            times.append(time.perf_counter() - began)
            size = len(body)
    median = statistics.median(times) * 1000
    return {
        "queues": queues,
        "render_ms": round(median, 2),
        "bytes": size,
        "ms_per_queue": round(median / queues, 3),
    }


def history_answers() -> dict[str, Any]:
    history, start = History(), 1_700_000_000
    for second in range(start, start + 3600):
        history.observe(
            [
                (seen.ADDED, "q", 0.0),
                (seen.STARTED, "q", (second % 7 + 1) / 3),  # waits of many digits
                (seen.COMPLETED, "q", 0.5),
                (seen.FAILED, "q", 0.5),
            ],
            second + 0.5,
        )
        history.sample({"q": second % 97}, second + 0.5)
    now = start + 3599.5
    result = {}
    for name, since in (("hour", None), ("since_last", now - 1)):
        times = []
        for _ in range(20):
            began = time.perf_counter()
            answer = history.series("q", since, now)
            times.append(time.perf_counter() - began)
        result[name] = {
            "build_ms": round(statistics.median(times) * 1000, 3),
            "bytes": len(msgspec.json.encode(answer)),
        }
    return result


def per_update() -> dict[str, float]:
    from prometheus_client import CollectorRegistry, Counter, Histogram

    registry = CollectorRegistry()
    counter = Counter("c", "c", ["queue"], registry=registry)
    histogram = Histogram("h", "h", ["queue"], buckets=TASK_BUCKETS, registry=registry)
    buckets = _Buckets(TASK_BUCKETS)
    calls = {
        "counter_labels_inc_us": lambda: counter.labels("q").inc(),
        "histogram_labels_observe_us": lambda: histogram.labels("q").observe(0.2),
        "plain_buckets_observe_us": lambda: buckets.observe(0.2),
    }
    n = 100_000
    return {
        name: round(min(timeit.repeat(call, number=n, repeat=5)) / n * 1e6, 3)
        for name, call in calls.items()
    }


async def main(sizes: list[int]) -> dict[str, Any]:
    return {
        "workload": "metrics scrape",
        "runs": [await measure(n) for n in sizes],
        "history": history_answers(),
        "per_update": per_update(),
    }


if __name__ == "__main__":
    parser = arguments(__doc__ or "")
    parser.add_argument("--queues", type=int, nargs="*")
    args = parser.parse_args()
    sizes = args.queues or ([10, 50] if args.quick else [10, 100, 1000])
    write_results(args.json, asyncio.run(main(sizes)))
