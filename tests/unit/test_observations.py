"""What the core reports for metrics (wsq.core.observations): one entry per transition
worth counting, with the times measured on the fake clock passed in."""

from __future__ import annotations

from wsq.core import observations as seen
from wsq.core.engine import Core
from wsq.core.observations import Observation
from wsq.core.task import Options, State, Task


def make_core() -> tuple[Core, list[Observation]]:
    core = Core(worker_timeout=1.0)
    observations: list[Observation] = []
    core.observations = observations
    return core, observations


def add(core: Core, task_id: str, now: float, *, queue: str = "q", **options: object) -> None:
    seq = core.allocate_seq(0.0)
    task = Task(task_id, queue, State.WAITING, seq, b"null", created=now, updated=now)
    task.options = Options(**options)  # type: ignore[arg-type]
    core.add(task, now)
    core.flush(now)


def test_no_list_no_observations() -> None:
    core = Core()
    add(core, "t1", 10.0)
    assert core.observations is None


def test_a_task_added_started_and_completed() -> None:
    core, seen_list = make_core()
    add(core, "t1", 100.0)
    core.add_worker("c1", "w1", "q", 1, 102.5)
    core.flush(102.5)
    core.ack("t1", 1, 102.6)
    core.complete("t1", 1, 104.5)
    assert seen_list == [
        (seen.ADDED, "q", 0.0),
        (seen.STARTED, "q", 2.5),
        (seen.COMPLETED, "q", 2.0),
    ]


def test_a_failure_with_a_retry_left_then_a_final_one() -> None:
    core, seen_list = make_core()
    core.add_worker("c1", "w1", "q", 1, 0.0)
    add(core, "t1", 10.0, retries=1)
    core.fail("t1", 1, "boom", 11.0)
    core.flush(11.0)
    core.fail("t1", 2, "boom", 14.0)
    assert seen_list == [
        (seen.ADDED, "q", 0.0),
        (seen.STARTED, "q", 0.0),
        (seen.RETRIED, "q", 1.0),
        (seen.STARTED, "q", 0.0),
        (seen.FAILED, "q", 3.0),
    ]


def test_a_timeout_is_observed_before_its_failure() -> None:
    core, seen_list = make_core()
    core.add_worker("c1", "w1", "q", 1, 0.0)
    add(core, "t1", 0.0, timeout=5.0)
    core.ack("t1", 1, 0.5)
    seen_list.clear()
    core.tick(5.5)
    assert seen_list == [(seen.TIMED_OUT, "q", 0.0), (seen.FAILED, "q", 5.5)]


def test_an_unacknowledged_offer_times_out_too() -> None:
    core, seen_list = make_core()
    core.add_worker("c1", "w1", "q", 1, 0.0)
    add(core, "t1", 0.0, retries=1)
    seen_list.clear()
    core.tick(1.0)
    assert seen_list == [(seen.TIMED_OUT, "q", 0.0), (seen.RETRIED, "q", 1.0)]


def test_a_manual_retry_is_a_retry() -> None:
    core, seen_list = make_core()
    core.add_worker("c1", "w1", "q", 1, 0.0)
    add(core, "t1", 0.0)
    core.fail("t1", 1, "boom", 1.0)
    stored = core.lookup("t1")
    assert stored is None  # a failed task lives in the store only
    failed = Task("t1", "q", State.FAILED, 1, b"null", retries=1, run=1, error="boom")
    seen_list.clear()
    op = core.begin_retry(failed, 2.0)
    core.retried(op, True, 2.0)
    assert seen_list[0] == (seen.RETRIED, "q", 0.0)


def test_the_wait_counts_from_when_the_task_was_last_queued() -> None:
    core, seen_list = make_core()
    core.add_worker("c1", "w1", "q", 1, 0.0)
    add(core, "t1", 0.0, retries=1)
    core.fail("t1", 1, "boom", 3.0)  # queued again at 3.0, offered at once to the free slot
    core.flush(3.0)
    assert seen_list[-1] == (seen.STARTED, "q", 0.0)


def test_a_clock_stepped_back_never_makes_a_negative_wait() -> None:
    core, seen_list = make_core()
    add(core, "t1", 100.0)
    core.add_worker("c1", "w1", "q", 1, 90.0)
    core.flush(90.0)
    assert seen_list[-1] == (seen.STARTED, "q", 0.0)


def test_waiting_and_worker_counts() -> None:
    core, _ = make_core()
    add(core, "t1", 0.0, queue="a")
    add(core, "t2", 0.0, queue="a")
    add(core, "t3", 0.0, queue="b")
    core.add_worker("c1", "w1", "b", 1, 0.0)
    core.add_worker("c1", "w2", "idle", 1, 0.0)
    core.flush(0.0)
    assert core.waiting_counts() == {"a": 2}
    assert core.worker_counts() == {"b": 1, "idle": 1}
