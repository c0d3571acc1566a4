"""Core with defer_dispatch (as the server runs it): offers wait for flush()."""

from __future__ import annotations

from wsq.core.effects import Offer, Write
from wsq.core.engine import Core
from wsq.core.task import State, Task


def waiting(core: Core, n: int, queue: str = "q") -> Task:
    return Task(id=f"t{n}", queue=queue, state=State.WAITING, seq=core.allocate_seq(0.0), data=b"1")


def offers(effects: list[object]) -> list[Offer]:
    return [e for e in effects if isinstance(e, Offer)]


def test_adds_are_offered_at_flush_in_fifo_order() -> None:
    core = Core(worker_timeout=1.0)
    core.defer_dispatch = True
    core.add_worker("c1", "w", "q", 10, now=0.0)
    tasks = [waiting(core, n) for n in range(5)]
    for task in tasks:
        assert offers(core.add(task, now=0.0)) == []
    [offer] = offers(core.flush(now=0.0))
    assert [t.id for t in offer.tasks] == [t.id for t in tasks]
    assert core.flush(now=0.0) == []


def test_completions_in_one_turn_free_slots_for_one_offer() -> None:
    core = Core(worker_timeout=1.0)
    core.defer_dispatch = True
    core.add_worker("c1", "w", "q", 3, now=0.0)
    for n in range(6):
        core.add(waiting(core, n), now=0.0)
    [first] = offers(core.flush(now=0.0))
    assert len(first.tasks) == 3
    for task in first.tasks:
        effects = core.complete(task.id, task.run, now=1.0)
        assert offers(effects) == []
        assert any(isinstance(e, Write) for e in effects)
    [second] = offers(core.flush(now=1.0))
    assert [t.id for t in second.tasks] == ["t3", "t4", "t5"]


def test_a_queue_forgotten_before_flush_is_skipped() -> None:
    core = Core(worker_timeout=1.0)
    core.defer_dispatch = True
    core.add_worker("c1", "w", "q", 1, now=0.0)
    task = waiting(core, 0)
    core.add(task, now=0.0)
    [offer] = offers(core.flush(now=0.0))
    core.remove_worker("w")
    core.complete(offer.tasks[0].id, offer.tasks[0].run, now=1.0)
    assert core.flush(now=1.0) == []
    assert core.queue_names() == []
