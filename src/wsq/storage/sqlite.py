"""The embedded default :class:`~wsq.storage.base.StateStore`: one SQLite file.

Threads, so the event loop never waits on the disk:

* **The writer** owns the write connection. :meth:`SqliteStateStore.submit` puts a job
  (ops and a future) on its inbox and returns. The writer takes every job queued, up to
  ``batch_max`` ops, runs them in one transaction (``BEGIN IMMEDIATE ... COMMIT``) and then
  resolves the futures in submission order. While a commit is syncing, new jobs pile up in
  the inbox, so batches grow with the load by themselves, with no timer.
* **The reader** is a one-thread executor with its own connection for :meth:`get`,
  :meth:`list`, :meth:`queues` and :meth:`blob_keys`. In WAL mode it sees committed data
  and never blocks the writer.

Durability: WAL journal with ``synchronous=FULL``, so a commit has reached the disk when
``COMMIT`` returns and a future resolves only after that; killing the process at any
moment loses no acknowledged op and leaves a sound database.

Failures: each job runs inside its own savepoint. An op that raises undoes its job only,
and that job's future gets the exception (:class:`~wsq.exceptions.ServerError` for SQLite
errors); the other jobs in the batch still commit. If the transaction itself fails (say
the disk is full at ``COMMIT``), the whole batch rolls back and every future in it gets
the error; later batches carry on.

The schema is built by the numbered scripts in :data:`MIGRATIONS`; ``PRAGMA user_version``
records how many have run.
"""

from __future__ import annotations

import asyncio
import builtins
import concurrent.futures
import contextlib
import dataclasses
import functools
import heapq
import itertools
import logging
import operator
import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from wsq.core.task import STATE_TEXT, State, Task
from wsq.exceptions import ServerError, Unavailable
from wsq.storage.base import (
    KEPT_ATTEMPTS,
    AdoptRuns,
    Attempt,
    AttemptOutcome,
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
)
from wsq.storage.rows import MAX_INT, MIN_INT, STATES, clamp, task_from_row, with_last

T = TypeVar("T")

_log = logging.getLogger(__name__)

# -- schema ---------------------------------------------------------------------------------

# Version 1. ``streams`` is a JSON array of StreamRef (NULL when there are none); the
# options are columns. (queue, state, seq) serves LoadWaiting and the loose scans over
# queue names; (state, seq) serves recovery's active tasks and listings by state; (seq)
# serves the other listings and max(seq).
SCHEMA_1 = """
CREATE TABLE tasks (
    id TEXT PRIMARY KEY NOT NULL,
    queue TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('waiting', 'active', 'completed', 'failed')),
    seq INTEGER NOT NULL,
    data BLOB NOT NULL,
    streams TEXT,
    opt_timeout REAL NOT NULL,
    opt_retries INTEGER NOT NULL,
    opt_autoremove INTEGER NOT NULL,
    progress REAL NOT NULL,
    retries INTEGER NOT NULL,
    error TEXT,
    run INTEGER NOT NULL,
    worker TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX tasks_queue_state_seq ON tasks (queue, state, seq);
CREATE INDEX tasks_state_seq ON tasks (state, seq);
CREATE INDEX tasks_seq ON tasks (seq);
CREATE TABLE blobs (
    key TEXT PRIMARY KEY NOT NULL,
    task TEXT NOT NULL
);
CREATE INDEX blobs_task ON blobs (task);
"""

# The principal that added the task (auth files, docs/security.md).
SCHEMA_2 = """
ALTER TABLE tasks ADD COLUMN owner TEXT;
"""

# The store's identity, made once: a blob store records which state store it serves, so two
# servers with separate databases cannot share (and sweep) one blob store.
SCHEMA_3 = """
CREATE TABLE meta (
    key TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);
INSERT INTO meta (key, value) VALUES ('store_id', lower(hex(randomblob(16))));
"""

# When a waiting task may be claimed (ClaimWaiting): the end of a back-off.
SCHEMA_4 = """
ALTER TABLE tasks ADD COLUMN not_before REAL NOT NULL DEFAULT 0;
"""

# Each task's attempts (RecordAttempt): the newest KEPT_ATTEMPTS runs of each, keyed and
# clustered by (task, run), so a task's history is one range and pruning one range delete.
SCHEMA_5 = """
CREATE TABLE attempts (
    task TEXT NOT NULL,
    run INTEGER NOT NULL,
    worker TEXT,
    client TEXT,
    node TEXT,
    offered REAL,
    started REAL,
    ended REAL NOT NULL,
    outcome TEXT NOT NULL,
    error TEXT,
    progress REAL,
    PRIMARY KEY (task, run)
) WITHOUT ROWID;
"""

# A completed task's last run (Update.attempt): its record in the task's row (the run and
# worker are the row's, the outcome "completed", no error), one row written per finished
# task instead of two. last_ended is NULL unless the row holds such a record.
SCHEMA_6 = """
ALTER TABLE tasks ADD COLUMN last_client TEXT;
ALTER TABLE tasks ADD COLUMN last_node TEXT;
ALTER TABLE tasks ADD COLUMN last_offered REAL;
ALTER TABLE tasks ADD COLUMN last_started REAL;
ALTER TABLE tasks ADD COLUMN last_ended REAL;
ALTER TABLE tasks ADD COLUMN last_progress REAL;
"""

MIGRATIONS: list[str] = [SCHEMA_1, SCHEMA_2, SCHEMA_3, SCHEMA_4, SCHEMA_5, SCHEMA_6]

# -- statements -----------------------------------------------------------------------------

SET_WAL = "PRAGMA journal_mode = WAL"
SET_SYNCHRONOUS_FULL = "PRAGMA synchronous = FULL"
SET_QUERY_ONLY = "PRAGMA query_only = ON"
GET_STORE_ID = "SELECT value FROM meta WHERE key = 'store_id'"
GET_USER_VERSION = "PRAGMA user_version"
SET_USER_VERSION = "PRAGMA user_version = {version:d}"  # PRAGMA takes no parameters

BEGIN = "BEGIN IMMEDIATE"
BEGIN_READ = "BEGIN"
COMMIT = "COMMIT"
ROLLBACK = "ROLLBACK"
SAVEPOINT = "SAVEPOINT job"
ROLLBACK_TO_SAVEPOINT = "ROLLBACK TO job"
RELEASE_SAVEPOINT = "RELEASE job"

TASK_COLUMNS = (
    "id, queue, state, seq, data, streams, opt_timeout, opt_retries, opt_autoremove,"
    " progress, retries, error, run, worker, created, updated, owner"
)
TASK_COLUMNS_SEQ = 3  # where seq is in a row selected as TASK_COLUMNS

INSERT_TASK = f"""
INSERT INTO tasks ({TASK_COLUMNS}, not_before)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (id) DO NOTHING
"""
INSERT_BLOB = "INSERT OR IGNORE INTO blobs (key, task) VALUES (?, ?)"
UPDATE_TASK = """
UPDATE tasks
SET state = ?, seq = ?, progress = ?, retries = ?, error = ?, run = ?, worker = ?, updated = ?,
    not_before = ?
WHERE id = ? AND state = ? AND (state <> 'active' OR run = ?)
"""
# The common moves touch only the columns they change, so SQLite leaves the indexes on
# the others alone: starting or finishing a run never rewrites the (seq) index.
START_TASK = """
UPDATE tasks SET state = 'active', run = ?, worker = ?, updated = ?
WHERE id = ? AND state = 'waiting'
"""
# A run ends whether its start was stored or not (Update: the task then waits at an
# earlier run).
_RUN_ENDS = "id = ? AND (state = 'active' AND run = ? OR state = 'waiting' AND run < ?)"
FINISH_TASK = f"""
UPDATE tasks SET state = ?, progress = ?, retries = ?, error = ?, run = ?, worker = ?, updated = ?,
    last_client = ?, last_node = ?, last_offered = ?, last_started = ?, last_ended = ?,
    last_progress = ?
WHERE {_RUN_ENDS}
"""
_NO_LAST = (None,) * 6  # FINISH_TASK's last_* of an update that carries no attempt
UPDATE_FROM_ACTIVE = f"""
UPDATE tasks
SET state = ?, seq = ?, progress = ?, retries = ?, error = ?, run = ?, worker = ?, updated = ?,
    not_before = ?
WHERE {_RUN_ENDS}
"""
SET_PROGRESS = "UPDATE tasks SET progress = ?, updated = ? WHERE id = ? AND state = 'active'"
DELETE_TASK = "DELETE FROM tasks WHERE id = ?"
DELETE_TASK_IN_STATE = "DELETE FROM tasks WHERE id = ? AND state = ?"
DELETE_BLOBS = "DELETE FROM blobs WHERE task = ?"
ATTEMPT_COLUMNS = (
    "task, run, worker, client, node, offered, started, ended, outcome, error, progress"
)
# Only for a task that exists; the same run recorded again replaces the first record.
RECORD_ATTEMPT = f"""
INSERT INTO attempts ({ATTEMPT_COLUMNS})
SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM tasks WHERE id = ?)
ON CONFLICT (task, run) DO UPDATE SET
    worker = excluded.worker, client = excluded.client, node = excluded.node,
    offered = excluded.offered, started = excluded.started, ended = excluded.ended,
    outcome = excluded.outcome, error = excluded.error, progress = excluded.progress
"""
PRUNE_ATTEMPTS = "DELETE FROM attempts WHERE task = ? AND run <= ?"
DELETE_ATTEMPTS = "DELETE FROM attempts WHERE task = ?"
# A task's attempts: those recorded apart, then the record its row holds of its completed
# last run, if any (Update.attempt; "last" tells them apart). One statement, one snapshot.
GET_ATTEMPTS = f"""
SELECT false AS last, {ATTEMPT_COLUMNS} FROM attempts WHERE task = ?
UNION ALL
SELECT true, id, run, worker, last_client, last_node, last_offered, last_started, last_ended,
    'completed', NULL, last_progress
FROM tasks WHERE id = ? AND last_ended IS NOT NULL
ORDER BY last, run
"""
# The payload (data, inline streams) only if it fits in the first parameter's bytes;
# else data is NULL and streams lists the blob refs alone (Task.strip). length() of a
# BLOB reads no overflow page, so a stripped row costs little however big its data.
_FITS = "length(data) + coalesce(length(streams), 0) <= ?"
_BLOB_REFS = (
    "(SELECT json_group_array(json(value)) FROM json_each(tasks.streams)"
    " WHERE json_type(value, '$.blob') = 'text')"
)
TASK_COLUMNS_STRIPPED = TASK_COLUMNS.replace(
    "data, streams",
    f"CASE WHEN {_FITS} THEN data END, CASE WHEN {_FITS} THEN streams ELSE {_BLOB_REFS} END",
)
LOAD_WAITING = f"""
SELECT {TASK_COLUMNS_STRIPPED} FROM tasks
WHERE queue = ? AND state = 'waiting'
ORDER BY seq LIMIT ?
"""
CLAIMABLE = f"""
SELECT {TASK_COLUMNS_STRIPPED} FROM tasks
WHERE queue = ? AND state = 'waiting' AND not_before <= ?
ORDER BY seq LIMIT ?
"""
GET_ACTIVE_STRIPPED = f"""
SELECT {TASK_COLUMNS_STRIPPED} FROM tasks WHERE id = ? AND state = 'active' AND run = ?
"""
CLAIM_TASK = """
UPDATE tasks SET state = 'active', run = run + 1, worker = ?, updated = ?, not_before = 0
WHERE id = ?
"""
GET_TASKS = f"SELECT {TASK_COLUMNS} FROM tasks WHERE id IN (SELECT value FROM json_each(?))"

GET_TASK = f"SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?"
# Listings show no payloads (Task.to_json): they read none, so that a page of large tasks
# costs what a page of small ones does.
LISTED_COLUMNS = TASK_COLUMNS.replace("data, streams,", "NULL, NULL,")
LIST_TASKS = f"SELECT {LISTED_COLUMNS} FROM tasks WHERE seq > ? ORDER BY seq LIMIT ?"
LIST_TASKS_IN_STATE = (
    f"SELECT {LISTED_COLUMNS} FROM tasks WHERE state = ? AND seq > ? ORDER BY seq LIMIT ?"
)
LIST_TASKS_OF_QUEUE_IN_STATE = f"""
SELECT {LISTED_COLUMNS} FROM tasks
WHERE queue = ? AND state = ? AND seq > ?
ORDER BY seq LIMIT ?
"""
GET_BLOB_KEYS = "SELECT key FROM blobs"

# Queue names by a loose index scan: one index seek per distinct queue instead of a walk
# over every task, which keeps open() fast with millions of tasks in few queues.
GET_QUEUES = """
WITH RECURSIVE names (queue) AS (
    SELECT min(queue) FROM tasks
    UNION ALL
    SELECT (SELECT min(queue) FROM tasks WHERE queue > names.queue)
    FROM names WHERE names.queue IS NOT NULL
)
SELECT queue FROM names WHERE queue IS NOT NULL ORDER BY queue
"""
GET_WAITING_QUEUES = """
WITH RECURSIVE names (queue) AS (
    SELECT min(queue) FROM tasks
    UNION ALL
    SELECT (SELECT min(queue) FROM tasks WHERE queue > names.queue)
    FROM names WHERE names.queue IS NOT NULL
)
SELECT queue FROM names
WHERE queue IS NOT NULL
  AND EXISTS (SELECT 1 FROM tasks WHERE tasks.queue = names.queue AND state = 'waiting')
ORDER BY queue
"""
GET_NEXT_SEQ = "SELECT coalesce(max(seq), 0) + 1 FROM tasks"
GET_COUNTS = "SELECT queue, state, count(*) FROM tasks GROUP BY queue, state"
GET_ACTIVE_TASKS = f"SELECT {TASK_COLUMNS_STRIPPED} FROM tasks WHERE state = 'active' ORDER BY seq"
READ_TASKS = f"""
SELECT {TASK_COLUMNS_STRIPPED} FROM tasks WHERE id IN (SELECT value FROM json_each(?))
ORDER BY seq
"""
_NO_PAYLOAD = -1  # as _FITS's parameter: strip every payload

# -- rows -----------------------------------------------------------------------------------

_encode_json = msgspec.json.Encoder().encode


def _task_params(task: Task) -> tuple[Any, ...]:
    """``task`` as INSERT_TASK's parameters: :data:`TASK_COLUMNS`, then not_before."""
    streams = _encode_json(task.streams).decode() if task.streams else None
    options = task.options
    return (
        task.id,
        task.queue,
        STATE_TEXT[task.state],
        task.seq,
        task.data,
        streams,
        options.timeout,
        options.retries,
        options.autoremove,
        task.progress,
        task.retries,
        task.error,
        task.run,
        task.worker,
        task.created,
        task.updated,
        task.owner,
        task.not_before,
    )


def _task_from_row(row: Sequence[Any]) -> Task:
    """The :class:`Task` in a row selected as :data:`TASK_COLUMNS`."""
    return task_from_row(row, row[11])


# -- connections ----------------------------------------------------------------------------


def migrate(conn: sqlite3.Connection) -> int:
    """Run the :data:`MIGRATIONS` that ``conn``'s database lacks, each in its own
    transaction; return the schema version found. ``conn`` must be in autocommit mode
    (``isolation_level=None``) with no transaction open. Raises ServerError if the
    database was made by a newer wsq."""
    (found,) = conn.execute(GET_USER_VERSION).fetchone()
    if found > len(MIGRATIONS):
        raise ServerError(
            f"The state store has schema version {found}; this wsq knows up to {len(MIGRATIONS)}."
        )
    for version in range(found + 1, len(MIGRATIONS) + 1):
        script = MIGRATIONS[version - 1]
        try:
            conn.executescript(
                f"{BEGIN};\n{script}\n{SET_USER_VERSION.format(version=version)};\n{COMMIT};"
            )
        except BaseException:
            if conn.in_transaction:
                conn.execute(ROLLBACK)
            raise
    return int(found)


def migrate_file(path: str | os.PathLike[str]) -> tuple[int, int]:
    """``wsq migrate`` without a database: create or migrate the file at ``path``; return
    the schema versions found and reached. Blocks. Raises ServerError."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=5.0, isolation_level=None)) as conn:
            conn.execute(SET_WAL)
            found = migrate(conn)
    except sqlite3.Error as exc:
        raise _server_error(exc) from exc
    return found, len(MIGRATIONS)


def _connect_writer(path: str, busy_timeout: float) -> sqlite3.Connection:
    """Open ``path`` (creating its directory) for writing, in WAL mode, migrated."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
    try:
        (mode,) = conn.execute(SET_WAL).fetchone()
        if mode != "wal":
            raise ServerError(f"The state store {path} cannot use WAL mode (got {mode}).")
        conn.execute(SET_SYNCHRONOUS_FULL)
        migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def _connect_reader(path: str, busy_timeout: float) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
    conn.execute(SET_QUERY_ONLY)
    return conn


def _recover(conn: sqlite3.Connection) -> Recovery:
    (next_seq,) = conn.execute(GET_NEXT_SEQ).fetchone()
    rows = conn.execute(GET_ACTIVE_TASKS, (_NO_PAYLOAD, _NO_PAYLOAD))
    active = [_task_from_row(row) for row in rows]
    waiting_queues = [name for (name,) in conn.execute(GET_WAITING_QUEUES)]
    counts = _count_tasks(conn)
    (store_id,) = conn.execute(GET_STORE_ID).fetchone()
    return Recovery(next_seq, active, waiting_queues, counts, store_id)


def _count_tasks(conn: sqlite3.Connection) -> dict[tuple[str, State], int]:
    """The stored tasks per (queue, state)."""
    return {(queue, STATES[state]): n for queue, state, n in conn.execute(GET_COUNTS)}


def _server_error(exc: Exception) -> Exception:
    """What a caller sees for ``exc``: SQLite's errors become ServerError, but a full
    disk, which may pass, is Unavailable (clients send reports again)."""
    if isinstance(exc, sqlite3.Error):
        error: Exception
        if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            error = Unavailable(f"The state store's disk is full: {exc}")
        else:
            error = ServerError(f"State store error: {exc}")
        error.__cause__ = exc
        return error
    return exc


def _rollback(conn: sqlite3.Connection) -> None:
    """Roll back whatever is open, if anything; a failed rollback leaves nothing to do."""
    with contextlib.suppress(sqlite3.Error):
        if conn.in_transaction:
            conn.execute(ROLLBACK)


# -- ops ------------------------------------------------------------------------------------


def _insert(conn: sqlite3.Connection, task: Task) -> bool:
    if conn.execute(INSERT_TASK, _task_params(task)).rowcount != 1:
        return False
    if task.streams:
        conn.executemany(INSERT_BLOB, [(key, task.id) for key in task.blobs])
    return True


def _update(conn: sqlite3.Connection, op: Update) -> bool:
    task = op.task
    if op.expected is State.WAITING and task.state is State.ACTIVE:
        start = (task.run, task.worker, task.updated, task.id)
        return bool(conn.execute(START_TASK, start).rowcount == 1)
    if op.expected is State.ACTIVE and task.state in _FINISHED:
        finish = (STATE_TEXT[task.state], task.progress, task.retries, task.error, task.run)
        last = _NO_LAST if op.attempt is None else _last_params(op.attempt)
        ends = (task.worker, task.updated, *last, task.id, task.run, task.run)
        return bool(conn.execute(FINISH_TASK, (*finish, *ends)).rowcount == 1)
    fields = (
        State(task.state).value,
        task.seq,
        task.progress,
        task.retries,
        task.error,
        task.run,
        task.worker,
        task.updated,
        task.not_before,
        task.id,
    )
    if op.expected is State.ACTIVE and task.state is not State.ACTIVE:
        return bool(conn.execute(UPDATE_FROM_ACTIVE, (*fields, task.run, task.run)).rowcount == 1)
    params = (*fields, State(op.expected).value, task.run)
    return bool(conn.execute(UPDATE_TASK, params).rowcount == 1)


def _claim(conn: sqlite3.Connection, op: ClaimWaiting) -> builtins.list[Task]:
    """One writer: no other claim can run in between, so no locking is needed."""
    fits = MAX_INT if op.max_payload is None else clamp(op.max_payload)
    params = (fits, fits, op.queue, op.now, len(op.workers))
    claimed = [_task_from_row(row) for row in conn.execute(CLAIMABLE, params)]
    for task, worker in zip(claimed, op.workers, strict=False):
        task.state = State.ACTIVE
        task.run += 1
        task.worker = worker
    conn.executemany(CLAIM_TASK, [(t.worker, op.now, t.id) for t in claimed])
    return claimed


def _adoptable(conn: sqlite3.Connection, op: AdoptRuns) -> builtins.list[Task]:
    """No other node shares the file: the runs are this server's already."""
    workers = set(op.workers)
    found: dict[str, Task] = {}
    for task_id, run in op.runs:
        params = (_NO_PAYLOAD, _NO_PAYLOAD, task_id, clamp(run))
        row = conn.execute(GET_ACTIVE_STRIPPED, params).fetchone()
        if row is not None:
            task = _task_from_row(row)
            if task.worker in workers:
                found[task.id] = task
    return sorted(found.values(), key=lambda t: t.seq)


_FINISHED = (State.COMPLETED, State.FAILED)


def _delete(conn: sqlite3.Connection, task_id: str, expected: State | None) -> bool:
    if expected is None:
        deleted = conn.execute(DELETE_TASK, (task_id,)).rowcount == 1
    else:
        deleted = conn.execute(DELETE_TASK_IN_STATE, (task_id, expected.value)).rowcount == 1
    if deleted:
        conn.execute(DELETE_BLOBS, (task_id,))
        conn.execute(DELETE_ATTEMPTS, (task_id,))
    return bool(deleted)


def _record_attempt(conn: sqlite3.Connection, attempt: Attempt) -> bool:
    params = (*_attempt_params(attempt), attempt.task_id)
    if conn.execute(RECORD_ATTEMPT, params).rowcount != 1:
        return False
    if attempt.run > KEPT_ATTEMPTS:  # else no older run can be past the bound
        conn.execute(PRUNE_ATTEMPTS, (attempt.task_id, attempt.run - KEPT_ATTEMPTS))
    return True


def _attempt_params(attempt: Attempt) -> tuple[Any, ...]:
    """``attempt`` in :data:`ATTEMPT_COLUMNS` order."""
    outcome = None if attempt.outcome is None else AttemptOutcome(attempt.outcome).value
    return (
        attempt.task_id,
        clamp(attempt.run),
        attempt.worker,
        attempt.client,
        attempt.node,
        attempt.offered,
        attempt.started,
        attempt.ended,
        outcome,
        attempt.error,
        attempt.progress,
    )


def _last_params(attempt: Attempt) -> tuple[Any, ...]:
    """A completed run's record as FINISH_TASK's last_* parameters (:class:`Update`)."""
    return (
        attempt.client,
        attempt.node,
        attempt.offered,
        attempt.started,
        attempt.ended,
        attempt.progress,
    )


def _attempt_from_row(row: Sequence[Any]) -> Attempt:
    """The :class:`Attempt` in a row selected as :data:`ATTEMPT_COLUMNS`."""
    task, run, worker, client, node, offered, started, ended, outcome, error, progress = row
    return Attempt(
        task, run, worker, client, node, offered, started, ended,
        AttemptOutcome(outcome), error, progress,
    )  # fmt: skip


def _apply(conn: sqlite3.Connection, op: Op) -> Any:
    """Run one op inside the open transaction and return its result."""
    match op:
        case Insert(task):
            return _insert(conn, task)
        case Update():
            return _update(conn, op)
        case SetProgress(task_id, progress, updated):
            return conn.execute(SET_PROGRESS, (progress, updated, task_id)).rowcount == 1
        case Delete(task_id, expected):
            return _delete(conn, task_id, expected)
        case ClaimWaiting():
            return _claim(conn, op)
        case CountTasks():
            return _count_tasks(conn)
        case AdoptRuns():
            return _adoptable(conn, op)
        case HeldRuns() | ReadTasks():
            return _read_tasks(conn, op)
        case Publish() | PutWorker() | DropWorkers():
            return None  # one server: no other shares the file; its core lists its workers
        case LoadWaiting(queue_, limit, max_payload):
            fits = MAX_INT if max_payload is None else clamp(max_payload)
            rows = conn.execute(LOAD_WAITING, (fits, fits, queue_, clamp(max(limit, 0))))
            return [_task_from_row(row) for row in rows]
        case RecordAttempt(attempt):
            return _record_attempt(conn, attempt)
    raise TypeError(f"Not a state store op: {op!r}")


def _read_tasks(conn: sqlite3.Connection, op: HeldRuns | ReadTasks) -> builtins.list[Task]:
    """The stripped tasks a :class:`HeldRuns` (one server holds every run: every active
    task) or a :class:`ReadTasks` reads, in seq order."""
    if isinstance(op, HeldRuns):
        rows = conn.execute(GET_ACTIVE_TASKS, (_NO_PAYLOAD, _NO_PAYLOAD))
    else:
        listed = _encode_json(list(op.ids)).decode()
        rows = conn.execute(READ_TASKS, (_NO_PAYLOAD, _NO_PAYLOAD, listed))
    return [_task_from_row(row) for row in rows]


class _Conflict(Exception):
    """An insert in a run of inserts met an existing id: redo the batch op by op."""


def _apply_fast(conn: sqlite3.Connection, ops: Sequence[Op]) -> builtins.list[Any]:
    """Results of ``ops``, with each run of plain inserts (no blobs) as one executemany.
    Raises :class:`_Conflict` if such a run met an existing id, since executemany cannot
    tell which insert was skipped; the caller then redoes the batch op by op."""
    results: builtins.list[Any] = []
    run: builtins.list[tuple[Any, ...]] = []
    for op in ops:
        if type(op) is Insert and not op.task.streams:
            run.append(_task_params(op.task))
            continue
        _insert_run(conn, run, results)
        results.append(_apply(conn, op))
    _insert_run(conn, run, results)
    return results


def _insert_run(
    conn: sqlite3.Connection, run: builtins.list[tuple[Any, ...]], results: builtins.list[Any]
) -> None:
    if not run:
        return
    if conn.executemany(INSERT_TASK, run).rowcount != len(run):
        raise _Conflict
    results.extend([True] * len(run))
    run.clear()


def _apply_job(conn: sqlite3.Connection, ops: Sequence[Op]) -> builtins.list[Any] | Exception:
    """Results of ``ops``, or the exception that stopped them, in which case none of them
    applied. Raises only if the enclosing transaction can no longer be trusted."""
    conn.execute(SAVEPOINT)
    try:
        results = [_apply(conn, op) for op in ops]
    except Exception as exc:
        conn.execute(ROLLBACK_TO_SAVEPOINT)
        conn.execute(RELEASE_SAVEPOINT)
        return _server_error(exc)
    conn.execute(RELEASE_SAVEPOINT)
    return results


# -- the writer thread ----------------------------------------------------------------------

_Outcome = builtins.list[Any] | BaseException


def _settle(future: asyncio.Future[builtins.list[Any]], outcome: _Outcome) -> None:
    if future.done():  # cancelled by the caller: nobody is waiting for the outcome
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _settle_batch(jobs: builtins.list[_Job], outcomes: builtins.list[_Outcome]) -> None:
    for job, outcome in zip(jobs, outcomes, strict=True):
        _settle(job.future, outcome)


def _settle_all(jobs: builtins.list[_Job], outcomes: builtins.list[_Outcome]) -> None:
    """Resolve the futures of a batch in order, with one wake-up per event loop (a thread
    wake-up per job would cost more than the job under load)."""
    by_loop: dict[asyncio.AbstractEventLoop, tuple[builtins.list[_Job], builtins.list[_Outcome]]]
    by_loop = {}
    for job, outcome in zip(jobs, outcomes, strict=True):
        pending = by_loop.setdefault(job.loop, ([], []))
        pending[0].append(job)
        pending[1].append(outcome)
    for loop, (loop_jobs, loop_outcomes) in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            loop.call_soon_threadsafe(_settle_batch, loop_jobs, loop_outcomes)


@dataclasses.dataclass(slots=True)
class _Job:
    """One :meth:`SqliteStateStore.submit` call on its way to the writer."""

    ops: tuple[Op, ...]
    future: asyncio.Future[builtins.list[Any]]
    loop: asyncio.AbstractEventLoop

    def settle(self, outcome: _Outcome) -> None:
        """Resolve the future from the writer thread (callbacks run in call order)."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            self.loop.call_soon_threadsafe(_settle, self.future, outcome)


class _Writer:
    """The thread that owns the write connection; see the module docstring.

    Call :meth:`start` once and wait for its future (the :class:`Recovery`, or the error
    that stopped the open), :meth:`put` jobs, then :meth:`stop` once and wait for its
    future before :meth:`join`.
    """

    def __init__(self, connect: Callable[[], sqlite3.Connection], batch_max: int) -> None:
        self.commits = 0  # transactions committed; written by the writer thread only
        self.accepting = True  # False once the thread no longer takes jobs
        self._connect = connect
        self._batch_max = batch_max
        self._inbox: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._started: concurrent.futures.Future[Recovery] = concurrent.futures.Future()
        self._stopped: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, name="wsq-sqlite-writer", daemon=True)

    def start(self) -> concurrent.futures.Future[Recovery]:
        self._thread.start()
        return self._started

    def put(self, job: _Job) -> None:
        self._inbox.put(job)

    def stop(self) -> concurrent.futures.Future[None]:
        """Ask the thread to finish the jobs already put, close, and exit."""
        self._inbox.put(None)
        return self._stopped

    def join(self) -> None:
        self._thread.join()

    def _run(self) -> None:
        conn = self._open()
        if conn is None:
            return
        try:
            self._serve(conn)
        except Exception:  # a bug: _commit handles every error a batch can meet
            _log.exception("State store writer failed.", extra={"action": "store_writer_failed"})
        finally:
            self.accepting = False
            conn.close()
            self._fail_pending()
            self._stopped.set_result(None)

    def _open(self) -> sqlite3.Connection | None:
        """The migrated write connection after reporting the Recovery, or ``None`` after
        reporting why there is none."""
        conn: sqlite3.Connection | None = None
        try:
            conn = self._connect()
            self._started.set_result(_recover(conn))
        except Exception as exc:
            if conn is not None:
                conn.close()
            self.accepting = False
            self._started.set_exception(_server_error(exc))
            self._stopped.set_result(None)
            return None
        return conn

    def _fail_pending(self) -> None:
        """Fail the jobs left in the inbox (none, unless the thread died of a bug)."""
        while True:
            try:
                job = self._inbox.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.settle(ServerError("The state store writer stopped."))

    def _serve(self, conn: sqlite3.Connection) -> None:
        while True:
            batch, stop = self._take()
            if batch:
                self._commit(conn, batch)
            if stop:
                return

    def _take(self) -> tuple[builtins.list[_Job], bool]:
        """Wait for a job, then take every job queued behind it until the batch holds
        ``batch_max`` ops. Also returns whether :meth:`stop` was called."""
        batch: builtins.list[_Job] = []
        size = 0
        job = self._inbox.get()
        while job is not None:
            batch.append(job)
            size += len(job.ops)
            if size >= self._batch_max:
                return batch, False
            try:
                job = self._inbox.get_nowait()
            except queue.Empty:
                return batch, False
        return batch, True

    def _commit(self, conn: sqlite3.Connection, batch: builtins.list[_Job]) -> None:
        """Run ``batch`` in one transaction, then settle its futures in order."""
        outcomes: builtins.list[_Outcome]
        try:
            outcomes = self._transact(conn, batch)
        except Exception as exc:
            _rollback(conn)
            error = _server_error(exc)
            outcomes = [error] * len(batch)
        _settle_all(batch, outcomes)

    def _transact(
        self, conn: sqlite3.Connection, batch: builtins.list[_Job]
    ) -> builtins.list[_Outcome]:
        """Apply the batch in one transaction and commit. The fast path runs every op with
        no savepoints; only if an op raises is the batch redone job by job, each in its own
        savepoint, so one caller's bad op fails only that caller."""
        conn.execute(BEGIN)
        try:
            fast: builtins.list[_Outcome] = [_apply_fast(conn, job.ops) for job in batch]
        except Exception:
            _rollback(conn)
            conn.execute(BEGIN)
        else:
            conn.execute(COMMIT)
            self.commits += 1
            return fast
        outcomes: builtins.list[_Outcome] = []
        for job in batch:
            outcomes.append(_apply_job(conn, job.ops))
            # Some errors (I/O, full disk) make SQLite roll the transaction back by itself;
            # later statements would then autocommit one by one.
            if not conn.in_transaction:
                if isinstance(outcomes[-1], Unavailable):  # the disk is full
                    raise outcomes[-1]
                raise ServerError("The state store transaction was rolled back.")
        conn.execute(COMMIT)
        self.commits += 1
        return outcomes


# -- the reader -----------------------------------------------------------------------------


class _Reader:
    """A one-thread executor holding the read connection (opened on first use, in that
    thread). Call :meth:`close` once, after the last :meth:`run`."""

    def __init__(self, connect: Callable[[], sqlite3.Connection]) -> None:
        self._connect = connect
        self._conn: sqlite3.Connection | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="wsq-sqlite-reader"
        )

    async def run(self, query: Callable[[sqlite3.Connection], T]) -> T:
        """``query(connection)``, run in the reader thread. SQLite errors raise ServerError."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._call, query)

    def _call(self, query: Callable[[sqlite3.Connection], T]) -> T:
        try:
            if self._conn is None:
                self._conn = self._connect()
            return query(self._conn)
        except sqlite3.Error as exc:
            raise ServerError(f"State store error: {exc}") from exc

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._close_connection)
        self._executor.shutdown(wait=True)  # its thread is idle now: this returns at once

    def _close_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


# -- the store ------------------------------------------------------------------------------


class SqliteStateStore(StateStore):
    """The state store in the SQLite file at ``path`` (its directory is created if
    missing). A batch holds at most ``batch_max`` ops, except that one :meth:`submit` is
    never split. ``busy_timeout`` is how many seconds a statement waits for a lock that
    another connection to the file holds before it fails.

    Call :meth:`open` first and :meth:`close` last; a closed store may be opened again.
    :meth:`submit` before :meth:`open` or once :meth:`close` has begun returns a future
    failed with :class:`~wsq.exceptions.ServerError`; the reads raise it.

    :attr:`commits` counts the transactions committed (a metric; group commit makes it far
    smaller than the number of :meth:`submit` calls under load).
    """

    def __init__(
        self, path: str | os.PathLike[str], *, batch_max: int = 4096, busy_timeout: float = 5.0
    ) -> None:
        if batch_max < 1:
            raise ValueError("batch_max must be at least 1.")
        self.busy_timeout = busy_timeout
        self.path = os.fspath(path)
        self.batch_max = batch_max
        self._writer: _Writer | None = None
        self._reader: _Reader | None = None
        self._closing: asyncio.Task[None] | None = None
        self._past_commits = 0

    @property
    def commits(self) -> int:
        """Transactions committed since this object was made."""
        return self._past_commits + (self._writer.commits if self._writer else 0)

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> Recovery:
        """Open the file (creating and migrating it as needed) and return the
        :class:`Recovery`, all in the writer thread. Raises ServerError if the file cannot
        be used or the store is already open."""
        if self._writer is not None:
            raise ServerError("The state store is already open.")
        writer = _Writer(
            functools.partial(_connect_writer, self.path, self.busy_timeout), self.batch_max
        )
        try:
            recovery = await asyncio.wrap_future(writer.start())
        except BaseException:
            writer.stop()  # the thread then closes its connection and exits
            raise
        self._writer = writer
        self._reader = _Reader(functools.partial(_connect_reader, self.path, self.busy_timeout))
        return recovery

    async def close(self) -> None:
        """Commit every job submitted so far, then stop the threads and close the
        connections. Idempotent; concurrent calls all wait for the same shutdown."""
        if self._writer is None:
            return
        if self._closing is None:
            loop = asyncio.get_running_loop()
            self._closing = loop.create_task(self._shut_down(), name="wsq-sqlite-close")
        await asyncio.shield(self._closing)

    async def _shut_down(self) -> None:
        writer, reader = self._writer, self._reader
        assert writer is not None and reader is not None
        try:
            await asyncio.wrap_future(writer.stop())
            writer.join()  # the thread has returned or is returning
            await reader.close()
        finally:
            self._past_commits += writer.commits
            self._writer = self._reader = None
            self._closing = None

    # -- the ordered pipe ------------------------------------------------------------------

    def submit(self, ops: Sequence[Op]) -> asyncio.Future[builtins.list[Any]]:
        """Queue ``ops`` for the next group commit; see :meth:`StateStore.submit`. Must be
        called with the event loop running; never blocks. The caller must not change
        the tasks of submitted ops (pass copies)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[builtins.list[Any]] = loop.create_future()
        if self._writer is None or self._closing is not None or not self._writer.accepting:
            future.set_exception(ServerError("The state store is closed."))
            return future
        self._writer.put(_Job(tuple(ops), future, loop))
        return future

    # -- reads -----------------------------------------------------------------------------

    async def _read(self, query: Callable[[sqlite3.Connection], T]) -> T:
        if self._reader is None or self._closing is not None:
            raise ServerError("The state store is closed.")
        return await self._reader.run(query)

    async def get(self, task_id: str) -> Task | None:
        """The committed task ``task_id``, or ``None``. Raises ServerError if closed."""

        def query(conn: sqlite3.Connection) -> Task | None:
            row = conn.execute(GET_TASK, (task_id,)).fetchone()
            return None if row is None else _task_from_row(row)

        return await self._read(query)

    async def counts(self) -> dict[tuple[str, State], int]:
        """Committed tasks per queue and state."""

        return await self._read(_count_tasks)

    async def get_many(self, task_ids: Sequence[str]) -> dict[str, Task]:
        """The committed tasks with these ids, by id. Raises ServerError if closed."""
        ids = _encode_json(list(task_ids)).decode()

        def query(conn: sqlite3.Connection) -> dict[str, Task]:
            return {row[0]: _task_from_row(row) for row in conn.execute(GET_TASKS, (ids,))}

        return await self._read(query)

    async def queues(self) -> builtins.list[str]:
        """Sorted names of queues holding at least one task. Raises ServerError if closed."""
        return await self._read(lambda conn: [name for (name,) in conn.execute(GET_QUEUES)])

    async def blob_keys(self) -> set[str]:
        """Every blob key a stored task references. Raises ServerError if closed."""
        return await self._read(lambda conn: {key for (key,) in conn.execute(GET_BLOB_KEYS)})

    async def attempts(self, task_id: str) -> builtins.list[Attempt]:
        """The committed attempts of ``task_id``, oldest run first. Raises ServerError
        if closed."""

        def query(conn: sqlite3.Connection) -> builtins.list[Attempt]:
            return with_last(conn.execute(GET_ATTEMPTS, (task_id, task_id)), _attempt_from_row)

        return await self._read(query)

    async def list(
        self,
        *,
        queue: str | None = None,
        state: State | None = None,
        limit: int = 1000,
        after: int | None = None,
    ) -> builtins.list[Task]:
        """Committed tasks in ``seq`` order, filtered by ``queue`` and ``state``, with
        ``seq > after`` when given, at most ``limit``. Raises ServerError if closed."""
        cursor = MIN_INT if after is None else clamp(after)
        count = clamp(max(limit, 0))
        return await self._read(lambda conn: _list_tasks(conn, queue, state, cursor, count))


def _list_tasks(
    conn: sqlite3.Connection, queue_: str | None, state: State | None, after: int, limit: int
) -> builtins.list[Task]:
    """:meth:`SqliteStateStore.list`, in the reader thread."""
    sql: str
    params: tuple[Any, ...]
    if state is None and queue_ is not None:
        return _list_queue(conn, queue_, after, limit)
    if state is None:
        sql, params = LIST_TASKS, (after, limit)
    elif queue_ is None:
        sql, params = LIST_TASKS_IN_STATE, (State(state).value, after, limit)
    else:
        sql, params = LIST_TASKS_OF_QUEUE_IN_STATE, (queue_, State(state).value, after, limit)
    return [_task_from_row(row) for row in conn.execute(sql, params)]


def _list_queue(
    conn: sqlite3.Connection, queue_: str, after: int, limit: int
) -> builtins.list[Task]:
    """The first ``limit`` tasks of ``queue_`` in seq order: the first ``limit`` of each
    state, merged. That is four index range scans however big the queue is, where one
    statement would sort the whole queue."""
    conn.execute(BEGIN_READ)  # one snapshot for the four statements
    try:
        runs = [
            conn.execute(
                LIST_TASKS_OF_QUEUE_IN_STATE, (queue_, state.value, after, limit)
            ).fetchall()
            for state in State
        ]
    finally:
        if conn.in_transaction:
            conn.execute(COMMIT)
    merged = heapq.merge(*runs, key=operator.itemgetter(TASK_COLUMNS_SEQ))
    return [_task_from_row(row) for row in itertools.islice(merged, limit)]
