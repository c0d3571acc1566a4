"""The core with a shared state store (``Core(shared=True)``): nodes claim what they offer.

Several cores, one per node, over one :class:`MemoryStateStore` applied synchronously, and
a fake clock: each test is deterministic. A claim can be held (``auto_claim=False``) and
answered later, to model claims of several nodes on their way at once; the memory store
applies ops one at a time, as PostgreSQL's row locks make concurrent claims behave (a
claim never takes a task another claim took).
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from wsq.core.effects import Abort, Claim, Effect, Emit, Offer, Write
from wsq.core.engine import ADD_HOLD, BACKOFF, CLAIM_RETRY, NODE_BITS, POLL_INTERVAL, Core, Resynced
from wsq.core.ops import (
    Attempt,
    AttemptOutcome,
    Delete,
    RecordAttempt,
    SetProgress,
    claims_may_pass,
)
from wsq.core.task import Options, State, Task
from wsq.storage.base import (
    AdoptRuns,
    ClaimWaiting,
    DropWorkers,
    HeldRuns,
    Insert,
    PutWorker,
    Recovery,
    Update,
    WorkerRow,
)
from wsq.storage.memory import MemoryStateStore

WAITING, ACTIVE, COMPLETED, FAILED = State.WAITING, State.ACTIVE, State.COMPLETED, State.FAILED


@dataclass
class Node:
    core: Core
    offers: list[tuple[str, str, int]] = field(default_factory=list)  # (worker, task, run)
    aborts: list[tuple[str, str, int, str]] = field(default_factory=list)
    events: list[tuple[str, str]] = field(default_factory=list)  # (event, task id)
    held: list[Claim] = field(default_factory=list)
    claims: int = 0
    dead: bool = False  # killed: its timers fire no more


class Cluster:
    """Nodes sharing one store. ``auto_claim``: answer each claim as it is emitted."""

    def __init__(self, nodes: int = 2, *, auto_claim: bool = True) -> None:
        self.store = MemoryStateStore(shared=True)
        self.store._open = True
        self.now = 1_000.0
        self.auto_claim = auto_claim
        self.nodes = [Node(Core(shared=True, node_index=i)) for i in range(nodes)]
        self._ids = itertools.count(1)

    def apply(self, node: Node, effects: list[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, Write):
                result = self.store._apply_all([effect.op])
                assert not isinstance(result, Exception), result
            elif isinstance(effect, Claim):
                node.claims += 1
                if self.auto_claim:
                    self.answer(node, effect)
                else:
                    node.held.append(effect)
            elif isinstance(effect, Offer):
                node.offers += [(effect.worker, t.id, t.run) for t in effect.tasks]
            elif isinstance(effect, Abort):
                node.aborts.append((effect.worker, effect.task, effect.run, effect.reason))
            elif isinstance(effect, Emit) and effect.args and isinstance(effect.args[0], dict):
                node.events.append((effect.event, effect.args[0].get("id", "")))

    def answer(self, node: Node, claim: Claim, *, fail: bool = False) -> None:
        result: Any = None if fail else self.store._apply_all([claim.op])
        if result is not None:
            assert not isinstance(result, Exception), result
            result = result[0]
        self.apply(node, node.core.claimed(claim.op, result, self.now))

    def answer_held(self, node: Node) -> None:
        while node.held:
            self.answer(node, node.held.pop(0))

    # -- driving ---------------------------------------------------------------------------

    def add(self, node: Node, queue: str = "q", *, timeout: float = 60.0, retries: int = 0) -> str:
        task = Task(
            f"t{next(self._ids)}",
            queue,
            WAITING,
            node.core.allocate_seq(self.now),
            b"{}",
            options=Options(timeout, retries),
            created=self.now,
            updated=self.now,
        )
        assert self.store._apply_all([Insert(node.core.admit(task, self.now))]) == [True]
        self.apply(node, node.core.add(task, self.now))
        return task.id

    def new_task(self, node: Node, queue: str = "q") -> Task:
        """A task about to be added on ``node`` (its seq allocated), not inserted yet."""
        seq = node.core.allocate_seq(self.now)
        return Task(f"t{next(self._ids)}", queue, WAITING, seq, b"{}", created=self.now)

    def worker(self, node: Node, worker_id: str, queue: str = "q", concurrency: int = 1) -> None:
        effects = node.core.add_worker(f"conn-{worker_id}", worker_id, queue, concurrency, self.now)
        self.apply(node, effects)

    def complete(self, node: Node, task_id: str) -> None:
        run = self.stored(task_id).run
        self.apply(node, node.core.ack(task_id, run, self.now))
        self.apply(node, node.core.complete(task_id, run, self.now))

    def tick(self, seconds: float) -> None:
        self.now += seconds
        for node in self.nodes:
            if not node.dead:
                self.apply(node, node.core.tick(self.now))

    # -- looking ---------------------------------------------------------------------------

    def stored(self, task_id: str) -> Task:
        return self.store._tasks[task_id]

    def states(self) -> Counter[State]:
        return Counter(task.state for task in self.store._tasks.values())


def test_a_worker_claims_a_task_added_on_its_node_and_the_store_holds_the_run() -> None:
    cluster = Cluster(1)
    [a] = cluster.nodes
    cluster.worker(a, "w1")
    task_id = cluster.add(a)
    assert a.offers == [("w1", task_id, 1)]
    stored = cluster.stored(task_id)
    assert (stored.state, stored.run, stored.worker) == (ACTIVE, 1, "w1")
    assert a.core.counts() == {"q": {"waiting": 0, "active": 1, "completed": 0, "failed": 0}}
    cluster.complete(a, task_id)
    assert cluster.stored(task_id).state == COMPLETED


def test_a_task_added_on_one_node_reaches_a_worker_on_another_within_the_poll_interval() -> None:
    cluster = Cluster(2)
    a, b = cluster.nodes
    cluster.worker(b, "w1")  # its first claim finds nothing
    assert b.offers == [] and b.core.next_deadline() == cluster.now + POLL_INTERVAL
    task_id = cluster.add(a)
    assert a.claims == 0  # no worker on a: nothing to claim for
    cluster.tick(POLL_INTERVAL / 2)
    assert b.offers == []
    cluster.tick(POLL_INTERVAL / 2)
    assert b.offers == [("w1", task_id, 1)]


def test_claims_of_several_nodes_on_their_way_at_once_never_take_one_task_twice() -> None:
    cluster = Cluster(3, auto_claim=False)
    nodes = cluster.nodes
    for n, node in enumerate(nodes):
        cluster.worker(node, f"w{n}", concurrency=4)
    ids = [cluster.add(nodes[n % 3]) for n in range(20)]
    # Every node's claim is on its way while the others' are.
    assert all(len(node.held) == 1 for node in nodes)
    for node in reversed(nodes):
        cluster.answer_held(node)
    offered = [task for node in nodes for _, task, _ in node.offers]
    assert len(offered) == len(set(offered)) == 12  # 3 workers x 4 slots, each task once
    # In seq order within the queue: the 12 oldest.
    assert sorted(offered, key=ids.index) == ids[:12]
    for _ in range(20):  # everything runs, once (each offer done before its worker times out)
        for node in nodes:
            for _, task_id, _ in list(node.offers):
                if cluster.stored(task_id).state == ACTIVE:
                    cluster.complete(node, task_id)
            cluster.answer_held(node)
        cluster.tick(POLL_INTERVAL / 2)
        for node in nodes:
            cluster.answer_held(node)
    assert cluster.states() == Counter({COMPLETED: 20})
    offered = [task for node in nodes for _, task, _ in node.offers]
    assert sorted(offered) == sorted(ids)


def test_a_slot_promised_to_a_claim_on_its_way_is_not_claimed_for_again() -> None:
    cluster = Cluster(1, auto_claim=False)
    [a] = cluster.nodes
    cluster.worker(a, "w1", concurrency=2)
    [first] = a.held
    assert first.op.workers == ("w1", "w1")
    cluster.add(a)
    cluster.add(a)
    assert len(a.held) == 1  # one claim of a queue at a time
    cluster.answer_held(a)  # took both (added before it ran)
    assert len(a.offers) == 2 and a.held == []


def test_a_task_added_while_a_claim_that_found_nothing_was_on_its_way_is_claimed() -> None:
    cluster = Cluster(1, auto_claim=False)
    [a] = cluster.nodes
    cluster.worker(a, "w1")
    [claim] = a.held
    a.held.clear()
    cluster.answer(a, claim)  # finds nothing: the queue is known empty...
    assert a.held == [] and a.offers == []
    task_id = cluster.add(a)  # ...until a task is added
    cluster.answer_held(a)
    assert a.offers == [("w1", task_id, 1)]


def test_a_task_claimed_for_a_worker_that_left_meanwhile_waits_again_in_its_place() -> None:
    cluster = Cluster(1, auto_claim=False)
    [a] = cluster.nodes
    older = cluster.add(a)
    cluster.worker(a, "w1")
    cluster.apply(a, a.core.remove_worker("w1"))
    cluster.answer_held(a)
    stored = cluster.stored(older)
    assert (stored.state, stored.worker, stored.retries) == (WAITING, None, 0)
    assert a.offers == [] and a.core.counts()["q"]["waiting"] == 1
    cluster.worker(a, "w2")
    cluster.answer_held(a)
    assert a.offers == [("w2", older, 2)]  # run 1 ended unused: no attempt counted
    assert cluster.stored(older).retries == 0


def test_a_run_that_timed_out_waits_out_its_back_off_in_the_store_for_every_node() -> None:
    cluster = Cluster(2)
    a, b = cluster.nodes
    cluster.worker(a, "wa")
    task_id = cluster.add(a, timeout=1.0, retries=3)
    cluster.apply(a, a.core.ack(task_id, 1, cluster.now))
    cluster.apply(a, a.core.remove_worker("wa"))
    cluster.worker(b, "wb")  # b's worker is idle and polls
    cluster.tick(1.0)  # the run times out on a
    stored = cluster.stored(task_id)
    assert (stored.state, stored.retries) == (WAITING, 1)
    assert stored.not_before == pytest.approx(cluster.now + BACKOFF)
    assert a.aborts == [("wa", task_id, 1, "Timed out.")] or a.aborts == []
    b.offers.clear()
    cluster.nodes[1].core.poll_interval = BACKOFF / 4
    cluster.tick(BACKOFF / 2)  # b looks, but the task is not due
    assert b.offers == []
    cluster.tick(BACKOFF)
    cluster.tick(POLL_INTERVAL)
    assert b.offers == [("wb", task_id, 2)]
    assert cluster.stored(task_id).not_before == 0.0


def test_a_claim_that_failed_is_tried_again_later() -> None:
    cluster = Cluster(1, auto_claim=False)
    [a] = cluster.nodes
    task_id = cluster.add(a)
    cluster.worker(a, "w1")
    claim = a.held.pop()
    cluster.answer(a, claim, fail=True)
    assert a.held == [] and a.core.next_deadline() == cluster.now + CLAIM_RETRY
    cluster.tick(CLAIM_RETRY)
    cluster.answer_held(a)
    assert a.offers == [("w1", task_id, 1)]


def test_seqs_are_unique_across_nodes_and_increase_on_each() -> None:
    cores = [Core(shared=True, node_index=i) for i in range(3)]
    seqs = [core.allocate_seq(5.0) for _ in range(4) for core in cores]
    assert len(set(seqs)) == len(seqs)
    for index in range(len(cores)):
        mine = [seq for seq in seqs if seq & ((1 << NODE_BITS) - 1) == index]
        assert mine == sorted(mine) and len(mine) == 4
    later = cores[2].allocate_seq(6.0)
    assert later > max(seqs)  # in time order across nodes
    with pytest.raises(ValueError):
        Core(shared=True, node_index=1 << NODE_BITS)


def test_the_node_index_comes_from_the_store() -> None:
    core = Core(shared=True)
    core.recover(Recovery(next_seq=(7 << NODE_BITS) | 3, node_index=5), 5.0)
    assert core.allocate_seq(5.0) & ((1 << NODE_BITS) - 1) == 5
    core.set_node_index(9)  # a lease taken anew may come with another
    assert core.allocate_seq(5.0) & ((1 << NODE_BITS) - 1) == 9
    with pytest.raises(ValueError):
        core.set_node_index(-1)


def test_a_report_of_a_run_the_store_no_longer_holds_does_not_apply() -> None:
    """The store's guard: an update out of 'active' names the run it ends."""
    cluster = Cluster(1)
    [a] = cluster.nodes
    cluster.worker(a, "w1")
    task_id = cluster.add(a)
    old = cluster.stored(task_id).copy()
    old.state, old.run = COMPLETED, 0  # as a node that lost the run would write it
    assert cluster.store._apply_all([Update(old, expected=ACTIVE)]) == [False]
    assert cluster.stored(task_id).state == ACTIVE


def test_a_restarted_node_claims_the_tasks_its_store_holds() -> None:
    cluster = Cluster(1)
    [a] = cluster.nodes
    ids = [cluster.add(a) for _ in range(3)]
    recovery = Cluster(1)  # a fresh node on the same store
    recovery.store = cluster.store
    [b] = recovery.nodes
    stored = Recovery(
        next_seq=max(t.seq for t in cluster.store._tasks.values()) + 1,
        waiting_queues=["q"],
        counts={("q", WAITING): 3},
    )
    effects = b.core.recover(stored, cluster.now)
    recovery.apply(b, effects)
    recovery.worker(b, "w1", concurrency=5)
    assert [task for _, task, _ in b.offers] == ids
    assert b.core.allocate_seq(0.0) > stored.next_seq  # seqs keep increasing


def test_claim_op_carries_every_free_slot_round_robin() -> None:
    cluster = Cluster(1, auto_claim=False)
    [a] = cluster.nodes
    cluster.worker(a, "w1", concurrency=2)
    cluster.answer_held(a)
    cluster.worker(a, "w2", concurrency=1)
    cluster.answer_held(a)
    for _ in range(3):  # added on another node: found by the next poll
        assert cluster.store._apply_all([Insert(cluster.new_task(a))]) == [True]
    cluster.tick(POLL_INTERVAL)
    [claim] = a.held
    assert isinstance(claim.op, ClaimWaiting)
    assert sorted(claim.op.workers) == ["w1", "w1", "w2"]
    cluster.answer_held(a)
    assert Counter(worker for worker, _, _ in a.offers) == {"w1": 2, "w2": 1}


# -- admit: an add that is its own claim ----------------------------------------------------


def test_an_add_for_an_idle_worker_is_inserted_as_its_run_and_offered_with_no_claim() -> None:
    cluster = Cluster(1)
    [a] = cluster.nodes
    cluster.worker(a, "w1")  # its claim finds nothing: the queue is known empty
    claims = a.claims
    task = cluster.new_task(a)
    record = a.core.admit(task, cluster.now)
    assert (record.state, record.run, record.worker) == (ACTIVE, 1, "w1")
    assert task.state == WAITING  # what the producer is answered and events show
    assert cluster.store._apply_all([Insert(record)]) == [True]
    cluster.apply(a, a.core.add(task, cluster.now))
    assert a.offers == [("w1", task.id, 1)] and a.claims == claims
    assert [event for event, _ in a.events][-2:] == ["task added", "task queued"]
    assert a.core.counts()["q"] == {"waiting": 0, "active": 1, "completed": 0, "failed": 0}
    cluster.complete(a, task.id)
    assert cluster.stored(task.id).state == COMPLETED


def test_an_add_does_not_overtake_an_earlier_add_still_being_inserted() -> None:
    cluster = Cluster(1)
    [a] = cluster.nodes
    cluster.worker(a, "w1")
    busy = cluster.add(a)  # w1's one slot
    first, second = cluster.new_task(a), cluster.new_task(a)
    record = a.core.admit(first, cluster.now)
    assert record.state == WAITING  # no free slot: waits
    assert cluster.store._apply_all([Insert(record)]) == [True]
    cluster.complete(a, busy)  # a slot frees while first's insert is on its way
    record = a.core.admit(second, cluster.now)
    assert record.state == WAITING  # first is older: second waits too
    assert cluster.store._apply_all([Insert(record)]) == [True]
    cluster.apply(a, a.core.add(first, cluster.now))
    cluster.apply(a, a.core.add(second, cluster.now))
    assert [task for _, task, _ in a.offers] == [busy, first.id]


def test_an_admitted_add_that_fails_frees_its_slot() -> None:
    cluster = Cluster(1)
    [a] = cluster.nodes
    cluster.worker(a, "w1")
    older = cluster.new_task(a)
    assert a.core.admit(older, cluster.now).state == ACTIVE
    a.core.abandon_seq(older.seq)  # the insert failed
    waiting = cluster.add(a)
    assert a.offers == [("w1", waiting, 1)]


def test_an_admitted_task_whose_worker_left_waits_for_the_next() -> None:
    cluster = Cluster(1)
    [a] = cluster.nodes
    cluster.worker(a, "w1")
    task = cluster.new_task(a)
    assert cluster.store._apply_all([Insert(a.core.admit(task, cluster.now))]) == [True]
    cluster.apply(a, a.core.remove_worker("w1"))
    cluster.apply(a, a.core.add(task, cluster.now))
    stored = cluster.stored(task.id)
    assert (stored.state, stored.worker, stored.retries) == (WAITING, None, 0)
    assert a.core.counts()["q"]["waiting"] == 1 and a.offers == []
    cluster.worker(a, "w2")
    assert a.offers == [("w2", task.id, 2)]


# -- takeover: a dead node's runs ----------------------------------------------------------


def test_adopted_runs_are_timed_from_the_takeover_and_their_worker_reports_here() -> None:
    cluster = Cluster(2)
    a, b = cluster.nodes
    cluster.worker(a, "w1")
    done_id = cluster.add(a, timeout=5.0)
    late_id = cluster.add(a, timeout=5.0)  # waits: w1 has one slot
    cluster.apply(a, a.core.ack(done_id, 1, cluster.now))
    cluster.tick(3.0)
    a.dead = True  # b takes its run over (the store says node = b)
    b.core.adopt([cluster.stored(done_id).copy()], cluster.now)
    cluster.worker(b, "w1")  # the worker reconnected to b: its run counts against its slot
    assert b.offers == []
    cluster.tick(4.0)  # 7 s after the ack, 4 after the takeover: still running
    assert cluster.stored(done_id).state == ACTIVE
    cluster.complete(b, done_id)  # its report is accepted on b
    assert cluster.stored(done_id).state == COMPLETED
    assert b.offers == [("w1", late_id, 1)]  # the slot freed: the waiting task is claimed


def test_an_adopted_run_whose_worker_never_comes_back_times_out_on_the_new_holder() -> None:
    cluster = Cluster(2)
    a, b = cluster.nodes
    cluster.worker(a, "w1")
    task_id = cluster.add(a, timeout=5.0, retries=1)
    cluster.apply(a, a.core.ack(task_id, 1, cluster.now))
    a.dead = True
    b.core.adopt([cluster.stored(task_id).copy()], cluster.now)
    cluster.tick(5.0)
    stored = cluster.stored(task_id)
    assert (stored.state, stored.retries) == (WAITING, 1)  # b failed the attempt
    b.core.drop_runs()  # had b lost its lease, the run would be no longer its own
    assert b.core.lookup(task_id) is None


def test_a_run_whose_worker_moved_to_another_live_node_is_dropped_by_its_old_holder() -> None:
    """The worker's connection to a broke while a stays up; it reports on b, which takes
    the run over (AdoptRuns); a hears of it and drops the run: its timers end nothing,
    and the slot the run took there is free again."""
    cluster = Cluster(2)
    a, b = cluster.nodes
    cluster.worker(a, "w1")
    task_id = cluster.add(a, timeout=5.0)
    late_id = cluster.add(a)
    cluster.apply(a, a.core.ack(task_id, 1, cluster.now))
    cluster.tick(3.0)
    [adopted] = cluster.store._apply_all([AdoptRuns(((task_id, 1),), ("w1",))])
    assert [(t.id, t.run) for t in adopted] == [(task_id, 1)]
    b.core.adopt([cluster.stored(task_id).copy()], cluster.now)
    assert not a.core.drop_run(task_id, 2)  # not the run a holds
    assert a.core.drop_run(task_id, 1)
    assert a.core.lookup(task_id) is None and not a.core.drop_run(task_id, 1)
    events = len(a.events)
    cluster.tick(3.0)  # past a's deadline (5 s after the ack), not past b's
    assert cluster.stored(task_id).state == ACTIVE and len(a.events) == events
    assert a.offers == [("w1", task_id, 1)]
    cluster.apply(a, a.core.flush(cluster.now))  # the server does so at each turn's end
    assert a.offers[-1] == ("w1", late_id, 1)  # w1's slot on a (if still there) is free
    cluster.complete(b, task_id)
    assert cluster.stored(task_id).state == COMPLETED


def test_no_node_claims_a_task_before_the_commit_that_announces_it() -> None:
    """Its insert holds it (not_before); add() releases it in the same batch as "task
    added", so no node can run it, and tell of its run, before every node heard of it."""
    cluster = Cluster(2)
    a, b = cluster.nodes
    cluster.worker(b, "wb")
    task = cluster.new_task(a)
    record = a.core.admit(task, cluster.now)
    assert record.not_before == cluster.now + ADD_HOLD
    assert cluster.store._apply_all([Insert(record)]) == [True]
    cluster.tick(POLL_INTERVAL)  # b looks: the task is there, but not claimable yet
    assert b.offers == []
    effects = a.core.add(task, cluster.now)
    assert isinstance(effects[0], Write) and effects[0].op.task.not_before == 0.0
    assert [e.event for e in effects if isinstance(e, Emit)] == ["task added", "task queued"]
    cluster.apply(a, effects)
    cluster.tick(POLL_INTERVAL)
    assert b.offers == [("wb", task.id, 1)]


def test_a_node_alone_inserts_unheld_and_releases_nothing_and_holds_again_once_not() -> None:
    """No other node is alive: nobody could claim a task before hearing of it, so the
    insert is claimable at once and add() writes no release."""
    cluster = Cluster(1)
    (a,) = cluster.nodes
    a.core.alone = True
    task = cluster.new_task(a)
    record = a.core.admit(task, cluster.now)
    assert record.not_before == 0.0
    assert cluster.store._apply_all([Insert(record)]) == [True]
    effects = a.core.add(task, cluster.now)
    assert not any(isinstance(e, Write) and isinstance(e.op, Update) for e in effects)
    a.core.alone = False
    again = cluster.new_task(a)
    assert a.core.admit(again, cluster.now).not_before == cluster.now + ADD_HOLD


def test_a_task_whose_node_died_before_announcing_it_is_claimable_after_the_hold() -> None:
    cluster = Cluster(2)
    a, b = cluster.nodes
    cluster.worker(b, "wb")
    task = cluster.new_task(a)
    assert cluster.store._apply_all([Insert(a.core.admit(task, cluster.now))]) == [True]
    a.dead = True  # never calls add(): its producer was never answered, and adds again
    b.core.poll_interval = 1.0
    cluster.tick(ADD_HOLD - 1.0)
    assert b.offers == []
    cluster.tick(2.0)
    assert b.offers == [("wb", task.id, 1)]


# -- workers: each node's, listed by every node --------------------------------------------


def test_a_shared_core_writes_its_workers_for_the_other_nodes() -> None:
    """add_worker puts the worker's row, remove_worker drops it, sync_workers makes them
    anew; stats and workers list the other nodes' rows after the node's own."""
    cluster = Cluster(2)
    a, b = cluster.nodes
    a.core.node, b.core.node = "a", "b"
    a.core.add_worker("conn", "k1", "q", 2, cluster.now, name="w1", client="py", peer="p:1")
    effects = a.core.add_worker("conn", "k2", "other", 1, cluster.now)
    writes = [e.op for e in effects if isinstance(e, Write)]
    assert writes == [PutWorker(WorkerRow("k2", "k2", "other", 1, cluster.now, "a"))]
    cluster.apply(a, a.core.add_worker("c3", "k3", "q", 1, cluster.now))
    cluster.apply(a, a.core.remove_worker("k3"))
    drop = [e.op for e in a.core.remove_worker("k2") if isinstance(e, Write)]
    assert drop == [DropWorkers("a", ("k2",))]
    sync = [e.op for e in a.core.sync_workers() if isinstance(e, Write)]
    row = WorkerRow("k1", "w1", "q", 2, cluster.now, "a", client="py", peer="p:1")
    assert sync == [DropWorkers("a"), PutWorker(row)]
    cluster.add(b)
    theirs = replace(row, runs=(("ta", 3, 0.25),))  # as b reads it from the store
    cluster.worker(b, "bw")  # claims the task b added
    stats = list(b.core.stats(None, None, [theirs, replace(row, key="x", queue="only-a", runs=())]))
    assert [(q["name"], q["workers"]) for q in stats] == [
        ("only-a", [{"id": "w1", "queue": "only-a", "concurrency": 2, "running": 0, "node": "a"}]),
        (
            "q",
            [
                {"id": "bw", "queue": "q", "concurrency": 1, "running": 1, "node": "b"},
                {"id": "w1", "queue": "q", "concurrency": 2, "running": 1, "node": "a"},
            ],
        ),
    ]
    [other, own] = b.core.workers(None, "q", [theirs])  # in (node, id) order
    assert (own["id"], own["node"], own["connection"]) == ("bw", "b", "conn-bw")
    assert other == {
        "id": "w1",
        "queue": "q",
        "concurrency": 2,
        "since": cluster.now,
        "node": "a",
        "connection": None,
        "client": "py",
        "peer": "p:1",
        "runs": [{"task": "ta", "run": 3, "offered": None, "started": None, "progress": 0.25}],
    }
    assert list(b.core.workers(lambda queue: queue != "q", None, [theirs])) == []
    assert [w["id"] for w in b.core.workers(None, "q", [theirs], after=("a", "w1"))] == ["bw"]


def test_a_core_of_one_server_writes_no_worker_rows() -> None:
    core = Core()
    effects = core.add_worker("conn", "k1", "q", 1, 0.0)
    effects += core.remove_worker("k1") + core.sync_workers()
    assert not [e for e in effects if isinstance(e, Write)]


# -- resync: after writes that failed --------------------------------------------------------


def test_a_run_whose_end_was_not_stored_is_held_again_after_a_resync() -> None:
    """PostgreSQL was away when the worker completed: the core ended the run, the store
    did not. The resync holds it again, timed from then, so its worker's report (sent
    again) is accepted, or its timeout runs it again; nothing is stuck."""
    cluster = Cluster(2)
    a, _ = cluster.nodes
    cluster.worker(a, "w1")
    task_id = cluster.add(a, timeout=5.0, retries=1)
    cluster.apply(a, a.core.ack(task_id, 1, cluster.now))
    a.core.complete(task_id, 1, cluster.now)  # its writes are lost: never applied
    assert a.core.lookup(task_id) is None and cluster.stored(task_id).state == ACTIVE
    a.core.begin_resync()
    [held] = cluster.store._apply_all([HeldRuns()])
    assert a.core.resynced(held, cluster.now) == Resynced(0, 1, 0, [])
    cluster.complete(a, task_id)  # the report sent again is accepted
    assert cluster.stored(task_id).state == COMPLETED


def test_a_resync_leaves_runs_made_or_ended_after_its_read_alone() -> None:
    cluster = Cluster(2)
    a, _ = cluster.nodes
    cluster.worker(a, "w1", concurrency=3)
    lost = cluster.add(a, timeout=5.0)  # ended by a write that failed
    ended = cluster.add(a, timeout=5.0)  # ended after the read, stored
    ghost = cluster.add(a, timeout=5.0)  # held by the core, not by the store
    for task_id in (lost, ended, ghost):
        cluster.apply(a, a.core.ack(task_id, 1, cluster.now))
    a.core.complete(lost, 1, cluster.now)  # lost
    cluster.store._tasks[ghost] = replace(cluster.stored(ghost), state=WAITING, worker=None)
    a.core.begin_resync()
    [held] = cluster.store._apply_all([HeldRuns()])  # the read: lost and ended
    assert sorted(t.id for t in held) == sorted([lost, ended])
    cluster.apply(a, a.core.complete(ended, 1, cluster.now))  # after the read
    fresh = cluster.add(a, timeout=5.0)  # claimed after the read: the store has it
    assert a.core.lookup(fresh) is not None
    assert a.core.resynced(held, cluster.now) == Resynced(1, 1, 0, [])  # ghost forgotten
    assert a.core.lookup(lost) is not None and a.core.lookup(fresh) is not None
    assert a.core.lookup(ended) is None and a.core.lookup(ghost) is None
    assert cluster.stored(ended).state == COMPLETED
    cluster.tick(5.0)  # lost's timer, armed again, ends it in the store
    assert cluster.stored(lost).state == FAILED


def test_a_claim_passes_only_the_writes_that_cannot_change_what_it_finds() -> None:
    """The server sends a claim ahead of the writes decided before it only when they
    neither make a task claimable nor take or remove one (``claims_may_pass``): a run's
    end, a progress, an attempt record."""

    def task(state: State) -> Task:
        return Task(id="t", queue="q", state=state, seq=1, data=b"{}", created=1.0, updated=1.0)

    passes = [
        Update(task(State.COMPLETED), expected=State.ACTIVE),
        Update(task(State.FAILED), expected=State.ACTIVE),
        SetProgress("t", 0.5, 1.0),
        RecordAttempt(Attempt("t", 1, ended=1.0, outcome=AttemptOutcome.COMPLETED)),
    ]
    assert all(claims_may_pass(op) for op in passes)
    stops = [
        Insert(task(State.WAITING)),
        Update(task(State.WAITING), expected=State.ACTIVE),  # queued again: a retry
        Update(task(State.WAITING), expected=State.FAILED),  # retried by hand
        Update(task(State.ACTIVE), expected=State.WAITING),  # taken by another way
        Delete("t", State.WAITING),
        ClaimWaiting("q", ("w",), 1.0),
    ]
    assert not any(claims_may_pass(op) for op in stops)
