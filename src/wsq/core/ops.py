"""The writes the core decides and the state a store gives back at start-up: plain data,
no I/O. The core emits these ops (inside :class:`wsq.core.effects.Write` and ``Load``
effects); every :class:`wsq.storage.base.StateStore` applies them with the semantics
written here, checked by ``tests/contract/test_state_store.py``."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from wsq.core.task import State, Task
from wsq.core.values import value


@value
class Insert:
    """Insert a new task (and record its blobs). Result: ``True``, or ``False`` if a task
    with that id already exists (nothing is written then)."""

    task: Task


@value
class Update:
    """Overwrite the task's mutable fields (state, seq, progress, retries, error, run,
    worker, updated, not_before) if its stored state is ``expected`` and, when that is
    ``active``, its stored run is ``task.run`` (a run another node took over is not
    ended by the old one). A store of one server also ends (from ``active`` to another
    state) a run whose
    start it did not store (the task waits at an earlier run: the disk was full when the
    offer went out): the run took place, its worker reported it. Result: whether it
    applied.

    ``attempt``: with the end of a run to ``completed`` (which no run follows), that
    run's record (its ``run`` and ``worker`` are the task's, its outcome ``completed``,
    no error), stored with the task when the update applies, instead of a
    :class:`RecordAttempt` of its own (one row written per finished task, not two);
    the store's ``attempts`` gives it as the newest, after those recorded apart."""

    task: Task
    expected: State
    attempt: Attempt | None = None


@value
class SetProgress:
    """Set ``progress`` and ``updated`` of an active task. Result: whether it applied."""

    task_id: str
    progress: float
    updated: float


@value
class Delete:
    """Delete the task and its blob records, if its stored state is ``expected`` (any
    state when ``None``). Result: whether a task was deleted."""

    task_id: str
    expected: State | None = None


@value
class LoadWaiting:
    """Read the first ``limit`` waiting tasks of ``queue`` in ``seq`` order, as of this
    point in the pipe. Result: ``list[Task]``, each with its payload (data and inline
    streams) only if that is at most ``max_payload`` bytes, else stripped
    (:meth:`Task.strip`: ``data`` is ``None``, blob refs kept); ``None``: every payload."""

    queue: str
    limit: int
    max_payload: int | None = None


@value
class ClaimWaiting:
    """Claim the oldest waiting tasks of ``queue`` that are due (``not_before <= now``),
    one per entry of ``workers``: the i-th claimed, in ``seq`` order, becomes active as
    the next run of ``workers[i]`` (``run + 1``, ``worker``, ``updated = now``). A shared
    store skips tasks another node is claiming at the same moment rather than wait for
    it (PostgreSQL: ``FOR UPDATE SKIP LOCKED``), so two claims never take one task.
    Result: ``list[Task]``, the claimed tasks as they now are but for ``updated``, which
    is given as it was (when the task was queued: how long it waited), in ``seq`` order,
    each with its payload only if that is at most ``max_payload`` bytes (as
    :class:`LoadWaiting`)."""

    queue: str
    workers: tuple[str, ...]
    now: float
    max_payload: int | None = None


def claims_may_pass(op: object) -> bool:
    """Whether a :class:`ClaimWaiting` decided after ``op`` may commit before it: ``op``
    neither makes a task claimable (an insert, a task queued again) nor takes or removes
    one, so the claim finds the same tasks either way. True of a run's end (an
    :class:`Update` from ``active`` to ``completed`` or ``failed``), a progress and an
    attempt record: the writes that free a worker's slot and are followed by the claim
    that fills it (docs/architecture.md, "Claims go first")."""
    # Exact types (these classes have none of their own), quicker to test than isinstance.
    if type(op) is Update:
        return op.expected is State.ACTIVE and op.task.state in _ENDED
    return type(op) is SetProgress or type(op) is RecordAttempt


_ENDED = frozenset((State.COMPLETED, State.FAILED))


@value
class AdoptRuns:
    """Make the active runs ``runs`` (task id, run) this node's, those of a worker in
    ``workers`` (a worker that moved here from another node reports for them). Result:
    ``list[Task]``, the tasks whose stored state is active with that run and worker, as
    stored, stripped of their payload (:meth:`Task.strip`), in ``seq`` order. A shared
    store records the node (the old holder's writes to those runs no longer apply); a
    store of one server has nothing to change."""

    runs: tuple[tuple[str, int], ...]
    workers: tuple[str, ...]


@value
class HeldRuns:
    """Read the active runs this node holds, as of this point in the pipe (it sees every
    write submitted before it): a shared store's active tasks whose node is this one; a
    store of one server's, every active task. Result: ``list[Task]``, stripped of their
    payload (:meth:`Task.strip`), in ``seq`` order."""


@value
class CountTasks:
    """Read the stored tasks per queue and state, as of this point in the pipe (every
    write submitted before it is in). Result: ``dict[tuple[str, State], int]``, without
    zeros (a shared store: every node's tasks)."""


@value
class ReadTasks:
    """Read the stored records of the tasks ``ids``, whatever their state, as of this
    point in the pipe (every write submitted before it is in). Result: ``list[Task]``,
    those stored, stripped of their payload (:meth:`Task.strip`), in ``seq`` order. (A
    resync with a store of one server reads the tasks of runs it ended whose end may not
    be stored: :meth:`Core.resynced`.)"""

    ids: tuple[str, ...]


@value
class Publish:
    """Send records (JSON texts, each under :data:`RECORD_MAX` bytes) to the other
    servers that share the store, once the batch holding this op commits, in commit
    order; never if it does not. Result: ``None``. A store that no other server shares
    drops them.

    ``events`` are ``(text, chunk, op)``: the events of one chunk, in order, make one
    record ``head + ",".join(texts) + tail``, leaving out each event whose ``op`` (an
    index into the ops of the same submit, before this one; ``None``: none) is a write
    that did not apply, and the record if none is left. Whoever makes the op sees to it
    that a chunk fits."""

    events: tuple[tuple[str, int, int | None], ...]
    head: str = ""
    tail: str = ""


@value
class WorkerRow:
    """A worker registered on a node, as a shared store keeps it for the other nodes'
    listings (``stats``, ``workers``). ``key`` is the core's key (unique in its node),
    ``name`` the id its client gave it, ``node`` the node's ``--node-name``, ``client``
    what its connection's hello said, ``peer`` that connection's remote address. ``runs``
    is filled by :meth:`wsq.storage.base.StateStore.workers` only: (task id, run,
    progress) of each active run the worker holds, in ``seq`` order."""

    key: str
    name: str
    queue: str
    concurrency: int
    since: float
    node: str
    client: str | None = None
    peer: str | None = None
    runs: tuple[tuple[str, int, float], ...] = ()


@value
class PutWorker:
    """Record ``worker`` as registered on its node (replacing a row of the same node and
    key). Result: ``None``. A store no other server shares keeps nothing: its one core
    lists its workers itself."""

    worker: WorkerRow


@value
class DropWorkers:
    """Forget the rows of ``node``'s workers ``keys`` (``None``: all of that node's).
    Result: ``None``. A store no other server shares has none."""

    node: str
    keys: tuple[str, ...] | None = None


NODE_BITS = 10
"""Shared store: a seq is ``(microseconds << NODE_BITS) | node_index`` (each live node has
its own index: :attr:`Recovery.node_index`)."""

RECORD_MAX = 7_900
"""The largest record :class:`Publish` carries (PostgreSQL's NOTIFY takes 8,000 bytes)."""


KEPT_ATTEMPTS = 100
"""How many attempts a store keeps per task: the newest, by run (a task retried forever
must not grow without end)."""


class AttemptOutcome(enum.StrEnum):
    """How a run ended (docs/protocol.md, ``attempts``)."""

    COMPLETED = "completed"
    FAILED = "failed"  # the worker reported a failure
    TIMED_OUT = "timed_out"  # started, then silent for the task's timeout
    NO_RESPONSE = "no_response"  # offered, never acknowledged within the worker timeout
    RELEASED = "released"  # declined by its worker before it started


@value
class Attempt:
    """One run of a task: who held it, when, and how it ended. ``offered`` and ``started``
    are ``None`` when unknown (a run recovered after a restart has neither; one never
    acknowledged has no ``started``); ``client`` and ``node`` when the server did not
    know them. ``progress`` is the last value the worker reported in this run (``None``:
    none). ``ended`` and ``outcome`` are ``None`` only for the run in progress, which is
    never stored (:meth:`wsq.core.engine.Core.current_attempt`)."""

    task_id: str
    run: int
    worker: str | None = None
    client: str | None = None
    node: str | None = None
    offered: float | None = None
    started: float | None = None
    ended: float | None = None
    outcome: AttemptOutcome | None = None
    error: str | None = None
    progress: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The attempt as ``attempts`` answers it (docs/protocol.md)."""
        return {
            "run": self.run,
            "worker": self.worker,
            "client": self.client,
            "node": self.node,
            "offered": self.offered,
            "started": self.started,
            "ended": self.ended,
            "outcome": None if self.outcome is None else self.outcome.value,
            "error": self.error,
            "progress": self.progress,
        }


@value
class RecordAttempt:
    """Store ``attempt`` (which has ended) if its task exists, replacing a record of the
    same run; then drop that task's records of runs older than the newest
    :data:`KEPT_ATTEMPTS` (runs ``<= attempt.run - KEPT_ATTEMPTS``). A :class:`Delete`
    that deletes the task deletes its attempts. Result: whether it was stored. Every run
    that ends gets one, but a run that completes: its :class:`Update` carries its record."""

    attempt: Attempt


Op = (
    Insert
    | Update
    | SetProgress
    | Delete
    | LoadWaiting
    | ClaimWaiting
    | AdoptRuns
    | HeldRuns
    | CountTasks
    | ReadTasks
    | Publish
    | RecordAttempt
    | PutWorker
    | DropWorkers
)


@dataclass(slots=True)
class Recovery:
    """What the server needs from the store to start: the next free ``seq``, every active
    task (stripped of its payload: :meth:`Task.strip`), the names of queues that hold
    waiting tasks, and how many tasks each queue holds in each state (the core keeps these
    counts from then on). ``store_id`` names the store's data for good (made once, when
    the store was created): a blob store records which state store its blobs belong to.
    ``node_index``: a shared store's index for this node, the low bits of the seqs it
    makes (:meth:`wsq.core.engine.Core.allocate_seq`), unique among live nodes.
    ``alone``: a shared store's node that no other live node shares it with
    (:attr:`wsq.storage.base.Heartbeat.alone`)."""

    next_seq: int = 1
    active: list[Task] = field(default_factory=list)
    waiting_queues: list[str] = field(default_factory=list)
    counts: dict[tuple[str, State], int] = field(default_factory=dict)
    store_id: str = ""
    node_index: int = 0
    alone: bool = False
