"""The per-second ring of the last hour (wsq.core.history), on a fake clock."""

from __future__ import annotations

import pytest

from wsq.core import observations as seen
from wsq.core.history import History

T0 = 1_700_000_000  # a whole second


def test_counts_land_in_their_second() -> None:
    history = History()
    history.observe([(seen.ADDED, "q", 0.0), (seen.ADDED, "q", 0.0)], T0 + 0.2)
    history.observe([(seen.ADDED, "q", 0.0), (seen.COMPLETED, "q", 1.5)], T0 + 0.9)
    history.observe([(seen.FAILED, "q", 2.0), (seen.COMPLETED, "q", 1.0)], T0 + 2.1)
    series = history.series("q", T0, T0 + 2.5)
    assert series["start"] == T0 and series["end"] == T0 + 2
    assert series["added"] == [3, 0, 0]
    assert series["completed"] == [1, 0, 1]
    assert series["failed"] == [0, 0, 1]


def test_latency_is_the_mean_wait_of_the_tasks_started_in_the_second() -> None:
    history = History()
    history.observe([(seen.STARTED, "q", 1.0), (seen.STARTED, "q", 3.0)], T0)
    history.observe([(seen.STARTED, "q", 0.5)], T0 + 2)
    assert history.series("q", T0, T0 + 2)["latency"] == [2.0, None, 0.5]


def test_retries_and_timeouts_are_not_charted_as_adds_or_ends() -> None:
    history = History()
    history.observe([(seen.RETRIED, "q", 1.0), (seen.TIMED_OUT, "q", 0.0)], T0)
    series = history.series("q", T0, T0)
    assert (series["added"], series["completed"], series["failed"]) == ([0], [0], [0])


def test_waiting_is_sampled_and_missing_samples_are_none() -> None:
    history = History()
    history.observe([(seen.ADDED, "q", 0.0)], T0)
    history.sample({"q": 5}, T0 + 0.5)
    history.sample({}, T0 + 2.5)  # q has none waiting now
    assert history.series("q", T0, T0 + 3)["waiting"] == [5, None, 0, None]


def test_a_sample_gives_a_ring_to_a_queue_with_tasks_waiting() -> None:
    history = History()
    history.sample({"backlog": 12, "empty": 0}, T0)
    assert history.queues() == ["backlog"]
    assert history.series("backlog", T0, T0)["waiting"] == [12]


def test_the_series_covers_the_last_hour_by_default() -> None:
    history = History()
    history.observe([(seen.ADDED, "q", 0.0)], T0)
    series = history.series("q", None, T0 + 10)
    assert series["start"] == T0 + 10 - 3599
    assert len(series["added"]) == 3600
    assert series["added"][-11] == 1 and sum(series["added"]) == 1


def test_an_hour_later_the_slot_reads_empty_without_a_sweep() -> None:
    history = History(seconds=60)
    history.observe([(seen.ADDED, "q", 0.0)], T0)
    history.observe([(seen.COMPLETED, "q", 0.0)], T0 + 1)  # keeps the ring in use
    later = T0 + 60  # the same slot as T0, a minute on
    series = history.series("q", None, later)
    assert series["start"] == T0 + 1
    assert series["added"] == [0] * 60 and series["completed"][0] == 1
    history.observe([(seen.ADDED, "q", 0.0)], later)
    assert history.series("q", later, later)["added"] == [1]


def test_since_is_clamped_to_the_ring() -> None:
    history = History(seconds=10)
    history.observe([(seen.ADDED, "q", 0.0)], T0)
    assert history.series("q", 0, T0)["start"] == T0 - 9
    future = history.series("q", T0 + 1e6, T0)
    assert future["start"] == T0 + 1 and future["end"] == T0
    assert future["added"] == [] and future["waiting"] == []
    assert history.series("q", T0 + 0.7, T0)["added"] == [1]


def test_an_unknown_queue_reads_as_zeros() -> None:
    history = History(seconds=5)
    series = history.series("nobody", None, T0)
    assert series["added"] == [0] * 5
    assert series["waiting"] == [None] * 5 and series["latency"] == [None] * 5
    assert history.queues() == []


def test_the_number_of_rings_is_bounded_and_quiet_rings_make_room() -> None:
    history = History(seconds=10, max_queues=2)
    history.observe([(seen.ADDED, "a", 0.0), (seen.ADDED, "b", 0.0), (seen.ADDED, "c", 0.0)], T0)
    assert sorted(history.queues()) == ["a", "b"]
    assert history.series("c", T0, T0)["added"] == [0]
    history.observe([(seen.ADDED, "b", 0.0)], T0 + 5)
    history.sample({}, T0 + 10)  # a: quiet for 10 s, nothing waiting: dropped
    assert history.queues() == ["b"]
    history.observe([(seen.ADDED, "c", 0.0)], T0 + 11)
    assert sorted(history.queues()) == ["b", "c"]


def test_a_quiet_queue_with_tasks_waiting_keeps_its_ring() -> None:
    history = History(seconds=10, max_queues=1)
    history.observe([(seen.ADDED, "a", 0.0)], T0)
    history.sample({"a": 1}, T0 + 30)
    assert history.queues() == ["a"]


def test_huge_depths_are_capped_not_lost() -> None:
    history = History(seconds=5)
    history.sample({"q": 10**12}, T0)
    assert history.series("q", T0, T0)["waiting"] == [2**32 - 2]


@pytest.mark.parametrize("kwargs", [{"seconds": 0}, {"max_queues": -1}])
def test_bad_sizes_are_refused(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        History(**kwargs)
