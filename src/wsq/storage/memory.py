"""An in-memory :class:`~wsq.storage.base.StateStore`, for tests and ephemeral servers.

It keeps the SQLite backend's semantics (the contract suite runs against both), minus
durability: ops apply at :meth:`MemoryStateStore.submit` time, in call order, and the
returned future resolves on the next turn of the event loop. The data lives as long as
the object, so :meth:`~MemoryStateStore.close` followed by
:meth:`~MemoryStateStore.open` recovers what was stored, like a restart would.

Tasks are copied on the way in and on the way out, so a caller mutating a :class:`Task`
it passed or received never changes what is stored.
"""

from __future__ import annotations

import asyncio
import bisect
import builtins
import dataclasses
import itertools
import uuid
from collections import Counter
from collections.abc import Sequence
from typing import Any

from wsq.core.task import State, Task
from wsq.exceptions import ServerError
from wsq.storage.base import (
    KEPT_ATTEMPTS,
    AdoptRuns,
    Attempt,
    ClaimWaiting,
    CountTasks,
    Delete,
    DropWorkers,
    HeldRuns,
    Insert,
    LoadWaiting,
    Op,
    Publish,
    PutWorker,
    ReadTasks,
    RecordAttempt,
    Recovery,
    SetProgress,
    StateStore,
    Update,
    WorkerRow,
)

# (seq, id): the sort key of the ordered indexes. The id breaks ties between equal seqs.
_Key = tuple[int, str]


def _key(task: Task) -> _Key:
    return (task.seq, task.id)


def _seq(key: _Key) -> int:
    return key[0]


def _copy(task: Task) -> Task:
    return dataclasses.replace(task)


def _settle(future: asyncio.Future[builtins.list[Any]], outcome: Any) -> None:
    if future.done():  # cancelled by the caller: nobody is waiting for the outcome
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


class MemoryStateStore(StateStore):
    """A :class:`StateStore` held in dicts and sorted lists. Not thread-safe: call it from
    the event loop only, like every store.

    :meth:`submit` before :meth:`open` or after :meth:`close` returns a future failed with
    :class:`~wsq.exceptions.ServerError`; so do the reads.
    """

    def __init__(self, *, shared: bool = False) -> None:
        self.shared = shared  # to test the several-node paths without PostgreSQL
        self._open = False
        self.store_id = uuid.uuid4().hex  # this store's data, for as long as it lives
        self._tasks: dict[str, Task] = {}
        self._order: builtins.list[_Key] = []  # every task, by seq
        self._waiting: dict[str, builtins.list[_Key]] = {}  # waiting tasks per queue, by seq
        self._attempts: dict[str, builtins.list[Attempt]] = {}  # per task, oldest run first
        # Each task's attempts as they were before this batch changed them (for undo).
        self._attempts_before: dict[str, builtins.list[Attempt] | None] = {}
        # Shared: the workers of every node (PutWorker), by (node, key); before this batch
        # changed them, for undo (None: unchanged).
        self._workers: dict[tuple[str, str], WorkerRow] = {}
        self._workers_before: dict[tuple[str, str], WorkerRow] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> Recovery:
        """Start accepting calls; return what is stored, as a restart would find it.
        Raises ServerError if already open."""
        if self._open:
            raise ServerError("The state store is already open.")
        self._open = True
        active = sorted((t for t in self._tasks.values() if t.state == State.ACTIVE), key=_key)
        return Recovery(
            next_seq=max((t.seq for t in self._tasks.values()), default=0) + 1,
            active=[_stripped(t, -1) for t in active],
            waiting_queues=sorted(q for q, keys in self._waiting.items() if keys),
            counts=dict(Counter((t.queue, t.state) for t in self._tasks.values())),
            store_id=self.store_id,
        )

    async def close(self) -> None:
        """Stop accepting calls. The data stays for a later :meth:`open`. Idempotent."""
        self._open = False

    # -- the ordered pipe ------------------------------------------------------------------

    def submit(self, ops: Sequence[Op]) -> asyncio.Future[builtins.list[Any]]:
        """Apply ``ops`` now, all or none, and return a future of their results that
        resolves on the next loop turn. Must be called with the event loop running."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[builtins.list[Any]] = loop.create_future()
        outcome: builtins.list[Any] | BaseException
        if not self._open:
            outcome = ServerError("The state store is closed.")
        else:
            outcome = self._apply_all(ops)
        loop.call_soon(_settle, future, outcome)
        return future

    def _apply_all(self, ops: Sequence[Op]) -> builtins.list[Any] | Exception:
        """Results of ``ops``, or the exception that stopped them (then undo them all)."""
        journal: builtins.list[tuple[str, Task | None]] = []
        self._attempts_before.clear()
        self._workers_before = None
        try:
            return [self._apply(op, journal) for op in ops]
        except Exception as exc:
            for task_id, previous in reversed(journal):
                self._restore(task_id, previous)
            self._restore_attempts()
            if self._workers_before is not None:
                self._workers = self._workers_before
            return exc

    def _read_tasks(self, op: HeldRuns | ReadTasks) -> builtins.list[Task]:
        """The stripped tasks a :class:`HeldRuns` (one process: it cannot tell nodes
        apart, every active task) or a :class:`ReadTasks` reads, in seq order."""
        if isinstance(op, HeldRuns):
            tasks = [t for t in self._tasks.values() if t.state == State.ACTIVE]
        else:
            tasks = [self._tasks[i] for i in dict.fromkeys(op.ids) if i in self._tasks]
        return [_stripped(t, -1) for t in sorted(tasks, key=_key)]

    def _apply(self, op: Op, journal: builtins.list[tuple[str, Task | None]]) -> Any:
        if isinstance(op, LoadWaiting):
            return self._load_waiting(op.queue, op.limit, op.max_payload)
        if isinstance(op, ClaimWaiting):
            return self._claim(op, journal)
        if isinstance(op, Publish):
            return None  # no other server shares it
        if isinstance(op, CountTasks):
            return dict(Counter((t.queue, t.state) for t in self._tasks.values()))
        if isinstance(op, AdoptRuns):
            return self._adoptable(op)
        if isinstance(op, HeldRuns | ReadTasks):
            return self._read_tasks(op)
        if isinstance(op, Insert):
            if op.task.id in self._tasks:
                return False
            journal.append((op.task.id, None))
            self._put(_copy(op.task))
            return True
        if isinstance(op, Update | SetProgress | Delete):
            return self._change(op, journal)
        if isinstance(op, RecordAttempt):
            return self._record(op.attempt)
        if isinstance(op, PutWorker | DropWorkers):
            self._change_workers(op)
            return None
        raise TypeError(f"Not a state store op: {op!r}")

    def _change_workers(self, op: PutWorker | DropWorkers) -> None:
        if not self.shared:
            return  # one server: its core lists its workers itself
        if self._workers_before is None:
            self._workers_before = dict(self._workers)
        if isinstance(op, PutWorker):
            row = dataclasses.replace(op.worker, runs=())
            self._workers[(row.node, row.key)] = row
            return
        for node, key in list(self._workers):
            if node == op.node and (op.keys is None or key in op.keys):
                del self._workers[(node, key)]

    def _change(
        self, op: Update | SetProgress | Delete, journal: builtins.list[tuple[str, Task | None]]
    ) -> bool:
        """Apply an op to an existing task; ``False`` if there is none in the right state."""
        task_id = op.task.id if isinstance(op, Update) else op.task_id
        stored = self._tasks.get(task_id)
        if stored is None:
            return False
        if isinstance(op, Update) and not self._expected(stored, op):
            return False
        if isinstance(op, Delete) and op.expected not in (None, stored.state):
            return False
        if isinstance(op, SetProgress) and stored.state != State.ACTIVE:
            return False
        journal.append((task_id, stored))
        self._remove(task_id)
        if isinstance(op, Delete):
            self._set_attempts(task_id, None)
        if isinstance(op, Update):
            self._put(_updated(stored, op.task))
            if op.attempt is not None:  # the completed run's record, with the task
                self._record(op.attempt)
        elif isinstance(op, SetProgress):
            self._put(dataclasses.replace(stored, progress=op.progress, updated=op.updated))
        return True

    def _expected(self, stored: Task, op: Update) -> bool:
        """Whether ``op`` finds ``stored`` as it expects (:class:`Update`)."""
        if op.expected != State.ACTIVE:
            return stored.state == op.expected
        if stored.state == State.ACTIVE:
            return stored.run == op.task.run
        # One server: a run whose start was not stored ends all the same.
        ends = op.task.state != State.ACTIVE
        return (
            ends and not self.shared and stored.state == State.WAITING and stored.run < op.task.run
        )

    def _adoptable(self, op: AdoptRuns) -> builtins.list[Task]:
        workers = set(op.workers)
        found: dict[str, Task] = {}
        for task_id, run in op.runs:
            stored = self._tasks.get(task_id)
            if (
                stored is not None
                and stored.state == State.ACTIVE
                and stored.run == run
                and stored.worker in workers
            ):
                task = _copy(stored)
                task.strip()
                found[task.id] = task
        return sorted(found.values(), key=lambda t: t.seq)

    def _claim(
        self, op: ClaimWaiting, journal: builtins.list[tuple[str, Task | None]]
    ) -> builtins.list[Task]:
        due = [
            self._tasks[task_id]
            for _, task_id in self._waiting.get(op.queue, [])
            if self._tasks[task_id].not_before <= op.now
        ][: len(op.workers)]
        claimed = []
        for stored, worker in zip(due, op.workers, strict=False):
            journal.append((stored.id, stored))
            self._remove(stored.id)
            active = dataclasses.replace(
                stored,
                state=State.ACTIVE,
                run=stored.run + 1,
                worker=worker,
                updated=op.now,
                not_before=0.0,
            )
            self._put(active)
            # As it now is, but for when it was last updated: when it was queued.
            claimed.append(
                _stripped(dataclasses.replace(active, updated=stored.updated), op.max_payload)
            )
        return claimed

    def _record(self, attempt: Attempt) -> bool:
        """:class:`RecordAttempt`: keep it, in run order, and only the newest runs."""
        if attempt.task_id not in self._tasks:
            return False
        kept = [a for a in self._attempts.get(attempt.task_id, []) if a.run != attempt.run]
        bisect.insort(kept, attempt, key=lambda a: a.run)
        self._set_attempts(
            attempt.task_id, [a for a in kept if a.run > attempt.run - KEPT_ATTEMPTS]
        )
        return True

    def _set_attempts(self, task_id: str, attempts: builtins.list[Attempt] | None) -> None:
        """Replace (``None``: drop) a task's attempts, noting the first state for undo."""
        if task_id not in self._attempts_before:
            self._attempts_before[task_id] = self._attempts.get(task_id)
        if attempts:
            self._attempts[task_id] = attempts
        else:
            self._attempts.pop(task_id, None)

    def _restore_attempts(self) -> None:
        for task_id, attempts in self._attempts_before.items():
            if attempts is None:
                self._attempts.pop(task_id, None)
            else:
                self._attempts[task_id] = attempts
        self._attempts_before.clear()

    def _load_waiting(self, queue: str, limit: int, max_payload: int | None) -> builtins.list[Task]:
        keys = self._waiting.get(queue, [])[: max(limit, 0)]
        return [_stripped(self._tasks[task_id], max_payload) for _, task_id in keys]

    # -- indexes ---------------------------------------------------------------------------

    def _put(self, task: Task) -> None:
        """Store ``task``, whose id must be free, and index it."""
        self._tasks[task.id] = task
        bisect.insort(self._order, _key(task))
        if task.state == State.WAITING:
            bisect.insort(self._waiting.setdefault(task.queue, []), _key(task))

    def _remove(self, task_id: str) -> None:
        """Drop the stored task ``task_id``, which must exist, and its index entries."""
        task = self._tasks.pop(task_id)
        _discard(self._order, _key(task))
        if task.state == State.WAITING:
            keys = self._waiting[task.queue]
            _discard(keys, _key(task))
            if not keys:
                del self._waiting[task.queue]

    def _restore(self, task_id: str, previous: Task | None) -> None:
        if task_id in self._tasks:
            self._remove(task_id)
        if previous is not None:
            self._put(previous)

    # -- reads -----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if not self._open:
            raise ServerError("The state store is closed.")

    async def get(self, task_id: str) -> Task | None:
        """A copy of the stored task ``task_id``, or ``None``. Raises ServerError if closed."""
        self._check_open()
        task = self._tasks.get(task_id)
        return None if task is None else _copy(task)

    async def counts(self) -> dict[tuple[str, State], int]:
        """Stored tasks per queue and state. Raises ServerError if closed."""
        self._check_open()
        return dict(Counter((t.queue, t.state) for t in self._tasks.values()))

    async def workers(self) -> builtins.list[WorkerRow]:
        """See :meth:`StateStore.workers` (one process: every node it holds is live).
        Raises ServerError if closed."""
        self._check_open()
        runs: dict[str, builtins.list[Task]] = {}
        for task in self._tasks.values():
            if task.state == State.ACTIVE and task.worker is not None:
                runs.setdefault(task.worker, []).append(task)
        return [
            dataclasses.replace(
                row,
                runs=tuple(
                    (t.id, t.run, t.progress)
                    for t in sorted(runs.get(row.key, ()), key=lambda t: t.seq)
                ),
            )
            for _, row in sorted(self._workers.items())
        ]

    async def get_many(self, task_ids: Sequence[str]) -> dict[str, Task]:
        """Copies of the stored tasks with these ids, by id. Raises ServerError if closed."""
        self._check_open()
        return {i: _copy(self._tasks[i]) for i in task_ids if i in self._tasks}

    async def queues(self) -> builtins.list[str]:
        """Sorted names of queues holding at least one task. Raises ServerError if closed."""
        self._check_open()
        return sorted({t.queue for t in self._tasks.values()})

    async def attempts(self, task_id: str) -> builtins.list[Attempt]:
        """The stored attempts of ``task_id``, oldest run first (Attempt is immutable).
        Raises ServerError if closed."""
        self._check_open()
        return builtins.list(self._attempts.get(task_id, ()))

    async def blob_keys(self) -> set[str]:
        """Every blob key a stored task references. Raises ServerError if closed."""
        self._check_open()
        return {key for task in self._tasks.values() for key in task.blobs}

    async def list(
        self,
        *,
        queue: str | None = None,
        state: State | None = None,
        limit: int = 1000,
        after: int | None = None,
    ) -> builtins.list[Task]:
        """Copies of stored tasks in ``seq`` order, filtered by ``queue`` and ``state``,
        with ``seq > after`` when given, at most ``limit``, without payloads. Raises
        ServerError if closed."""
        self._check_open()
        start = 0 if after is None else bisect.bisect_right(self._order, after, key=_seq)
        found: builtins.list[Task] = []
        for _, task_id in itertools.islice(self._order, start, None):
            if len(found) >= limit:
                break
            task = self._tasks[task_id]
            if (queue is None or task.queue == queue) and (state is None or task.state == state):
                listed = _copy(task)
                listed.data, listed.streams = None, ()
                found.append(listed)
        return found


def _stripped(task: Task, max_payload: int | None) -> Task:
    """A copy of ``task``, its payload dropped if over ``max_payload`` (None: never)."""
    copy = _copy(task)
    if max_payload is not None and copy.payload_size > max_payload:
        copy.strip()
    return copy


def _updated(stored: Task, new: Task) -> Task:
    """``stored`` with the fields an :class:`Update` overwrites taken from ``new``."""
    return dataclasses.replace(
        stored,
        state=new.state,
        seq=new.seq,
        progress=new.progress,
        retries=new.retries,
        error=new.error,
        run=new.run,
        worker=new.worker,
        updated=new.updated,
        not_before=new.not_before,
    )


def _discard(keys: builtins.list[_Key], key: _Key) -> None:
    """Remove ``key`` from the sorted list ``keys``, where it must be."""
    del keys[bisect.bisect_left(keys, key)]
