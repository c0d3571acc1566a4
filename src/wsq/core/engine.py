"""The queue core: every scheduling decision wsq makes, with no I/O and no clock.

Callers pass ``now`` (seconds) into each method and get back a list of
:mod:`effects <wsq.core.effects>` to apply in order. The core keeps in memory only what it
must: connected workers, active runs, and a bounded *window* of the oldest waiting tasks
of each queue; the rest of the backlog stays in the state store and is paged in with
:class:`~wsq.core.effects.Load` as the window drains (docs/architecture.md, "The window").

Contract with the caller:

* A new task is inserted into the store first; :meth:`Core.add` is called after that
  insert is durable, with a ``seq`` taken from :meth:`Core.allocate_seq` before it.
* Timers: after every call, re-arm a wake-up at :meth:`Core.next_deadline` and call
  :meth:`Core.tick` then.
* Worker reports name a ``run``; one that does not match the task's current run raises
  :class:`~wsq.exceptions.StaleRun`, and nothing changes.
* Metrics: set :attr:`Core.observations` to a list and drain it now and then; the core
  appends what it saw happen (:mod:`wsq.core.observations`).

With ``shared=True`` (a state store other nodes use too, docs/architecture.md "Several
nodes") the core keeps no window: dispatch emits :class:`~wsq.core.effects.Claim` for the
free slots of a queue's workers and offers what :meth:`Core.claimed` is given back; tasks
queued again go to the store only (a back-off as the row's ``not_before``); seqs come from
the clock and :attr:`Core.node_index`, so nodes never hand out the same one.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from wsq.core import observations as seen
from wsq.core.effects import Abort, Claim, DeleteBlobs, Effect, Emit, Load, Offer, Write
from wsq.core.names import NameIndex
from wsq.core.observations import Observation
from wsq.core.ops import (
    NODE_BITS,
    Attempt,
    AttemptOutcome,
    ClaimWaiting,
    CountTasks,
    Delete,
    DropWorkers,
    HeldRuns,
    Op,
    PutWorker,
    ReadTasks,
    RecordAttempt,
    Recovery,
    SetProgress,
    Update,
    WorkerRow,
)
from wsq.core.task import State, Task, check_transition
from wsq.exceptions import InvalidArgument, InvalidState, StaleRun

BACKOFF = 0.1
"""Seconds a task waits after an expired run before it is offered again, doubled for
each earlier failure of the task (``retries``), up to :data:`MAX_BACKOFF`
(docs/protocol.md §6.2)."""
MAX_BACKOFF = 60.0
WINDOW_BYTES = 64 << 20
"""Bytes of task payloads all windows together keep in memory (docs/architecture.md)."""
PAYLOAD_CAP = 16 << 10
"""The largest payload (data and inline streams) of one task a window keeps in memory."""
POLL_INTERVAL = 1.0
"""Shared store: seconds between claims for a queue whose workers have free slots but
whose store held nothing to claim last time (tasks other nodes add are found this way
when no notice of them arrives)."""
CLAIM_RETRY = 1.0
"""Shared store: seconds before a claim that failed (the store unavailable) is tried
again."""
ADD_HOLD = 5.0
"""Shared store: seconds a task added on a node that died before announcing it waits
before any node may claim it (:meth:`Core.admit`)."""

_STATE_NAMES = tuple(state.value for state in State)
_STATE_INDEX = {state: index for index, state in enumerate(State)}


@dataclass(frozen=True, slots=True)
class Resynced:
    """What :meth:`Core.resynced` did: runs forgotten, held again and whose start it
    writes again, and the effects to apply (those writes, aborts of forgotten runs)."""

    dropped: int
    held: int
    started: int
    effects: list[Effect]


@dataclass(slots=True)
class _Ending:
    """A run ended whose end may not be stored (a store of its own: Core._ending)."""

    run: int
    worker: str | None
    mark: int  # Core._ends when it ended
    # The end's writes (its Update, which carries a completion's attempt record, and any
    # other end's RecordAttempt) of each run of the task that ended since the writes were
    # last known stored, to write again if a later run is kept and these were not stored
    # (Core._unstarted_ends).
    writes: list[Update | RecordAttempt] = field(default_factory=list)


@dataclass(slots=True)
class _Worker:
    id: str  # the key the core knows it by (unique in the server)
    queue: str
    connection: str
    concurrency: int
    name: str  # the id its client gave it, which offers and aborts carry
    since: float = 0.0  # when it was registered
    client: str | None = None  # what its connection's hello said, for attempts
    peer: str | None = None  # its connection's remote address, for other nodes' listings

    def to_json(self) -> dict[str, Any]:
        return {"id": self.name, "queue": self.queue, "concurrency": self.concurrency}


@dataclass(slots=True)
class _Run:
    task: Task
    acked: bool
    deadline: float | None
    offered: float | None = None  # None: recovered after a restart
    started: float | None = None  # when the worker acknowledged it
    resumed: float | None = None  # recovered after a restart: the task's last update
    progress: float | None = None  # the last progress this run reported
    client: str | None = None  # its worker's client, noted when the worker left
    born: int = 0  # Core._generation when it was made (Core.resynced)

    @property
    def began(self) -> float:
        """When run times count from: the offer (for a run recovered after a restart,
        which has no offer time, the task's last update before it)."""
        for when in (self.offered, self.resumed, self.started):
            if when is not None:
                return when
        return 0.0


@dataclass(slots=True)
class _Queue:
    name: str
    window: list[Task] = field(default_factory=list)
    workers: dict[str, _Worker] = field(default_factory=dict)
    # The store may hold waiting tasks of this queue that are not in the window.
    spilled: bool = False
    loading: bool = False
    refused_during_load: bool = False
    # The oldest seq of the tasks left in the store during a load (refused_during_load):
    # the load, read before they waited, may hold newer ones, which must wait behind them.
    refused_seq: int | None = None
    left_during_load: set[str] = field(default_factory=set)
    # Tasks of this queue waiting out a back-off: loads read past them (they skip them).
    delayed: int = 0
    # Shared store: whether the store may hold tasks to claim (unknown counts as yes),
    # whether a claim is on its way, and whether one was added meanwhile.
    maybe_waiting: bool = True
    claiming: bool = False
    added_while_claiming: bool = False

    @property
    def idle(self) -> bool:
        return not (
            self.window
            or self.workers
            or self.spilled
            or self.loading
            or self.delayed
            or self.claiming
        )


class Core:
    """The scheduler. See the module docstring for the calling contract."""

    def __init__(
        self,
        *,
        worker_timeout: float = 1.0,
        window: int = 1000,
        backoff: float = BACKOFF,
        max_backoff: float = MAX_BACKOFF,
        window_bytes: int = WINDOW_BYTES,
        payload_cap: int = PAYLOAD_CAP,
        shared: bool = False,
        node_index: int = 0,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        self.worker_timeout = worker_timeout
        self.shared = shared
        self.node_index = 0
        self.set_node_index(node_index)
        self.poll_interval = poll_interval
        self._last_micros = 0  # shared: the clock part of the last seq handed out
        # Shared: slots of each worker promised to claims on their way, and when queues
        # are next looked at (a back-off's end, a failed claim tried again, a poll).
        self._claiming: dict[str, int] = {}
        self._reserved: dict[int, tuple[str, str]] = {}  # seq -> (worker, queue): admit()
        self._waiting_adds: dict[int, str] = {}  # seq -> queue, of adds admit() let wait
        self._held_adds: set[int] = set()  # seqs of those inserted held (not_before)
        # Shared: no other node is alive (the store says so: Heartbeat.alone), so no other
        # node can claim a task before it hears of it: inserts need no hold and release.
        self.alone = False
        self._inflight: dict[str, int] = {}  # queue -> how many of those
        self._wakes: list[tuple[float, str]] = []
        self._poll_at: float | None = None
        # Payloads (data and inline streams) held in memory: each at most payload_cap
        # bytes, all windows together at most window_bytes; beyond that the window
        # holds ids and order only, and offers read the payload from the store.
        self.window_bytes = window_bytes
        self.payload_cap = payload_cap
        self._held_bytes = 0
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.window_size = window
        self.low_water = max(1, window // 4)
        self._next_seq = 1
        self._queues: dict[str, _Queue] = {}
        self._workers: dict[str, _Worker] = {}
        self._runs: dict[str, _Run] = {}
        self._by_worker: dict[str, set[str]] = {}
        self._waiting: dict[str, Task] = {}
        self._deadlines: list[tuple[float, str, int]] = []
        # Tasks re-queued after an expired run wait out a back-off here, then join their
        # window: id -> task, and a heap of (when, id, seq).
        self._delayed: dict[str, Task] = {}
        self._delays: list[tuple[float, str, int]] = []
        # Whether anyone (a listener, the log) wants task events of a queue; the server
        # sets this so that unobserved queues cost no snapshots.
        self.observed: Callable[[str], bool] = lambda queue: True
        # With defer_dispatch, calls only note which queues changed and flush() offers
        # once for all of them: a worker freed by 100 completions in one turn of the
        # server's loop gets one offer of 100 tasks, not 100 offers of one.
        self.defer_dispatch = False
        self._dirty: dict[str, None] = {}
        self._adding: set[int] = set()
        self._freed: dict[str, None] = {}  # queues whose workers' slots ended elsewhere
        self._removing: dict[str, int] = {}  # task id -> deletes in flight (begin_delete)
        self._skipped: set[str] = set()  # tasks being deleted that a load skipped
        self._counts: dict[str, list[int]] = {}  # queue -> tasks per state (_STATE_INDEX)
        # Every name in _counts or _queues, sorted: what a principal's patterns match is
        # found without reading the names of every other queue (core/names.py).
        self._names = NameIndex()
        # What happened, for the caller's metrics (wsq.core.observations); None: nothing.
        self.observations: list[Observation] | None = None
        # This server's node name, recorded with every attempt; the server sets it.
        self.node: str | None = None
        # Shared store, resyncing: runs are made in the current generation; the runs
        # ended since begin_resync (task id, run), None when no resync is on its way.
        self._generation = 0
        self._ended_since: set[tuple[str, int]] | None = None
        self._counts_then: dict[str, list[int]] = {}  # a store of its own: at begin_resync
        # A store of its own: task id -> the run a resync forgot (its start was not stored
        # and the store holds an earlier run); the task's next run is numbered above it,
        # so no worker is offered a run it may still be running.
        self._spent: dict[str, int] = {}
        # A store of its own: the runs ended whose end may not be stored, by task id, in
        # the order they ended; ``mark`` counts ends (:meth:`ends_made`).
        # :meth:`writes_durable` forgets them once their writes are stored, unless a write
        # failed since the last resync (``_unsure``): then the resync reads their tasks
        # (:class:`ReadTasks`) and holds again a run whose start was not stored either (its
        # worker sends its report again), or writes its end again before a later run's start.
        self._ending: dict[str, _Ending] = {}
        self._ends = 0
        self._unsure = False
        self._resync_mark = 0  # _ends at begin_resync
        # A store of its own: the adds, retries (by seq) and deletes (("delete", task id))
        # in flight when a resync began, whose results come later: the read counts what
        # they did, so their count moves are not moves since (_count_stored); and, once
        # the counts are set from the read, those whose results are still to come.
        self._before_read: set[object] = set()
        self._read_saw: set[object] = set()

    # -- start-up and intake ---------------------------------------------------------------

    def recover(self, recovery: Recovery, now: float) -> list[Effect]:
        """Adopt what the store holds: active tasks get fresh timers, queues with waiting
        tasks are marked as spilled so their windows fill from the store (shared: as
        holding tasks to claim)."""
        self._next_seq = max(self._next_seq, recovery.next_seq)
        self._last_micros = max(self._last_micros, recovery.next_seq >> NODE_BITS)
        if self.shared:
            self.set_node_index(recovery.node_index)
        for (name, state), count in recovery.counts.items():
            self._count(name, state, count)
        self._hold_runs(recovery.active, now)
        effects: list[Effect] = []
        for name in recovery.waiting_queues:
            queue = self._queue(name)
            if self.shared:
                queue.maybe_waiting = True
                effects += self._dispatch_soon(queue, now)
                continue
            queue.spilled = True
            effects += self._refill(queue)
        return effects

    def _hold_runs(self, tasks: Iterable[Task], now: float) -> None:
        for task in tasks:
            run = _Run(task, acked=True, deadline=None, resumed=task.updated, born=self._generation)
            self._runs[task.id] = run
            self._by_worker.setdefault(task.worker or "", set()).add(task.id)
            self._arm(run, now)

    def adopt(self, tasks: list[Task], now: float) -> list[Effect]:
        """Shared store: active runs of a dead node that this node now holds (the store
        made them its own): timed from now, as runs recovered after a restart are; their
        workers' reports are accepted here once they reconnect to this node."""
        self._hold_runs((task for task in tasks if task.id not in self._runs), now)
        return []

    def drop_run(self, task_id: str, run: int) -> bool:
        """Shared store: another node took run ``run`` of the task over (its worker moved
        there): forget it, with no write and no event (its timers end nothing now).
        Whether this node held it."""
        current = self._runs.get(task_id)
        if current is None or current.task.run != run:
            return False
        self._detach(current)
        self._dirty[current.task.queue] = None  # its worker's slot, if still here, is free
        return True

    def ends_made(self) -> int:
        """How many runs this core has ended so far: the mark to hand to
        :meth:`writes_durable` once the writes emitted until now are stored."""
        return self._ends

    def writes_durable(self, mark: int) -> None:
        """Every write emitted before :meth:`ends_made` returned ``mark`` is stored: the
        core forgets those runs' ends, unless a write failed since the last resync (that
        resync decides on them)."""
        if self._unsure:
            return
        ending = self._ending
        while ending:
            task_id = next(iter(ending))
            if ending[task_id].mark > mark:
                break
            del ending[task_id]

    def write_failed(self) -> None:
        """A batch of writes failed: a resync is on its way (:meth:`begin_resync`);
        until it is done, the core cannot tell which ends were stored."""
        self._unsure = True

    @property
    def unsure(self) -> bool:
        """Whether a write failed since the last resync was done (:meth:`write_failed`,
        :meth:`resynced`)."""
        return self._unsure

    def begin_resync(self) -> list[Op]:
        """Some of this node's writes failed (PostgreSQL was out of reach, the disk was
        full), so the runs the core holds may differ from those the store gives this
        node (and, with a store of its own, its windows and counts from the store's).
        Returns the reads the shell submits now, in the write pipe, and hands, with their
        results in order, to :meth:`resynced`: :class:`HeldRuns`, and, with a store of
        its own, :class:`CountTasks` and the tasks of the runs ended whose end may not be
        stored (:class:`ReadTasks`). Runs made or ended from here on are told apart from
        the read."""
        self._generation += 1
        self._ended_since = set()
        if self.shared:
            return [HeldRuns()]
        # The moves from here on are not in the read.
        self._counts_then = {name: list(counts) for name, counts in self._counts.items()}
        self._resync_mark = self._ends
        self._before_read = {*self._adding, *(("delete", key) for key in self._removing)}
        self._read_saw = set()
        return [HeldRuns(), CountTasks(), ReadTasks(tuple(self._ending))]

    def resynced(
        self,
        held: list[Task],
        now: float,
        counts: dict[tuple[str, State], int] | None = None,
        records: list[Task] | None = None,
    ) -> Resynced:
        """The store's active runs of this node as of :meth:`begin_resync` (``held``):
        runs the core ended before it, whose end was not stored, are held again, timed
        from now as after a takeover (their workers' reports are accepted again, and
        their timers run); runs the core held before it that the store does not give this
        node are forgotten, with no write and no event. Runs made or ended since are left
        as they are: the store saw those writes after the read.

        With a store of its own, also: a run whose start was not stored (offers go out
        before their write is durable) while the store still has its task waiting is kept,
        and its start written again (its worker is running it: it must not be offered
        again); a run forgotten because the store holds an earlier run of the task is
        aborted at its worker, and the task's next run is numbered above it. Every window
        is emptied and loaded from the store again (a re-queue or a delete that was not
        stored shows there); and ``counts`` (the store's, as of the read) are the counts
        again, with the moves made since. A run ended before the read whose start and end
        were both not stored (the store has its task waiting, at an earlier run:
        ``records``, the stored tasks of the ends the core was unsure of) is held again
        and its start written again, so the report its worker sends again is accepted,
        and its task not offered again (:meth:`_unstarted_ends`)."""
        generation, ended = self._generation, self._ended_since or set()
        self._ended_since = None
        stored = {task.id: task for task in held}
        effects: list[Effect] = []
        started: list[_Run] = []
        dropped = 0
        for task_id, current in list(self._runs.items()):
            if current.born == generation:
                continue
            task = stored.get(task_id)
            if task is not None and task.run == current.task.run:
                mine = current.task
                if (task.progress, task.updated) != (mine.progress, mine.updated):
                    # A progress was not stored.
                    effects.append(Write(SetProgress(task_id, mine.progress, mine.updated)))
                continue
            if task is None and not self.shared:
                started.append(current)
                continue
            self._detach(current)
            self._dirty[current.task.queue] = None
            dropped += 1
            if not self.shared:
                effects += self._abort(current, "Its start was not stored (the store failed).")
                self._spent[task_id] = current.task.run
        again = [
            task for task in held if task.id not in self._runs and (task.id, task.run) not in ended
        ]
        self._unsure = False
        superseded: dict[str, tuple[Update | RecordAttempt, ...]] = {}
        restarted = (
            [] if self.shared else self._unstarted_ends(stored, records or [], superseded, now)
        )
        if not self.shared:
            self._resync_windows(again + restarted, counts)
            for task in [current.task for current in started] + restarted:
                if counts is not None:  # the store counts the task as waiting
                    self._move(task.queue, State.WAITING, State.ACTIVE)
                # Runs of it that ended meanwhile, not stored: their ends first.
                effects += [Write(op) for op in superseded.get(task.id, ())]
                effects.append(Write(Update(task.copy(), expected=State.WAITING)))
        self._hold_runs(again + restarted, now)
        for queue in self._queues.values():  # claims may have failed meanwhile: look again
            queue.maybe_waiting = True
            self._dirty[queue.name] = None
        return Resynced(dropped, len(again), len(started) + len(restarted), effects)

    def _unstarted_ends(
        self,
        stored: dict[str, Task],
        records: list[Task],
        superseded: dict[str, tuple[Update | RecordAttempt, ...]],
        now: float,
    ) -> list[Task]:
        """The part of :meth:`resynced` for the ends the core was unsure of (a store of
        its own): the runs ended before the read whose task the store has waiting at an
        earlier run (neither the start nor the end was stored), as active tasks to hold
        again, unless a later run of the task, whose start was not stored either, is
        kept: then the ended runs' writes (their Updates and attempt records) go in
        ``superseded``, to be written before its start. The others' ends are settled and
        forgotten."""
        found = {task.id: task for task in records}
        restarted: list[Task] = []
        for task_id, entry in list(self._ending.items()):
            run = entry.run
            if entry.mark > self._resync_mark:
                break  # ended since the read was sent: its writes come after it
            del self._ending[task_id]
            record = found.get(task_id)
            if task_id in stored and stored[task_id].run < run:
                # The store holds an earlier run, held again: the task's next run is
                # numbered above this one, which its worker may still report on.
                self._spent[task_id] = max(self._spent.get(task_id, 0), run)
            if (
                record is None  # deleted since
                or task_id in stored  # its start was stored: held again as such
                or record.state is not State.WAITING
                or record.run >= run  # its end was stored, or a later run's
            ):
                continue
            # The ends of its runs since the stored one, not stored either (each run's
            # Update, then its attempt record, the order they are stored in); but for the
            # run held again, whose end its worker sends again.
            later = task_id in self._runs  # a later run is kept: its start written again
            lost = [
                op
                for op in entry.writes
                if record.run < _run_of(op) and (later or _run_of(op) < run)
            ]
            lost.sort(key=lambda op: (_run_of(op), isinstance(op, RecordAttempt)))
            superseded[task_id] = tuple(lost)
            if later:
                continue
            ends = [op.task for op in lost if isinstance(op, Update)]
            if ends:  # the task as the last of them leaves it
                record = ends[-1].copy()
            record.state = State.ACTIVE
            record.run = run
            record.worker = entry.worker
            record.updated = now
            restarted.append(record)
        return restarted

    def _empty_windows(self) -> None:
        """Every window back to the store: loads bring back what the store has waiting
        (a load on its way, read before the resync's read, adds nothing)."""
        for queue in self._queues.values():
            for task in queue.window:
                del self._waiting[task.id]
                self._release(task)
            queue.window.clear()
            queue.spilled = True
            if queue.loading:
                queue.refused_during_load = True
                queue.refused_seq = 0

    def _resync_windows(
        self, again: list[Task], counts: dict[tuple[str, State], int] | None
    ) -> None:
        """The part of :meth:`resynced` for a store of one server: the windows are
        emptied and filled from the store again (a task's move to the back of its queue,
        a re-queue, may not have been stored); tasks held again leave their back-off."""
        for task in again:
            if self._delayed.pop(task.id, None) is not None:
                self._queue(task.queue).delayed -= 1
        self._empty_windows()
        then, self._counts_then = self._counts_then, {}
        if counts is None:
            return
        self._read_saw, self._before_read = self._before_read, set()
        moved = {name: list(values) for name, values in self._counts.items()}
        for name, values in then.items():  # the moves since begin_resync...
            mine = moved.setdefault(name, [0] * len(_STATE_NAMES))
            for index, value in enumerate(values):
                mine[index] -= value
        for (name, state), count in counts.items():  # ...on top of what the store had
            moved.setdefault(name, [0] * len(_STATE_NAMES))[_STATE_INDEX[state]] += count
        for name, values in moved.items():
            if any(values):
                self._counts_of(name)[:] = values
            elif name in self._counts:
                del self._counts[name]
                self._names.drop(name)

    def drop_runs(self) -> None:
        """Shared store: this node's lease ran out and others took its runs over: forget
        them (their workers' reports here are stale from now on)."""
        self._runs.clear()
        self._by_worker.clear()
        self._deadlines.clear()

    def set_node_index(self, node_index: int) -> None:
        """Shared store: the low bits of the seqs this node makes from now on (the store
        gives each live node its own: :attr:`Recovery.node_index`, and again with a lease
        taken anew)."""
        if not 0 <= node_index < 1 << NODE_BITS:
            raise ValueError(f"node_index must be in [0, {1 << NODE_BITS}).")
        self.node_index = node_index

    def allocate_seq(self, now: float) -> int:
        """The seq of a task about to be inserted (see the module docstring)."""
        seq = self._allocate(now)
        self._adding.add(seq)
        return seq

    def _allocate(self, now: float) -> int:
        if self.shared:
            # Unique across nodes (the low bits), increasing on this node, and in time
            # order across nodes up to their clocks' skew.
            micros = max(int(now * 1_000_000), self._last_micros + 1)
            self._last_micros = micros
            return (micros << NODE_BITS) | self.node_index
        seq = self._next_seq
        self._next_seq += 1
        return seq

    def abandon_seq(self, seq: int) -> None:
        """The insert that ``seq`` was allocated for did not happen."""
        self._adding.discard(seq)
        self._not_stored(seq)
        self._admitted(seq)
        reserved = self._reserved.pop(seq, None)
        if reserved is not None:
            self._unreserve(reserved[0])
            self._dirty[reserved[1]] = None  # the slot is free again

    def admit(self, task: Task, now: float) -> Task:
        """The record to insert for a new waiting ``task`` (seq from :meth:`allocate_seq`):
        ``task`` itself, or, with a shared store, when a worker of its queue on this node
        has a free slot and the store holds nothing older to claim, a copy already active
        as that worker's first run. The insert is then the claim: the task starts after
        one commit, not two (an insert, then a claim)."""
        if not self.shared:
            return task
        queue = self._queues.get(task.queue)
        worker = self._idle_worker(queue) if self._inflight.get(task.queue, 0) == 0 else None
        if queue is None or worker is None:
            # Waits; until its insert is done, later adds wait too (FIFO). No node claims
            # it until add() releases it with its "task added": every node hears of a task
            # before any event of its runs (else ADD_HOLD, should this node die first).
            _tally(self._inflight, task.queue, 1)
            self._waiting_adds[task.seq] = task.queue
            if self.alone:
                return task
            self._held_adds.add(task.seq)
            held = task.copy()
            held.not_before = now + ADD_HOLD
            return held
        queue.workers[worker.id] = queue.workers.pop(worker.id)  # round robin
        _tally(self._claiming, worker.id, 1)
        self._reserved[task.seq] = (worker.id, queue.name)
        active = task.copy()
        active.state = State.ACTIVE
        active.run = 1
        active.worker = worker.id
        return active

    def _idle_worker(self, queue: _Queue | None) -> _Worker | None:
        """A worker of ``queue`` with a free slot, if the store holds nothing to claim."""
        if queue is None or queue.maybe_waiting or queue.claiming:
            return None
        for worker in queue.workers.values():
            if self._free_slots(worker) > 0:
                return worker
        return None

    def _admitted(self, seq: int) -> None:
        """The insert of a task :meth:`admit` let wait is done (or failed)."""
        self._held_adds.discard(seq)
        name = self._waiting_adds.pop(seq, None)
        if name is not None:
            _tally(self._inflight, name, -1)

    def add(self, task: Task, now: float) -> list[Effect]:
        """A new waiting task whose insert is durable (as :meth:`admit` made it: maybe
        already the first run of a worker, which is offered it now)."""
        self._adding.discard(task.seq)
        held = task.seq in self._held_adds
        self._admitted(task.seq)
        self._count_stored(task.seq, task.queue, ((State.WAITING, 1),))
        self._observe(seen.ADDED, task.queue, 0.0)
        effects: list[Effect] = []
        if held:  # claimable from the commit that tells every node of it (admit())
            released = task.copy()
            released.not_before = 0.0
            effects.append(Write(Update(released, expected=State.WAITING)))
        if self.observed(task.queue):  # one snapshot for both: events are read-only
            snapshot = (task.to_json(),)
            effects.append(Emit("task added", task.queue, snapshot))
            effects.append(Emit("task queued", task.queue, snapshot))
        queue = self._queue(task.queue)
        reserved = self._reserved.pop(task.seq, None)
        if reserved is not None:
            self._unreserve(reserved[0])
            active = task.copy()
            active.state, active.run, active.worker = State.ACTIVE, 1, reserved[0]
            return effects + self._start_claimed(queue, [active], now)
        self._waits(queue, task)
        return effects + self._dispatch_soon(queue, now)

    def _unreserve(self, worker_id: str) -> None:
        _tally(self._claiming, worker_id, -1)

    def loaded(self, name: str, tasks: list[Task], limit: int, now: float) -> list[Effect]:
        """The result of a :class:`Load` of ``limit`` tasks for queue ``name``."""
        queue = self._queue(name)
        queue.loading = False
        room = self.window_size - len(queue.window)
        fresh = [t for t in tasks if self._is_new(queue, t)]
        if queue.refused_seq is not None:  # FIFO: only what is older than those
            fresh = [t for t in fresh if t.seq < queue.refused_seq]
        for task in fresh[:room]:
            self._insert(queue, task)
        exhausted = len(tasks) < limit and len(fresh) <= room
        if exhausted and not queue.refused_during_load:
            queue.spilled = False
        queue.refused_during_load = False
        queue.refused_seq = None
        queue.left_during_load.clear()
        return self._dispatch_soon(queue, now)

    def load_failed(self, name: str, now: float) -> list[Effect]:
        """A :class:`Load` for queue ``name`` failed (the store unavailable): it is tried
        again in :data:`CLAIM_RETRY` seconds."""
        queue = self._queue(name)
        queue.loading = False
        queue.refused_during_load = False
        queue.refused_seq = None
        queue.left_during_load.clear()
        queue.spilled = True
        heapq.heappush(self._wakes, (now + CLAIM_RETRY, name))
        return []

    # -- workers ---------------------------------------------------------------------------

    def add_worker(
        self,
        connection: str,
        worker_id: str,
        queue_name: str,
        concurrency: int,
        now: float,
        *,
        name: str | None = None,
        client: str | None = None,
        peer: str | None = None,
    ) -> list[Effect]:
        """Register a worker under the key ``worker_id``; its runs still active from an
        earlier connection count against ``concurrency``. ``name`` (default: the key) is
        the id its client knows it by, which offers and aborts carry; the caller makes
        keys that separate what must not share runs (docs/security.md). ``client`` (what
        its connection's hello said) is recorded with the attempts of its runs; it and
        ``peer`` (the connection's remote address) are in the worker's row for the other
        nodes (shared store: :class:`PutWorker`)."""
        if worker_id in self._workers:
            raise InvalidArgument(f"Worker id {name or worker_id} is already connected.")
        worker = _Worker(worker_id, queue_name, connection, concurrency, name or worker_id, now)
        worker.client = client
        worker.peer = peer
        self._workers[worker_id] = worker
        queue = self._queue(queue_name)
        queue.workers[worker_id] = worker
        effects: list[Effect] = []
        if self.shared:
            effects.append(Write(PutWorker(self._worker_row(worker))))
        effects.append(Emit("worker added", queue_name, (worker.to_json(),)))
        return effects + self._dispatch_soon(queue, now)

    def remove_worker(self, worker_id: str) -> list[Effect]:
        """Stop offering to a worker (it stopped, or its connection dropped). Its active
        runs go on until they end or time out; a later report is still accepted."""
        worker = self._workers.pop(worker_id, None)
        if worker is None:
            return []
        queue = self._queues[worker.queue]
        del queue.workers[worker_id]
        self._forget_if_idle(queue)
        for task_id in self._by_worker.get(worker_id, ()):
            self._runs[task_id].client = worker.client  # for the attempt, when it ends
        effects: list[Effect] = []
        if self.shared:
            effects.append(Write(DropWorkers(self.node or "", (worker_id,))))
        effects.append(Emit("worker removed", worker.queue, (worker.to_json(),)))
        return effects

    def sync_workers(self) -> list[Effect]:
        """Shared store: this node's rows of workers made anew (all dropped, then one per
        worker), after they may have gone astray: a write of them failed, or this node's
        lease ran out and the node that took it over deleted them."""
        if not self.shared:
            return []
        effects: list[Effect] = [Write(DropWorkers(self.node or ""))]
        effects += [Write(PutWorker(self._worker_row(w))) for w in self._workers.values()]
        return effects

    def _worker_row(self, worker: _Worker) -> WorkerRow:
        return WorkerRow(
            key=worker.id,
            name=worker.name,
            queue=worker.queue,
            concurrency=worker.concurrency,
            since=worker.since,
            node=self.node or "",
            client=worker.client,
            peer=worker.peer,
        )

    def worker_connection(self, worker_id: str) -> str | None:
        """The connection a worker is registered on, if it is."""
        worker = self._workers.get(worker_id)
        return worker.connection if worker else None

    def workers_of(self, connection: str) -> list[str]:
        return [w.id for w in self._workers.values() if w.connection == connection]

    def queue_names(self) -> list[str]:
        """Queues the core holds anything for (workers, waiting or active tasks)."""
        return list(self._queues)

    def names(
        self,
        patterns: Iterable[str] | None = None,
        after: str | None = None,
        counts: dict[tuple[str, State], int] | None = None,
        others: Sequence[WorkerRow] = (),
    ) -> Iterator[str]:
        """The sorted names of the queues that hold tasks (in any state) or have workers,
        after ``after``, lazily, only those ``patterns`` match when given (shell-style, as
        in the auth file). A page costs its names and those that share a pattern's literal
        head, not every queue's. ``counts`` and ``others``: as in :meth:`stats`."""
        return self._listed(counts, others)[0].iter_matching(patterns, after)

    def _listed(
        self, counts: dict[tuple[str, State], int] | None, others: Sequence[WorkerRow]
    ) -> tuple[NameIndex, dict[str, list[int]], dict[str, list[WorkerRow]]]:
        """What ``queues`` and ``stats`` list: the names, the counts by name and the other
        nodes' workers by queue; the core's own, unless a shared store's ``counts`` and
        ``others`` are given: then theirs, and the queues of this node's workers."""
        names, by_name = self._names, self._counts
        theirs: dict[str, list[WorkerRow]] = {}
        for row in others:
            theirs.setdefault(row.queue, []).append(row)
        if counts is not None:
            by_name = {}
            for (name, state), n in counts.items():
                by_name.setdefault(name, [0] * len(_STATE_NAMES))[_STATE_INDEX[state]] = n
        if counts is not None or theirs:
            names = NameIndex()
            ours = (q.name for q in self._queues.values() if q.workers)
            for name in [*by_name, *ours, *theirs]:
                if name not in names:
                    names.hold(name)
        return names, by_name, theirs

    def worker_json(self, worker_id: str) -> dict[str, Any] | None:
        worker = self._workers.get(worker_id)
        return worker.to_json() if worker else None

    # -- worker reports --------------------------------------------------------------------

    def ack(self, task_id: str, run: int, now: float) -> list[Effect]:
        """The worker took run ``run`` of the task: start its timeout."""
        current = self._run_of(task_id, run)
        return self._start(current, now)

    def delivering(self, worker_ids: Iterable[str], now: float) -> None:
        """The connection of these workers is still carrying bytes to them: offers they
        have not acknowledged may still be on their way, so the worker timeout of each
        starts again from ``now``. An acknowledgment is due within the worker timeout of
        its offer's arrival, not of its sending: a slow link is not a dead worker (one
        that stops reading stops this, and its offers time out)."""
        if self.worker_timeout < 0:
            return
        for worker_id in worker_ids:
            for task_id in self._by_worker.get(worker_id, ()):
                current = self._runs.get(task_id)
                if current is not None and not current.acked:
                    self._arm(current, now)

    def progress(self, task_id: str, run: int, value: float, now: float) -> list[Effect]:
        current = self._run_of(task_id, run)
        effects = self._start(current, now)
        task = current.task
        task.progress = value
        current.progress = value
        task.updated = now
        self._arm(current, now)
        op = SetProgress(task.id, value, now)
        effects.append(Write(op))
        effects += self._event("task progress", task, value, tells=op)
        return effects

    def touch(self, task_id: str, run: int, now: float) -> list[Effect]:
        current = self._run_of(task_id, run)
        effects = self._start(current, now)
        self._arm(current, now)
        return effects

    def complete(self, task_id: str, run: int, now: float) -> list[Effect]:
        current = self._run_of(task_id, run)
        effects = self._start(current, now)
        task = self._end(current, State.COMPLETED, now)
        if self._spent:  # no next run to number
            self._spent.pop(task.id, None)
        self._observe(seen.COMPLETED, task.queue, now - current.began)
        attempt = None
        if not task.options.autoremove:  # else its attempts go with it at once
            attempt = self._attempt_of(current, AttemptOutcome.COMPLETED, now, None)
        op = Update(task.copy(), expected=State.ACTIVE, attempt=attempt)
        self._note_end(task, op)
        effects.append(Write(op))
        effects += self._event("task completed", task, tells=op)
        if task.options.autoremove:
            effects += self._delete(task)
        return effects + self._dispatch_soon(self._queue(task.queue), now)

    def fail(self, task_id: str, run: int, error: str, now: float) -> list[Effect]:
        current = self._run_of(task_id, run)
        effects = self._start(current, now)
        return effects + self._fail(current, error, now)

    def release(self, task_id: str, run: int, now: float) -> list[Effect]:
        """The worker declines run ``run``, offered but not acknowledged (it stopped while
        the offer was on its way): the run ends without an attempt, and the task waits in
        its old place with its failure count and error untouched. Raises
        :class:`~wsq.exceptions.StaleRun` for a run that is not active and
        :class:`~wsq.exceptions.InvalidState` for one already acknowledged."""
        current = self._run_of(task_id, run)
        if current.acked:
            raise InvalidState(f"Run {run} of task {task_id} has started; it cannot be released.")
        attempt = self._attempt(current, AttemptOutcome.RELEASED, now)
        task = self._detach(current)
        check_transition(task.id, task.state, State.WAITING)
        self._move(task.queue, task.state, State.WAITING)
        task.state = State.WAITING
        task.worker = None
        task.updated = now
        op = Update(task.copy(), expected=State.ACTIVE)
        effects: list[Effect] = [Write(op), attempt, *self._event("task queued", task, tells=op)]
        queue = self._queue(task.queue)
        self._waits(queue, task)
        return effects + self._dispatch_soon(queue, now)

    # -- shared store: claims --------------------------------------------------------------

    def claimed(self, op: ClaimWaiting, tasks: list[Task] | None, now: float) -> list[Effect]:
        """The result of a :class:`Claim`'s op (``None``: it failed, and nothing was
        claimed). Each claimed task is offered to the worker the store gave it to; a task
        whose worker left meanwhile goes back to waiting in its place, no attempt made."""
        queue = self._queue(op.queue)
        queue.claiming = False
        for worker_id in op.workers:
            self._unreserve(worker_id)
        if tasks is None:
            heapq.heappush(self._wakes, (now + CLAIM_RETRY, queue.name))
            queue.added_while_claiming = False
            return []
        if len(tasks) < len(op.workers) and not queue.added_while_claiming:
            queue.maybe_waiting = False
        queue.added_while_claiming = False
        return self._start_claimed(queue, tasks, op.now)

    def _start_claimed(self, queue: _Queue, tasks: list[Task], now: float) -> list[Effect]:
        """Offer tasks the store made active runs of this node's workers (``updated``: when
        each was queued); a task whose worker left meanwhile waits again."""
        effects: list[Effect] = []
        offers: dict[str, list[Task]] = {}
        for task in tasks:
            worker = self._workers.get(task.worker or "")
            if worker is None or worker.queue != queue.name:
                effects += self._unclaim(queue, task)
                continue
            self._move(task.queue, State.WAITING, State.ACTIVE)
            # The store gives ``updated`` as it was, when the task was queued.
            self._observe(seen.STARTED, task.queue, max(0.0, now - task.updated))
            task.updated = now
            offers.setdefault(worker.id, []).append(task)
        for worker_id, claimed in offers.items():
            effects += self._offer(self._workers[worker_id], claimed, now, claimed=True)
        return effects + self._dispatch_soon(queue, now)

    def _unclaim(self, queue: _Queue, task: Task) -> list[Effect]:
        """A claimed task nobody can take now: waiting again, where it was."""
        task = task.copy()
        task.state = State.WAITING
        task.worker = None
        task.strip()
        queue.maybe_waiting = True
        return [Write(Update(task, expected=State.ACTIVE))]

    def _claim(self, queue: _Queue, now: float) -> list[Effect]:
        """Claim tasks for every free slot of the queue's workers, if the store may hold
        some and no claim of the queue is on its way (claims of one queue go one at a
        time, so each sees what the one before took)."""
        if queue.claiming:
            return []
        slots: list[str] = []
        served: list[str] = []
        for worker in queue.workers.values():
            free = self._free_slots(worker)
            if free > 0:
                slots += [worker.id] * free
                served.append(worker.id)
        if not slots:
            return []
        if not queue.maybe_waiting:
            if self._poll_at is None:
                self._poll_at = now + self.poll_interval
            return []
        for worker_id in served:  # round robin: those served go to the back
            queue.workers[worker_id] = queue.workers.pop(worker_id)
            _tally(self._claiming, worker_id, slots.count(worker_id))
        queue.claiming = True
        queue.added_while_claiming = False
        return [Claim(ClaimWaiting(queue.name, tuple(slots), now, self.payload_cap))]

    def _wake(self, now: float) -> list[Effect]:
        """Look at queues again whose load or claim failed or (shared) whose back-off
        ended, and, every poll interval, at every queue whose workers have free slots."""
        effects: list[Effect] = []
        while self._wakes and self._wakes[0][0] <= now:
            _, name = heapq.heappop(self._wakes)
            queue = self._queue(name)
            if not self.shared:  # a load that failed: try it again
                effects += self._refill(queue)
                continue
            queue.maybe_waiting = True
            effects += self._dispatch_soon(queue, now)
        if self._poll_at is not None and self._poll_at <= now:
            self._poll_at = None
            for queue in list(self._queues.values()):
                if not queue.maybe_waiting and any(
                    self._free_slots(worker) > 0 for worker in queue.workers.values()
                ):
                    queue.maybe_waiting = True
                    effects += self._dispatch_soon(queue, now)
        return effects

    def wake(self, names: Iterable[str] | None, now: float) -> list[Effect]:
        """Shared store: tasks of these queues (``None``: of any) may wait there now,
        queued by another node; workers here with free slots claim them."""
        effects: list[Effect] = []
        queues = self._queues.values() if names is None else map(self._queues.get, names)
        for queue in list(queues):
            if queue is not None and queue.workers:
                queue.maybe_waiting = True
                if queue.claiming:
                    queue.added_while_claiming = True
                effects += self._dispatch_soon(queue, now)
        return effects

    def _waits(self, queue: _Queue, task: Task) -> None:
        """A task of ``queue`` waits (again): in its window, or, shared, in the store."""
        if not self.shared:
            self._place(queue, task)
            return
        queue.maybe_waiting = True
        if queue.claiming:
            queue.added_while_claiming = True

    # -- requests about any task -----------------------------------------------------------

    def is_current(self, task_id: str, run: int) -> bool:
        """Whether run ``run`` of the task is still active."""
        current = self._runs.get(task_id)
        return current is not None and current.task.run == run

    def current_attempt(self, task_id: str) -> Attempt | None:
        """The task's run in progress as an :class:`Attempt` with no ``ended`` and no
        ``outcome`` (the store holds only runs that ended), or ``None``."""
        current = self._runs.get(task_id)
        if current is None:
            return None
        return self._attempt_of(current, None, None, None)

    def lookup(self, task_id: str) -> Task | None:
        """The task if the core holds it (active, or waiting in a window)."""
        current = self._runs.get(task_id)
        if current is not None:
            return current.task
        return self._waiting.get(task_id) or self._delayed.get(task_id)

    def remove(self, task_id: str, now: float) -> list[Effect] | None:
        """Delete a task the core holds; an active run is aborted first. ``None`` if the
        core holds no task ``task_id``: then the store decides (:meth:`begin_delete`)."""
        current = self._runs.get(task_id)
        if current is not None:
            effects = self._abort(current, "Removed.")
            detached = self._detach(current)
            effects += self._delete(detached)
            return effects + self._dispatch_soon(self._queue(detached.queue), now)
        task = self._delayed.pop(task_id, None)
        if task is not None:
            queue = self._queue(task.queue)
            queue.delayed -= 1
            if queue.loading:  # a load in flight may have read it
                queue.left_during_load.add(task.id)
            self._forget_if_idle(queue)
            return self._delete(task)
        task = self._waiting.get(task_id)
        if task is None:
            return None
        self._unplace(task)
        return self._delete(task)

    def begin_delete(self, stored: Task) -> Delete | None:
        """Delete a task the core does not hold, as the store had it (the copy may be out
        of date): submit the returned op, which applies only if the task is still in
        ``stored.state``, and pass what it returned to :meth:`deleted`. Until then, loads
        skip the task. ``None`` if the task's add is not done yet (:meth:`add` will come):
        read it again once the writes made so far are durable."""
        if stored.seq in self._adding:
            return None
        self._removing[stored.id] = self._removing.get(stored.id, 0) + 1
        return Delete(stored.id, expected=stored.state)

    def deleted(self, stored: Task, applied: bool, now: float) -> list[Effect]:
        """The result of :meth:`begin_delete`'s op. Counts change only if it applied, so
        two deletes of one task never count it twice."""
        left = self._removing.pop(stored.id) - 1
        if left:
            self._removing[stored.id] = left
        key = ("delete", stored.id)
        if applied:
            self._skipped.discard(stored.id)
            self._unplace(stored)  # a load in flight may have read it
            self._count_stored(key, stored.queue, ((stored.state, -1),))
            return self._forget(stored, counted=True)
        self._not_stored(key)
        if stored.id not in self._skipped:
            return []
        # A load skipped the task meanwhile, and it may wait in the store after all (the
        # copy was out of date): make sure the store is looked at again.
        self._skipped.discard(stored.id)
        queue = self._queue(stored.queue)
        queue.spilled = True
        return self._dispatch_soon(queue, now)

    def begin_retry(self, stored: Task, now: float) -> Update:
        """Move a failed task the core does not hold (as the store had it) back to waiting,
        failure count reset: submit the returned op, which applies only if the task is
        still failed, and pass it with what it returned to :meth:`retried`. Raises
        :class:`InvalidState` unless the task is failed."""
        held = self.lookup(stored.id)
        state = held.state if held is not None else stored.state
        if state is not State.FAILED:
            raise InvalidState(f"Task {stored.id} is {state.value}; only failed tasks retry.")
        task = stored.copy()
        task.state = State.WAITING
        task.seq = self.allocate_seq(now)  # loads skip it until retried()
        task.retries = 0
        task.error = None
        task.progress = 0.0
        task.worker = None
        task.updated = now
        return Update(task, expected=State.FAILED)

    def retried(self, op: Update, applied: bool, now: float) -> list[Effect]:
        """The result of :meth:`begin_retry`'s op: if it applied, the task waits again."""
        self._adding.discard(op.task.seq)
        if not applied:
            self._not_stored(op.task.seq)
            return []
        task = op.task.copy()
        moves = ((State.WAITING, 1), (State.FAILED, -1))
        self._count_stored(op.task.seq, task.queue, moves)
        self._observe(seen.RETRIED, task.queue, 0.0)
        effects = self._event("task queued", task)
        queue = self._queue(task.queue)
        self._waits(queue, task)
        return effects + self._dispatch_soon(queue, now)

    # -- time ------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When :meth:`tick` should next be called, or ``None`` if nothing is timed."""
        deadlines, runs = self._deadlines, self._runs
        while deadlines:  # _is_live, inlined: a run's end leaves its entry here
            deadline, task_id, run = deadlines[0]
            current = runs.get(task_id)
            if current is not None and current.task.run == run and current.deadline == deadline:
                break
            heapq.heappop(deadlines)
        while self._delays and not self._is_delayed(self._delays[0]):
            heapq.heappop(self._delays)
        times = [heap[0][0] for heap in (self._deadlines, self._delays) if heap]
        if self._wakes:
            times.append(self._wakes[0][0])
        if self._poll_at is not None:
            times.append(self._poll_at)
        return min(times) if times else None

    def tick(self, now: float) -> list[Effect]:
        """Fail every run whose deadline has passed: unacknowledged offers with the
        worker's "didn't respond", started runs with "Timed out.". An expired run that
        will retry waits out its back-off first; tasks whose back-off is over wait again."""
        effects = self._release_delayed(now) + self._wake(now)
        expired: list[tuple[float, str, int]] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            expired.append(heapq.heappop(self._deadlines))
        # Runs started by this tick's own failures wait for the next tick.
        for entry in expired:
            if not self._is_live(entry):
                continue
            current = self._runs[entry[1]]
            if current.acked:
                reason = "Timed out."
            else:
                reason = f"Worker {current.task.worker} didn't respond."
            self._observe(seen.TIMED_OUT, current.task.queue, 0.0)
            effects += self._abort(current, reason)
            effects += self._fail(current, reason, now, expired=True)
        return effects

    def _release_delayed(self, now: float) -> list[Effect]:
        effects: list[Effect] = []
        while self._delays and self._delays[0][0] <= now:
            entry = heapq.heappop(self._delays)
            if not self._is_delayed(entry):
                continue
            task = self._delayed.pop(entry[1])
            # Queued again at the back as its back-off ends (FIFO by seq, §6.1).
            task.seq = self._allocate(now)
            effects.append(Write(Update(task.copy(), expected=State.WAITING)))
            queue = self._queue(task.queue)
            queue.delayed -= 1
            if queue.loading:  # a load in flight may have read it with its old seq
                queue.left_during_load.add(task.id)
            self._place(queue, task)
            effects += self._dispatch_soon(queue, now)
        return effects

    def _is_delayed(self, entry: tuple[float, str, int]) -> bool:
        task = self._delayed.get(entry[1])
        return task is not None and task.seq == entry[2]

    # -- internals: runs -------------------------------------------------------------------

    def _event(self, name: str, task: Task, *extra: Any, tells: Op | None = None) -> list[Effect]:
        """The event, with a snapshot of the task, if anyone observes its queue; ``tells``:
        the write it tells of (:attr:`Emit.tells`)."""
        if not self.observed(task.queue):
            return []
        return [Emit(name, task.queue, (task.to_json(), *extra), tells)]

    def _run_of(self, task_id: str, run: int) -> _Run:
        current = self._runs.get(task_id)
        if current is None or current.task.run != run:
            raise StaleRun(f"Run {run} of task {task_id} is not active.")
        return current

    def _start(self, current: _Run, now: float) -> list[Effect]:
        if current.acked:
            return []
        current.acked = True
        current.started = now
        self._arm(current, now)
        task = current.task
        if not self.observed(task.queue):
            return []
        snapshot = task.to_json()
        worker = self.worker_json(task.worker or "") or {
            "id": task.worker,
            "queue": task.queue,
            "concurrency": None,
        }
        return [
            Emit("task started", task.queue, (snapshot,)),
            Emit("worker started", task.queue, (worker, snapshot)),
        ]

    def _arm(self, current: _Run, now: float) -> None:
        timeout = self.worker_timeout if not current.acked else current.task.options.timeout
        current.deadline = None if timeout < 0 else now + timeout
        if current.deadline is not None:
            entry = (current.deadline, current.task.id, current.task.run)
            heapq.heappush(self._deadlines, entry)

    def _is_live(self, entry: tuple[float, str, int]) -> bool:
        deadline, task_id, run = entry
        current = self._runs.get(task_id)
        return current is not None and current.task.run == run and current.deadline == deadline

    def _end(self, current: _Run, state: State, now: float) -> Task:
        task = self._detach(current)
        if not self.shared:  # until its write is durable (writes_durable)
            self._ends += 1
            earlier = self._ending.pop(task.id, None)
            writes = earlier.writes if earlier is not None else []
            self._ending[task.id] = _Ending(task.run, task.worker, self._ends, writes)
        check_transition(task.id, task.state, state)
        self._move(task.queue, task.state, state)
        task.state = state
        task.updated = now
        return task

    def _detach(self, current: _Run) -> Task:
        task = current.task
        del self._runs[task.id]
        if self._ended_since is not None:
            self._ended_since.add((task.id, task.run))
        owned = self._by_worker.get(task.worker or "")
        if owned is not None:
            owned.discard(task.id)
            if not owned:
                del self._by_worker[task.worker or ""]
        worker = self._workers.get(task.worker or "")
        if worker is not None and worker.queue != task.queue:
            # Registered again on another queue since: the freed slot serves that one.
            self._freed[worker.queue] = None
        return task

    def _abort(self, current: _Run, reason: str) -> list[Effect]:
        task = current.task
        worker = self._workers.get(task.worker or "")
        if worker is None:
            return []
        return [Abort(worker.connection, worker.name, task.id, task.run, reason)]

    def _fail(
        self, current: _Run, error: str, now: float, *, expired: bool = False
    ) -> list[Effect]:
        task = self._end(current, State.FAILED, now)
        task.retries += 1
        task.error = error
        limit = task.options.retries
        will_retry = limit == -1 or task.retries <= limit
        kind = seen.RETRIED if will_retry else seen.FAILED
        self._observe(kind, task.queue, now - current.began)
        attempt = self._attempt(current, _failure(current, expired), now, error)
        failed = [attempt, *self._event("task failed", task, will_retry)]
        if will_retry:
            task.error = None  # as the original: a task queued again carries no error
            delay = self._backoff(task.retries) if expired else 0.0
            return self._requeue(task, State.ACTIVE, now, announce=failed, delay=delay)
        if self._spent:  # no next run to number
            self._spent.pop(task.id, None)
        op = Update(task.copy(), expected=State.ACTIVE)
        self._note_end(task, op)
        effects: list[Effect] = [Write(op), *_telling(failed, op)]
        return effects + self._dispatch_soon(self._queue(task.queue), now)

    def _attempt(
        self, current: _Run, outcome: AttemptOutcome, now: float, error: str | None = None
    ) -> Write:
        """The record of ``current``, ending now: the caller puts it right after the
        task's Update, so that both are committed together."""
        op = RecordAttempt(self._attempt_of(current, outcome, now, error))
        self._note_end(current.task, op)
        return Write(op)

    def _note_end(self, task: Task, op: Update | RecordAttempt) -> None:
        """Keep a write of the end of ``task``'s run with its entry in :attr:`_ending`
        (written again if a resync finds it was not stored: :meth:`_unstarted_ends`)."""
        entry = self._ending.get(task.id)
        if entry is not None and entry.run == task.run:
            entry.writes.append(op)

    def _attempt_of(
        self,
        current: _Run,
        outcome: AttemptOutcome | None,
        ended: float | None,
        error: str | None,
    ) -> Attempt:
        """``current`` as an attempt; its client is its worker's, or, if the worker left,
        the one noted on the run then (:meth:`remove_worker`)."""
        task = current.task
        worker = self._workers.get(task.worker or "")
        return Attempt(
            task_id=task.id,
            run=task.run,
            worker=task.worker,
            client=worker.client if worker is not None else current.client,
            node=self.node,
            offered=current.offered,
            started=current.started,
            ended=ended,
            outcome=outcome,
            error=error,
            progress=current.progress,
        )

    def _backoff(self, failures: int) -> float:
        """The wait before the next offer after ``failures`` failed attempts in a row."""
        return min(self.backoff * 2.0 ** min(failures - 1, 64), self.max_backoff)

    def _requeue(
        self,
        task: Task,
        expected: State,
        now: float,
        announce: list[Effect] | None = None,
        delay: float = 0.0,
    ) -> list[Effect]:
        self._move(task.queue, task.state, State.WAITING)
        task.state = State.WAITING
        task.seq = self._allocate(now)
        task.worker = None
        task.updated = now
        if self.shared and delay > 0:
            task.not_before = now + delay  # in the row: any node's claim waits for it
        op = Update(task.copy(), expected=expected)
        if expected is State.ACTIVE:
            self._note_end(task, op)
        effects: list[Effect] = [
            Write(op),
            *_telling(announce or [], op),
            *self._event("task queued", task, tells=op),
        ]
        if self.shared:
            task.not_before = 0.0
            queue = self._queue(task.queue)
            if delay > 0:
                heapq.heappush(self._wakes, (now + delay, queue.name))
            else:
                self._waits(queue, task)
            return effects + self._dispatch_soon(queue, now)
        if delay > 0:
            self._delayed[task.id] = task
            heapq.heappush(self._delays, (now + delay, task.id, task.seq))
            queue = self._queue(task.queue)
            queue.delayed += 1
            return effects + self._dispatch_soon(queue, now)  # its slot is free
        queue = self._queue(task.queue)
        self._place(queue, task)
        return effects + self._dispatch_soon(queue, now)

    def _delete(self, task: Task) -> list[Effect]:
        op = Delete(task.id)
        return [Write(op), *self._forget(task, tells=op)]

    def _forget(
        self, task: Task, tells: Op | None = None, *, counted: bool = False
    ) -> list[Effect]:
        """A deleted task: its count (unless ``counted``), its blobs and the event."""
        if not counted:
            self._count(task.queue, task.state, -1)
        effects: list[Effect] = []
        if task.blobs:
            effects.append(DeleteBlobs(tuple(task.blobs)))
        effects += self._event("task deleted", task, tells=tells)
        return effects

    # -- internals: counts ------------------------------------------------------------------

    def _observe(self, kind: str, queue: str, seconds: float) -> None:
        if self.observations is not None:
            self.observations.append((kind, queue, seconds))

    def waiting_counts(self) -> dict[str, int]:
        """Waiting tasks per queue, for every queue that has any."""
        index = _STATE_INDEX[State.WAITING]
        return {name: counts[index] for name, counts in self._counts.items() if counts[index]}

    def worker_counts(self) -> dict[str, int]:
        """Connected workers per queue, for every queue that has any."""
        return {name: len(queue.workers) for name, queue in self._queues.items() if queue.workers}

    def counts(self) -> dict[str, dict[str, int]]:
        """Tasks per queue and state, for every queue that holds any (the store's counts
        at recovery, kept since by every transition)."""
        return {
            name: dict(zip(_STATE_NAMES, counts, strict=True))
            for name, counts in self._counts.items()
            if any(counts)
        }

    def stats(
        self,
        patterns: Iterable[str] | None = None,
        counts: dict[tuple[str, State], int] | None = None,
        others: Sequence[WorkerRow] = (),
        after: str | None = None,
    ) -> Iterator[dict[str, Any]]:
        """The queues holding tasks or workers (only those ``patterns`` match), in name
        order after ``after``, lazily (a page costs its own queues): each with its counts
        by state and its workers, each with how many runs it holds and its node. Costs
        nothing per task (counts are kept as they move), nor for the queues left out.
        ``counts`` (a shared store's, of every node) replaces the core's own;
        ``others`` are the other nodes' workers (:meth:`StateStore.workers`)."""
        names, by_name, theirs = self._listed(counts, others)
        for name in names.iter_matching(patterns, after):
            counts_of = by_name.get(name)
            queue = self._queues.get(name)
            if counts_of is None and not (queue and queue.workers) and name not in theirs:
                continue  # a window with no tasks counted and no workers: not a queue yet
            counts_of = counts_of or [0] * len(_STATE_NAMES)
            workers = [
                {
                    **worker.to_json(),
                    "running": len(self._by_worker.get(worker.id, ())),
                    "node": self.node,
                }
                for worker in (queue.workers.values() if queue else ())
            ]
            workers += [
                {
                    "id": row.name,
                    "queue": row.queue,
                    "concurrency": row.concurrency,
                    "running": len(row.runs),
                    "node": row.node,
                }
                for row in theirs.get(name, ())
            ]
            yield {
                "name": name,
                **dict(zip(_STATE_NAMES, counts_of, strict=True)),
                "workers": workers,
            }

    def workers(
        self,
        visible: Callable[[str], bool] | None = None,
        queue: str | None = None,
        others: Sequence[WorkerRow] = (),
        after: tuple[str, str] | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Connected workers (of ``queue``, or of every queue ``visible`` accepts), each
        with its node, its connection key, when it registered, and the runs it holds:
        task, run, when offered and when started (``None`` for a run recovered after a
        restart or not acknowledged yet), and progress (docs/protocol.md, ``workers``).
        ``others``: the other nodes' workers (:meth:`StateStore.workers`), with
        ``connection`` ``None``, their client and peer as their node recorded them, and
        their runs' times ``None`` (their node alone knows them). In (node, worker id)
        order, after ``after``, lazily: a page builds only its own workers."""

        def shown(name: str) -> bool:
            return (queue is None or name == queue) and (visible is None or visible(name))

        keyed: list[tuple[str, str, _Worker | WorkerRow]] = [
            (self.node or "", w.id, w) for w in self._workers.values() if shown(w.queue)
        ]
        keyed += [(row.node, row.name, row) for row in others if shown(row.queue)]
        keyed.sort(key=lambda item: (item[0], item[1]))
        start = 0 if after is None else bisect.bisect_right(keyed, after, key=lambda i: i[:2])
        for _, _, worker in keyed[start:]:
            yield self._worker_entry(worker)

    def _worker_entry(self, worker: _Worker | WorkerRow) -> dict[str, Any]:
        if isinstance(worker, WorkerRow):
            return {
                "id": worker.name,
                "queue": worker.queue,
                "concurrency": worker.concurrency,
                "since": worker.since,
                "node": worker.node,
                "connection": None,
                "client": worker.client or "",
                "peer": worker.peer or "unknown",
                "runs": [
                    {"task": t, "run": r, "offered": None, "started": None, "progress": p}
                    for t, r, p in worker.runs
                ],
            }
        runs = [self._runs[task_id] for task_id in self._by_worker.get(worker.id, ())]
        runs.sort(key=lambda run: (run.offered or 0.0, run.task.id))
        return {
            **worker.to_json(),
            "since": worker.since,
            "node": self.node,
            "connection": worker.connection,
            "runs": [_run_json(run) for run in runs],
        }

    def _counts_of(self, queue: str) -> list[int]:
        counts = self._counts.get(queue)
        if counts is None:
            counts = self._counts[queue] = [0] * len(_STATE_NAMES)
            self._names.hold(queue)
        return counts

    def _count(self, queue: str, state: State, delta: int) -> None:
        counts = self._counts_of(queue)
        counts[_STATE_INDEX[state]] += delta
        if delta < 0 and not any(counts):
            del self._counts[queue]  # names of gone queues do not pile up
            self._names.drop(queue)

    def _count_stored(self, key: object, queue: str, moves: tuple[tuple[State, int], ...]) -> None:
        """Count the ``moves`` of a write the store decided (an add, a retry, a delete:
        ``key``), whose result comes now: as moves since a resync's read, but for a write
        that was in flight when the resync began (a store of its own), which the read
        counted: then as moves before it while the resync is on its way, and not at all
        once the counts were set from the read."""
        if key in self._read_saw:
            self._read_saw.discard(key)
            return
        for state, delta in moves:
            self._count(queue, state, delta)
        if key in self._before_read:
            self._before_read.discard(key)
            then = self._counts_then.setdefault(queue, [0] * len(_STATE_NAMES))
            for state, delta in moves:
                then[_STATE_INDEX[state]] += delta

    def _not_stored(self, key: object) -> None:
        """The write ``key`` names (see :meth:`_count_stored`) did not apply: nothing of
        it to count (a later delete of the same task must count)."""
        self._before_read.discard(key)
        self._read_saw.discard(key)

    def _move(self, queue: str, old: State, new: State) -> None:
        counts = self._counts_of(queue)
        counts[_STATE_INDEX[old]] -= 1
        counts[_STATE_INDEX[new]] += 1

    # -- internals: the window -------------------------------------------------------------

    def _queue(self, name: str) -> _Queue:
        queue = self._queues.get(name)
        if queue is None:
            queue = self._queues[name] = _Queue(name)
            self._names.hold(name)
        return queue

    def _forget_if_idle(self, queue: _Queue) -> None:
        if queue.idle:
            del self._queues[queue.name]
            self._names.drop(queue.name)

    def _is_new(self, queue: _Queue, task: Task) -> bool:
        if task.id in self._removing:
            self._skipped.add(task.id)
            return False
        return not (
            task.seq in self._adding
            or task.id in self._delayed
            or task.id in self._waiting
            or task.id in self._runs
            or task.id in queue.left_during_load
            # A run of it ended, and a write failed since: the store may have it waiting
            # only because its start was not stored (the resync decides).
            or (self._unsure and task.id in self._ending)
        )

    def _place(self, queue: _Queue, task: Task) -> None:
        """Hold a waiting task in the window if its place is there: the window is always
        the oldest waiting tasks of the queue, the rest stays in the store only."""
        if task.id in self._waiting:
            return
        if queue.window and task.seq < queue.window[-1].seq:
            # Older than the window's newest (an add that finished late, a released
            # offer): it belongs inside, and the newest makes room.
            self._insert(queue, task)
            if len(queue.window) > self.window_size:
                self._spill_last(queue)
            return
        if queue.spilled or queue.loading or len(queue.window) >= self.window_size:
            queue.spilled = True
            self._refused(queue, task)
            return
        self._insert(queue, task)

    def _insert(self, queue: _Queue, task: Task) -> None:
        self._hold(task)
        self._waiting[task.id] = task
        if not queue.window or queue.window[-1].seq < task.seq:
            queue.window.append(task)
        else:
            bisect.insort(queue.window, task, key=lambda t: t.seq)

    def _spill_last(self, queue: _Queue) -> None:
        """Drop the window's newest task back to the store only (it stays waiting there)."""
        task = queue.window.pop()
        del self._waiting[task.id]
        self._release(task)
        queue.spilled = True
        self._refused(queue, task)

    def _refused(self, queue: _Queue, task: Task) -> None:
        """``task`` waits in the store only; if a load is on its way, what it brings
        newer than ``task`` must wait behind it (:meth:`loaded`)."""
        if queue.loading:
            queue.refused_during_load = True
            if queue.refused_seq is None or task.seq < queue.refused_seq:
                queue.refused_seq = task.seq

    def _unplace(self, task: Task) -> None:
        queue = self._queues.get(task.queue)
        if queue is not None and queue.loading:
            queue.left_during_load.add(task.id)
        placed = self._waiting.pop(task.id, None)  # maybe another copy than ``task``
        if placed is None:
            return
        assert queue is not None
        queue.window.remove(placed)
        self._release(placed)

    def _hold(self, task: Task) -> None:
        """Keep the payload of a task entering a window if the budget allows."""
        if task.data is None:
            return
        size = task.payload_size
        if size > self.payload_cap or self._held_bytes + size > self.window_bytes:
            task.strip()
        else:
            self._held_bytes += size

    def _release(self, task: Task) -> None:
        """A task left its window: its payload no longer counts (a run keeps none)."""
        if task.data is not None:
            self._held_bytes -= task.payload_size

    def _take(self, queue: _Queue, count: int) -> list[Task]:
        taken, queue.window = queue.window[:count], queue.window[count:]
        for task in taken:
            del self._waiting[task.id]
            self._release(task)
            if queue.loading:
                queue.left_during_load.add(task.id)
        return taken

    def _refill(self, queue: _Queue) -> list[Effect]:
        if queue.spilled and not queue.loading and len(queue.window) <= self.low_water:
            queue.loading = True
            queue.refused_during_load = False
            queue.refused_seq = None
            return [Load(queue.name, self.window_size + queue.delayed, self.payload_cap)]
        return []

    def _free_slots(self, worker: _Worker) -> int:
        held = len(self._by_worker.get(worker.id, ())) + self._claiming.get(worker.id, 0)
        return worker.concurrency - held

    def _dispatch_soon(self, queue: _Queue, now: float) -> list[Effect]:
        """Offer now, or, with :attr:`defer_dispatch`, at the next :meth:`flush`; also
        on the queues where a run's end freed a slot."""
        freed: list[str] = []
        if self._freed:  # rare: a worker moved to another queue while running
            freed = list(self._freed)
            self._freed.clear()
        if self.defer_dispatch:
            self._dirty[queue.name] = None
            if freed:
                self._dirty.update(dict.fromkeys(freed))
            return []
        effects = self._dispatch(queue, now)
        for name in freed:
            other = self._queues.get(name)
            if other is not None and other is not queue:
                effects += self._dispatch(other, now)
        return effects

    def flush(self, now: float) -> list[Effect]:
        """Dispatch every queue that changed since the last flush (see
        :attr:`defer_dispatch`)."""
        effects: list[Effect] = []
        while self._dirty:
            name = next(iter(self._dirty))
            del self._dirty[name]
            queue = self._queues.get(name)
            if queue is not None:
                effects += self._dispatch(queue, now)
        return effects

    def _dispatch(self, queue: _Queue, now: float) -> list[Effect]:
        """Offer waiting tasks to workers with free slots, round robin, each worker's share
        in one offer (shared: claim them first, :meth:`_claim`)."""
        if self.shared:
            claims = self._claim(queue, now)
            self._forget_if_idle(queue)
            return claims
        effects: list[Effect] = []
        for worker in list(queue.workers.values()):
            if not queue.window:
                break
            free = self._free_slots(worker)
            if free <= 0:
                continue
            tasks = self._take(queue, free)
            effects += self._offer(worker, tasks, now)
            # Round robin: the worker just served goes to the back.
            queue.workers[worker.id] = queue.workers.pop(worker.id)
        effects += self._refill(queue)
        self._forget_if_idle(queue)
        return effects

    def _offer(
        self, worker: _Worker, tasks: Iterable[Task], now: float, *, claimed: bool = False
    ) -> list[Effect]:
        """Offer waiting ``tasks`` to ``worker``, each as its next run; ``claimed``: the
        store made them active runs of the worker already (:meth:`claimed`)."""
        effects: list[Effect] = []
        snapshots: list[Task] = []
        held = self._by_worker.get(worker.id)
        if held is None:
            held = self._by_worker[worker.id] = set()
        for task in tasks:
            if not claimed:
                self._move(task.queue, State.WAITING, State.ACTIVE)
                # Waiting since it was last queued (updated then); a clock that stepped
                # back across a restart must not make it negative.
                self._observe(seen.STARTED, task.queue, max(0.0, now - task.updated))
                task.state = State.ACTIVE
                task.run = max(task.run, self._spent.pop(task.id, 0)) + 1
                task.worker = worker.id
                task.updated = now
            current = _Run(task, acked=False, deadline=None, offered=now, born=self._generation)
            self._runs[task.id] = current
            held.add(task.id)
            self._arm(current, now)
            snapshot = task.copy()
            task.strip()  # the offer carries the payload; the run needs none
            snapshots.append(snapshot)
            if not claimed:
                effects.append(Write(Update(snapshot, expected=State.WAITING)))
        effects.append(Offer(worker.connection, worker.name, tuple(snapshots)))
        return effects


def _failure(current: _Run, expired: bool) -> AttemptOutcome:
    """How a failed run ended: reported by its worker, or expired (started or not)."""
    if not expired:
        return AttemptOutcome.FAILED
    return AttemptOutcome.TIMED_OUT if current.acked else AttemptOutcome.NO_RESPONSE


def _run_of(op: Update | RecordAttempt) -> int:
    return op.task.run if isinstance(op, Update) else op.attempt.run


def _telling(effects: list[Effect], op: Op) -> list[Effect]:
    """``effects`` with each event among them telling of ``op`` (:attr:`Emit.tells`)."""
    return [Emit(e.event, e.queue, e.args, op) if type(e) is Emit else e for e in effects]


def _tally(counts: dict[str, int], key: str, delta: int) -> None:
    """Add ``delta`` to ``counts[key]``, dropping the key at zero."""
    left = counts.get(key, 0) + delta
    if left:
        counts[key] = left
    else:
        counts.pop(key, None)


def _run_json(run: _Run) -> dict[str, Any]:
    task = run.task
    return {
        "task": task.id,
        "run": task.run,
        "offered": run.offered,
        "started": run.started,
        "progress": task.progress,
    }
