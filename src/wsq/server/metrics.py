"""What ``GET /metrics`` reports, in the Prometheus text format (docs/operations.md).

One :class:`Metrics` per server, with its own ``CollectorRegistry`` (several servers in
one process do not collide). The per-task path stays cheap: the core appends what it
saw happen to :attr:`Metrics.observations` (:mod:`wsq.core.observations`), and the server
calls :meth:`Metrics.drain` once per turn of its loop, which adds them to plain
integers, bucket counts and the per-second :class:`~wsq.core.history.History`. Task
counts by state, workers and connections are read from the server only when scraped
(:class:`_Collector`); nothing is kept per event for them.

Queue names are chosen by clients, so the number of ``queue`` label values is bounded:
the first ``max_queues`` queues seen get their own; every other queue (and one named
``_other``) is counted under ``queue="_other"``.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.process_collector import ProcessCollector

from wsq.core import observations as seen
from wsq.core.history import History
from wsq.core.observations import Observation

OTHER = "_other"
"""The ``queue`` label of queues past ``max_queues``."""
MAX_QUEUES = 100
"""Queues with a label of their own. A scrape builds its text on the event loop (picows's
HTTP hook cannot wait), 0.3 to 0.5 ms per labelled queue (``python -m bench.wsq_metrics``):
100 cost 33 to 47 ms."""
RENDER_REUSE = 1.0
"""Seconds a rendered scrape is served again: however often /metrics is asked for, the
server renders at most once a second."""
PULSE = 0.5
"""Seconds between two wake-ups of :meth:`Metrics.run` (loop lag, history samples)."""
CONTENT_TYPE = CONTENT_TYPE_LATEST

TASK_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
)  # fmt: skip
"""Upper bounds (seconds) of the enqueue-to-start and run-time histograms."""
COMMIT_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

# kind -> (metric name without _total, help): one counter per observation kind.
_COUNTERS = {
    seen.ADDED: ("wsq_tasks_added", "Tasks added."),
    seen.STARTED: ("wsq_tasks_started", "Runs offered to a worker (tasks that left waiting)."),
    seen.COMPLETED: ("wsq_tasks_completed", "Runs completed."),
    seen.FAILED: ("wsq_tasks_failed", "Runs failed with no retry left (the task is failed)."),
    seen.RETRIED: (
        "wsq_tasks_retried",
        "Tasks queued again: failed runs with retries left, and retry requests.",
    ),
    seen.TIMED_OUT: (
        "wsq_tasks_timed_out",
        "Runs that expired: not acknowledged in time, or past their timeout.",
    ),
}
_RUN_ENDS = frozenset({seen.COMPLETED, seen.FAILED, seen.RETRIED})


class _Buckets:
    """A histogram as plain numbers: counts per bucket (not cumulative) and the sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
        return out


class _QueueStats:
    __slots__ = ("counts", "run", "used", "wait")

    def __init__(self) -> None:
        self.counts = dict.fromkeys(_COUNTERS, 0)
        self.wait = _Buckets(TASK_BUCKETS)
        self.run = _Buckets(TASK_BUCKETS)
        self.used = False


class Metrics:
    """The numbers of one server. ``counts`` (tasks per queue and state), ``workers``
    (per queue), ``waiting`` (per queue, queues with any) and ``connections`` are read
    when scraped or sampled; the server must call :meth:`drain` after the core's calls
    (once per turn of its loop) and run :meth:`run` in the background."""

    def __init__(
        self,
        *,
        counts: Callable[[], Mapping[str, Mapping[str, int]]],
        workers: Callable[[], Mapping[str, int]],
        waiting: Callable[[], Mapping[str, int]],
        connections: Callable[[], int],
        max_queues: int = MAX_QUEUES,
        history: History | None = None,
    ) -> None:
        if max_queues < 0:
            raise ValueError(f"max_queues must be 0 or more, not {max_queues!r}")
        self.max_queues = max_queues
        self.history = history or History()
        self.observations: list[Observation] = []
        self._queues: dict[str, _QueueStats] = {}
        self._other = _QueueStats()
        self._counts = counts
        self._workers = workers
        self._waiting = waiting
        self._connections = connections
        self._sampled = -1  # the last second the history sampled
        self.registry = CollectorRegistry(auto_describe=False)
        self._rendered: tuple[float, bytes] | None = None  # (monotonic time, body)
        self.registry.register(_Collector(self))
        ProcessCollector(registry=self.registry)
        self.received_bytes = Counter(
            "wsq_stream_received_bytes",
            "Stream bytes received from clients (uploads).",
            registry=self.registry,
        )
        self.sent_bytes = Counter(
            "wsq_stream_sent_bytes",
            "Stream bytes sent to clients (downloads).",
            registry=self.registry,
        )
        self.commit_seconds = Histogram(
            "wsq_store_commit_seconds",
            "From a batch of writes submitted to the state store to its being durable.",
            buckets=COMMIT_BUCKETS,
            registry=self.registry,
        )
        self.loop_lag = Histogram(
            "wsq_event_loop_lag_seconds",
            f"How late a timer set every {PULSE} s fires on the server's event loop.",
            buckets=LAG_BUCKETS,
            registry=self.registry,
        )

    # -- recording -------------------------------------------------------------------------

    def drain(self, now: float) -> None:
        """Take in the core's observations so far, as of ``now`` (Unix seconds)."""
        observations = self.observations
        if not observations:
            return
        queues = self._queues
        for kind, queue, seconds in observations:
            stats = queues.get(queue) or self._admit(queue)
            stats.counts[kind] += 1
            if kind == seen.STARTED:
                stats.wait.observe(seconds)
            elif kind in _RUN_ENDS:
                stats.run.observe(seconds)
        self.history.observe(observations, now)
        observations.clear()

    def sample(self, now: float) -> None:
        """Drain, and record each queue's waiting depth once per second of ``now``."""
        self.drain(now)
        if int(now) != self._sampled:
            self._sampled = int(now)
            self.history.sample(self._waiting(), now)

    async def run(self) -> None:
        """Every :data:`PULSE` seconds: measure the loop's lag and :meth:`sample`."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + PULSE
            await asyncio.sleep(PULSE)
            self.loop_lag.observe(max(0.0, loop.time() - due))
            self.sample(time.time())

    def _admit(self, queue: str) -> _QueueStats:
        """The stats under ``queue``'s own label, if there is room for one more."""
        if len(self._queues) >= self.max_queues or queue == OTHER:
            self._other.used = True
            return self._other
        stats = self._queues[queue] = _QueueStats()
        stats.used = True
        return stats

    def _label(self, queue: str) -> str:
        return (
            queue if (self._queues.get(queue) or self._admit(queue)) is not self._other else OTHER
        )

    # -- reading ---------------------------------------------------------------------------

    def render(self, now: float | None = None) -> bytes:
        """The Prometheus text exposition of every metric (:data:`CONTENT_TYPE`), made
        again only if the last one is older than :data:`RENDER_REUSE`."""
        now = time.monotonic() if now is None else now
        if self._rendered is not None and now - self._rendered[0] < RENDER_REUSE:
            return self._rendered[1]
        self.drain(time.time())
        body = generate_latest(self.registry)
        self._rendered = (now, body)
        return body

    def families(self) -> Iterator[Metric]:
        """The metrics built at scrape time (see :class:`_Collector`)."""
        yield self._tasks_gauge()
        workers = GaugeMetricFamily("wsq_workers", "Connected workers.", labels=["queue"])
        for label, value in self._by_label(self._workers()).items():
            workers.add_metric([label], value)
        yield workers
        yield GaugeMetricFamily(
            "wsq_connections", "Open client connections.", value=self._connections()
        )
        labelled = [(name, stats) for name, stats in self._queues.items() if stats.used]
        if self._other.used:
            labelled.append((OTHER, self._other))
        for kind, (name, text) in _COUNTERS.items():
            counter = CounterMetricFamily(name, text, labels=["queue"])
            for label, stats in labelled:
                counter.add_metric([label], stats.counts[kind])
            yield counter
        yield self._histogram(
            "wsq_task_wait_seconds",
            "From a task's being queued to its being offered to a worker.",
            [(label, stats.wait) for label, stats in labelled],
        )
        yield self._histogram(
            "wsq_task_run_seconds",
            "From a run's offer to its completion or failure.",
            [(label, stats.run) for label, stats in labelled],
        )

    def _tasks_gauge(self) -> GaugeMetricFamily:
        gauge = GaugeMetricFamily(
            "wsq_tasks", "Tasks by queue and state.", labels=["queue", "state"]
        )
        totals: dict[tuple[str, str], int] = {}
        for queue, states in self._counts().items():
            label = self._label(queue)
            for state, count in states.items():
                totals[label, state] = totals.get((label, state), 0) + count
        for (label, state), count in totals.items():
            gauge.add_metric([label, state], count)
        return gauge

    def _by_label(self, values: Mapping[str, int]) -> dict[str, int]:
        out: dict[str, int] = {}
        for queue, value in values.items():
            label = self._label(queue)
            out[label] = out.get(label, 0) + value
        return out

    @staticmethod
    def _histogram(
        name: str, text: str, series: list[tuple[str, _Buckets]]
    ) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, text, labels=["queue"])
        for label, buckets in series:
            family.add_metric([label], buckets.cumulative(), buckets.total)
        return family


class _Collector:
    """Builds the per-queue metrics from :class:`Metrics` when the registry is scraped."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return self._metrics.families()
