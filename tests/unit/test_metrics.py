"""wsq.server.metrics without a server: observations in, Prometheus text out."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from wsq.core import observations as seen
from wsq.core.history import History
from wsq.server.metrics import Metrics


def make(**kwargs: Any) -> tuple[Metrics, dict[str, dict[str, int]]]:
    counts: dict[str, dict[str, int]] = {}
    metrics = Metrics(
        counts=lambda: counts,
        workers=lambda: {"q": 2},
        waiting=lambda: {name: c["waiting"] for name, c in counts.items() if c.get("waiting")},
        connections=lambda: 3,
        **kwargs,
    )
    return metrics, counts


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.render().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_observations_become_counters_and_histograms() -> None:
    metrics, counts = make()
    counts["q"] = {"waiting": 1, "active": 0, "completed": 2, "failed": 0}
    metrics.observations.extend(
        [
            (seen.ADDED, "q", 0.0),
            (seen.STARTED, "q", 0.002),
            (seen.STARTED, "q", 7.0),
            (seen.COMPLETED, "q", 0.3),
            (seen.RETRIED, "q", 0.01),
            (seen.TIMED_OUT, "q", 0.0),
        ]
    )
    metrics.drain(1000.0)
    assert metrics.observations == []
    got = samples(metrics)
    q = (("queue", "q"),)
    assert got["wsq_tasks_added_total", q] == 1
    assert got["wsq_tasks_started_total", q] == 2
    assert got["wsq_tasks_retried_total", q] == 1
    assert got["wsq_tasks_timed_out_total", q] == 1
    assert got["wsq_tasks_failed_total", q] == 0
    assert got["wsq_task_wait_seconds_bucket", (("le", "0.001"), ("queue", "q"))] == 0
    assert got["wsq_task_wait_seconds_bucket", (("le", "0.0025"), ("queue", "q"))] == 1
    assert got["wsq_task_wait_seconds_bucket", (("le", "5.0"), ("queue", "q"))] == 1
    assert got["wsq_task_wait_seconds_bucket", (("le", "10.0"), ("queue", "q"))] == 2
    assert got["wsq_task_wait_seconds_bucket", (("le", "+Inf"), ("queue", "q"))] == 2
    assert got["wsq_task_wait_seconds_sum", q] == 7.002
    assert got["wsq_task_run_seconds_count", q] == 2  # the completion and the retried run
    assert got["wsq_tasks", (("queue", "q"), ("state", "completed"))] == 2
    assert got["wsq_workers", q] == 2
    assert got["wsq_connections", ()] == 3


def test_a_value_on_a_bucket_bound_counts_in_that_bucket() -> None:
    metrics, _ = make()
    metrics.observations.append((seen.STARTED, "q", 0.5))
    metrics.drain(0.0)
    got = samples(metrics)
    assert got["wsq_task_wait_seconds_bucket", (("le", "0.25"), ("queue", "q"))] == 0
    assert got["wsq_task_wait_seconds_bucket", (("le", "0.5"), ("queue", "q"))] == 1


def test_queues_past_the_bound_share_the_other_label() -> None:
    metrics, counts = make(max_queues=1)
    counts["b"] = {"waiting": 4, "active": 0, "completed": 0, "failed": 0}
    counts["c"] = {"waiting": 5, "active": 0, "completed": 0, "failed": 0}
    metrics.observations.extend([(seen.ADDED, name, 0.0) for name in ("a", "b", "c", "a")])
    metrics.drain(0.0)
    got = samples(metrics)
    assert got["wsq_tasks_added_total", (("queue", "a"),)] == 2
    assert got["wsq_tasks_added_total", (("queue", "_other"),)] == 2
    assert got["wsq_tasks", (("queue", "_other"), ("state", "waiting"))] == 9
    assert got["wsq_workers", (("queue", "_other"),)] == 2  # "q" has no label of its own
    labels = {dict(labels).get("queue") for _, labels in got}
    assert labels - {None} == {"a", "_other"}


def test_sample_feeds_the_history_once_per_second() -> None:
    history = History(seconds=10)
    metrics, counts = make(history=history)
    counts["q"] = {"waiting": 3, "active": 0, "completed": 0, "failed": 0}
    metrics.observations.append((seen.ADDED, "q", 0.0))
    metrics.sample(100.2)
    counts["q"]["waiting"] = 7
    metrics.sample(100.7)  # the same second: no new sample
    metrics.sample(101.1)
    series = history.series("q", 100, 101)
    assert series["added"] == [1, 0]
    assert series["waiting"] == [3, 7]


def test_two_instances_do_not_share_a_registry() -> None:
    one, _ = make()
    two, _ = make()
    one.observations.append((seen.ADDED, "q", 0.0))
    one.drain(0.0)
    one.received_bytes.inc(10)
    assert samples(one)["wsq_stream_received_bytes_total", ()] == 10
    assert samples(two)["wsq_stream_received_bytes_total", ()] == 0
    assert samples(one)["wsq_tasks_added_total", (("queue", "q"),)] == 1
    assert samples(two)["wsq_tasks_added_total", (("queue", "q"),)] == 0
