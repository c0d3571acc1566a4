"""Unit tests of :class:`wsq.core.engine.Core`, the scheduler, driven by a fake clock.

No event loop and no sleeps: time is a float passed into each call. The :class:`Harness`
applies the core's effects the way the server would, to an in-memory model of the state
store (a dict of task copies), and after every call checks that the store and the core
agree (see :meth:`Harness.check`), so every test below doubles as a model check. Load
effects are answered from that dict in ``seq`` order, as the store's ordered pipe would:
the snapshot is taken where the Load sits in the effect stream, and it may be handed back
to the core later (``auto_load=False``) to model a slow store.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from wsq.core.effects import Abort, DeleteBlobs, Effect, Emit, Load, Offer, Write
from wsq.core.engine import PAYLOAD_CAP, Core, Resynced
from wsq.core.task import TRANSITIONS, Options, State, StreamRef, Task
from wsq.exceptions import InvalidArgument, InvalidState, StaleRun
from wsq.storage.base import (
    KEPT_ATTEMPTS,
    Attempt,
    AttemptOutcome,
    CountTasks,
    Delete,
    HeldRuns,
    Op,
    ReadTasks,
    RecordAttempt,
    Recovery,
    SetProgress,
    Update,
)

WAITING, ACTIVE, COMPLETED, FAILED = State.WAITING, State.ACTIVE, State.COMPLETED, State.FAILED

TASK_KEYS = set(Task("x", "q", WAITING, 1, b"").to_json())
WORKER_KEYS = {"id", "queue", "concurrency"}
# Event name -> kinds of its args ("task": a task dict, "worker": a worker dict).
EVENT_ARGS: dict[str, tuple[str, ...]] = {
    "task added": ("task",),
    "task queued": ("task",),
    "task started": ("task",),
    "task progress": ("task", "fraction"),
    "task completed": ("task",),
    "task failed": ("task", "bool"),
    "task deleted": ("task",),
    "worker added": ("worker",),
    "worker removed": ("worker",),
    "worker started": ("worker", "task"),
}


# -- the harness -------------------------------------------------------------------------


@dataclass
class PendingLoad:
    queue: str
    limit: int
    snapshot: list[Task]


@dataclass
class ConnectedWorker:
    connection: str
    queue: str
    concurrency: int


STATE_NAMES = ("waiting", "active", "completed", "failed")


class Harness:
    """A :class:`Core` plus a model of everything around it: the store, the connected
    workers, the clock. Each driving method returns the effects of the core call itself;
    effects of Loads answered on the way are in :attr:`log` only."""

    def __init__(
        self, *, worker_timeout: float = 1.0, window: int = 1000, auto_load: bool = True
    ) -> None:
        self.worker_timeout = worker_timeout
        self.window = window
        self.auto_load = auto_load
        self.core = Core(worker_timeout=worker_timeout, window=window)
        self.now = 0.0
        self.store: dict[str, Task] = {}
        self.attempts: dict[str, list[Attempt]] = {}  # the store's, by task, oldest first
        self.deleted: set[str] = set()
        self.added: list[str] = []
        self.undelivered: dict[str, Task] = {}
        self.strict_fifo = True
        self.workers: dict[str, ConnectedWorker] = {}
        self.pending_loads: list[PendingLoad] = []
        # Removes and retries whose store op applied (or not) and whose result the core
        # has not heard yet: (kind, the copy read, the op, whether it applied).
        self.pending_admin: list[tuple[str, Task, Delete | Update, bool]] = []
        self.admin_op: Delete | Update | None = None  # the last one made
        self.log: list[Effect] = []
        self.offer_order: list[str] = []
        self.offered_runs: set[tuple[str, int]] = set()  # (task id, run) of every offer
        # Runs a resync forgot (their start was never stored): no attempt records them.
        self.unstored_runs: set[tuple[str, int]] = set()
        self.reoffered: set[tuple[str, int]] = set()  # may be offered again (restart())
        self.last: list[Effect] = []
        # A batch of writes failed (a full disk), until the next resync: writes are not
        # stored, events not told, loads fail; offers and aborts still go out.
        self.losing = False
        self._ids = itertools.count(1)
        self._connections = itertools.count(1)

    # -- driving the core ------------------------------------------------------------------

    def add(
        self,
        queue: str = "q",
        *,
        timeout: float = 60.0,
        retries: int = 0,
        autoremove: bool = False,
        blobs: Sequence[str] = (),
        inline: bool = False,
    ) -> str:
        """Insert a new task into the store, then hand it to the core; return its id (the
        core's effects are in :attr:`last`). ``blobs`` are keys of uploaded streams;
        ``inline`` adds a stream held in the record itself."""
        task_id = self.insert(
            queue,
            timeout=timeout,
            retries=retries,
            autoremove=autoremove,
            blobs=blobs,
            inline=inline,
        )
        self.deliver(task_id)
        return task_id

    def insert(
        self,
        queue: str = "q",
        *,
        timeout: float = 60.0,
        retries: int = 0,
        autoremove: bool = False,
        blobs: Sequence[str] = (),
        inline: bool = False,
        big: bool = False,
    ) -> str:
        """The first half of an add: the durable insert, with a seq from the core. Until
        :meth:`deliver`, Loads see the task and the core does not know it. ``big`` data
        is over the payload a window keeps in memory."""
        task_id = f"t{next(self._ids)}"
        streams = tuple(StreamRef(("files", i), 1, blob=key) for i, key in enumerate(blobs))
        if inline:
            streams += (StreamRef(("note",), 1, inline=b"x"),)
        task = Task(
            task_id,
            queue,
            WAITING,
            self.core.allocate_seq(0.0),
            b'"%s"' % (b"x" * PAYLOAD_CAP) if big else b"{}",
            streams,
            Options(timeout, retries, autoremove),
            created=self.now,
            updated=self.now,
        )
        self.store[task_id] = replace(task)
        self.added.append(task_id)
        self.undelivered[task_id] = task
        return task_id

    def deliver(self, task_id: str) -> None:
        """The second half of an add: :meth:`Core.add`, once the insert is durable."""
        task = self.undelivered.pop(task_id)
        # Concurrent adds may finish out of seq order, and a task queued again meanwhile
        # (a failure, a retry) may have a later seq than an add still on its way; FIFO
        # then holds only loosely.
        if any(t.queue == task.queue and t.seq < task.seq for t in self.undelivered.values()):
            self.strict_fifo = False
        newer = (t for t in self.store.values() if t.queue == task.queue and t.seq > task.seq)
        if any(t.state == WAITING and t.id not in self.undelivered for t in newer):
            self.strict_fifo = False
        self.last = self._handle(self.core.add(task, self.now))

    def add_worker(
        self, worker_id: str, queue: str = "q", concurrency: int = 1, client: str | None = None
    ) -> list[Effect]:
        connection = f"c{next(self._connections)}"
        effects = self.core.add_worker(
            connection, worker_id, queue, concurrency, self.now, client=client
        )
        self.workers[worker_id] = ConnectedWorker(connection, queue, concurrency)
        return self._handle(effects)

    def remove_worker(self, worker_id: str) -> list[Effect]:
        effects = self.core.remove_worker(worker_id)
        self.workers.pop(worker_id, None)
        return self._handle(effects)

    def ack(self, task_id: str, run: int | None = None) -> list[Effect]:
        return self._handle(self.core.ack(task_id, self.run_of(task_id, run), self.now))

    def complete(self, task_id: str, run: int | None = None) -> list[Effect]:
        return self._handle(self.core.complete(task_id, self.run_of(task_id, run), self.now))

    def fail(self, task_id: str, error: str = "boom", run: int | None = None) -> list[Effect]:
        run = self.run_of(task_id, run)
        return self._handle(self.core.fail(task_id, run, error, self.now))

    def progress(self, task_id: str, value: float, run: int | None = None) -> list[Effect]:
        run = self.run_of(task_id, run)
        return self._handle(self.core.progress(task_id, run, value, self.now))

    def touch(self, task_id: str, run: int | None = None) -> list[Effect]:
        return self._handle(self.core.touch(task_id, self.run_of(task_id, run), self.now))

    def release(self, task_id: str, run: int | None = None) -> list[Effect]:
        return self._handle(self.core.release(task_id, self.run_of(task_id, run), self.now))

    def tick(self, at: float | None = None) -> list[Effect]:
        if at is not None:
            assert at >= self.now, "the fake clock never goes back"
            self.now = at
        return self._handle(self.core.tick(self.now))

    def advance(self, seconds: float) -> list[Effect]:
        return self.tick(self.now + seconds)

    def remove(self, task_id: str) -> list[Effect]:
        """A remove as the server makes it: the core's if it holds the task, else a
        delete the store decides on, its result handed back at once."""
        effects = self.core.remove(task_id, self.now)
        if effects is not None:
            return self._handle(effects)
        stored = self.store.get(task_id)
        if stored is None:
            return []
        self.begin_remove(replace(stored))
        return self.finish_admin()

    def retry(self, task_id: str) -> list[Effect]:
        held = self.core.lookup(task_id)
        self.begin_retry(replace(held or self.store[task_id]))
        return self.finish_admin()

    def begin_remove(self, read: Task) -> None:
        """The first half of a remove of a task the core does not hold, from a copy read
        earlier (maybe out of date): the conditional delete reaches the store now, its
        result reaches the core at :meth:`finish_admin`."""
        op = self.admin_op = self.core.begin_delete(read)
        assert op is not None, "begin_remove of a task whose add is not delivered"
        self.pending_admin.append(("remove", read, op, self._decide(op)))
        self.check()

    def begin_retry(self, read: Task) -> None:
        """The first half of a retry (raises InvalidState as the core does)."""
        op = self.admin_op = self.core.begin_retry(read, self.now)
        self.pending_admin.append(("retry", read, op, self._decide(op)))
        self.check()

    def finish_admin(self) -> list[Effect]:
        """Hand the oldest pending remove or retry its store result."""
        kind, read, op, applied = self.pending_admin.pop(0)
        if kind == "remove":
            return self._handle(self.core.deleted(read, applied, self.now))
        assert isinstance(op, Update)
        return self._handle(self.core.retried(op, applied, self.now))

    def _decide(self, op: Delete | Update) -> bool:
        """A conditional op as the store applies it: only to a task in the expected state."""
        stored = self.store.get(op.task_id if isinstance(op, Delete) else op.task.id)
        if stored is None or op.expected not in (None, stored.state):
            return False
        if isinstance(op, Delete):
            del self.store[op.task_id]
            self.attempts.pop(op.task_id, None)
            self.deleted.add(op.task_id)
        else:
            self.store[op.task.id] = replace(op.task)
        return True

    def answer_load(self) -> list[Effect]:
        """Hand the oldest pending Load's result to the core."""
        load = self.pending_loads.pop(0)
        return self._handle(self.core.loaded(load.queue, load.snapshot, load.limit, self.now))

    def answer_loads(self) -> None:
        while self.pending_loads:
            self.answer_load()

    def restart(self) -> list[Effect]:
        """A new core recovering from the store, as after a server restart."""
        # Known: the run numbers a resync put aside (Core._spent, in memory) are lost
        # with the server; a restart before the task's next offer may offer them again
        # (its clients ignore an offer of a run they are running or reporting).
        for task_id, spent in self.core._spent.items():
            stored = self.store.get(task_id)
            if stored is not None:
                self.reoffered.update((task_id, r) for r in range(stored.run + 1, spent + 1))
        self.core = Core(worker_timeout=self.worker_timeout, window=self.window)
        self.workers.clear()
        self.pending_loads.clear()
        self.pending_admin.clear()
        self.undelivered.clear()  # adds in flight die with the server; recovery loads them
        tasks = sorted(self.store.values(), key=lambda t: t.seq)
        recovery = Recovery(
            next_seq=max((t.seq for t in tasks), default=0) + 1,
            active=[replace(t) for t in tasks if t.state == ACTIVE],
            waiting_queues=sorted({t.queue for t in tasks if t.state == WAITING}),
            counts=dict(Counter((t.queue, t.state) for t in tasks)),
        )
        return self._handle(self.core.recover(recovery, self.now))

    def work_off(self, limit: int = 100_000) -> None:
        """Complete every active task, in seq order, answering Loads, until all is done."""
        for _ in range(limit):
            if self.pending_loads:
                self.answer_load()
                continue
            active = self.in_state(ACTIVE)
            if not active and self.core._delayed:
                self.tick(max(self.now, self.core.next_deadline() or self.now))
                continue
            if not active:
                return
            for task_id in active:
                self.complete(task_id)
        raise AssertionError("work_off did not finish")

    # -- looking at the model --------------------------------------------------------------

    def run_of(self, task_id: str, run: int | None = None) -> int:
        """``run`` if given, else the run the store knows for the task."""
        return self.store[task_id].run if run is None else run

    def state(self, task_id: str) -> State | None:
        task = self.store.get(task_id)
        return task.state if task is not None else None

    def in_state(self, state: State, queue: str | None = None) -> list[str]:
        """Ids of the stored tasks in ``state``, in seq order."""
        tasks = sorted(self.store.values(), key=lambda t: t.seq)
        return [t.id for t in tasks if t.state == state and queue in (None, t.queue)]

    def held_by(self, worker_id: str) -> list[str]:
        """Ids of the runs (offered or active) the core counts against ``worker_id``."""
        return sorted(tid for tid, run in self.core._runs.items() if run.task.worker == worker_id)

    def window_of(self, queue: str = "q") -> list[str]:
        held = self.core._queues.get(queue)
        return [t.id for t in held.window] if held is not None else []

    # -- applying effects ------------------------------------------------------------------

    def _handle(self, effects: list[Effect]) -> list[Effect]:
        if self.losing:
            return self._lose(effects)
        self._apply(effects)
        while self.auto_load and self.pending_loads:
            load = self.pending_loads.pop(0)
            self._apply(self.core.loaded(load.queue, load.snapshot, load.limit, self.now))
        self.core.writes_durable(self.core.ends_made())  # as the server does per batch
        self.check()
        return effects

    def _lose(self, effects: list[Effect]) -> list[Effect]:
        """``effects`` while writes fail: see :attr:`losing`."""
        for effect in effects:
            self.log.append(effect)
            if isinstance(effect, Offer):
                self._check_offer(effect)
            elif isinstance(effect, Abort):
                self._check_abort(effect)
            elif isinstance(effect, Load):
                self._lose(self.core.load_failed(effect.queue, self.now))
        return effects

    def _apply(self, effects: Iterable[Effect]) -> None:
        previous: Effect | None = None
        for effect in effects:
            self.log.append(effect)
            if isinstance(effect, Write) and isinstance(effect.op, RecordAttempt):
                # Committed with the task's Update: the attempt follows it at once.
                assert isinstance(previous, Write) and isinstance(previous.op, Update), effect
                assert previous.op.task.id == effect.op.attempt.task_id, effect
            previous = effect
            if isinstance(effect, Write):
                self._write(effect.op)
            elif isinstance(effect, Load):
                snapshot = self._first_waiting(effect.queue, effect.limit)
                for task in snapshot:
                    if effect.max_payload is not None and task.payload_size > effect.max_payload:
                        task.strip()
                self.pending_loads.append(PendingLoad(effect.queue, effect.limit, snapshot))
            elif isinstance(effect, Offer):
                self._check_offer(effect)
            elif isinstance(effect, Abort):
                self._check_abort(effect)
            elif isinstance(effect, Emit):
                self._check_emit(effect)
            else:
                assert isinstance(effect, DeleteBlobs), effect

    def _write(self, op: Op) -> None:
        if isinstance(op, Update):
            stored = self.store.get(op.task.id)
            assert stored is not None, f"Update of {op.task.id}, which the store does not hold"
            # A store of one server ends a run whose start it did not store (Update).
            unstarted = stored.state == WAITING and stored.run < op.task.run
            assert stored.state == op.expected or (op.expected == ACTIVE and unstarted), (
                f"Update of {op.task.id} expects {op.expected}, the store has {stored.state}"
            )
            # A task whose back-off ended moves to the back: waiting -> waiting, new seq.
            assert op.task.state in TRANSITIONS[stored.state] or (
                op.task.state == stored.state == WAITING and op.task.seq > stored.seq
            ), op
            self.store[op.task.id] = replace(op.task)
            if op.attempt is not None:  # a completed run's record, stored with its task
                assert op.task.state == COMPLETED, op
                self._record(op.attempt)
        elif isinstance(op, SetProgress):
            stored = self.store[op.task_id]
            assert stored.state == ACTIVE, f"progress of {op.task_id}, which is {stored.state}"
            stored.progress = op.progress
            stored.updated = op.updated
        elif isinstance(op, Delete):
            assert op.task_id in self.store, f"Delete of {op.task_id}, which is not stored"
            del self.store[op.task_id]
            self.attempts.pop(op.task_id, None)
            self.deleted.add(op.task_id)
        elif isinstance(op, RecordAttempt):
            self._record(op.attempt)
        else:
            raise AssertionError(f"the core submitted {op!r}")

    def _record(self, attempt: Attempt) -> None:
        """A RecordAttempt as the stores apply it (ops.RecordAttempt), checked: one record
        per run that ended, in run order."""
        stored = self.store.get(attempt.task_id)
        assert stored is not None, f"attempt of {attempt.task_id}, which is not stored"
        assert attempt.ended is not None and attempt.outcome is not None, attempt
        assert attempt.run == stored.run, f"attempt of run {attempt.run}, stored {stored.run}"
        kept = self.attempts.setdefault(attempt.task_id, [])
        assert not kept or kept[-1].run < attempt.run, f"run {attempt.run} recorded twice"
        kept.append(attempt)
        kept[:] = [a for a in kept if a.run > attempt.run - KEPT_ATTEMPTS]

    def _first_waiting(self, queue: str, limit: int) -> list[Task]:
        tasks = [t for t in self.store.values() if t.queue == queue and t.state == WAITING]
        return [replace(t) for t in sorted(tasks, key=lambda t: t.seq)[:limit]]

    def _check_offer(self, offer: Offer) -> None:
        worker = self.workers.get(offer.worker)
        assert worker is not None, f"offer to {offer.worker}, which is not connected"
        assert offer.connection == worker.connection
        assert offer.tasks, "an empty offer"
        for task in offer.tasks:
            assert task.queue == worker.queue, f"{task.id} offered to a worker of another queue"
            assert task.state == ACTIVE and task.worker == offer.worker
            if not self.losing:
                assert as_held(self.store[task.id], task) == task, "offered before its Update"
            # A worker may still run an earlier offer of it (a resync forgot it): a run
            # is offered once.
            assert (task.id, task.run) not in self.offered_runs - self.reoffered, (
                f"run {task.run} offered twice"
            )
            if (task.id, task.run) in self.reoffered:  # a run again: it will have its record
                self.reoffered.discard((task.id, task.run))
                self.unstored_runs.discard((task.id, task.run))
            self.offered_runs.add((task.id, task.run))
            self.offer_order.append(task.id)
        # Runs held again by a resync (their reports are on their way) may fill a worker
        # past its concurrency for a while; an offer never does.
        held = self.held_by(offer.worker)
        assert len(held) <= worker.concurrency, f"{offer.worker} holds {held}"

    def _check_abort(self, abort: Abort) -> None:
        worker = self.workers.get(abort.worker)
        assert worker is not None, f"abort sent to {abort.worker}, which is not connected"
        assert abort.connection == worker.connection

    def _check_emit(self, emit: Emit) -> None:
        json.dumps(emit.args)  # JSON-ready
        kinds = EVENT_ARGS[emit.event]
        assert len(emit.args) == len(kinds), emit
        for kind, arg in zip(kinds, emit.args, strict=True):
            if kind == "task":
                assert set(arg) == TASK_KEYS and arg["queue"] == emit.queue, emit
            elif kind == "worker":
                # Full key set checked by test_worker_started_of_disconnected_worker_...
                assert {"id", "queue"} <= set(arg) <= WORKER_KEYS, emit
            elif kind == "bool":
                assert isinstance(arg, bool), emit
            else:
                assert isinstance(arg, float) and 0.0 <= arg <= 1.0, emit

    # -- the model check -------------------------------------------------------------------

    def check(self) -> None:
        """Invariants that hold after every call. Looks inside the core (its windows and
        runs) on purpose: this is where "no task is in two places" is visible."""
        core = self.core
        window_ids = self._check_windows()
        assert not set(window_ids) & set(core._runs), "a task is both waiting and active"
        for task_id, run in core._runs.items():
            assert run.task.state == ACTIVE and run.task.id == task_id
        assert not set(core._delayed) & (set(window_ids) | set(core._runs))
        for task_id, task in core._delayed.items():
            assert task.state == WAITING and task.id == task_id
        for task_id in [*window_ids, *core._runs, *core._delayed]:
            stored = self.store.get(task_id)
            assert stored is not None, (
                f"the core holds {task_id}, which the store "
                f"{'deleted' if task_id in self.deleted else 'never had'}"
            )
            held = core.lookup(task_id)
            assert held is not None and as_held(stored, held) == held, (
                f"store and core disagree on {task_id}"
            )
        self._check_store_is_known(window_ids)
        for task_id in self.added:
            assert (task_id in self.store) != (task_id in self.deleted), task_id
        self._check_attempts()
        self._check_counts()
        self._check_no_stall()

    def _check_attempts(self) -> None:
        """Every run that ended has its record, the newest KEPT_ATTEMPTS of them; a
        deleted task has none."""
        assert set(self.attempts) <= set(self.store), "attempts of a deleted task"
        for task_id, task in self.store.items():
            ended = task.run - 1 if task.state == ACTIVE else task.run
            runs = [a.run for a in self.attempts.get(task_id, [])]
            kept = range(max(1, ended - KEPT_ATTEMPTS + 1), ended + 1)
            assert runs == [r for r in kept if (task_id, r) not in self.unstored_runs], task_id

    def _check_counts(self) -> None:
        """The core's counts are the store's, but for adds, removes and retries whose
        store result the core has not heard yet."""
        expected: dict[str, dict[str, int]] = {}

        def count(task: Task, state: State, delta: int) -> None:
            per_state = expected.setdefault(task.queue, dict.fromkeys(STATE_NAMES, 0))
            per_state[state.value] += delta

        # A resync's read counts what the store holds, adds whose result the core has
        # not heard yet included (Core._read_saw).
        saw = self.core._read_saw
        for task in self.store.values():
            if task.id not in self.undelivered or task.seq in saw:
                count(task, task.state, 1)
        for kind, read, op, applied in self.pending_admin:
            key = ("delete", read.id) if kind == "remove" else getattr(op, "task", read).seq
            if key in saw:
                continue
            if applied and kind == "remove":
                count(read, read.state, 1)
            elif applied:
                count(read, WAITING, -1)
                count(read, FAILED, 1)
        expected = {q: c for q, c in expected.items() if any(c.values())}
        assert self.core.counts() == expected
        for counts in self.core.counts().values():
            assert min(counts.values()) >= 0, counts

    def _unheard(self) -> set[str]:
        """Ids of tasks waiting in the store that the core has not heard of yet."""
        retried = {read.id for kind, read, _, ok in self.pending_admin if ok and kind == "retry"}
        return set(self.undelivered) | retried | set(self.core._delayed)

    def _check_windows(self) -> list[str]:
        core = self.core
        window_ids: list[str] = []
        for name, queue in core._queues.items():
            window = queue.window
            assert len(window) <= core.window_size, f"window of {name} overflows"
            assert [t.seq for t in window] == sorted(t.seq for t in window), "window unordered"
            assert all(t.queue == name and t.state == WAITING for t in window)
            window_ids += [t.id for t in window]
        assert len(window_ids) == len(set(window_ids)), "a task is twice in the windows"
        assert set(window_ids) == set(core._waiting)
        return window_ids

    def _check_store_is_known(self, window_ids: list[str]) -> None:
        """Every stored active task is a run of the core; every stored waiting task is in
        its window, or newer than the whole window with its queue marked spilled."""
        core = self.core
        in_window = set(window_ids)
        for task in self.store.values():
            if task.state == ACTIVE:
                assert task.id in core._runs, f"{task.id} is active in the store only"
            if task.state != WAITING or task.id in in_window or task.id in self._unheard():
                continue
            queue = core._queues.get(task.queue)
            assert queue is not None and (queue.spilled or queue.loading), (
                f"{task.id} waits in the store, unknown to a queue that is not spilled"
            )
            assert not self.strict_fifo or all(t.seq < task.seq for t in queue.window), (
                f"{task.id} is older than a task in the window (FIFO broken)"
            )

    def _check_no_stall(self) -> None:
        loading = {load.queue for load in self.pending_loads}
        for worker_id, worker in self.workers.items():
            if worker.queue in loading or len(self.held_by(worker_id)) >= worker.concurrency:
                continue
            unheard = self._unheard()
            waiting = [t for t in self.in_state(WAITING, worker.queue) if t not in unheard]
            assert not waiting, f"{worker_id} has a free slot while {waiting} wait"


# -- helpers -----------------------------------------------------------------------------


def as_held(stored: Task, held: Task) -> Task:
    """The store's copy as the core may hold it: without its payload if the core's
    copy has none (the window keeps ids and order beyond a budget; runs keep none)."""
    copy = replace(stored)
    if held.data is None:
        copy.strip()
    return copy


def emits(effects: Iterable[Effect], event: str | None = None) -> list[Emit]:
    return [e for e in effects if isinstance(e, Emit) and event in (None, e.event)]


def event_names(effects: Iterable[Effect]) -> list[str]:
    return [e.event for e in emits(effects)]


def of_type(effects: Iterable[Effect], kind: type[Any]) -> list[Any]:
    return [e for e in effects if isinstance(e, kind)]


def writes(effects: Iterable[Effect]) -> list[Op]:
    """The task writes (attempt records apart: :func:`recorded`)."""
    return [e.op for e in of_type(effects, Write) if not isinstance(e.op, RecordAttempt)]


def recorded(effects: Iterable[Effect]) -> list[Attempt]:
    """The attempt records written: RecordAttempt's, and a completed run's with its Update."""
    return [
        e.op.attempt
        for e in of_type(effects, Write)
        if isinstance(e.op, RecordAttempt | Update) and e.op.attempt is not None
    ]


def offered(effects: Iterable[Effect]) -> list[str]:
    return [t.id for offer in of_type(effects, Offer) for t in offer.tasks]


def make_task(task_id: str, **fields: Any) -> Task:
    fields.setdefault("queue", "q")
    fields.setdefault("state", WAITING)
    fields.setdefault("seq", 1)
    fields.setdefault("data", b"{}")
    return Task(task_id, **fields)


@pytest.fixture
def h() -> Harness:
    return Harness()


# -- adding and offering -----------------------------------------------------------------


def test_add_emits_added_then_queued(h: Harness) -> None:
    task_id = h.add()
    assert event_names(h.last) == ["task added", "task queued"]
    assert emits(h.last)[0].args == (h.store[task_id].to_json(),)
    assert all(e.queue == "q" for e in emits(h.last))


def test_add_without_workers_leaves_task_waiting(h: Harness) -> None:
    task_id = h.add()
    assert not of_type(h.last, Offer)
    held = h.core.lookup(task_id)
    assert held is not None and held.state == WAITING
    assert h.core.next_deadline() is None


def test_add_worker_emits_worker_added_with_worker_dict(h: Harness) -> None:
    effects = h.add_worker("w1", "q", concurrency=3)
    assert effects == [Emit("worker added", "q", ({"id": "w1", "queue": "q", "concurrency": 3},))]


def test_add_with_idle_worker_offers_task(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add()
    (offer,) = of_type(h.last, Offer)
    assert offer.worker == "w1" and offer.connection == h.workers["w1"].connection
    (task,) = offer.tasks
    assert (task.id, task.state, task.run, task.worker) == (task_id, ACTIVE, 1, "w1")


def test_offer_is_written_as_update_from_waiting_before_it_is_sent(h: Harness) -> None:
    h.add_worker("w1")
    h.add()
    update, offer = [e for e in h.last if isinstance(e, Write | Offer)]
    assert isinstance(update, Write) and isinstance(update.op, Update)
    assert update.op.expected == WAITING
    assert isinstance(offer, Offer) and update.op.task == offer.tasks[0]


def test_offered_task_is_not_started_yet(h: Harness) -> None:
    h.add_worker("w1")
    h.add()
    assert not emits(h.last, "task started")


def test_waiting_tasks_are_offered_to_a_new_worker_in_one_batch(h: Harness) -> None:
    ids = [h.add() for _ in range(5)]
    effects = h.add_worker("w1", concurrency=3)
    (offer,) = of_type(effects, Offer)
    assert [t.id for t in offer.tasks] == ids[:3]
    assert len(of_type(effects, Write)) == 3


def test_offer_snapshots_are_copies(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add()
    (offer,) = of_type(h.last, Offer)
    assert offer.tasks[0] is not h.core.lookup(task_id)


# -- listing workers ---------------------------------------------------------------------


def test_workers_lists_each_worker_with_its_runs_offered_and_started(h: Harness) -> None:
    h.now = 10.0
    h.add_worker("w1", "q", concurrency=2)
    h.add_worker("w2", "other")
    h.now = 11.0
    first, second = h.add(), h.add()
    h.now = 12.5
    h.ack(first)
    h.progress(first, 0.5)
    (w1,) = list(h.core.workers(queue="q"))
    assert {k: w1[k] for k in ("id", "queue", "concurrency", "since")} == {
        "id": "w1",
        "queue": "q",
        "concurrency": 2,
        "since": 10.0,
    }
    assert w1["connection"] == h.workers["w1"].connection
    assert w1["runs"] == [
        {"task": first, "run": 1, "offered": 11.0, "started": 12.5, "progress": 0.5},
        {"task": second, "run": 1, "offered": 11.0, "started": None, "progress": 0.0},
    ]
    assert [w["id"] for w in h.core.workers()] == ["w1", "w2"]
    assert [w["id"] for w in h.core.workers(lambda queue: queue == "other")] == ["w2"]
    assert [w["id"] for w in h.core.workers(after=(h.core.node or "", "w1"))] == ["w2"]
    h.complete(first)
    assert [r["task"] for r in next(h.core.workers(queue="q"))["runs"]] == [second]
    h.remove_worker("w1")
    assert list(h.core.workers(queue="q")) == []


def test_workers_shows_a_recovered_run_with_no_times(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add()
    h.ack(task_id)
    h.restart()
    h.add_worker("w1")
    (w1,) = list(h.core.workers())
    assert w1["runs"] == [
        {"task": task_id, "run": 1, "offered": None, "started": None, "progress": 0.0}
    ]


# -- ack and start -----------------------------------------------------------------------


def test_ack_emits_task_started_then_worker_started(h: Harness) -> None:
    h.add_worker("w1", concurrency=2)
    task_id = h.add()
    effects = h.ack(task_id)
    task_json = h.store[task_id].to_json()
    worker_json = {"id": "w1", "queue": "q", "concurrency": 2}
    assert effects == [
        Emit("task started", "q", (task_json,)),
        Emit("worker started", "q", (worker_json, task_json)),
    ]


def test_second_ack_of_same_run_emits_nothing(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add()
    h.ack(task_id)
    assert h.ack(task_id) == []


def test_report_without_ack_starts_the_run_first(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add()
    effects = h.complete(task_id)
    assert event_names(effects)[:3] == ["task started", "worker started", "task completed"]


# -- completion and failure --------------------------------------------------------------


def test_complete_writes_completed_and_emits(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add()
    h.ack(task_id)
    h.now = 5.0
    effects = h.complete(task_id)
    (update,) = writes(effects)
    assert isinstance(update, Update) and update.expected == ACTIVE
    assert (update.task.state, update.task.updated) == (COMPLETED, 5.0)
    assert event_names(effects) == ["task completed"]
    assert h.state(task_id) == COMPLETED
    assert h.core.lookup(task_id) is None


def test_complete_write_precedes_completed_event(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add()
    h.ack(task_id)
    effects = h.complete(task_id)
    # The task's Update, which carries its attempt's record, then the event.
    assert [type(effect) for effect in effects[:2]] == [Write, Emit]
    write = effects[0]
    assert isinstance(write, Write) and isinstance(write.op, Update)
    assert write.op.attempt is not None and write.op.attempt.outcome == "completed"


@pytest.mark.parametrize("retries", [0, 1])
def test_failed_event_follows_its_write(h: Harness, retries: int) -> None:
    # Sends after a Write wait until it is durable (wsq.core.effects.Write): a listener
    # told "task failed" must find the task failed (or requeued) in the store.
    h.add_worker("w1")
    task_id = h.add(retries=retries)
    h.ack(task_id)
    effects = h.fail(task_id)
    kinds = [type(e) for e in effects]
    failed = next(i for i, e in enumerate(effects) if isinstance(e, Emit))
    assert Write in kinds[:failed], [type(e).__name__ for e in effects]


@pytest.mark.parametrize("retries", [0, 1])
def test_timeout_failed_event_follows_its_write(h: Harness, retries: int) -> None:
    h.add_worker("w1")
    task_id = h.add(retries=retries, timeout=1.0)
    h.ack(task_id)
    effects = h.tick(1.0)
    failed = next(i for i, e in enumerate(effects) if isinstance(e, Emit))
    assert any(isinstance(e, Write) for e in effects[:failed])


def test_fail_without_retries_marks_task_failed(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add()
    h.ack(task_id)
    effects = h.fail(task_id, "disk full")
    (failed,) = emits(effects, "task failed")
    task_json, will_retry = failed.args
    assert will_retry is False
    assert (task_json["state"], task_json["error"], task_json["retries"]) == (
        "failed",
        "disk full",
        1,
    )
    (update,) = writes(effects)
    assert isinstance(update, Update) and update.expected == ACTIVE
    assert h.state(task_id) == FAILED and h.store[task_id].error == "disk full"


def test_failed_task_stays_stored(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add(autoremove=True)
    h.fail(task_id)
    assert h.state(task_id) == FAILED
    assert not any(isinstance(op, Delete) for op in writes(h.log))


def test_completing_frees_the_slot_for_the_next_task(h: Harness) -> None:
    h.add_worker("w1")
    first, second = h.add(), h.add()
    effects = h.complete(first)
    assert offered(effects) == [second]


def test_failing_frees_the_slot_for_the_next_task(h: Harness) -> None:
    h.add_worker("w1")
    first, second = h.add(), h.add()
    effects = h.fail(first)
    assert offered(effects) == [second]


# -- order, concurrency, queues ----------------------------------------------------------


def test_tasks_are_offered_in_fifo_order(h: Harness) -> None:
    ids = [h.add() for _ in range(50)]
    h.add_worker("w1")
    h.work_off()
    assert h.offer_order == ids


def test_worker_holds_at_most_concurrency_tasks(h: Harness) -> None:
    h.add_worker("w1", concurrency=2)
    ids = [h.add() for _ in range(5)]
    assert h.held_by("w1") == sorted(ids[:2])
    assert h.in_state(WAITING) == ids[2:]


def test_acked_tasks_still_count_against_concurrency(h: Harness) -> None:
    h.add_worker("w1", concurrency=2)
    ids = [h.add() for _ in range(3)]
    h.ack(ids[0])
    h.ack(ids[1])
    assert h.state(ids[2]) == WAITING


def test_each_free_slot_is_filled_once(h: Harness) -> None:
    h.add_worker("w1", concurrency=3)
    ids = [h.add() for _ in range(6)]
    effects = h.complete(ids[1])
    assert offered(effects) == [ids[3]]


def test_tasks_go_only_to_workers_of_their_queue(h: Harness) -> None:
    h.add_worker("wa", "a", concurrency=5)
    h.add_worker("wb", "b", concurrency=5)
    a_ids = [h.add("a") for _ in range(3)]
    b_ids = [h.add("b") for _ in range(3)]
    assert h.held_by("wa") == sorted(a_ids)
    assert h.held_by("wb") == sorted(b_ids)


def test_busy_queue_does_not_block_another_queue(h: Harness) -> None:
    h.add_worker("wa", "a")
    h.add_worker("wb", "b")
    h.add("a")
    h.add("a")
    b_id = h.add("b")
    assert offered(h.last) == [b_id]


def test_queue_events_carry_their_queue(h: Harness) -> None:
    h.add("a")
    assert {e.queue for e in emits(h.last)} == {"a"}


def test_round_robin_between_two_workers(h: Harness) -> None:
    h.add_worker("w1", concurrency=10)
    h.add_worker("w2", concurrency=10)
    receivers = []
    for _ in range(6):
        h.add()
        (offer,) = of_type(h.last, Offer)
        receivers.append(offer.worker)
    assert receivers == ["w1", "w2", "w1", "w2", "w1", "w2"]


def test_round_robin_skips_a_full_worker(h: Harness) -> None:
    h.add_worker("w1", concurrency=1)
    h.add_worker("w2", concurrency=10)
    h.add()
    receivers = []
    for _ in range(3):
        h.add()
        receivers += [o.worker for o in of_type(h.last, Offer)]
    assert receivers == ["w2", "w2", "w2"]


def test_backlog_is_shared_between_new_workers(h: Harness) -> None:
    ids = [h.add() for _ in range(4)]
    first = h.add_worker("w1", concurrency=3)
    second = h.add_worker("w2", concurrency=3)
    assert offered(first) == ids[:3]
    assert offered(second) == ids[3:]


# -- the worker timeout (offer not acknowledged) -----------------------------------------


def test_unacked_offer_fails_after_worker_timeout(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add()
    effects = h.tick(1.0)
    run = h.store[task_id].run
    connection = h.workers["w1"].connection
    assert of_type(effects, Abort) == [
        Abort(connection, "w1", task_id, run, "Worker w1 didn't respond.")
    ]
    (failed,) = emits(effects, "task failed")
    assert failed.args[0]["error"] == "Worker w1 didn't respond."
    assert h.store[task_id].error == "Worker w1 didn't respond."
    assert h.state(task_id) == FAILED


def test_abort_for_unacked_offer_comes_before_the_failure(h: Harness) -> None:
    h.add_worker("w1")
    h.add()
    effects = h.tick(1.0)
    kinds = [type(e) for e in effects]
    assert kinds.index(Abort) < kinds.index(Emit)
    assert kinds.index(Abort) < kinds.index(Write)


def test_tick_just_before_worker_timeout_does_nothing(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add()
    assert h.tick(0.999) == []
    assert h.state(task_id) == ACTIVE


def test_worker_timeout_counts_from_the_offer(h: Harness) -> None:
    h.now = 10.0
    h.add_worker("w1")
    task_id = h.add()
    assert h.tick(10.999) == []
    h.tick(11.0)
    assert h.state(task_id) == FAILED


def test_an_offer_still_being_delivered_waits_from_the_last_progress(h: Harness) -> None:
    """While the worker's connection keeps carrying bytes to it (a slow link), the
    worker timeout of its unacknowledged runs starts again; once the link stops, it
    runs out. Acknowledged runs keep their task timeout; other workers' runs their own."""
    h.add_worker("w1", concurrency=2)
    first, second = h.add(timeout=5.0), h.add(timeout=5.0)
    h.add_worker("w2")
    third = h.add()
    assert [h.store[t].worker for t in (first, second, third)] == ["w1", "w1", "w2"]
    h.now = 0.5
    h.ack(first)
    h.core.delivering(["w1"], 0.9)
    (aborted,) = of_type(h.tick(1.0), Abort)  # w2 got no extension
    assert aborted.task == third
    h.core.delivering(["w1"], 1.7)
    assert h.tick(2.69) == []
    assert h.core.next_deadline() == 2.7
    h.tick(2.7)
    assert (h.state(first), h.state(second)) == (ACTIVE, FAILED)
    assert h.store[second].error == "Worker w1 didn't respond."
    h.tick(5.5)
    assert h.state(first) == FAILED  # its task timeout, from its ack


def test_delivering_does_nothing_without_a_worker_timeout() -> None:
    core = Core(worker_timeout=-1)
    core.delivering(["w1"], 1.0)
    assert core.next_deadline() is None


def test_ack_in_time_cancels_the_worker_timeout(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add(timeout=60.0)
    h.now = 0.9
    h.ack(task_id)
    assert h.tick(1.0) == []
    assert h.state(task_id) == ACTIVE


def test_unacked_offer_of_disconnected_worker_fails_without_abort(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add()
    h.remove_worker("w1")
    effects = h.tick(1.0)
    assert not of_type(effects, Abort)
    assert h.store[task_id].error == "Worker w1 didn't respond."


def test_worker_timeout_applies_even_when_task_timeout_is_disabled(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add(timeout=-1)
    assert h.core.next_deadline() == 1.0
    h.tick(1.0)
    assert h.state(task_id) == FAILED


def test_worker_timeout_is_a_failure_that_may_retry(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add(retries=1)
    effects = h.tick(1.0)
    (failed,) = emits(effects, "task failed")
    assert failed.args[1] is True
    # Requeued, and offered again once its back-off is over: run 2.
    assert h.state(task_id) == WAITING
    h.advance(0.1)
    assert h.state(task_id) == ACTIVE and h.store[task_id].run == 2


# -- back-off after an expired run ---------------------------------------------------------


def test_timed_out_task_waits_out_a_back_off_before_its_next_offer(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add(timeout=1.0, retries=-1)
    h.ack(task_id)
    h.tick(1.0)
    assert h.state(task_id) == WAITING and h.core.lookup(task_id) is not None
    assert h.core.next_deadline() == pytest.approx(1.1)
    h.tick(1.09)
    assert h.state(task_id) == WAITING
    h.tick(1.1)
    assert h.state(task_id) == ACTIVE


def test_back_off_doubles_with_each_expiry_in_a_row_up_to_its_cap() -> None:
    h = Harness()
    h.core.max_backoff = 1.0
    h.add_worker("w1")
    task_id = h.add(timeout=1.0, retries=-1)
    waits = []
    for _ in range(6):
        h.ack(task_id)
        h.advance(1.0)  # the run expires
        expired = h.now
        while h.state(task_id) != ACTIVE:
            h.tick(h.core.next_deadline())
        waits.append(round(h.now - expired, 6))
    assert waits == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_a_task_that_always_times_out_costs_little(h: Harness) -> None:
    """retries -1, the smallest timeout: ten minutes of fake time hold few runs."""
    h.add_worker("w1")
    task_id = h.add(timeout=0.1, retries=-1)
    runs = 0
    while h.now < 600:
        if h.state(task_id) == ACTIVE and h.store[task_id].run > runs:
            runs = h.store[task_id].run
            h.ack(task_id)
        h.tick(h.core.next_deadline())
    assert runs < 30  # without the back-off: 6,000


def test_a_failure_the_worker_reports_requeues_at_once(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add(retries=-1)
    h.fail(task_id)
    assert h.state(task_id) == ACTIVE and h.store[task_id].run == 2


def test_a_task_in_back_off_frees_its_slot_for_others(h: Harness) -> None:
    h.add_worker("w1")
    first = h.add(timeout=1.0, retries=-1)
    second = h.add()
    h.ack(first)
    h.tick(1.0)
    assert h.state(second) == ACTIVE and h.state(first) == WAITING


def test_a_task_in_back_off_can_be_removed_not_retried(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add(timeout=1.0, retries=-1)
    h.ack(task_id)
    h.tick(1.0)
    with pytest.raises(InvalidState):
        h.retry(task_id)
    h.remove(task_id)
    assert h.state(task_id) is None and h.core.counts() == {}
    assert h.core.next_deadline() is None
    assert h.tick(5.0) == []


def _a_task_in_back_off_behind_a_load_in_flight() -> tuple[Harness, str]:
    h = Harness(window=4, auto_load=False)
    h.add_worker("w1")
    slow = h.add(timeout=1.0, retries=-1)
    h.ack(slow)
    for _ in range(5):
        h.add()
    h.remove_worker("w1")
    h.tick(1.0)  # in back-off, waiting in the store
    h.add_worker("w2", concurrency=3)  # drains the window: a Load reads the store
    assert h.pending_loads and slow in [t.id for t in h.pending_loads[0].snapshot]
    return h, slow


def test_a_task_removed_in_back_off_is_not_brought_back_by_a_load() -> None:
    h, slow = _a_task_in_back_off_behind_a_load_in_flight()
    h.remove(slow)
    h.answer_loads()
    assert h.core.lookup(slow) is None and h.state(slow) is None


def test_a_task_whose_back_off_ends_during_a_load_joins_with_its_new_seq() -> None:
    h, slow = _a_task_in_back_off_behind_a_load_in_flight()
    h.tick(1.1)
    h.answer_loads()  # the load read its old seq: skipped, read again later
    h.auto_load = True
    h.work_off()
    assert h.offer_order.count(slow) == 2


def test_loads_read_past_tasks_in_back_off() -> None:
    """More tasks in back-off than the window holds never make a load read nothing new."""
    h = Harness(window=4)
    h.add_worker("w1", concurrency=6)
    slow = [h.add(timeout=1.0, retries=-1) for _ in range(6)]
    for task_id in slow:
        h.ack(task_id)
    h.remove_worker("w1")
    h.tick(1.0)  # six tasks in back-off, waiting in the store
    fresh = [h.add() for _ in range(6)]
    h.add_worker("w2", concurrency=20)
    assert set(fresh) <= set(h.in_state(ACTIVE))


# -- the run timeout (after ack) ---------------------------------------------------------


def test_started_run_times_out_with_abort_and_timed_out(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add(timeout=5.0)
    h.now = 0.5
    h.ack(task_id)
    effects = h.tick(5.5)
    connection = h.workers["w1"].connection
    assert of_type(effects, Abort) == [Abort(connection, "w1", task_id, 1, "Timed out.")]
    (failed,) = emits(effects, "task failed")
    assert failed.args == (h.store[task_id].to_json(), False)
    assert h.store[task_id].error == "Timed out."


def test_run_timeout_counts_from_the_ack(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add(timeout=2.0)
    h.now = 0.5
    h.ack(task_id)
    assert h.tick(2.4999) == []
    h.tick(2.5)
    assert h.state(task_id) == FAILED


def test_progress_resets_the_run_timeout(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add(timeout=2.0)
    h.ack(task_id)
    h.now = 1.5
    h.progress(task_id, 0.5)
    assert h.tick(3.4) == []
    assert h.core.next_deadline() == 3.5
    h.tick(3.5)
    assert h.store[task_id].error == "Timed out."


def test_touch_resets_the_run_timeout(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add(timeout=2.0)
    h.ack(task_id)
    h.now = 1.5
    assert h.touch(task_id) == []
    assert h.tick(3.4) == []
    h.tick(3.5)
    assert h.state(task_id) == FAILED


def test_many_touches_keep_a_long_run_alive(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add(timeout=2.0)
    h.ack(task_id)
    for _ in range(100):
        h.advance(1.5)
        h.touch(task_id)
    assert h.state(task_id) == ACTIVE
    h.complete(task_id)
    assert h.state(task_id) == COMPLETED


def test_timeout_minus_one_never_expires(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add(timeout=-1)
    h.ack(task_id)
    assert h.core.next_deadline() is None
    assert h.tick(1e9) == []
    assert h.state(task_id) == ACTIVE


def test_timeout_minus_one_survives_progress(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add(timeout=-1)
    h.ack(task_id)
    h.progress(task_id, 0.1)
    assert h.core.next_deadline() is None


def test_timed_out_run_of_disconnected_worker_fails_without_abort(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add(timeout=3.0)
    h.ack(task_id)
    h.remove_worker("w1")
    effects = h.tick(3.0)
    assert not of_type(effects, Abort)
    assert h.store[task_id].error == "Timed out."


def test_several_expiries_in_one_tick(h: Harness) -> None:
    h.add_worker("w1", concurrency=3)
    ids = [h.add(timeout=t) for t in (3.0, 1.0, 2.0)]
    for task_id in ids:
        h.ack(task_id)
    effects = h.tick(10.0)
    failed = [e.args[0]["id"] for e in emits(effects, "task failed")]
    assert failed == [ids[1], ids[2], ids[0]]  # in deadline order


# -- next_deadline -----------------------------------------------------------------------


def test_next_deadline_is_none_when_nothing_runs(h: Harness) -> None:
    assert h.core.next_deadline() is None
    h.add()
    assert h.core.next_deadline() is None


def test_next_deadline_of_an_offer_is_offer_time_plus_worker_timeout() -> None:
    h = Harness(worker_timeout=2.5)
    h.now = 4.0
    h.add_worker("w1")
    h.add()
    assert h.core.next_deadline() == 6.5


def test_next_deadline_after_ack_is_ack_time_plus_task_timeout(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add(timeout=30.0)
    h.now = 0.25
    h.ack(task_id)
    assert h.core.next_deadline() == 30.25


def test_next_deadline_is_the_earliest_of_all_runs(h: Harness) -> None:
    h.add_worker("w1", concurrency=2)
    slow, fast = h.add(timeout=30.0), h.add(timeout=10.0)
    h.ack(slow)
    h.ack(fast)
    assert h.core.next_deadline() == 10.0
    h.complete(fast)
    assert h.core.next_deadline() == 30.0


def test_next_deadline_forgets_ended_runs(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add()
    h.complete(task_id)
    assert h.core.next_deadline() is None


def test_tick_at_next_deadline_always_makes_progress(h: Harness) -> None:
    h.add_worker("w1", concurrency=2)
    h.add(timeout=1.0, retries=-1)
    h.add(timeout=0.5, retries=-1)
    for _ in range(50):
        deadline = h.core.next_deadline()
        assert deadline is not None and deadline >= h.now
        assert h.tick(deadline) != []


# -- progress ----------------------------------------------------------------------------


def test_progress_writes_set_progress_and_emits(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add()
    h.ack(task_id)
    h.now = 2.0
    effects = h.progress(task_id, 0.25)
    assert writes(effects) == [SetProgress(task_id, 0.25, 2.0)]
    (event,) = emits(effects, "task progress")
    assert event.args[1] == 0.25 and event.args[0]["progress"] == 0.25
    assert h.store[task_id].progress == 0.25


# -- retries -----------------------------------------------------------------------------


def test_failure_with_retries_left_requeues(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add(retries=1)
    seq = h.store[task_id].seq
    h.remove_worker("w1")  # so the requeued task stays waiting
    effects = h.fail(task_id, "flaky")
    (failed,) = emits(effects, "task failed")
    assert failed.args[1] is True
    assert failed.args[0]["error"] == "flaky"
    assert event_names(effects)[-2:] == ["task failed", "task queued"]
    (queued,) = emits(effects, "task queued")
    assert queued.args[0]["error"] is None  # as the original: requeued without its error
    (update,) = writes(effects)
    assert isinstance(update, Update) and update.expected == ACTIVE
    stored = h.store[task_id]
    assert (stored.state, stored.retries, stored.error, stored.worker) == (
        WAITING,
        1,
        None,
        None,
    )
    assert stored.seq > seq


def test_retries_counts_failures_until_the_limit(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add(retries=2)
    will_retry = []
    for _ in range(3):
        (failed,) = emits(h.fail(task_id), "task failed")
        will_retry.append(failed.args[1])
    assert will_retry == [True, True, False]
    assert h.store[task_id].retries == 3
    assert h.state(task_id) == FAILED


def test_retries_minus_one_retries_forever(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add(retries=-1)
    for attempt in range(1, 51):
        (failed,) = emits(h.fail(task_id), "task failed")
        assert failed.args[1] is True
        assert h.store[task_id].retries == attempt
    assert h.state(task_id) == ACTIVE and h.store[task_id].run == 51


def test_requeued_task_goes_to_the_back_of_the_queue(h: Harness) -> None:
    h.add_worker("w1")
    first = h.add(retries=1)
    second, third = h.add(), h.add()
    h.fail(first)
    h.work_off()
    assert h.offer_order == [first, second, third, first]


def test_requeued_task_gets_a_new_run(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add(retries=1)
    h.fail(task_id)
    assert h.store[task_id].run == 2


# -- autoremove --------------------------------------------------------------------------


def test_autoremove_deletes_completed_task_and_its_blobs(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add(autoremove=True, blobs=["b1", "b2"])
    h.ack(task_id)
    effects = h.complete(task_id)
    ops = writes(effects)
    assert isinstance(ops[0], Update) and ops[0].task.state == COMPLETED
    assert ops[1] == Delete(task_id)
    assert of_type(effects, DeleteBlobs) == [DeleteBlobs(("b1", "b2"))]
    assert event_names(effects) == ["task completed", "task deleted"]
    assert task_id in h.deleted


def test_autoremove_without_blobs_deletes_no_blobs(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add(autoremove=True)
    effects = h.complete(task_id)
    assert Delete(task_id) in writes(effects)
    assert not of_type(effects, DeleteBlobs)


def test_inline_streams_are_not_blobs_to_delete(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add(autoremove=True, inline=True)
    effects = h.complete(task_id)
    assert not of_type(effects, DeleteBlobs)


def test_autoremove_deletes_only_after_the_completed_write(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add(autoremove=True, blobs=["b1"])
    effects = h.complete(task_id)
    kinds = [type(e).__name__ for e in effects if not isinstance(e, Emit)]
    assert kinds[:3] == ["Write", "Write", "DeleteBlobs"]


def test_without_autoremove_completed_task_stays(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add(blobs=["b1"])
    effects = h.complete(task_id)
    assert not of_type(effects, DeleteBlobs)
    assert h.state(task_id) == COMPLETED


# -- retry() -----------------------------------------------------------------------------


def test_retry_moves_failed_task_back_to_waiting(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add(retries=1)
    h.fail(task_id)
    h.fail(task_id)
    h.remove_worker("w1")
    seq = h.store[task_id].seq
    h.now = 9.0
    effects = h.retry(task_id)
    update = h.admin_op
    assert isinstance(update, Update) and update.expected == FAILED
    assert not writes(effects)
    assert event_names(effects) == ["task queued"]
    stored = h.store[task_id]
    assert (stored.state, stored.retries, stored.error) == (WAITING, 0, None)
    assert stored.seq > seq and stored.updated == 9.0


def test_retried_task_is_offered_with_its_retry_budget_restored(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add(retries=1)
    h.fail(task_id)
    h.fail(task_id)
    h.retry(task_id)
    (failed,) = emits(h.fail(task_id), "task failed")
    assert failed.args[1] is True


def test_retry_of_completed_task_is_invalid(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add()
    h.complete(task_id)
    with pytest.raises(InvalidState):
        h.retry(task_id)
    assert h.state(task_id) == COMPLETED


def test_retry_of_waiting_task_is_invalid(h: Harness) -> None:
    task_id = h.add()
    with pytest.raises(InvalidState):
        h.retry(task_id)


def test_retry_of_spilled_waiting_task_is_invalid() -> None:
    h = Harness(window=4)
    ids = [h.add() for _ in range(5)]
    assert h.core.lookup(ids[4]) is None  # only in the store
    with pytest.raises(InvalidState):
        h.retry(ids[4])


def test_retry_of_active_task_is_invalid(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add()
    with pytest.raises(InvalidState):
        h.retry(task_id)
    assert h.state(task_id) == ACTIVE


# -- remove() ----------------------------------------------------------------------------


def test_remove_waiting_task(h: Harness) -> None:
    task_id = h.add(blobs=["b1"])
    effects = h.remove(task_id)
    assert writes(effects) == [Delete(task_id)]
    assert of_type(effects, DeleteBlobs) == [DeleteBlobs(("b1",))]
    assert event_names(effects) == ["task deleted"]
    assert h.core.lookup(task_id) is None


def test_removed_waiting_task_is_never_offered(h: Harness) -> None:
    ids = [h.add() for _ in range(3)]
    h.remove(ids[1])
    h.add_worker("w1", concurrency=5)
    assert h.offer_order == [ids[0], ids[2]]


def test_remove_active_task_aborts_it_first(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add(blobs=["b1"])
    h.ack(task_id)
    effects = h.remove(task_id)
    connection = h.workers["w1"].connection
    assert isinstance(effects[0], Abort)
    assert (effects[0].connection, effects[0].worker, effects[0].task, effects[0].run) == (
        connection,
        "w1",
        task_id,
        1,
    )
    assert writes(effects) == [Delete(task_id)]
    assert of_type(effects, DeleteBlobs) == [DeleteBlobs(("b1",))]
    assert event_names(effects) == ["task deleted"]


def test_removing_active_task_frees_its_slot(h: Harness) -> None:
    h.add_worker("w1")
    first, second = h.add(), h.add()
    effects = h.remove(first)
    assert offered(effects) == [second]


def test_remove_active_task_of_disconnected_worker_sends_no_abort(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add()
    h.remove_worker("w1")
    effects = h.remove(task_id)
    assert not of_type(effects, Abort)
    assert writes(effects) == [Delete(task_id)]


def test_removed_active_task_has_no_deadline(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add()
    h.remove(task_id)
    assert h.core.next_deadline() is None
    assert h.tick(100.0) == []


def test_remove_completed_task_from_its_stored_copy(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add(blobs=["b1"])
    h.complete(task_id)
    effects = h.remove(task_id)
    assert h.admin_op == Delete(task_id, expected=COMPLETED)
    assert of_type(effects, DeleteBlobs) == [DeleteBlobs(("b1",))]
    (deleted,) = emits(effects, "task deleted")
    assert deleted.args[0]["state"] == "completed"


def test_remove_failed_task(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add()
    h.fail(task_id)
    h.remove(task_id)
    assert h.admin_op == Delete(task_id, expected=FAILED)
    assert task_id in h.deleted


def test_remove_spilled_waiting_task() -> None:
    h = Harness(window=4)
    ids = [h.add() for _ in range(6)]
    h.remove(ids[5])
    assert h.admin_op == Delete(ids[5], expected=WAITING)
    h.add_worker("w1", concurrency=10)
    h.work_off()
    assert h.offer_order == ids[:5]


def test_remove_unknown_task_does_nothing(h: Harness) -> None:
    assert h.remove("nope") == []


# -- removes and retries racing each other (the store decides) ----------------------------


def test_two_removes_of_one_failed_task_count_it_once(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add(blobs=["b1"])
    h.fail(task_id)
    read = replace(h.store[task_id])
    h.begin_remove(replace(read))
    h.begin_remove(replace(read))
    first, second = h.finish_admin(), h.finish_admin()
    assert event_names(first) == ["task deleted"] and of_type(first, DeleteBlobs)
    assert second == []
    assert h.core.counts() == {}


def test_two_retries_of_a_spilled_failed_task_queue_it_once() -> None:
    h = Harness(window=2)
    h.add_worker("w1")
    task_id = h.add()
    h.fail(task_id)
    h.remove_worker("w1")
    for _ in range(5):  # the queue is longer than the window
        h.add()
    read = replace(h.store[task_id])
    h.begin_retry(replace(read))
    h.begin_retry(replace(read))
    assert event_names(h.finish_admin()) == ["task queued"]
    assert h.finish_admin() == []
    assert h.core.counts() == {"q": {"waiting": 6, "active": 0, "completed": 0, "failed": 0}}
    h.add_worker("w1", concurrency=10)
    h.work_off()
    assert h.offer_order.count(task_id) == 2  # the first run, and the retry once


def test_remove_then_retry_never_runs_the_removed_task(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add()
    h.fail(task_id)
    read = replace(h.store[task_id])
    h.begin_remove(replace(read))
    h.begin_retry(replace(read))  # read before the remove took effect
    h.finish_admin()
    assert h.finish_admin() == []
    assert h.offer_order == [task_id]
    assert h.core.counts() == {}


def test_retry_then_remove_removes_the_waiting_task(h: Harness) -> None:
    task_id = h.add()
    h.add_worker("w1")
    h.fail(task_id)
    h.remove_worker("w1")
    read = replace(h.store[task_id])
    h.begin_retry(replace(read))
    h.begin_remove(replace(read))  # expects failed: too late
    h.finish_admin()
    assert h.finish_admin() == []
    assert h.state(task_id) == WAITING
    h.remove(task_id)  # read again: the core holds it now
    assert h.state(task_id) is None and h.core.counts() == {}


def test_remove_from_an_out_of_date_read_changes_nothing() -> None:
    h = Harness(window=2)
    ids = [h.add() for _ in range(4)]
    read = replace(h.store[ids[3]])  # waiting, beyond the window
    h.add_worker("w1", concurrency=4)
    h.work_off()  # it ran and completed meanwhile
    h.begin_remove(read)
    effects = h.finish_admin()
    assert not writes(effects) and not emits(effects)
    assert h.state(ids[3]) == COMPLETED
    assert h.core.counts() == {"q": {"waiting": 0, "active": 0, "completed": 4, "failed": 0}}


def test_a_load_skips_a_task_being_removed() -> None:
    h = Harness(window=4, auto_load=False)
    ids = [h.add() for _ in range(8)]
    h.add_worker("w1", concurrency=4)  # drains the window: a Load goes out
    h.begin_remove(replace(h.store[ids[5]]))
    h.answer_loads()
    assert h.core.lookup(ids[5]) is None
    h.finish_admin()
    h.auto_load = True
    h.work_off()
    assert ids[5] not in h.offer_order and h.state(ids[5]) is None


def test_report_after_remove_is_stale(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add()
    run = h.store[task_id].run
    h.remove(task_id)
    with pytest.raises(StaleRun):
        h.core.complete(task_id, run, h.now)


# -- workers coming and going ------------------------------------------------------------


def test_remove_worker_emits_worker_removed(h: Harness) -> None:
    h.add_worker("w1", concurrency=2)
    effects = h.remove_worker("w1")
    assert effects == [Emit("worker removed", "q", ({"id": "w1", "queue": "q", "concurrency": 2},))]


def test_remove_unknown_worker_does_nothing(h: Harness) -> None:
    assert h.remove_worker("ghost") == []


def test_removed_worker_gets_no_more_offers(h: Harness) -> None:
    h.add_worker("w1")
    h.remove_worker("w1")
    h.add()
    assert not of_type(h.last, Offer)


def test_disconnected_worker_keeps_its_active_runs(h: Harness) -> None:
    h.add_worker("w1", concurrency=2)
    ids = [h.add(), h.add()]
    h.ack(ids[0])
    h.remove_worker("w1")
    assert [h.state(t) for t in ids] == [ACTIVE, ACTIVE]


def test_completion_after_disconnect_is_accepted(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add()
    h.ack(task_id)
    h.remove_worker("w1")
    effects = h.complete(task_id)
    assert event_names(effects) == ["task completed"]
    assert h.state(task_id) == COMPLETED


def test_failure_after_disconnect_is_accepted(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add()
    h.ack(task_id)
    h.remove_worker("w1")
    h.fail(task_id, "crashed")
    assert h.store[task_id].error == "crashed"


def test_progress_after_disconnect_is_accepted(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add(timeout=2.0)
    h.ack(task_id)
    h.remove_worker("w1")
    h.now = 1.0
    h.progress(task_id, 0.5)
    assert h.store[task_id].progress == 0.5
    assert h.core.next_deadline() == 3.0


def test_worker_started_of_disconnected_worker_has_full_worker_dict(h: Harness) -> None:
    h.add_worker("w1", concurrency=2)
    task_id = h.add()
    h.remove_worker("w1")
    effects = h.complete(task_id)  # no ack before: this report starts the run
    (started,) = emits(effects, "worker started")
    assert set(started.args[0]) == WORKER_KEYS


def test_reregistered_worker_runs_count_against_its_concurrency(h: Harness) -> None:
    h.add_worker("w1", concurrency=2)
    ids = [h.add() for _ in range(4)]
    h.ack(ids[0])
    h.ack(ids[1])
    h.remove_worker("w1")
    effects = h.add_worker("w1", concurrency=2)
    assert not of_type(effects, Offer)
    effects = h.complete(ids[0])
    assert offered(effects) == [ids[2]]


def test_reregistered_worker_with_more_slots_gets_only_the_difference(h: Harness) -> None:
    h.add_worker("w1", concurrency=1)
    ids = [h.add() for _ in range(4)]
    h.ack(ids[0])
    h.remove_worker("w1")
    effects = h.add_worker("w1", concurrency=3)
    assert offered(effects) == ids[1:3]


def test_reregistered_worker_gets_aborts_for_its_old_runs(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add(timeout=5.0)
    h.ack(task_id)
    h.remove_worker("w1")
    h.add_worker("w1")
    effects = h.tick(5.0)
    (abort,) = of_type(effects, Abort)
    assert abort.connection == h.workers["w1"].connection  # the new connection


def test_a_run_ending_frees_the_slot_on_the_queue_its_worker_serves_now(h: Harness) -> None:
    h.add_worker("w1", queue="a")
    old_run = h.add("a")
    h.ack(old_run)
    h.remove_worker("w1")
    h.add_worker("w1", queue="b")  # the same worker, now on another queue
    waiting = h.add("b")
    assert h.state(waiting) == WAITING  # its one slot is still taken
    h.complete(old_run)
    assert h.state(waiting) == ACTIVE


def test_offers_and_aborts_carry_the_worker_s_own_name() -> None:
    core = Core()
    effects = core.add_worker("c9", "alice/w", "q", 1, 0.0, name="w")
    assert emits(effects, "worker added")[0].args[0]["id"] == "w"
    task = make_task("t1")
    core.allocate_seq(0.0)
    (offer,) = of_type(core.add(task, 0.0), Offer)
    assert offer.worker == "w" and offer.tasks[0].worker == "alice/w"
    (abort,) = of_type(core.remove("t1", 0.0) or [], Abort)
    assert abort.worker == "w"


def test_duplicate_worker_id_is_rejected(h: Harness) -> None:
    h.add_worker("w1")
    with pytest.raises(InvalidArgument):
        h.core.add_worker("c-other", "w1", "q", 1, h.now)
    assert h.core.workers_of("c-other") == []


def test_workers_of_lists_a_connection_s_workers(h: Harness) -> None:
    h.core.add_worker("c1", "w1", "a", 1, 0.0)
    h.core.add_worker("c1", "w2", "b", 1, 0.0)
    h.core.add_worker("c2", "w3", "a", 1, 0.0)
    assert sorted(h.core.workers_of("c1")) == ["w1", "w2"]
    assert h.core.worker_json("w3") == {"id": "w3", "queue": "a", "concurrency": 1}
    assert h.core.worker_json("w9") is None


# -- stale reports -----------------------------------------------------------------------

REPORTS = {
    "ack": lambda core, task_id, run, now: core.ack(task_id, run, now),
    "progress": lambda core, task_id, run, now: core.progress(task_id, run, 0.5, now),
    "touch": lambda core, task_id, run, now: core.touch(task_id, run, now),
    "complete": lambda core, task_id, run, now: core.complete(task_id, run, now),
    "fail": lambda core, task_id, run, now: core.fail(task_id, run, "x", now),
    "release": lambda core, task_id, run, now: core.release(task_id, run, now),
}


def snapshot_of(h: Harness) -> tuple[Any, ...]:
    runs = {tid: (r.acked, r.deadline, replace(r.task)) for tid, r in h.core._runs.items()}
    return (
        runs,
        {name: list(q.window) for name, q in h.core._queues.items()},
        h.core.next_deadline(),
        {tid: replace(t) for tid, t in h.store.items()},
    )


@pytest.mark.parametrize("report", sorted(REPORTS))
def test_report_with_wrong_run_is_stale_and_changes_nothing(h: Harness, report: str) -> None:
    h.add_worker("w1")
    task_id = h.add()
    before = snapshot_of(h)
    with pytest.raises(StaleRun):
        REPORTS[report](h.core, task_id, 2, h.now)
    assert snapshot_of(h) == before


@pytest.mark.parametrize("report", sorted(REPORTS))
def test_report_for_waiting_task_is_stale(h: Harness, report: str) -> None:
    task_id = h.add()
    before = snapshot_of(h)
    with pytest.raises(StaleRun):
        REPORTS[report](h.core, task_id, 0, h.now)
    assert snapshot_of(h) == before


@pytest.mark.parametrize("report", sorted(REPORTS))
def test_report_for_completed_task_is_stale(h: Harness, report: str) -> None:
    h.add_worker("w1")
    task_id = h.add()
    h.complete(task_id)
    with pytest.raises(StaleRun):
        REPORTS[report](h.core, task_id, 1, h.now)


def test_report_of_timed_out_run_is_stale_after_requeue(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add(retries=1, timeout=1.0)
    h.ack(task_id)
    h.tick(1.0)
    h.advance(0.1)  # the back-off
    assert h.store[task_id].run == 2
    before = snapshot_of(h)
    with pytest.raises(StaleRun):
        h.core.complete(task_id, 1, h.now)
    assert snapshot_of(h) == before


def test_report_for_unknown_task_is_stale(h: Harness) -> None:
    with pytest.raises(StaleRun):
        h.core.complete("nope", 1, 0.0)


def test_stale_run_is_an_invalid_state() -> None:
    assert issubclass(StaleRun, InvalidState)


# -- effects are data --------------------------------------------------------------------


def test_update_snapshots_do_not_change_with_the_core(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add(retries=5)
    (update,) = writes(h.last)
    assert isinstance(update, Update)
    frozen = replace(update.task)
    h.ack(task_id)
    h.progress(task_id, 0.75)
    h.fail(task_id)
    assert update.task == frozen
    assert update.task is not h.core.lookup(task_id)


def test_failure_snapshot_is_a_copy(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add(retries=1)
    effects = h.fail(task_id)
    requeued = next(op for op in writes(effects) if isinstance(op, Update))
    assert requeued.task.state == WAITING and requeued.task.run == 1
    assert h.store[task_id].run == 2


def test_every_event_arg_is_json_ready(h: Harness) -> None:
    h.add_worker("w1", concurrency=2)
    first = h.add(retries=1, autoremove=True, blobs=["b"])
    second = h.add()
    h.ack(first)
    h.progress(first, 0.5)
    h.fail(first)
    h.complete(first)
    h.tick(10.0)
    h.remove(second)
    h.remove_worker("w1")
    names = set(event_names(h.log))
    assert names == set(EVENT_ARGS)
    for event in emits(h.log):
        assert json.loads(json.dumps(event.args)) == list(event.args)


# -- the window: memory bounded ----------------------------------------------------------


def test_adds_beyond_the_window_stay_in_the_store_only() -> None:
    h = Harness(window=4)
    ids = [h.add() for _ in range(6)]
    assert h.window_of() == ids[:4]
    assert h.core.lookup(ids[4]) is None and h.core.lookup(ids[5]) is None
    assert event_names(h.last) == ["task added", "task queued"]  # added all the same


def test_low_water_is_a_quarter_of_the_window() -> None:
    assert Core(window=4).low_water == 1
    assert Core(window=1000).low_water == 250


def test_no_load_while_nothing_is_spilled() -> None:
    h = Harness(window=4)
    h.add_worker("w1", concurrency=10)
    for _ in range(8):
        h.add()
    assert not of_type(h.log, Load)


def test_load_when_window_drains_to_low_water() -> None:
    h = Harness(window=8, auto_load=False)
    ids = [h.add() for _ in range(10)]  # 8 in the window, 2 spilled
    h.add_worker("w1", concurrency=5)  # window: 3 left, above low water (2)
    assert not h.pending_loads
    effects = h.complete(ids[0])  # window: 2 left
    assert of_type(effects, Load) == [Load("q", 8, PAYLOAD_CAP)]


def test_only_one_load_in_flight_per_queue() -> None:
    h = Harness(window=4, auto_load=False)
    ids = [h.add() for _ in range(10)]
    h.add_worker("w1", concurrency=4)
    assert len(h.pending_loads) == 1
    h.complete(ids[0])
    h.complete(ids[1])
    assert len(h.pending_loads) == 1


def test_loaded_tasks_fill_the_window_in_seq_order() -> None:
    h = Harness(window=4, auto_load=False)
    ids = [h.add() for _ in range(10)]
    h.add_worker("w1", concurrency=3)  # takes t1..t3, window [t4]
    h.answer_load()
    assert h.window_of() == ids[3:7]


def test_loaded_ignores_tasks_already_in_the_window() -> None:
    h = Harness(window=4, auto_load=False)
    ids = [h.add() for _ in range(6)]
    h.add_worker("w1", concurrency=3)
    assert [t.id for t in h.pending_loads[0].snapshot] == ids[3:6]
    h.answer_load()
    assert h.window_of() == ids[3:6]


def test_loaded_ignores_tasks_dispatched_during_the_load() -> None:
    h = Harness(window=4, auto_load=False)
    ids = [h.add() for _ in range(6)]
    h.add_worker("w1", concurrency=3)  # window [t4], Load in flight
    h.add_worker("w2", concurrency=1)  # takes t4 while the Load is in flight
    h.answer_load()
    assert h.window_of() == ids[4:6]
    h.work_off()
    assert h.offer_order == ids


def test_loaded_ignores_window_tasks_removed_during_the_load() -> None:
    h = Harness(window=4, auto_load=False)
    ids = [h.add() for _ in range(6)]
    h.add_worker("w1", concurrency=3)  # window [t4], Load in flight
    h.remove(ids[3])
    h.answer_load()
    assert h.window_of() == ids[4:6]


def test_loaded_ignores_spilled_tasks_removed_during_the_load() -> None:
    h = Harness(window=4, auto_load=False)
    ids = [h.add() for _ in range(6)]  # t5, t6 spilled
    h.add_worker("w1", concurrency=3)  # window [t4], Load in flight, reads t4..t6
    h.remove(ids[4])  # deleted from the store after the Load read it
    load = h.pending_loads.pop(0)
    h.core.loaded(load.queue, load.snapshot, load.limit, h.now)
    assert h.core.lookup(ids[4]) is None, "a deleted task came back into the window"


def test_loaded_ignores_tasks_completed_during_the_load() -> None:
    h = Harness(window=4, auto_load=False)
    ids = [h.add() for _ in range(6)]
    h.add_worker("w1", concurrency=3)
    h.add_worker("w2", concurrency=1)  # takes t4 during the Load
    h.complete(ids[3])
    h.answer_load()
    assert ids[3] not in h.window_of()
    assert h.state(ids[3]) == COMPLETED


def test_exhausted_load_unspills_the_queue() -> None:
    h = Harness(window=4, auto_load=False)
    ids = [h.add() for _ in range(5)]
    h.add_worker("w1", concurrency=4)
    h.answer_load()  # reads t5 alone: fewer than the limit, the store is drained
    assert h.window_of() == [ids[4]]
    assert not h.core._queues["q"].spilled
    later = h.add()
    assert h.window_of() == [ids[4], later]
    assert not h.pending_loads


def test_add_refused_during_load_keeps_queue_spilled_and_loads_again() -> None:
    h = Harness(window=4, auto_load=False)
    ids = [h.add() for _ in range(5)]
    h.add_worker("w1", concurrency=4)  # Load in flight, will read t5 only
    late = h.add()  # refused: the Load did not see it
    assert h.core.lookup(late) is None
    effects = h.answer_load()
    assert h.window_of() == [ids[4]]
    assert of_type(effects, Load) == [Load("q", 4, PAYLOAD_CAP)]  # window at low water: load again
    h.answer_load()
    assert h.window_of() == [ids[4], late]


def test_requeue_during_load_is_not_lost() -> None:
    h = Harness(window=4, auto_load=False)
    ids = [h.add(retries=1) for _ in range(6)]
    h.add_worker("w1", concurrency=4)  # t1..t4 offered, Load in flight
    h.fail(ids[0])  # requeued while loading
    h.answer_loads()
    h.work_off()
    assert h.offer_order == [*ids[:4], ids[4], ids[5], ids[0]]


def test_add_after_a_load_read_the_task_runs_it_once() -> None:
    # Core.add comes once the insert is durable, so a Load queued behind that insert
    # may return the task before add() is called.
    h = Harness(window=4, auto_load=False)
    h.add_worker("w1", concurrency=2)
    ids = [h.add() for _ in range(7)]  # t1, t2 offered; t3..t6 in the window; t7 spilled
    late = h.insert()  # durable, Core.add not called yet
    for task_id in ids[:3]:
        h.complete(task_id)  # window [t6]: the Load reads t6, t7 and the late task
    h.answer_load()
    h.deliver(late)
    h.work_off()
    assert h.offer_order.count(late) == 1
    assert h.in_state(COMPLETED) == [*ids, late]


def test_add_after_a_load_already_ran_the_task_does_not_run_it_again() -> None:
    h = Harness(window=4, auto_load=False)
    ids = [h.add() for _ in range(5)]  # t1..t4 in the window, t5 spilled
    h.add_worker("w1", concurrency=2)  # takes t1, t2
    late = h.insert()  # durable, Core.add not called yet
    h.complete(ids[0])  # window [t4]: the Load reads t4, t5 and the late task
    h.answer_load()
    h.work_off()  # may run the late task already, from the Load
    # If it ran, the core must not offer it again: the Harness then fails on an Update
    # that expects "waiting" of a task the store has as "completed".
    h.deliver(late)
    h.work_off()
    assert h.offer_order.count(late) == 1
    assert h.state(late) == COMPLETED


def test_window_never_exceeds_its_size_when_a_load_returns_more() -> None:
    h = Harness(window=4, auto_load=False)
    for _ in range(20):
        h.add()
    h.add_worker("w1", concurrency=3)
    h.answer_load()  # Harness.check asserts the bound
    assert len(h.window_of()) == 4


@pytest.mark.parametrize("concurrency", [1, 3, 4, 9])
def test_hundreds_of_tasks_pass_a_small_window_once_each_in_fifo_order(
    concurrency: int,
) -> None:
    h = Harness(window=4)
    ids = [h.add() for _ in range(300)]
    h.add_worker("w1", concurrency=concurrency)
    h.work_off()
    assert h.offer_order == ids
    assert h.in_state(COMPLETED) == ids


def test_interleaved_adds_and_slow_loads_keep_fifo_and_exactly_once() -> None:
    h = Harness(window=4, auto_load=False)
    h.add_worker("w1", concurrency=2)
    h.add_worker("w2", concurrency=1)
    ids: list[str] = []
    for step in range(120):
        ids += [h.add() for _ in range(step % 4)]
        for task_id in h.in_state(ACTIVE)[:2]:
            h.complete(task_id)
        if step % 3 == 0:
            h.answer_loads()
    h.work_off()
    assert h.offer_order == ids
    assert h.in_state(COMPLETED) == ids


def test_loads_are_per_queue() -> None:
    h = Harness(window=4, auto_load=False)
    a_ids = [h.add("a") for _ in range(6)]
    b_ids = [h.add("b") for _ in range(6)]
    h.add_worker("wa", "a", concurrency=4)
    assert [load.queue for load in h.pending_loads] == ["a"]
    h.answer_load()
    assert h.window_of("a") == a_ids[4:]
    assert h.window_of("b") == b_ids[:4]


# -- attempts ----------------------------------------------------------------------------


def test_each_run_that_ends_is_recorded_with_its_times_worker_and_progress() -> None:
    h = Harness()
    h.core.node = "node-a"
    h.add_worker("w1", client="wsq-python")
    h.now = 1.0
    task_id = h.add(retries=1)
    h.now = 2.0
    h.ack(task_id)
    h.now = 2.5
    h.progress(task_id, 0.5)
    h.now = 3.0
    h.fail(task_id, "disk full")
    h.now = 4.0
    h.ack(task_id)
    h.now = 6.0
    h.complete(task_id)
    assert h.attempts[task_id] == [
        Attempt(task_id, 1, "w1", "wsq-python", "node-a", 1.0, 2.0, 3.0,
                AttemptOutcome.FAILED, "disk full", 0.5),
        # The second run reported no progress: the first run's is not carried over.
        Attempt(task_id, 2, "w1", "wsq-python", "node-a", 3.0, 4.0, 6.0,
                AttemptOutcome.COMPLETED, None, None),
    ]  # fmt: skip


def test_an_offer_never_acknowledged_is_recorded_as_no_response(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add()
    h.tick(1.0)  # the worker timeout
    (attempt,) = h.attempts[task_id]
    assert (attempt.outcome, attempt.error) == ("no_response", "Worker w1 didn't respond.")
    assert (attempt.offered, attempt.started, attempt.ended) == (0.0, None, 1.0)


def test_a_started_run_that_expires_is_recorded_as_timed_out(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add(timeout=5.0)
    h.ack(task_id)
    h.tick(5.0)
    (attempt,) = h.attempts[task_id]
    assert (attempt.outcome, attempt.error, attempt.ended) == ("timed_out", "Timed out.", 5.0)


def test_a_released_offer_is_recorded_as_released(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add()
    h.remove_worker("w1")
    effects = h.release(task_id)
    (attempt,) = recorded(effects)
    assert (attempt.outcome, attempt.started, attempt.error) == ("released", None, None)


def test_a_run_whose_worker_left_keeps_its_client_name(h: Harness) -> None:
    h.add_worker("w1", client="wsq-js")
    task_id = h.add(timeout=5.0)
    h.ack(task_id)
    h.remove_worker("w1")  # its connection dropped; the run goes on until it expires
    h.tick(5.0)
    (attempt,) = h.attempts[task_id]
    assert (attempt.worker, attempt.client, attempt.outcome) == ("w1", "wsq-js", "timed_out")


def test_a_recovered_run_records_what_is_known() -> None:
    h = Harness()
    h.add_worker("w1")
    task_id = h.add()
    h.ack(task_id)
    h.now = 7.0
    h.restart()
    h.now = 8.0
    effects = h.complete(task_id)
    (attempt,) = recorded(effects)
    assert attempt == Attempt(
        task_id, 1, "w1", None, None, None, None, 8.0, AttemptOutcome.COMPLETED, None, None
    )


def test_removed_or_autoremoved_tasks_record_no_attempt(h: Harness) -> None:
    h.add_worker("w1", concurrency=2)
    gone = h.add(autoremove=True)
    removed = h.add()
    h.ack(gone)
    assert recorded(h.complete(gone)) == []
    assert recorded(h.remove(removed)) == []
    assert h.attempts == {}


def test_a_task_s_attempts_are_deleted_with_it(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add()
    h.fail(task_id)
    assert len(h.attempts[task_id]) == 1
    h.remove(task_id)
    assert task_id not in h.attempts


def test_current_attempt_shows_the_run_in_progress(h: Harness) -> None:
    h.core.node = "n"
    h.add_worker("w1", client="c")
    task_id = h.add()
    assert h.core.current_attempt(task_id) == Attempt(task_id, 1, "w1", "c", "n", 0.0)
    h.now = 2.0
    h.progress(task_id, 0.25)
    current = h.core.current_attempt(task_id)
    assert current is not None and (current.started, current.progress) == (2.0, 0.25)
    assert (current.ended, current.outcome) == (None, None)
    h.complete(task_id)
    assert h.core.current_attempt(task_id) is None


def test_a_task_that_always_fails_records_every_run() -> None:
    # The stores keep the newest KEPT_ATTEMPTS (the contract suite); the core asks for all.
    h = Harness(worker_timeout=-1)
    h.add_worker("w1")
    task_id = h.add(retries=-1)
    for run in range(1, KEPT_ATTEMPTS + 6):
        assert [attempt.run for attempt in recorded(h.fail(task_id))] == [run]
    runs = [attempt.run for attempt in h.attempts[task_id]]
    assert runs == list(range(6, KEPT_ATTEMPTS + 6))


# -- recovery ----------------------------------------------------------------------------


def test_recover_sets_the_next_seq() -> None:
    core = Core()
    assert core.recover(Recovery(next_seq=42), 0.0) == []
    assert core.allocate_seq(0.0) == 42
    assert core.allocate_seq(0.0) == 43


def test_recover_restores_active_runs_with_fresh_timers() -> None:
    core = Core(worker_timeout=1.0)
    task = make_task("t1", state=ACTIVE, run=3, worker="w1", options=Options(timeout=10.0))
    core.recover(Recovery(next_seq=2, active=[task]), 100.0)
    assert core.next_deadline() == 110.0
    effects = core.tick(110.0)
    assert not of_type(effects, Abort)
    (failed,) = emits(effects, "task failed")
    assert failed.args[0]["error"] == "Timed out."


def test_recover_marks_waiting_queues_spilled_and_loads_them() -> None:
    core = Core(window=16)
    effects = core.recover(Recovery(next_seq=9, waiting_queues=["a", "b"]), 0.0)
    assert effects == [Load("a", 16, PAYLOAD_CAP), Load("b", 16, PAYLOAD_CAP)]


def resync(h: Harness) -> Resynced:
    """A resync after writes that failed, as the server makes it: the store's active runs
    and counts read in the pipe, then its effects applied and the queues that changed
    dispatched."""
    reads = h.core.begin_resync()
    assert [type(op) for op in reads] == [HeldRuns, CountTasks, ReadTasks]
    held = [replace(h.store[task_id]) for task_id in h.in_state(ACTIVE)]
    counts = dict(Counter((t.queue, t.state) for t in h.store.values()))
    read = reads[2]
    assert isinstance(read, ReadTasks)
    records = sorted((replace(h.store[i]) for i in read.ids if i in h.store), key=lambda t: t.seq)
    result = h.core.resynced(held, h.now, counts, records)
    h.unstored_runs.update((e.task, e.run) for e in of_type(result.effects, Abort))
    # Runs that ended while the store kept an earlier one, held again: their reports are
    # stale now, their records never made; the next run is numbered above them.
    for task_id, spent in h.core._spent.items():
        h.unstored_runs.update((task_id, run) for run in range(h.store[task_id].run + 1, spent + 1))
    h._handle(result.effects + h.core.flush(h.now))
    return result


def test_after_writes_that_failed_a_resync_sets_runs_windows_and_counts_right() -> None:
    """A store of one server whose batch failed (a full disk): a completion, the offer it
    made, a failure, its re-queue and the next run's offer were not stored. The resync
    holds the unstored ends' runs again (their workers' reports, sent again, are
    accepted); keeps the offered run whose task the store has waiting (its worker runs
    it) and writes its start again; forgets the second run of the failed task (the store
    has its first run), aborting it at its worker and numbering the next run above it; and
    counts as the store does. No run is offered twice (the harness checks it)."""
    h = Harness()
    done, failing, waiting = h.add(), h.add(retries=1), h.add()
    h.add_worker("w1", concurrency=2)
    assert h.held_by("w1") == sorted([done, failing])
    h.ack(done)
    h.ack(failing)
    # One batch, not stored: done completes (waiting is offered in its place), failing
    # fails, is queued again and offered as run 2.
    lost = h.core.complete(done, 1, h.now) + h.core.fail(failing, 1, "boom", h.now)
    assert [t.id for e in of_type(lost, Offer) for t in e.tasks] == [waiting, failing]
    # The offers went out (they do not wait for their writes): the workers run them.
    h.offered_runs.update((t.id, t.run) for e in of_type(lost, Offer) for t in e.tasks)
    assert h.core.counts()["q"]["completed"] == 1
    result = resync(h)
    assert (result.dropped, result.held, result.started) == (1, 2, 1)
    [abort] = of_type(result.effects, Abort)
    assert (abort.task, abort.run) == (failing, 2)
    assert h.store[waiting].state == ACTIVE and h.store[waiting].run == 1  # written again
    assert h.core.counts()["q"] == {"waiting": 0, "active": 3, "completed": 0, "failed": 0}
    h.ack(waiting)
    h.complete(waiting)  # its run, kept, ends as reported
    h.complete(done)  # sent again: accepted
    h.fail(failing, run=1)  # sent again: accepted; queued again
    assert h.core.lookup(failing) is not None and h.store[failing].run == 3  # above 2
    h.work_off()
    assert {h.state(t) for t in (done, failing, waiting)} == {COMPLETED}
    assert [a.run for a in h.attempts[waiting]] == [1]
    assert [a.run for a in h.attempts[failing]] == [1, 3]


def test_a_resync_holds_again_a_run_whose_start_and_end_were_not_stored() -> None:
    """A store of one server, its disk full from the offer on: neither the run's start
    nor its end (the worker's report) was stored, and the core heard that a write failed.
    A load meanwhile finds the task waiting in the store and leaves it alone; the resync
    reads it (ReadTasks), holds the run again and writes its start again; the report, sent
    again, is accepted: one run, one attempt. The ends the core keeps for this are
    forgotten once their writes are stored."""
    h = Harness()
    task_id = h.add()
    h.workers["w1"] = ConnectedWorker("c1", "q", 1)
    lost = h.core.add_worker("c1", "w1", "q", 1, h.now) + h.core.flush(h.now)
    assert [t.id for e in of_type(lost, Offer) for t in e.tasks] == [task_id]
    h.offered_runs.add((task_id, 1))
    h.offer_order.append(task_id)
    h.core.ack(task_id, 1, h.now)
    h.core.complete(task_id, 1, h.now)
    h.core.write_failed()
    h.core.writes_durable(h.core.ends_made())  # a later batch, stored: still unsure
    assert h.store[task_id].state == WAITING and h.store[task_id].run == 0
    effects = h.core.loaded("q", [replace(h.store[task_id])], 10, h.now)
    assert not of_type(effects + h.core.flush(h.now), Offer)
    result = resync(h)
    assert (result.dropped, result.held, result.started) == (0, 0, 1)
    assert h.store[task_id].state == ACTIVE and h.store[task_id].run == 1  # written again
    assert h.core.counts()["q"] == {"waiting": 0, "active": 1, "completed": 0, "failed": 0}
    h.complete(task_id, run=1)  # sent again: accepted
    assert h.state(task_id) == COMPLETED
    assert [a.run for a in h.attempts[task_id]] == [1]
    assert h.offer_order == [task_id]
    assert not h.core._ending  # its end stored: forgotten


def test_a_resync_forgets_the_ends_it_finds_stored() -> None:
    """Ends made before a write failed whose own writes were stored: the resync reads
    them, finds them ended in the store, and neither holds them again nor keeps them."""
    h = Harness()
    h.add_worker("w1", concurrency=3)
    ids = [h.add() for _ in range(3)]
    h.core.write_failed()
    for task_id in ids:
        h.complete(task_id)
    assert len(h.core._ending) == 3  # unsure: kept for the resync
    result = resync(h)
    assert (result.dropped, result.held, result.started) == (0, 0, 0)
    assert not h.core._ending
    assert {h.state(t) for t in ids} == {COMPLETED}


def test_restart_resumes_waiting_tasks_in_order() -> None:
    h = Harness(window=4)
    ids = [h.add() for _ in range(10)]
    h.restart()
    h.add_worker("w1", concurrency=2)
    h.work_off()
    assert h.offer_order == ids


def test_recovered_run_accepts_the_worker_s_report() -> None:
    h = Harness()
    h.add_worker("w1")
    task_id = h.add()
    h.ack(task_id)
    h.restart()
    h.now = 1.0
    h.progress(task_id, 0.5)
    effects = h.complete(task_id)
    assert event_names(effects) == ["task completed"]  # already started: no second start


def test_recovered_runs_count_against_the_reconnecting_worker() -> None:
    h = Harness()
    h.add_worker("w1", concurrency=2)
    ids = [h.add() for _ in range(3)]
    h.restart()
    effects = h.add_worker("w1", concurrency=2)
    assert not of_type(effects, Offer)
    assert h.state(ids[2]) == WAITING


def test_recovered_run_with_timeout_disabled_has_no_deadline() -> None:
    core = Core()
    task = make_task("t1", state=ACTIVE, run=1, worker="w1", options=Options(timeout=-1))
    core.recover(Recovery(next_seq=2, active=[task]), 0.0)
    assert core.next_deadline() is None


# -- property test: random operations against the model ----------------------------------

QUEUES = ("a", "b")
# Each worker id always serves the same queue with the same concurrency.
WORKERS = {"w1": ("a", 1), "w2": ("a", 2), "w3": ("b", 3)}


class CoreMachine(RuleBasedStateMachine):
    """Random sequences of everything the server may do; :meth:`Harness.check` after each
    step, and at the end every task must be processed (or deleted) exactly once."""

    def __init__(self) -> None:
        super().__init__()
        self.h = Harness(worker_timeout=1.0, window=4, auto_load=False)
        self.reads: list[Task] = []

    @rule(
        queue=st.sampled_from(QUEUES),
        timeout=st.sampled_from([-1.0, 0.5, 2.0]),
        retries=st.sampled_from([-1, 0, 1]),
        autoremove=st.booleans(),
        blob=st.booleans(),
        count=st.integers(1, 6),
        deliver=st.booleans(),
        big=st.booleans(),
    )
    def add(
        self,
        queue: str,
        timeout: float,
        retries: int,
        autoremove: bool,
        blob: bool,
        count: int,
        deliver: bool,
        big: bool,
    ) -> None:
        """Insert tasks; hand them to the core now, or later (:meth:`deliver`)."""
        blobs = ["b"] if blob else []
        for _ in range(count):
            options = {"timeout": timeout, "retries": retries, "autoremove": autoremove}
            task_id = self.h.insert(queue, blobs=blobs, big=big, **options)
            if deliver:
                self.h.deliver(task_id)

    @rule()
    def deliver(self) -> None:
        if self.h.undelivered:
            self.h.deliver(next(iter(self.h.undelivered)))

    @rule(worker=st.sampled_from(sorted(WORKERS)))
    def connect(self, worker: str) -> None:
        if worker not in self.h.workers:
            queue, concurrency = WORKERS[worker]
            self.h.add_worker(worker, queue, concurrency)

    @rule(worker=st.sampled_from(sorted(WORKERS)))
    def connect_elsewhere(self, worker: str) -> None:
        """The same worker id on the other queue (its runs there still count)."""
        if worker not in self.h.workers:
            queue, concurrency = WORKERS[worker]
            self.h.add_worker(worker, QUEUES[1 - QUEUES.index(queue)], concurrency)

    @rule(worker=st.sampled_from(sorted(WORKERS)))
    def disconnect(self, worker: str) -> None:
        self.h.remove_worker(worker)

    @rule(data=st.data(), report=st.sampled_from(["ack", "progress", "touch", "complete", "fail"]))
    def report(self, data: st.DataObject, report: str) -> None:
        active = self.h.in_state(ACTIVE)
        if not active:
            return
        task_id = data.draw(st.sampled_from(active))
        if report == "ack":
            self.h.ack(task_id)
        elif report == "progress":
            self.h.progress(task_id, data.draw(st.sampled_from([0.0, 0.5, 1.0])))
        elif report == "touch":
            self.h.touch(task_id)
        elif report == "complete":
            self.h.complete(task_id)
        else:
            self.h.fail(task_id)

    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        """A stopped worker declines an offer; a started run cannot be released."""
        active = self.h.in_state(ACTIVE)
        if not active:
            return
        task_id = data.draw(st.sampled_from(active))
        if not self.h.core._runs[task_id].acked:
            self.h.release(task_id)
            return
        before = snapshot_of(self.h)
        with pytest.raises(InvalidState):
            self.h.release(task_id)
        assert snapshot_of(self.h) == before

    @rule(data=st.data(), report=st.sampled_from(sorted(REPORTS)))
    def stale_report(self, data: st.DataObject, report: str) -> None:
        if not self.h.store:
            return
        task_id = data.draw(st.sampled_from(sorted(self.h.store)))
        stored = self.h.store[task_id]
        offset = data.draw(st.sampled_from([-1, 1]))
        run = stored.run + offset if stored.state == ACTIVE else stored.run
        before = snapshot_of(self.h)
        with pytest.raises(StaleRun):
            REPORTS[report](self.h.core, task_id, run, self.h.now)
        assert snapshot_of(self.h) == before

    @rule(step=st.sampled_from([0.0, 0.25, 0.5, 1.0, 3.0]), to_deadline=st.booleans())
    def tick(self, step: float, to_deadline: bool) -> None:
        deadline = self.h.core.next_deadline()
        if to_deadline and deadline is not None:
            self.h.tick(max(deadline, self.h.now))
        else:
            self.h.advance(step)

    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        candidates = sorted(set(self.h.store) - set(self.h.undelivered)) or ["unknown"]
        self.h.remove(data.draw(st.sampled_from(candidates)))

    @rule(data=st.data())
    def retry(self, data: st.DataObject) -> None:
        if not self.h.store:
            return
        task_id = data.draw(st.sampled_from(sorted(self.h.store)))
        if self.h.state(task_id) == FAILED:
            self.h.retry(task_id)
        else:
            with pytest.raises(InvalidState):
                self.h.retry(task_id)

    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        """A remove or retry reads a task; it acts on the copy later (maybe stale)."""
        if self.h.store:
            task_id = data.draw(st.sampled_from(sorted(self.h.store)))
            self.reads.append(replace(self.h.store[task_id]))

    @rule(data=st.data(), kind=st.sampled_from(["remove", "retry"]))
    def act_on_read(self, data: st.DataObject, kind: str) -> None:
        """The second half of a racing remove or retry, as connection.py makes it: the
        core's own path if it holds the task, else the store decides."""
        if not self.reads:
            return
        read = self.reads.pop(data.draw(st.integers(0, len(self.reads) - 1)))
        held = self.h.core.lookup(read.id)
        if kind == "remove" and held is not None:
            self.h.remove(read.id)
        elif kind == "remove" and read.seq in self.h.core._adding:
            # Its add (or retry) is not done: the server reads again once it is.
            assert self.h.core.begin_delete(read) is None
        elif kind == "remove":
            self.h.begin_remove(read)
        elif (held or read).state == FAILED:
            self.h.begin_retry(read)
        else:
            with pytest.raises(InvalidState):
                self.h.begin_retry(read)

    @rule()
    def finish_admin(self) -> None:
        if self.h.pending_admin:
            self.h.finish_admin()

    @rule()
    def answer_load(self) -> None:
        if self.h.pending_loads:
            self.h.answer_load()

    @rule()
    def restart(self) -> None:
        self.h.restart()

    @rule(
        data=st.data(),
        steps=st.lists(
            st.sampled_from(
                ["ack", "progress", "complete", "complete", "fail", "tick", "disconnect"]
            ),
            min_size=2,
            max_size=8,
        ),
    )
    def writes_fail(self, data: st.DataObject, steps: list[str]) -> None:
        """A store of one server whose writes fail for a while (a full disk): what the
        core does meanwhile is not stored; the resync then sets it right, and the workers
        send the final reports refused meanwhile again. No run is offered twice, no
        state is lost (the invariants hold again after it)."""
        h = self.h
        h.losing = True
        h.core.write_failed()
        refused: list[tuple[str, str, int]] = []
        for step in steps:
            runs = sorted((task_id, run.task.run) for task_id, run in h.core._runs.items())
            if step in ("ack", "progress", "complete", "fail") and runs:
                task_id, run = data.draw(st.sampled_from(runs))
                h._handle(REPORTS[step](h.core, task_id, run, h.now))
                if step in ("complete", "fail"):
                    refused.append((step, task_id, run))
            elif step == "tick":
                h.advance(0.5)
            elif step == "disconnect" and h.workers:
                h.remove_worker(data.draw(st.sampled_from(sorted(h.workers))))
            h._handle(h.core.flush(h.now))  # the end of the server's turn: offers go out
        h.losing = False
        resync(h)
        for step, task_id, run in refused:  # sent again
            if h.core.is_current(task_id, run):
                h._handle(REPORTS[step](h.core, task_id, run, h.now))

    @invariant()
    def consistent(self) -> None:
        self.h.check()

    def teardown(self) -> None:
        h = self.h
        while h.undelivered:
            h.deliver(next(iter(h.undelivered)))
        while h.pending_admin:
            h.finish_admin()
        for worker, (queue, concurrency) in WORKERS.items():
            if worker in h.workers and h.workers[worker].queue != queue:
                h.remove_worker(worker)
            if worker not in h.workers:
                h.add_worker(worker, queue, concurrency)
        h.work_off()
        assert not h.in_state(WAITING), "tasks left waiting with idle workers"
        for task_id in h.added:
            assert task_id in h.deleted or h.state(task_id) in (COMPLETED, FAILED), task_id


TestCoreModel = CoreMachine.TestCase
TestCoreModel.settings = settings(
    max_examples=300,
    stateful_step_count=50,
    deadline=None,
    derandomize=True,  # the same examples on every run; raise max_examples to explore
    database=None,
    report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow],
)


# -- release: a stopped worker declines an offer -------------------------------------------


def test_release_puts_an_unacked_offer_back_in_its_place(h: Harness) -> None:
    h.add_worker("w1")
    first, second = h.add(), h.add()
    h.remove_worker("w1")
    effects = h.release(first)
    assert h.state(first) == WAITING
    assert h.store[first].retries == 0 and h.store[first].error is None
    assert h.store[first].worker is None
    assert [e.args[0]["id"] for e in emits(effects, "task queued")] == [first]
    assert emits(effects, "task failed") == []
    assert h.window_of() == [first, second]
    h.add_worker("w2")
    assert h.held_by("w2") == [first]


def test_released_run_never_times_out(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add()
    h.remove_worker("w1")
    h.release(task_id)
    assert h.advance(10.0) == []
    assert h.state(task_id) == WAITING


def test_release_of_a_started_run_is_refused_and_changes_nothing(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add()
    h.ack(task_id)
    with pytest.raises(InvalidState):
        h.release(task_id)
    assert h.state(task_id) == ACTIVE
    h.complete(task_id)
    assert h.state(task_id) == COMPLETED


def test_release_of_an_old_run_is_stale(h: Harness) -> None:
    h.add_worker("w1")
    task_id = h.add()
    run = h.store[task_id].run
    h.complete(task_id)
    with pytest.raises(StaleRun):
        h.release(task_id, run)


def test_release_frees_the_slot_for_another_worker_in_order(h: Harness) -> None:
    h = Harness(window=2)
    h.add_worker("w1", concurrency=2)
    ids = [h.add() for _ in range(5)]
    h.remove_worker("w1")
    h.release(ids[1])
    h.release(ids[0])
    h.add_worker("w2", concurrency=5)
    assert h.offer_order[-5:] == ids


def test_an_add_that_lands_after_a_requeue_keeps_its_place_in_a_full_window() -> None:
    # Found by the model: t8's insert was in flight while t1 failed and was queued again
    # behind it; the window was full when t8 landed, and t1 used to run first.
    h = Harness(window=4)
    h.add_worker("w3", "b", concurrency=3)
    first = [h.add("b", retries=-1) for _ in range(3)]
    late = [h.insert("b") for _ in range(5)]
    h.deliver(late[0])
    h.fail(first[0])
    for task_id in late[1:]:
        h.deliver(task_id)
    assert h.window_of("b") == late[1:]


def test_a_resync_takes_a_task_held_again_out_of_its_window() -> None:
    """A failure, queued again behind another task (so it waits in the window while the
    other is offered), was not stored: the resync holds its run again and takes the
    waiting copy out of the window (another object than the record it read)."""
    h = Harness()
    failing = h.add(retries=1)
    h.add_worker("w1")
    h.ack(failing)
    ahead = h.add()  # the failure is queued again behind it
    lost = h.core.fail(failing, 1, "boom", h.now) + h.core.flush(h.now)
    assert [t.id for e in of_type(lost, Offer) for t in e.tasks] == [ahead]
    h.offered_runs.add((ahead, 1))
    assert h.window_of() == [failing]
    result = resync(h)
    assert (result.dropped, result.held, result.started) == (0, 1, 1)
    assert h.window_of() == []
    h.fail(failing, run=1)  # sent again: accepted, queued again
    h.ack(ahead)
    h.complete(ahead)
    h.work_off()
    assert h.state(failing) == COMPLETED
