"""A :class:`~wsq.storage.base.StateStore` in PostgreSQL (``wsq server --database URL``).

Everything runs on the event loop through asyncpg; nothing blocks it.

* **The writer** is one asyncio task with its own connection.
  :meth:`PostgresStateStore.submit` appends a job (ops and a future) to its inbox and
  returns. The writer takes every job queued, up to ``batch_max`` ops, applies them in one
  transaction and resolves the futures in submission order. While a commit is on its way,
  new jobs pile up, so batches grow with the load by themselves, as SQLite's do.
* **Few round trips per batch.** The ops of a batch are cut into *steps*: a run of ops
  that touch distinct tasks (so their order does not matter) becomes one statement, whose
  data-modifying CTEs insert, update and delete every op of the run from arrays
  (``unnest``) and return which ones applied; a :class:`~wsq.storage.base.LoadWaiting`
  is a step of its own, run where it stands in the pipe. A batch of one step needs no
  ``BEGIN``/``COMMIT``: one statement, one round trip.
* **Reads** (:meth:`~PostgresStateStore.get`, :meth:`~PostgresStateStore.list`, ...)
  use a small pool of other connections and see committed data.

Durability: a future resolves once PostgreSQL has committed, which with the default
``synchronous_commit = on`` means the commit is on disk (docs/operations.md).

Failures: a job whose op raises (a bad op, a value PostgreSQL refuses) fails alone: the
batch is redone job by job, each in its own savepoint. If PostgreSQL is unreachable,
stops answering within ``timeout``, or shuts down, every job of the batch fails with
:class:`~wsq.exceptions.Unavailable` and the connection is dropped; the next batch
connects again, so the store recovers by itself once PostgreSQL is back. A connection
lost during ``COMMIT`` leaves the outcome unknown: the batch is reported failed though it
may have applied (an ``add`` sent again with its id is then answered as the same add).

The schema is built by the numbered scripts in ``migrations/postgres`` (``NNNN_name.sql``),
run by :func:`migrate` under an advisory lock, so servers starting together on an empty
database do it once; ``wsq_schema_version`` records those that ran.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import contextlib
import dataclasses
import datetime
import functools
import importlib.resources
import logging
import math
import re
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import asyncpg
import msgspec

from wsq.core.task import STATE_TEXT, State, Task
from wsq.exceptions import ServerError, Unavailable, UploadFailed
from wsq.storage.base import (
    KEPT_ATTEMPTS,
    NODE_BITS,
    AdoptRuns,
    Attempt,
    AttemptOutcome,
    ClaimWaiting,
    CountTasks,
    Delete,
    DropWorkers,
    Heartbeat,
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
from wsq.storage.rows import MAX_INT, MIN_INT, STATES, clamp, task_from_row, with_last

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

T = TypeVar("T")

_log = logging.getLogger(__name__)

# -- migrations -----------------------------------------------------------------------------

_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")

# Two keys for pg_advisory_lock: wsq's (b"wsq\0"), and the search path's hash, so that
# servers on different schemas of one database do not wait for each other.
LOCK_KEY = 0x77737100
TAKE_LOCK = "SELECT pg_advisory_lock($1, hashtext(current_setting('search_path')))"
DROP_LOCK = "SELECT pg_advisory_unlock($1, hashtext(current_setting('search_path')))"
# Keepalives on the listener's connection: a cut network is noticed within about 30 s.
_KEEPALIVES = {
    "tcp_keepalives_idle": "10",
    "tcp_keepalives_interval": "5",
    "tcp_keepalives_count": "3",
}
CREATE_SCHEMA = "CREATE SCHEMA IF NOT EXISTS {schema}"
GET_SCHEMA = "SELECT current_schema()"
GET_SEARCH_PATH = "SHOW search_path"
CREATE_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS wsq_schema_version (
    version integer PRIMARY KEY,
    name text NOT NULL,
    applied timestamptz NOT NULL DEFAULT now()
)
"""
GET_VERSION = "SELECT coalesce(max(version), 0) FROM wsq_schema_version"
SET_VERSION = "INSERT INTO wsq_schema_version (version, name) VALUES ($1, $2)"


@functools.cache
def migrations() -> tuple[tuple[int, str, str], ...]:
    """The packaged migrations as ``(version, file name, SQL)``, numbered 1, 2, ... with
    no gap (a packaging mistake raises RuntimeError)."""
    folder = importlib.resources.files("wsq.storage").joinpath("migrations", "postgres")
    found = []
    for item in folder.iterdir():
        match = _MIGRATION_NAME.match(item.name)
        if match:
            found.append((int(match.group(1)), item.name, item.read_text(encoding="utf-8")))
    found.sort()
    if [version for version, _, _ in found] != list(range(1, len(found) + 1)):
        raise RuntimeError(f"wsq's PostgreSQL migrations are not numbered 1..n: {found!r}")
    return tuple(found)


def quote_ident(name: str) -> str:
    """``name`` as an SQL identifier (a schema name)."""
    return '"' + name.replace('"', '""') + '"'


async def _migrate(conn: asyncpg.Connection, schema: str | None) -> tuple[int, int]:
    """Run the migrations ``conn``'s schema lacks, each in its own transaction, holding the
    advisory lock throughout; return the versions found and reached. Creates ``schema``
    if given. Raises ServerError if the schema was made by a newer wsq."""
    await conn.execute(TAKE_LOCK, LOCK_KEY)
    try:
        async with conn.transaction():
            if schema is not None:
                await conn.execute(CREATE_SCHEMA.format(schema=quote_ident(schema)))
            elif await conn.fetchval(GET_SCHEMA) is None:
                path = await conn.fetchval(GET_SEARCH_PATH)
                raise ServerError(
                    f"No schema to create wsq's tables in: search_path is {path!r}, and none"
                    " of its schemas exists. Create one (CREATE SCHEMA) or change the path."
                )
            await conn.execute(CREATE_VERSION_TABLE)
        found: int = await conn.fetchval(GET_VERSION)
        known = migrations()
        if found > len(known):
            raise ServerError(
                f"The PostgreSQL schema has version {found}; this wsq knows up to {len(known)}."
            )
        for version, name, script in known[found:]:
            async with conn.transaction():
                await conn.execute(script)
                await conn.execute(SET_VERSION, version, name)
            _log.info(
                "Migrated the PostgreSQL schema to version %d (%s).",
                version,
                name,
                extra={"action": "store_migrated"},
            )
        return found, max(found, len(known))
    finally:
        if not conn.is_closed():
            await conn.execute(DROP_LOCK, LOCK_KEY)


async def migrate(
    dsn: str, *, schema: str | None = None, connect_timeout: float = 10.0
) -> tuple[int, int]:
    """Bring the schema at ``dsn`` up to date (``wsq migrate``); return the versions found
    and reached. Raises Unavailable if PostgreSQL cannot be reached, ServerError if it
    refuses or the schema is newer than this wsq."""
    try:
        conn = await _connect(dsn, schema, connect_timeout)
        try:
            return await _migrate(conn, schema)
        finally:
            await conn.close()
    except Exception as exc:
        raise _store_error(exc) from exc


# -- statements -----------------------------------------------------------------------------

TASK_COLUMNS = (
    "id, queue, state, seq, data, streams, opt_timeout, opt_retries, opt_autoremove,"
    " progress, retries, error, run, worker, created, updated, owner"
)
# An insert also sets not_before: a task inserted held (Core.admit) is claimed by no node
# before its "task added" commits.
INSERT_COLUMNS = TASK_COLUMNS.replace("streams,", "streams, blob_streams,") + ", not_before"
INSERT_TYPES = (
    *("text", "text", "text", "bigint", "bytea", "text", "text", "float8", "bigint"),
    *("boolean", "float8", "bigint", "bytea", "bigint", "text", "float8", "float8", "text"),
    "float8",
)
TASK_COLUMNS_SEQ = 3


def _state_is(column: str, state: str) -> str:
    """``column = 'state'`` as an expression that no index holds (likewise a comparison
    of the state with a value of the batch's rows). A write that addresses
    rows by id must probe the primary key once per row: given a plain ``state = 'active'``,
    the planner may instead scan every entry of an index on state (or of the partial index
    of active runs, which keeps an entry per claim until vacuum) and join them to the ids,
    at a cost that grows with the table, not with the batch (docs/performance.md)."""
    return f"({column} || '') = '{state}'"


# The payload (data, inline streams) only if it fits in $1 bytes; else data is NULL and
# streams lists the blob refs alone (Task.strip). octet_length reads the size a TOASTed
# value records, not the value.
_FITS = "octet_length(data) + coalesce(octet_length(streams), 0) <= $1::bigint"
_FITS_COLUMNS = (
    f"CASE WHEN {_FITS} THEN data END, CASE WHEN {_FITS} THEN streams ELSE blob_streams END"
)
TASK_COLUMNS_STRIPPED = TASK_COLUMNS.replace("data, streams", _FITS_COLUMNS)
LOAD_WAITING = f"""
SELECT {TASK_COLUMNS_STRIPPED} FROM wsq_tasks
WHERE queue = $2 AND state = 'waiting'
ORDER BY seq LIMIT $3
"""
_CLAIMED_COLUMNS = (
    ", ".join(
        "p.updated AS updated" if name == "updated" else f"t.{name}"
        for name in TASK_COLUMNS.split(", ")
    )
    .replace(
        "t.data, t.streams", re.sub(r"\b(data|streams|blob_streams)\b", r"t.\1", _FITS_COLUMNS)
    )
    .replace("THEN t.data END", "THEN t.data END AS data")
    .replace("t.blob_streams END", "t.blob_streams END AS streams")
)
# The oldest due waiting tasks of a queue, one per worker slot ($4), locked as they are
# read so that concurrent claims of other nodes skip them instead of waiting; the n-th
# (by seq) goes to the n-th slot. RETURNING gives the rows as updated, but for
# ``updated``: the value before (when the task was queued), from the locked subquery.
CLAIM_WAITING = f"""
WITH picked AS (
    SELECT id, updated, row_number() OVER (ORDER BY seq) AS slot FROM (
        SELECT id, seq, updated FROM wsq_tasks
        WHERE queue = $2 AND state = 'waiting' AND not_before <= $3
        ORDER BY seq LIMIT cardinality($4::text[])
        FOR UPDATE SKIP LOCKED
    ) locked
), claimed AS (
    UPDATE wsq_tasks t
    SET state = 'active', run = t.run + 1, worker = ($4::text[])[p.slot], updated = $3,
        not_before = 0, node = $5
    FROM picked p WHERE t.id = p.id
    RETURNING {_CLAIMED_COLUMNS}
), cnt AS (
    INSERT INTO wsq_counts (node, queue, state, n)
    SELECT $5::text, $2, s.state, s.d * (SELECT count(*) FROM claimed)
    FROM (VALUES ('waiting', -1), ('active', 1)) AS s (state, d)
    WHERE EXISTS (SELECT 1 FROM claimed)
    ON CONFLICT (node, queue, state) DO UPDATE SET n = wsq_counts.n + excluded.n
)
SELECT * FROM claimed
"""
GET_TASK = f"SELECT {TASK_COLUMNS} FROM wsq_tasks WHERE id = $1"
GET_TASKS = f"SELECT {TASK_COLUMNS} FROM wsq_tasks WHERE id = ANY($1::text[])"
# Listings show no payloads (Task.to_json): they read none, so that a page of large tasks
# costs what a page of small ones does.
LISTED_COLUMNS = TASK_COLUMNS.replace("data, streams,", "NULL, NULL,")


def _merged_by_state(where: str) -> str:
    """The first tasks by seq of those matching ``where`` (an SQL condition and ``AND``,
    or nothing): the first of each state, merged (a Merge Append of four index range
    scans) rather than a sort of every match."""
    first = (
        f"(SELECT {LISTED_COLUMNS} FROM wsq_tasks WHERE {where}state = '{{state}}'"
        " AND seq > $1 ORDER BY seq LIMIT $2)"
    )
    return " UNION ALL ".join(first.format(state=s.value) for s in State) + " ORDER BY seq LIMIT $2"


# Every queue's, from (state, seq): no index on seq alone is kept up to date by every
# write (migration 13).
LIST_TASKS = _merged_by_state("")
LIST_TASKS_IN_STATE = (
    f"SELECT {LISTED_COLUMNS} FROM wsq_tasks WHERE state = $3 AND seq > $1 ORDER BY seq LIMIT $2"
)
LIST_TASKS_OF_QUEUE_IN_STATE = f"""
SELECT {LISTED_COLUMNS} FROM wsq_tasks
WHERE queue = $3 AND state = $4 AND seq > $1
ORDER BY seq LIMIT $2
"""
LIST_TASKS_OF_QUEUE = _merged_by_state("queue = $3 AND ")  # from (queue, state, seq)
GET_BLOB_KEYS = "SELECT key FROM wsq_blobs WHERE NOT swept"
ATTEMPT_COLUMNS = (
    "task, run, worker, client, node, offered, started, ended, outcome, error, progress"
)
# A task's attempts: those recorded apart, then the record its row holds of its completed
# last run, if any (Update.attempt; "last" tells them apart). One statement, one snapshot.
GET_ATTEMPTS = f"""
SELECT false AS last, {ATTEMPT_COLUMNS} FROM wsq_attempts WHERE task = $1
UNION ALL
SELECT true, id, run, worker, last_client, last_node, last_offered, last_started, last_ended,
    'completed', NULL, last_progress
FROM wsq_tasks WHERE id = $1 AND last_ended IS NOT NULL
ORDER BY last, run
"""

# Queue names by a loose index scan: one index probe per distinct queue.
_QUEUE_NAMES = """
WITH RECURSIVE names (queue) AS (
    (SELECT queue FROM wsq_tasks ORDER BY queue LIMIT 1)
    UNION ALL
    SELECT (SELECT queue FROM wsq_tasks WHERE queue > names.queue ORDER BY queue LIMIT 1)
    FROM names WHERE names.queue IS NOT NULL
)
"""
GET_QUEUES = _QUEUE_NAMES + "SELECT queue FROM names WHERE queue IS NOT NULL ORDER BY queue"
GET_WAITING_QUEUES = (
    _QUEUE_NAMES
    + """SELECT queue FROM names
WHERE queue IS NOT NULL
  AND EXISTS (SELECT 1 FROM wsq_tasks t WHERE t.queue = names.queue AND t.state = 'waiting')
ORDER BY queue"""
)
# The last seq of each state, from the end of its range of (state, seq).
GET_NEXT_SEQ = (
    "SELECT coalesce(max(last), 0) + 1 FROM ("
    + " UNION ALL ".join(
        f"SELECT max(seq) AS last FROM wsq_tasks WHERE state = '{state.value}'" for state in State
    )
    + ") AS s"
)
GET_COUNTS = (
    "SELECT queue, state, sum(n)::bigint FROM wsq_counts GROUP BY queue, state HAVING sum(n) <> 0"
)
GET_STORE_ID = "SELECT value FROM wsq_meta WHERE key = 'store_id'"
# -- leases (migration 5): a node's row, renewed; a dead node's runs taken over ----------------

# The lease on the node's name, unless a live instance holds it (then no row comes back),
# with the node's index (migration 7): the one its row had, else the smallest free one.
# Two nodes taking the same free index at once: the second fails on the unique index and
# tries again. NULL: all MAX_NODE_INDEX are taken.
TAKE_LEASE = """
INSERT INTO wsq_nodes (name, instance, expires, idx)
VALUES ($1, $2, now() + make_interval(secs => $3), (
    SELECT min(i) FROM generate_series(1, $4::int) AS i
    WHERE NOT EXISTS (SELECT 1 FROM wsq_nodes n WHERE n.idx = i)))
ON CONFLICT (name) DO UPDATE SET instance = excluded.instance, expires = excluded.expires,
    idx = coalesce(wsq_nodes.idx, excluded.idx), alone = false, ended = false
WHERE wsq_nodes.expires < now() OR wsq_nodes.instance = excluded.instance
RETURNING idx
"""
RENEW_LEASE = """
UPDATE wsq_nodes SET expires = now() + make_interval(secs => $3)
WHERE name = $1 AND instance = $2 RETURNING name
"""
# -- a node alone (migration 11) -------------------------------------------------------------

# Held (per transaction) by a node turning alone and by a node asking lone nodes to stop.
ALONE_LOCK = "SELECT pg_advisory_xact_lock($1, hashtext(current_setting('search_path')))"
ALONE_KEY = 0x77737101
# Unless another node is alive, or one died (its lease ran out, not ended) less than $3
# seconds ago: it may be alive after all, and read the records it missed (RECORDS_KEPT).
BECOME_ALONE = """
UPDATE wsq_nodes SET alone = true
WHERE name = $1 AND instance = $2 AND alone = false
  AND NOT EXISTS (SELECT 1 FROM wsq_nodes o WHERE o.name <> $1
                  AND (o.expires >= now()
                       OR (NOT o.ended AND o.expires >= now() - make_interval(secs => $3))))
  AND NOT EXISTS (SELECT 1 FROM wsq_meta WHERE key = 'node_died'
                  AND value::timestamptz >= now() - make_interval(secs => $3))
"""
NODE_DIED = """
INSERT INTO wsq_meta (key, value) VALUES ('node_died', now()::text)
ON CONFLICT (key) DO UPDATE SET value = excluded.value
"""
GET_ALONE = "SELECT alone FROM wsq_nodes WHERE name = $1 AND instance = $2"
ASK_NOT_ALONE = (
    "UPDATE wsq_nodes SET alone = NULL WHERE name <> $1 AND alone AND expires >= now()"
    " RETURNING name"
)
STILL_ALONE = "SELECT name FROM wsq_nodes WHERE name <> $1 AND alone IS NULL AND expires >= now()"
END_ALONE = (
    "UPDATE wsq_nodes SET alone = false"
    " WHERE name = $1 AND instance = $2 AND alone IS DISTINCT FROM false"
)
# A node closing ends its lease now, so that another takes its runs over at once.
END_LEASE = (
    "UPDATE wsq_nodes SET expires = now() - interval '1 second', ended = true"
    " WHERE name = $1 AND instance = $2"
)
# Leases that ran out: their nodes are dead. Deleting them decides who takes over: of two
# nodes deleting one row, the second finds none.
DROP_EXPIRED = "DELETE FROM wsq_nodes WHERE expires < now() AND name <> $1 RETURNING name, ended"
# Active runs of the nodes in $3 (dead ones) become this node's ($2); $1 as in _FITS.
ADOPT_RUNS = f"""
UPDATE wsq_tasks SET node = $2
WHERE state = 'active' AND node = ANY($3::text[])
RETURNING {TASK_COLUMNS_STRIPPED}
"""
# At start: this node's own runs from an earlier life, and those of nodes that hold no
# live lease (dead before anyone noticed; NULL: written before leases existed).
ADOPT_ORPHANS = f"""
UPDATE wsq_tasks SET node = $2
WHERE state = 'active'
  AND (node IS NULL OR node = $2
       OR node NOT IN (SELECT name FROM wsq_nodes WHERE expires >= now()))
RETURNING {TASK_COLUMNS_STRIPPED}
"""
# Runs a worker that moved here reports for (AdoptRuns): this node's from now on.
ADOPT_REPORTED = f"""
UPDATE wsq_tasks SET node = $2
FROM unnest($3::text[], $4::bigint[]) AS r (rid, rrun)
WHERE id = r.rid AND run = r.rrun AND {_state_is("state", "active")} AND worker = ANY($5::text[])
RETURNING {TASK_COLUMNS_STRIPPED}
"""
# -- workers (migration 8): each node's, for the other nodes' listings ------------------------

PUT_WORKERS = """
INSERT INTO wsq_workers (node, key, name, queue, concurrency, since, client, peer)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int[],
                     $6::float8[], $7::bytea[], $8::text[])
ON CONFLICT (node, key) DO UPDATE SET holder = excluded.holder, name = excluded.name,
    queue = excluded.queue, concurrency = excluded.concurrency, since = excluded.since,
    client = excluded.client, peer = excluded.peer
"""
DROP_WORKERS = "DELETE FROM wsq_workers WHERE node = $1 AND key = ANY($2::text[])"
DROP_ALL_WORKERS = "DELETE FROM wsq_workers WHERE node = $1"
# At start: this node's rows from an earlier life, and those of nodes with no live lease.
DROP_ORPHAN_WORKERS = """
DELETE FROM wsq_workers
WHERE holder = $1 OR holder NOT IN (SELECT name FROM wsq_nodes WHERE expires >= now())
"""
DROP_DEAD_WORKERS = "DELETE FROM wsq_workers WHERE holder = ANY($1::text[])"
# -- records (migration 9): what a node whose listener broke reads again ----------------------

CLOSE_GRACE = 1.0
"""Seconds a closing store waits for PostgreSQL to commit what is queued; then the jobs
left fail (never acknowledged) and it closes, so that a node stops in bounded time."""
RECORDS_KEPT = 300.0
"""Seconds the records of wsq_records are kept: a node whose listening connection was
away longer than this misses some (then it says so)."""
DROP_OLD_RECORDS = "DELETE FROM wsq_records WHERE at < now() - make_interval(secs => $1)"
# The records committed since about $1 (an id: from a minute before its time on), or, when
# $1 is none or gone, those since $2 (a time) with a greater id; oldest first: a record
# caused by another is in a transaction that began after the other committed, so this
# order keeps causes first.
GET_RECORDS_SINCE = """
WITH last AS (SELECT at FROM wsq_records WHERE id = $1::bigint)
SELECT id, record FROM wsq_records
WHERE CASE WHEN EXISTS (SELECT 1 FROM last)
           THEN at >= (SELECT at FROM last) - interval '1 minute'
           ELSE at >= $2::timestamptz AND id > coalesce($1::bigint, 0) END
ORDER BY at, id
"""
GET_WORKERS = """
SELECT w.node, w.key, w.name, w.queue, w.concurrency, w.since, w.client, w.peer, w.holder
FROM wsq_workers w JOIN wsq_nodes n ON n.name = w.holder AND n.expires >= now()
ORDER BY w.node, w.key
"""
# The active runs the live nodes hold (the index on node where active), by worker.
GET_WORKER_RUNS = """
SELECT node, worker, id, run, progress FROM wsq_tasks
WHERE state = 'active' AND node = ANY($1::text[]) AND worker IS NOT NULL
ORDER BY seq
"""
# The active runs this node holds (HeldRuns), $2 the node.
GET_HELD = f"""
SELECT {TASK_COLUMNS_STRIPPED} FROM wsq_tasks WHERE state = 'active' AND node = $2
ORDER BY seq
"""
READ_TASKS = f"""
SELECT {TASK_COLUMNS_STRIPPED} FROM wsq_tasks WHERE id = ANY($2::text[]) ORDER BY seq
"""
_NO_PAYLOAD = -1  # as _FITS's parameter: strip every payload
MAX_NODE_INDEX = (1 << NODE_BITS) - 1

# -- one step of writes: a statement of data-modifying CTEs ------------------------------------

# Each kind of write, as a CTE over arrays that returns the ids it applied to. ``{p}``
# numbers its parameters from where the previous CTEs' left off. Writes to an active run
# apply only on the node holding it (_MINE: the write connection's wsq.node): once another
# node took the run over (its worker moved there, or this node's lease ran out), what
# this node still decides about it (a timeout, say) changes nothing.
# -- uploads in progress (migration 10): a blob's row before its task's --------------------

SWEPT_STATE = "WQ001"
"""The SQLSTATE of an insert that names a blob whose upload row was swept."""
RESERVE_BLOB = (
    "INSERT INTO wsq_blobs (key, node, instance, since) VALUES ($1, $2, $3, now())"
    " ON CONFLICT (key) DO NOTHING"
)
RELEASE_BLOBS = "DELETE FROM wsq_blobs WHERE key = ANY($1::text[]) AND task IS NULL"
# The uploads of node instances that hold no live lease (dead, or this node's earlier
# life): marked swept, which fences their inserts (_INSERT_CTE). Swept rows a day old go.
SWEEP_UPLOADS = """
UPDATE wsq_blobs b SET swept = true, since = now()
WHERE task IS NULL AND NOT swept
  AND NOT EXISTS (SELECT 1 FROM wsq_nodes n
                  WHERE n.name = b.node AND n.instance = b.instance AND n.expires >= now())
RETURNING key
"""
DROP_SWEPT = "DELETE FROM wsq_blobs WHERE swept AND since < now() - interval '1 day'"
_MINE = "t.node IS NOT DISTINCT FROM nullif(current_setting('wsq.node', true), '')"


def _rows(numbers: Sequence[str], types: Sequence[str], names: Sequence[str]) -> str:
    """A FROM item of a step's rows of one kind: the element ``i`` of each array
    parameter (``numbers``, of ``types``) in row ``i``, the columns called ``names``. An
    array of one element stands for that value in every row (:func:`_columns`: a column
    the same in all rows travels as one value), except the first, which sets the rows."""
    arrays = [f"{number}::{type_}[]" for number, type_ in zip(numbers, types, strict=True)]
    columns = [f"u.{names[0]}"] + [
        f"CASE WHEN cardinality({array}) = 1 THEN ({array})[1] ELSE u.{name} END AS {name}"
        for array, name in zip(arrays[1:], names[1:], strict=True)
    ]
    unnest = f"unnest({', '.join(arrays)}) AS u ({', '.join(names)})"
    return f"(SELECT {', '.join(columns)} FROM {unnest})"


# Each kind of write, as a CTE over {rows} (_rows) that returns the ids it applied to;
# {e0}, {e1}: further array parameters of the kind, unnested as they are.
_INSERT_CTE = (
    "ins AS (INSERT INTO wsq_tasks (" + INSERT_COLUMNS + ") SELECT * FROM {rows} AS r"
    " ON CONFLICT (id) DO NOTHING RETURNING id, queue, state),"
    " ins_blobs AS (INSERT INTO wsq_blobs (key, task)"
    " SELECT b.key, b.task FROM unnest({e0}::text[], {e1}::text[]) AS b (key, task)"
    " WHERE b.task IN (SELECT id FROM ins) ON CONFLICT (key) DO UPDATE SET"
    " task = excluded.task, node = NULL, instance = NULL, since = NULL"
    " WHERE wsq_blobs.task IS NULL AND NOT wsq_blobs.swept RETURNING key),"
    # A blob whose upload row was swept (its node's lease ran out: the blob is deleted):
    # the whole insert fails, so that no task references it (migration 10).
    " ins_fence AS (SELECT wsq_fail('" + SWEPT_STATE + "', 'blob ' || b.key || ' was swept')"
    " AS x FROM unnest({e0}::text[], {e1}::text[]) AS b (key, task)"
    " WHERE b.task IN (SELECT id FROM ins) AND b.key NOT IN (SELECT key FROM ins_blobs))"
)
_START_CTE = (
    "start AS (UPDATE wsq_tasks t SET state = 'active', run = s.run, worker = s.worker,"
    " updated = s.updated, node = nullif(current_setting('wsq.node', true), '')"
    " FROM {rows} AS s"
    f" WHERE t.id = s.id AND {_state_is('t.state', 'waiting')} RETURNING t.id, t.queue)"
)
# A completed run's record goes in the row (Update.attempt; NULLs for any other end).
_FINISH_CTE = (
    "finish AS (UPDATE wsq_tasks t SET state = f.state, progress = f.progress,"
    " retries = f.retries, error = f.error, updated = f.updated, last_client = f.client,"
    " last_node = f.node, last_offered = f.offered, last_started = f.started,"
    " last_ended = f.ended, last_progress = f.last_progress"
    " FROM {rows} AS f"
    f" WHERE t.id = f.id AND {_state_is('t.state', 'active')} AND t.run = f.run AND {_MINE}"
    " RETURNING t.id, t.queue, t.state)"
)
# An update out of 'active' applies only to the same run, on the node holding it.
_UPDATE_CTE = (
    "upd AS (UPDATE wsq_tasks t SET state = u.state, seq = u.seq, progress = u.progress,"
    " retries = u.retries, error = u.error, run = u.run, worker = u.worker,"
    " updated = u.updated, not_before = u.not_before"
    " FROM {rows} AS u"
    " WHERE t.id = u.id AND (t.state || '') = u.expected"
    f" AND (u.expected <> 'active' OR (t.run = u.run AND {_MINE}))"
    " RETURNING t.id, t.queue, u.expected, t.state)"
)
_PROGRESS_CTE = (
    "prog AS (UPDATE wsq_tasks t SET progress = p.progress, updated = p.updated"
    " FROM {rows} AS p"
    f" WHERE t.id = p.id AND {_state_is('t.state', 'active')} AND {_MINE} RETURNING t.id)"
)
_DELETE_CTE = (
    "del AS (DELETE FROM wsq_tasks t USING {rows} AS d"
    " WHERE t.id = d.id AND (d.expected IS NULL OR t.state = d.expected)"
    " RETURNING t.id, t.queue, t.state),"
    " del_blobs AS (DELETE FROM wsq_blobs WHERE task IN (SELECT id FROM del)),"
    " del_attempts AS (DELETE FROM wsq_attempts WHERE task IN (SELECT id FROM del))"
)
# Attempts of tasks that exist (as of the statement's snapshot: Writes.add keeps a task's
# insert or delete out of a step that records its attempt), then the runs past the bound.
_ATTEMPT_CTE = (
    "att AS (INSERT INTO wsq_attempts (" + ATTEMPT_COLUMNS + ") SELECT a.* FROM {rows} AS a"
    " WHERE EXISTS (SELECT 1 FROM wsq_tasks t WHERE t.id = a.task)"
    " ON CONFLICT (task, run) DO UPDATE SET worker = excluded.worker,"
    " client = excluded.client, node = excluded.node, offered = excluded.offered,"
    " started = excluded.started, ended = excluded.ended, outcome = excluded.outcome,"
    " error = excluded.error, progress = excluded.progress RETURNING task AS id),"
    " att_prune AS (DELETE FROM wsq_attempts w USING {rows} AS x"
    f" WHERE x.run > {KEPT_ATTEMPTS}"  # else no older run is past the bound
    f" AND w.task = x.task AND w.run <= x.run - {KEPT_ATTEMPTS})"
)


@dataclass(frozen=True, slots=True)
class _Kind:
    cte: str
    name: str  # of the CTE returning the ids applied
    types: tuple[str, ...]  # of the rows' columns, one array parameter each
    names: tuple[str, ...]
    extra: int = 0  # array parameters after the rows' ({e0}, ...)


def _kind(cte: str, name: str, columns: str, extra: int = 0) -> _Kind:
    """A kind whose rows' columns are ``columns``: "name type, ..."."""
    pairs = [column.split() for column in columns.split(",")]
    return _Kind(cte, name, tuple(t for _, t in pairs), tuple(n for n, _ in pairs), extra)


_KINDS: dict[str, _Kind] = {
    "insert": _Kind(
        _INSERT_CTE, "ins", INSERT_TYPES, tuple(INSERT_COLUMNS.replace(" ", "").split(",")), 2
    ),
    "start": _kind(_START_CTE, "start", "id text, run bigint, worker text, updated float8"),
    "finish": _kind(
        _FINISH_CTE,
        "finish",
        "id text, state text, progress float8, retries bigint, error bytea, updated float8,"
        " run bigint, client bytea, node text, offered float8, started float8,"
        " ended float8, last_progress float8",
    ),
    "update": _kind(
        _UPDATE_CTE,
        "upd",
        "id text, expected text, state text, seq bigint, progress float8, retries bigint,"
        " error bytea, run bigint, worker text, updated float8, not_before float8",
    ),
    "progress": _kind(_PROGRESS_CTE, "prog", "id text, progress float8, updated float8"),
    "delete": _kind(_DELETE_CTE, "del", "id text, expected text"),
    "attempt": _kind(
        _ATTEMPT_CTE,
        "att",
        "task text, run bigint, worker text, client bytea, node text, offered float8,"
        " started float8, ended float8, outcome text, error bytea, progress float8",
    ),
}
_KIND_CODES = {kind: code for code, kind in enumerate(_KINDS)}
NOTIFIED = -1  # the kind code of the rows the notifications add to a step's result

# How each kind moves the counts of wsq_counts: (queue, state, delta) rows from the CTE's
# RETURNING. Progress moves none.
_DELTAS = {
    "insert": "SELECT queue, state, 1 FROM ins",
    "start": (
        "SELECT queue, 'waiting', -1 FROM start UNION ALL SELECT queue, 'active', 1 FROM start"
    ),
    "finish": (
        "SELECT queue, 'active', -1 FROM finish UNION ALL SELECT queue, state, 1 FROM finish"
    ),
    "update": "SELECT queue, expected, -1 FROM upd UNION ALL SELECT queue, state, 1 FROM upd",
    "delete": "SELECT queue, state, -1 FROM del",
}
# A node adds the moves it makes to its own rows of wsq_counts, so that nodes never wait
# for each other's row locks there; the counts are the sums over nodes.
_COUNT_CTE = (
    "cnt AS (INSERT INTO wsq_counts (node, queue, state, n)"
    " SELECT {node}::text, queue, state, sum(d) FROM ({deltas}) AS x (queue, state, d)"
    " GROUP BY queue, state"
    " ON CONFLICT (node, queue, state) DO UPDATE SET n = wsq_counts.n + excluded.n)"
)
# Records for the other nodes, kept in wsq_records (for a node that missed them: see
# _Listener) and sent as "<id> <record>" in the statement's transaction: delivered once it
# commits, in commit order, and never if it does not. Each is made of the notes of one
# chunk (head || the bodies, comma-joined || tail), leaving out the notes tied to a write
# of the statement that did not apply (code and id: a row of "app"); a record of notes
# none of which is left is not made.
_NOTIFY_CTE = (
    "app (code, id) AS ({applied}),"
    " rec AS (INSERT INTO wsq_records (record)"
    " SELECT n.head || string_agg(n.body, ',' ORDER BY n.i) || n.tail"
    " FROM unnest({p0}::text[], {p1}::text[], {p2}::text[], {p3}::int[], {p4}::int[],"
    " {p5}::text[]) WITH ORDINALITY AS n (head, body, tail, chunk, code, id, i)"
    " WHERE n.code IS NULL OR (n.code, n.id) IN (SELECT code, id FROM app)"
    " GROUP BY n.chunk, n.head, n.tail ORDER BY n.chunk"
    " RETURNING id, record),"
    " ntf AS (SELECT pg_notify({channel}::text, id::text || ' ' || record)"
    " FROM (SELECT id, record FROM rec ORDER BY id) AS o)"
)


def moves_counts(kinds: Sequence[str]) -> bool:
    return any(kind in _DELTAS for kind in kinds)


@functools.lru_cache(maxsize=128)
def write_statement(kinds: tuple[str, ...], notify: bool = False) -> str:
    """The statement applying one step holding ops of ``kinds`` (in :data:`_KINDS` order):
    its rows are ``(kind code, id)`` for every op that applied. Its parameters are those
    of the kinds, then the node whose counts it moves (if a kind moves any:
    :func:`moves_counts`), then, with ``notify``, the channel and the notes of the records
    to send there (:attr:`Writes.notes`, as six arrays; a row ``(NOTIFIED, '')`` per
    record sent)."""
    ctes = []
    selects = []
    applied = []
    next_param = 1
    for kind in kinds:
        spec = _KINDS[kind]
        count = len(spec.types) + spec.extra
        numbers = [f"${n}" for n in range(next_param, next_param + count)]
        rows = _rows(numbers[: len(spec.types)], spec.types, spec.names)
        extra = {f"e{i}": number for i, number in enumerate(numbers[len(spec.types) :])}
        ctes.append(spec.cte.format(rows=rows, **extra))
        selects.append(f"SELECT {_KIND_CODES[kind]}, id FROM {spec.name}")
        applied.append(selects[-1])
        if kind == "insert":  # never a row: evaluated so that it may raise
            selects.append(f"SELECT {NOTIFIED}, NULL FROM ins_fence WHERE x IS NULL")
        next_param += count
    deltas = [_DELTAS[kind] for kind in kinds if kind in _DELTAS]
    if deltas:
        ctes.append(_COUNT_CTE.format(node=f"${next_param}", deltas=" UNION ALL ".join(deltas)))
        next_param += 1
    if notify:
        named = {f"p{i}": f"${next_param + 1 + i}" for i in range(6)}
        applied_sql = " UNION ALL ".join(applied) or "SELECT NULL::int, NULL::text WHERE false"
        ctes.append(_NOTIFY_CTE.format(channel=f"${next_param}", applied=applied_sql, **named))
        selects.append(f"SELECT {NOTIFIED}, '' FROM ntf")
    return "WITH " + ", ".join(ctes) + " " + " UNION ALL ".join(selects)


# -- rows -----------------------------------------------------------------------------------


def _column(values: tuple[Any, ...]) -> tuple[Any, ...]:
    """A column of a step's rows as its array parameter: one element if every row holds
    the same value (_rows), which spares encoding and decoding it once per row (all but
    the task ids and a few more columns, in a batch of new tasks)."""
    return values[:1] if values.count(values[0]) == len(values) else values


_encode_json = msgspec.json.Encoder().encode
_FINISHED = (State.COMPLETED, State.FAILED)


def _text(value: str | None) -> bytes | None:
    """An error message as stored (UTF-8 bytes: PostgreSQL text cannot hold NUL)."""
    return None if value is None else value.encode("utf-8", "surrogatepass")


def _untext(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", "surrogatepass")


def _insert_row(task: Task) -> tuple[Any, ...]:
    """``task`` in :data:`INSERT_COLUMNS` order."""
    streams = blob_streams = None
    if task.streams:
        streams = _encode_json(task.streams).decode()
        blobs = [ref for ref in task.streams if ref.blob is not None]
        blob_streams = _encode_json(blobs).decode() if blobs else None
    options = task.options
    return (
        task.id,
        task.queue,
        STATE_TEXT[task.state],
        task.seq,
        task.data,
        streams,
        blob_streams,
        options.timeout,
        options.retries,
        bool(options.autoremove),
        task.progress,
        task.retries,
        _text(task.error),
        task.run,
        task.worker,
        task.created,
        task.updated,
        task.owner,
        task.not_before,
    )


def _counts(rows: Sequence[asyncpg.Record]) -> dict[tuple[str, State], int]:
    """Rows of :data:`GET_COUNTS` as tasks per (queue, state)."""
    return {(queue, STATES[state]): n for queue, state, n in rows}


def _task_from_row(row: asyncpg.Record) -> Task:
    """The :class:`Task` in a row selected as :data:`TASK_COLUMNS`."""
    return task_from_row(row, _untext(row[11]))


# -- planning a batch -----------------------------------------------------------------------


@dataclass(slots=True)
class Writes:
    """Write ops on distinct tasks, so that they commute: one statement applies them all.
    ``slots`` is, per op in order, its kind and task id; ``rows`` the parameters per
    kind, one tuple per op."""

    slots: list[tuple[str, str]] = field(default_factory=list)
    rows: dict[str, list[tuple[Any, ...]]] = field(default_factory=dict)
    # For the other nodes (Publish): the notes of the records to send, as (head, body,
    # tail, chunk, kind code, task id), tied by the last two to a write of this step (else
    # None); the number of the next chunk; and the notes tied to a write of an earlier
    # step, with its index among the ops planned (resolve()).
    notes: list[tuple[str, str, str, int, int | None, str | None]] = field(default_factory=list)
    chunks: int = 0
    earlier: list[tuple[int, int]] = field(default_factory=list)
    blobs: list[tuple[str, str]] = field(default_factory=list)  # (key, task) of inserts
    # Task id -> index of its row in rows["progress"] for a SetProgress, else -1.
    ids: dict[str, int] = field(default_factory=dict)
    # Tasks this step records an attempt of, and tasks it inserts or deletes.
    attempted: set[str] = field(default_factory=set)
    made_or_gone: set[str] = field(default_factory=set)

    def add(self, kind: str, task_id: str, row: tuple[Any, ...]) -> bool:
        """Take the op, unless this step already writes to its task: then only a progress
        after a progress is taken (a worker's reports come in runs): the later value
        replaces the earlier, and both apply or neither (nothing between them here).
        An attempt goes with its task's other writes (the core sends it right after the
        task's Update), but not with its insert or delete, nor with another attempt. A
        refused op starts a new step (:func:`plan`): this one takes nothing more."""
        if kind == "attempt":
            return self._add_attempt(task_id, row)
        if kind in ("insert", "delete"):
            if task_id in self.attempted:
                return False
            self.made_or_gone.add(task_id)
        index = self.ids.get(task_id)
        if index is not None:
            if kind != "progress" or index < 0:
                return False
            self.rows[kind][index] = row
        else:
            rows = self.rows.setdefault(kind, [])
            self.ids[task_id] = len(rows) if kind == "progress" else -1
            rows.append(row)
        self.slots.append((kind, task_id))
        return True

    def _add_attempt(self, task_id: str, row: tuple[Any, ...]) -> bool:
        if task_id in self.attempted or task_id in self.made_or_gone:
            return False
        self.attempted.add(task_id)
        self.rows.setdefault("attempt", []).append(row)
        self.slots.append(("attempt", task_id))
        return True

    def publish(self, op: Publish, located: list[tuple[int, str, str] | None], here: int) -> None:
        """Take ``op``'s events as notes; ``located``: for each op planned so far, the
        step, kind and task of the write it became (``None``: no write), so that an
        event's tie (an index into them) is known; ``here``: this step's number."""
        first = self.chunks
        for body, chunk, index in op.events:
            code = task_id = None
            where = located[index] if index is not None and 0 <= index < len(located) else None
            if where is not None and index is not None:
                step, kind, task_id = where
                if step == here:
                    code = _KIND_CODES[kind]
                else:  # known once that step has run (resolve())
                    self.earlier.append((len(self.notes), index))
                    task_id = None
            self.notes.append((op.head, body, op.tail, first + chunk, code, task_id))
            self.chunks = max(self.chunks, first + chunk + 1)

    def resolve(self, results: Sequence[Any]) -> None:
        """Leave out the notes tied to a write of an earlier step that did not apply
        (``results``: those of the ops planned before this step, in order)."""
        dropped = {at for at, index in self.earlier if results[index] is False}
        self.notes = [note for at, note in enumerate(self.notes) if at not in dropped]
        self.earlier.clear()

    def statement(self, node: str = "", channel: str = "") -> tuple[str, list[Any]]:
        """The SQL and its parameters; ``node`` names the counts it moves, ``channel``
        is where its :attr:`notes` go."""
        kinds = tuple(kind for kind in _KINDS if kind in self.rows)
        params: list[Any] = []
        for kind in kinds:
            params.extend(map(_column, zip(*self.rows[kind], strict=True)))
            if kind == "insert":
                params.append([key for key, _ in self.blobs])
                params.append([task for _, task in self.blobs])
        if moves_counts(kinds):
            params.append(node)
        if self.notes:
            params.append(channel)
            params.extend(list(column) for column in zip(*self.notes, strict=True))
        return write_statement(kinds, bool(self.notes)), params


@dataclass(slots=True)
class WorkerWrites:
    """A run of :class:`PutWorker` ops (one statement), or one :class:`DropWorkers`."""

    puts: list[WorkerRow] = field(default_factory=list)
    drop: DropWorkers | None = None


Step = (
    Writes
    | LoadWaiting
    | ClaimWaiting
    | AdoptRuns
    | HeldRuns
    | CountTasks
    | ReadTasks
    | WorkerWrites
)


def _write(op: Op) -> tuple[str, str, tuple[Any, ...]]:
    """``op`` as ``(kind, task id, parameters)``; TypeError if it is no write op."""
    match op:
        case Insert(task):
            return "insert", task.id, _insert_row(task)
        case Update(task, expected, attempt):
            if expected is State.WAITING and task.state is State.ACTIVE:
                return "start", task.id, (task.id, task.run, task.worker, task.updated)
            if expected is State.ACTIVE and task.state in _FINISHED:
                finish = (STATE_TEXT[task.state], task.progress, task.retries, _text(task.error))
                last = _NO_LAST if attempt is None else _last_row(attempt)
                return "finish", task.id, (task.id, *finish, task.updated, task.run, *last)
            return "update", task.id, _update_row(task, State(expected))
        case SetProgress(task_id, progress, updated):
            return "progress", task_id, (task_id, progress, updated)
        case Delete(task_id, expected):
            return "delete", task_id, (task_id, None if expected is None else expected.value)
        case RecordAttempt(attempt):
            return "attempt", attempt.task_id, _attempt_row(attempt)
    raise TypeError(f"Not a state store op: {op!r}")


def _attempt_row(attempt: Attempt) -> tuple[Any, ...]:
    """``attempt`` in :data:`ATTEMPT_COLUMNS` order."""
    outcome = None if attempt.outcome is None else AttemptOutcome(attempt.outcome).value
    return (
        attempt.task_id,
        clamp(attempt.run),
        attempt.worker,
        _text(attempt.client),
        attempt.node,
        attempt.offered,
        attempt.started,
        attempt.ended,
        outcome,
        _text(attempt.error),
        attempt.progress,
    )


_NO_LAST = (None,) * 6  # a finish's last_* when its Update carries no attempt


def _last_row(attempt: Attempt) -> tuple[Any, ...]:
    """A completed run's record as a finish's last_* parameters (:class:`Update`)."""
    return (
        _text(attempt.client),
        attempt.node,
        attempt.offered,
        attempt.started,
        attempt.ended,
        attempt.progress,
    )


def _attempt_from_row(row: asyncpg.Record) -> Attempt:
    """The :class:`Attempt` in a row selected as :data:`ATTEMPT_COLUMNS`."""
    task, run, worker, client, node, offered, started, ended, outcome, error, progress = row
    return Attempt(
        task, run, worker, _untext(client), node, offered, started, ended,
        AttemptOutcome(outcome), _untext(error), progress,
    )  # fmt: skip


def _update_row(task: Task, expected: State) -> tuple[Any, ...]:
    return (
        task.id,
        expected.value,
        State(task.state).value,
        task.seq,
        task.progress,
        task.retries,
        _text(task.error),
        task.run,
        task.worker,
        task.updated,
        task.not_before,
    )


def plan(ops: Sequence[Op]) -> list[Step]:
    """``ops`` as steps to run in order: each :class:`LoadWaiting` alone, and between them
    runs of writes on distinct tasks (a second write to a task starts a new run, but for
    progress after progress: :meth:`Writes.add`). Raises
    TypeError for something that is no op (before anything runs)."""
    steps: list[Step] = []
    writes: Writes | None = None
    # Per op planned: the step, kind and task of the write it became (None: no write).
    located: list[tuple[int, str, str] | None] = []
    for op in ops:
        located.append(None)
        if type(op) not in _WRITE_OPS:
            writes = _plan_other(op, steps, writes, located)
            continue
        kind, task_id, row = _write(op)
        if writes is None or not writes.add(kind, task_id, row):
            writes = Writes()
            steps.append(writes)
            writes.add(kind, task_id, row)
        located[-1] = (len(steps) - 1, kind, task_id)
        if kind == "insert" and isinstance(op, Insert) and op.task.streams:
            writes.blobs.extend((key, task_id) for key in op.task.blobs)
    return steps


# The ops that are writes of a step (Writes), most of a batch: told apart by exact type
# (these classes have none of their own), quicker than a chain of isinstance.
_WRITE_OPS = frozenset((Insert, Update, SetProgress, Delete, RecordAttempt))


def _plan_other(
    op: Op, steps: list[Step], writes: Writes | None, located: list[tuple[int, str, str] | None]
) -> Writes | None:
    """Plan ``op``, no write (:func:`plan`); return the step of writes open after it."""
    if isinstance(op, LoadWaiting | ClaimWaiting | AdoptRuns | HeldRuns | CountTasks | ReadTasks):
        steps.append(op)
        return None
    if isinstance(op, PutWorker):
        last = steps[-1] if steps else None
        if isinstance(last, WorkerWrites) and last.drop is None:
            last.puts.append(op.worker)
        else:
            steps.append(WorkerWrites([op.worker]))
        return None
    if isinstance(op, DropWorkers):
        steps.append(WorkerWrites(drop=op))
        return None
    if isinstance(op, Publish):
        # Sent at commit whichever statement sends it: it joins the current step.
        if writes is None:
            writes = Writes()
            steps.append(writes)
        writes.publish(op, located, len(steps) - 1)
        writes.slots.append(("publish", ""))
        return writes
    raise TypeError(f"Not a state store op: {op!r}")


async def _run_step(
    conn: asyncpg.Connection, step: Step, node: str = "", channel: str = ""
) -> builtins.list[Any]:
    """Results of the ops of ``step``, run on ``conn``; ``node`` and ``channel`` as for
    :meth:`Writes.statement`."""
    if isinstance(step, LoadWaiting):
        fits = MAX_INT if step.max_payload is None else clamp(step.max_payload)
        rows = await conn.fetch(LOAD_WAITING, fits, step.queue, clamp(max(step.limit, 0)))
        return [[_task_from_row(row) for row in rows]]
    if isinstance(step, ClaimWaiting):
        fits = MAX_INT if step.max_payload is None else clamp(step.max_payload)
        args = (fits, step.queue, step.now, list(step.workers), node)
        rows = await conn.fetch(CLAIM_WAITING, *args)
        return [sorted((_task_from_row(row) for row in rows), key=lambda t: t.seq)]
    if isinstance(step, AdoptRuns):
        ids = [task_id for task_id, _ in step.runs]
        runs = [clamp(run) for _, run in step.runs]
        workers = list(step.workers)
        rows = await conn.fetch(ADOPT_REPORTED, _NO_PAYLOAD, node, ids, runs, workers)
        return [sorted((_task_from_row(row) for row in rows), key=lambda t: t.seq)]
    if isinstance(step, CountTasks):
        return [_counts(await conn.fetch(GET_COUNTS))]
    if isinstance(step, HeldRuns):
        rows = await conn.fetch(GET_HELD, _NO_PAYLOAD, node)
        return [[_task_from_row(row) for row in rows]]
    if isinstance(step, ReadTasks):
        rows = await conn.fetch(READ_TASKS, _NO_PAYLOAD, list(step.ids))
        return [[_task_from_row(row) for row in rows]]
    if isinstance(step, WorkerWrites):
        return await _write_workers(conn, step)
    sql, params = step.statement(node, channel)
    applied = {(row[0], row[1]) for row in await conn.fetch(sql, *params)}
    return [
        None if kind == "publish" else (_KIND_CODES[kind], task_id) in applied
        for kind, task_id in step.slots
    ]


async def _write_workers(conn: asyncpg.Connection, step: WorkerWrites) -> builtins.list[Any]:
    if step.drop is not None:
        if step.drop.keys is None:
            await conn.execute(DROP_ALL_WORKERS, step.drop.node)
        else:
            await conn.execute(DROP_WORKERS, step.drop.node, list(step.drop.keys))
        return [None]
    # One row per (node, key): a later put of the same worker in the run replaces it.
    rows = list({(w.node, w.key): w for w in step.puts}.values())
    columns = (
        [w.node for w in rows],
        [w.key for w in rows],
        [w.name for w in rows],
        [w.queue for w in rows],
        [w.concurrency for w in rows],
        [w.since for w in rows],
        [_text(w.client) for w in rows],
        [w.peer for w in rows],
    )
    await conn.execute(PUT_WORKERS, *columns)
    return [None] * len(step.puts)


async def _run_steps(
    conn: asyncpg.Connection, steps: list[Step], node: str = "", channel: str = ""
) -> builtins.list[Any]:
    results: builtins.list[Any] = []
    for step in steps:
        if isinstance(step, Writes) and step.earlier:
            step.resolve(results)
        results += await _run_step(conn, step, node, channel)
    return results


# -- errors and connections -----------------------------------------------------------------

_Reader: TypeAlias = "PoolConnectionProxy[asyncpg.Record]"  # a connection of the read pool
_AnyConnection: TypeAlias = "asyncpg.Connection | _Reader"

# Errors that say PostgreSQL is out of reach or out of service (SQLSTATE classes 08, 53
# and 57), not that an op was wrong: worth trying again later.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InsufficientResourcesError,
    asyncpg.OperatorInterventionError,
    asyncpg.exceptions.ClientCannotConnectError,
)


def _store_error(exc: BaseException, conn: _AnyConnection | None = None) -> BaseException:
    """What a caller sees for ``exc``: Unavailable when PostgreSQL cannot be used now,
    ServerError for its other errors, anything else (a bug, a bad op) as it is."""
    if isinstance(exc, Unavailable | ServerError):
        return exc
    lost = conn is not None and conn.is_closed()
    if isinstance(exc, _UNAVAILABLE) or (lost and isinstance(exc, asyncpg.InterfaceError)):
        reason = "did not answer in time" if isinstance(exc, TimeoutError) else str(exc)
        error: BaseException = Unavailable(f"PostgreSQL is unavailable: {reason}")
    elif getattr(exc, "sqlstate", None) == SWEPT_STATE:
        error = UploadFailed(
            "A stream of this task was discarded while it was stored (this node's lease"
            " had run out, so its uploads were taken for a dead node's); add it again."
        )
    elif isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError):
        error = ServerError(f"State store error: {exc}")
    else:
        return exc
    error.__cause__ = exc
    return error


async def _connect(dsn: str, schema: str | None, timeout: float) -> asyncpg.Connection:
    return await asyncpg.connect(dsn, timeout=timeout, server_settings=_settings(dsn, schema))


def _settings(dsn: str, schema: str | None) -> dict[str, str]:
    """Settings of wsq's sessions: its name in pg_stat_activity unless the DSN gives one,
    and ``schema`` first in the search path when given."""
    settings = {} if "application_name" in dsn else {"application_name": "wsq"}
    if schema is not None:
        settings["search_path"] = quote_ident(schema)
    return settings


# The write connection's statements address rows by key (ids from arrays): index probes
# in nested loops are always their plan, whatever the row estimates of a table that grew
# since it was last analyzed (a hash join over a scan of the whole table, or a scan of
# the whole table per row of a nested loop, costs time that grows with it; see also
# _state_is). A statement with no index to use still scans, at a cost so high that
# PostgreSQL would compile it (JIT, 60 ms and more): no JIT, which never pays for these
# short statements. One generic plan per statement: none re-planned per batch.
_WRITER_PLANS = {
    "enable_hashjoin": "off",
    "enable_mergejoin": "off",
    "enable_seqscan": "off",
    "jit": "off",
    "plan_cache_mode": "force_generic_plan",
}


async def _lease(
    conn: _AnyConnection, node: str, instance: str, lease: float, retry: bool = True
) -> int | None:
    """Take the lease on ``node``'s name (TAKE_LEASE): the node's index, or ``None`` if a
    live instance holds it. ``retry``: outside a transaction, try again when another node
    took the same free index at the same moment."""
    while True:
        try:
            row = await conn.fetchrow(TAKE_LEASE, node, instance, lease, MAX_NODE_INDEX)
        except asyncpg.UniqueViolationError:
            if not retry:
                raise
            continue
        if row is None:
            return None
        if row["idx"] is None:
            raise ServerError(
                f"More than {MAX_NODE_INDEX} wsq nodes hold a lease on this database."
            )
        return int(row["idx"])


async def _recover(conn: asyncpg.Connection, node: str) -> Recovery:
    """What a starting node needs; the active runs it adopts are its own from an earlier
    life and those of nodes with no live lease."""
    async with conn.transaction():
        rows = await conn.fetch(ADOPT_ORPHANS, _NO_PAYLOAD, node)
        await conn.execute(DROP_ORPHAN_WORKERS, node)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        next_seq = await conn.fetchval(GET_NEXT_SEQ)
        waiting = await conn.fetch(GET_WAITING_QUEUES)
        counts = await conn.fetch(GET_COUNTS)
        store_id = await conn.fetchval(GET_STORE_ID)
    return Recovery(
        next_seq=next_seq,
        active=sorted((_task_from_row(row) for row in rows), key=lambda t: t.seq),
        waiting_queues=[name for (name,) in waiting],
        counts=_counts(counts),
        store_id=store_id,
    )


# -- the writer -----------------------------------------------------------------------------

_Outcome = builtins.list[Any] | BaseException


@dataclass(slots=True)
class _Job:
    """One :meth:`PostgresStateStore.submit` call on its way to the writer."""

    ops: tuple[Op, ...]
    future: asyncio.Future[builtins.list[Any]]

    def settle(self, outcome: _Outcome) -> None:
        if self.future.done():  # cancelled by the caller: nobody is waiting
            return
        if isinstance(outcome, BaseException):
            self.future.set_exception(outcome)
        else:
            self.future.set_result(outcome)


def _claims_only(job: _Job) -> bool:
    return bool(job.ops) and all(type(op) is ClaimWaiting for op in job.ops)


class _Writer:
    """The task that owns the write connection; see the module docstring. :meth:`put`
    jobs, then :meth:`stop` once: it returns after the jobs put before it are settled."""

    def __init__(
        self,
        connect: Callable[[], Awaitable[asyncpg.Connection]],
        conn: asyncpg.Connection,
        *,
        batch_max: int,
        timeout: float | None,
        node: str = "",
        channel: str = "",
    ) -> None:
        self.commits = 0  # transactions committed
        self.node = node  # whose rows of wsq_counts its writes move
        self.channel = channel  # where Publish records go
        self.accepting = True
        self._connect = connect
        self._conn: asyncpg.Connection | None = conn
        self._batch_max = batch_max
        self._timeout = timeout
        self._inbox: collections.deque[_Job] = collections.deque()
        self._wake = asyncio.Event()
        self._stopping = False
        self._task = asyncio.get_running_loop().create_task(self._run(), name="wsq-postgres-writer")

    def put(self, job: _Job) -> None:
        self._inbox.append(job)
        self._wake.set()

    async def stop(self, grace: float = math.inf) -> None:
        """Commit what is queued, then stop; after ``grace`` seconds (PostgreSQL does not
        answer), stop at once: the jobs not committed fail (ServerError)."""
        self._stopping = True
        self._wake.set()
        try:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), grace)
            except TimeoutError:
                self._drop()
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        finally:
            self.accepting = False
            conn, self._conn = self._conn, None
            if conn is not None:
                await _close(conn)

    async def _run(self) -> None:
        batch: builtins.list[_Job] = []
        try:
            while self._inbox or not self._stopping:
                if not self._inbox:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                batch = self._take()
                _settle_all(batch, await self._commit(batch))
        except BaseException as exc:  # cancelled, or a bug: nobody may wait forever
            if not isinstance(exc, asyncio.CancelledError):
                _log.exception(
                    "State store writer failed.", extra={"action": "store_writer_failed"}
                )
            self.accepting = False
            for job in [*batch, *self._inbox]:  # settling twice does nothing
                job.settle(ServerError("The state store writer stopped."))
            self._inbox.clear()
            raise

    def _take(self) -> builtins.list[_Job]:
        """The jobs queued, until the batch holds ``batch_max`` ops (one job is never
        split). Jobs of claims only commit apart from the others: a run of them is a
        batch of its own, so that their tasks are offered while the writes queued behind
        them commit (the server sends a node's claims ahead of the writes they may pass:
        docs/architecture.md, "Claims go first")."""
        batch: builtins.list[_Job] = []
        size = 0
        claims = _claims_only(self._inbox[0]) if self._inbox else False
        while self._inbox and (not batch or size + len(self._inbox[0].ops) <= self._batch_max):
            if _claims_only(self._inbox[0]) is not claims:
                break
            job = self._inbox.popleft()
            batch.append(job)
            size += len(job.ops)
        return batch

    async def _commit(self, batch: builtins.list[_Job]) -> builtins.list[_Outcome]:
        """Apply ``batch`` in one transaction; the outcome of each job, in order."""
        conn = self._conn
        try:
            if conn is None or conn.is_closed():
                conn = self._conn = await self._connect()
            async with asyncio.timeout(self._timeout):
                return await self._transact(conn, batch)
        except (Exception, asyncio.CancelledError) as exc:
            error = _store_error(exc, conn)
            if isinstance(error, Unavailable) or isinstance(exc, asyncio.CancelledError):
                self._drop()
            if isinstance(exc, asyncio.CancelledError):
                raise
            return [error] * len(batch)

    def _drop(self) -> None:
        """Forget the connection (its state is unknown); the next batch makes another."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()

    async def _transact(
        self, conn: asyncpg.Connection, batch: builtins.list[_Job]
    ) -> builtins.list[_Outcome]:
        """The fast path runs the whole batch as one plan (one statement when it is one
        step, else one transaction). Only if that raises something other than the
        connection failing is the batch redone job by job, each in its own savepoint."""
        ops = _flatten(batch)
        try:
            steps = plan(ops)
            if len(steps) == 1:
                results = await _run_step(conn, steps[0], self.node, self.channel)
            else:
                async with conn.transaction():
                    results = await _run_steps(conn, steps, self.node, self.channel)
        except Exception as exc:
            if isinstance(_store_error(exc, conn), Unavailable):
                raise
        else:
            self.commits += 1
            return _split(results, batch)
        outcomes: builtins.list[_Outcome] = []
        async with conn.transaction():
            for job in batch:
                outcomes.append(await _apply_job(conn, job.ops, self.node, self.channel))
        self.commits += 1
        return outcomes


async def _apply_job(
    conn: asyncpg.Connection, ops: Sequence[Op], node: str = "", channel: str = ""
) -> _Outcome:
    """Results of ``ops`` in a savepoint, or the exception that stopped them (then none of
    them applied). Raises if the connection failed."""
    try:
        steps = plan(ops)
    except Exception as exc:
        return exc
    try:
        async with conn.transaction():
            return await _run_steps(conn, steps, node, channel)
    except Exception as exc:
        error = _store_error(exc, conn)
        if isinstance(error, Unavailable):
            raise
        return error


def _flatten(batch: builtins.list[_Job]) -> builtins.list[Op]:
    """The ops of the jobs in order, each Publish's ties (indices into its job's ops)
    made indices into all of them."""
    ops: builtins.list[Op] = []
    for job in batch:
        base = len(ops)
        for op in job.ops:
            if base and isinstance(op, Publish) and op.events:
                events = tuple(
                    (body, chunk, None if index is None else base + index)
                    for body, chunk, index in op.events
                )
                op = dataclasses.replace(op, events=events)
            ops.append(op)
    return ops


def _split(results: builtins.list[Any], batch: builtins.list[_Job]) -> builtins.list[_Outcome]:
    outcomes: builtins.list[_Outcome] = []
    start = 0
    for job in batch:
        outcomes.append(results[start : start + len(job.ops)])
        start += len(job.ops)
    return outcomes


def _settle_all(batch: builtins.list[_Job], outcomes: builtins.list[_Outcome]) -> None:
    for job, outcome in zip(batch, outcomes, strict=True):
        job.settle(outcome)


async def _end_lease(pool: asyncpg.Pool, node: str, instance: str) -> None:
    """End the lease now (another node takes the runs over at once), if PostgreSQL answers
    within a second; else it expires by itself. A connection cut off mid-statement is
    terminated, not handed back: the pool would wait on a cancel request that PostgreSQL
    may never answer."""
    conn: Any = None
    try:
        async with asyncio.timeout(1.0):
            conn = await pool.acquire()
            await conn.execute(END_LEASE, node, instance)
    except (Exception, asyncio.CancelledError) as exc:
        if conn is not None:
            conn.terminate()
        if isinstance(exc, asyncio.CancelledError) and not isinstance(exc, TimeoutError):
            raise
    finally:
        if conn is not None:
            releasing = asyncio.ensure_future(pool.release(conn))
            await asyncio.wait({releasing}, timeout=1.0)
            if not releasing.done():
                releasing.cancel()
            elif not releasing.cancelled():
                releasing.exception()  # retrieved: a failure to release is no matter here


async def _close(conn: asyncpg.Connection) -> None:
    """Close ``conn`` politely if PostgreSQL answers soon, else just drop it."""
    try:
        await conn.close(timeout=2.0)
    except Exception:
        conn.terminate()


# -- the listener ---------------------------------------------------------------------------


class _Listener:
    """LISTEN on ``channel`` on a connection of its own; hand each record to ``deliver``
    (on the event loop, in the order PostgreSQL sends them: commit order), each once. When
    the connection is lost, connect again every second until it works, then read the
    records committed meanwhile from wsq_records and deliver them first (oldest first,
    those already delivered left out), then ``deliver(None)`` (the server looks at every
    queue again). Records older than :data:`RECORDS_KEPT` are gone: a longer outage loses
    them, and says so."""

    RETRY = 1.0
    SEEN_FOR = 90.0
    """Seconds the ids of delivered records are remembered, to leave them out of a
    catch-up (it reads from a minute before the last one delivered)."""

    def __init__(
        self,
        connect: Callable[[], Awaitable[asyncpg.Connection]],
        channel: str,
        deliver: Callable[[str | None], None],
    ) -> None:
        self._connect = connect
        self._channel = channel
        self._deliver = deliver
        self._conn: asyncpg.Connection | None = None
        self._lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._seen: set[int] = set()  # ids delivered in the last SEEN_FOR seconds
        self._seen_order: collections.deque[tuple[float, int]] = collections.deque()
        self._last: int | None = None  # the id delivered last
        self._since: datetime.datetime | None = None  # when it first listened (PG's clock)
        self._held: list[tuple[int, str]] | None = None  # live ones, during a catch-up

    async def start(self) -> None:
        """Listen now (raises if PostgreSQL cannot be reached), then keep listening."""
        await self._listen()
        assert self._conn is not None
        self._since = await self._conn.fetchval("SELECT now()")
        self._task = asyncio.get_running_loop().create_task(
            self._keep(), name="wsq-postgres-listener"
        )

    async def _listen(self) -> None:
        conn = await self._connect()
        try:
            await conn.add_listener(self._channel, self._notified)
        except BaseException:
            conn.terminate()
            raise
        self._conn = conn
        # Only this connection's end counts: one given up after a failed catch-up does not.
        conn.add_termination_listener(self._ended)
        self._lost.clear()

    def _ended(self, ended: Any) -> None:
        if ended is self._conn:
            self._lost.set()

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: object) -> None:
        text = str(payload)
        number, _, record = text.partition(" ")
        if not number.isdigit():  # from a node of a wsq before migration 9: no id
            self._deliver(text)
            return
        if self._held is not None:
            self._held.append((int(number), record))
        else:
            self._deliver_once(int(number), record)

    def _deliver_once(self, number: int, record: str) -> None:
        if number in self._seen:
            return
        now = time.monotonic()
        while self._seen_order and self._seen_order[0][0] < now - self.SEEN_FOR:
            self._seen.discard(self._seen_order.popleft()[1])
        self._seen.add(number)
        self._seen_order.append((now, number))
        self._last = number
        self._deliver(record)

    async def _catch_up(self) -> None:
        """Deliver the records committed while the connection was away (see the class),
        then those that came live meanwhile. Raises if the read fails."""
        assert self._conn is not None
        try:
            rows = await self._conn.fetch(GET_RECORDS_SINCE, self._last, self._since)
        except BaseException:
            self._held = None
            raise
        held, self._held = self._held or [], None
        if self._last is not None and not any(row[0] == self._last for row in rows):
            _log.warning(
                "Records of other nodes older than %s s were missed: the listening"
                " connection was away longer than that.",
                RECORDS_KEPT,
                extra={"action": "store_records_missed"},
            )
        for number, record in rows:
            self._deliver_once(number, record)
        for number, record in held:
            self._deliver_once(number, record)

    async def _keep(self) -> None:
        while True:
            await self._lost.wait()
            self._conn = None
            while True:
                await asyncio.sleep(self.RETRY)
                self._held = []  # live records wait for those read from the table
                try:
                    await self._listen()
                    await self._catch_up()
                except Exception as exc:
                    self._held = None
                    conn, self._conn = self._conn, None
                    if conn is not None:
                        conn.terminate()
                    _log.warning(
                        "Listening for other nodes' changes failed: %s",
                        _store_error(exc),
                        extra={"action": "store_listen_failed"},
                    )
                    continue
                self._deliver(None)
                break

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        conn, self._conn = self._conn, None
        if conn is not None:
            await _close(conn)


# -- the store ------------------------------------------------------------------------------


class PostgresStateStore(StateStore):
    """The state store in the PostgreSQL database at ``dsn`` (a ``postgresql://`` URL or
    a libpq key/value string, as asyncpg takes them), in ``schema`` when given (created if
    missing; else the connection's ``search_path``, which a DSN may set with
    ``options=-csearch_path=...``).

    A batch holds at most ``batch_max`` ops, except that one :meth:`submit` is never split.
    ``timeout`` bounds the seconds a batch or a read may wait for PostgreSQL (``None``: no
    bound), ``connect_timeout`` a connection attempt; ``readers`` is the size of the pool
    of read connections.

    Call :meth:`open` first and :meth:`close` last; a closed store may be opened again.
    :meth:`submit` before :meth:`open` or once :meth:`close` has begun returns a future
    failed with :class:`~wsq.exceptions.ServerError`; the reads raise it. While PostgreSQL
    is out of reach, writes and reads raise :class:`~wsq.exceptions.Unavailable`.

    :attr:`commits` counts the transactions committed.
    """

    # Several servers share one schema: the core claims what it offers (ClaimWaiting).
    shared = True

    def __init__(
        self,
        dsn: str,
        *,
        schema: str | None = None,
        batch_max: int = 4096,
        timeout: float | None = 30.0,
        connect_timeout: float = 10.0,
        readers: int = 4,
        node: str = "",
        lease: float = 10.0,
        may_be_alone: bool = True,
    ) -> None:
        if batch_max < 1:
            raise ValueError("batch_max must be at least 1.")
        if readers < 1:
            raise ValueError("readers must be at least 1.")
        self.dsn = dsn
        self.schema = schema
        self.batch_max = batch_max
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.readers = readers
        # The node's name: its lease, its rows of wsq_counts, the runs it holds.
        if not 0 < lease < math.inf:
            raise ValueError("lease must be a positive number of seconds.")
        self.node = node
        self.lease = lease
        # Whether this node turns alone when no other is alive (docs/architecture.md,
        # "A node alone"); False: it always publishes, and a node that starts never
        # waits for its answer (the heartbeats then report alone False).
        self.may_be_alone = may_be_alone
        self._instance = uuid.uuid4().hex
        self.channel = ""  # wsq_<store id>, known once open
        self._deliver: Callable[[str | None], None] | None = None
        self._listener: _Listener | None = None
        self._writer: _Writer | None = None
        self._pool: asyncpg.Pool | None = None
        self._closing: asyncio.Task[None] | None = None
        self._past_commits = 0

    @property
    def commits(self) -> int:
        """Transactions committed since this object was made."""
        return self._past_commits + (self._writer.commits if self._writer else 0)

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> Recovery:
        """Connect, create or migrate the schema (under an advisory lock), and return the
        :class:`Recovery`. Raises Unavailable if PostgreSQL cannot be reached, ServerError
        if it refuses, the schema is newer than this wsq, or the store is already open."""
        if self._writer is not None:
            raise ServerError("The state store is already open.")
        conn: asyncpg.Connection | None = None
        try:
            conn = await _connect(self.dsn, self.schema, self.connect_timeout)
            await _migrate(conn, self.schema)
            await conn.close()
            if not self.node:  # a store of its own (a library's, a test's)
                self.node = f"{socket.gethostname()}:{uuid.uuid4().hex[:8]}"
            conn = await self._connect()  # the writer's
            index = await self._take_lease(conn)
            alone = await self._join(conn)
            recovery = await _recover(conn, self.node)
            recovery.node_index = index
            recovery.alone = alone
        except BaseException as exc:
            if conn is not None:
                conn.terminate()
            error = _store_error(exc, conn)
            if error is exc:
                raise
            raise error from exc
        self.channel = f"wsq_{recovery.store_id}"
        self._writer = _Writer(
            self._connect,
            conn,
            batch_max=self.batch_max,
            timeout=self.timeout,
            node=self.node,
            channel=self.channel,
        )
        if self._deliver is not None:
            self._listener = _Listener(self._listen_connect, self.channel, self._deliver)
            await self._listener.start()
        self._pool = await asyncpg.create_pool(  # min_size=0: connects on first use
            self.dsn,
            min_size=0,
            max_size=self.readers,
            timeout=self.connect_timeout,
            server_settings=_settings(self.dsn, self.schema),
        )
        return recovery

    async def _connect(self) -> asyncpg.Connection:
        """The write connection: what it inserts is this node's (``wsq.node``)."""
        settings = {**_settings(self.dsn, self.schema), "wsq.node": self.node, **_WRITER_PLANS}
        return await asyncpg.connect(
            self.dsn, timeout=self.connect_timeout, server_settings=settings
        )

    async def _take_lease(self, conn: asyncpg.Connection) -> int:
        """Hold the lease on this node's name; return the node's index. A live lease of
        another instance (a node that crashed moments ago, or one running under the same
        name) is waited out for up to two lease terms; then ServerError."""
        deadline = asyncio.get_running_loop().time() + 2 * self.lease
        while True:
            index = await _lease(conn, self.node, self._instance, self.lease)
            if index is not None:
                return index
            if asyncio.get_running_loop().time() > deadline:
                raise ServerError(
                    f"Another wsq node named {self.node!r} is running on this database;"
                    " give each node its own --node-name."
                )
            await asyncio.sleep(min(1.0, self.lease / 4))

    async def _join(self, conn: asyncpg.Connection) -> bool:
        """Ask the nodes that are alone to stop (they publish nothing), and wait until each
        has answered (at its next heartbeat) or its lease has run out, before this node
        reads any state: from then on they publish all they write. With no other live
        node, turn alone at once instead; return whether this node is alone."""
        async with conn.transaction():
            await conn.execute(ALONE_LOCK, ALONE_KEY)
            asked = await conn.fetch(ASK_NOT_ALONE, self.node)
            if not asked:
                if not self.may_be_alone:
                    return False
                await conn.execute(BECOME_ALONE, self.node, self._instance, RECORDS_KEPT)
                return bool(await conn.fetchval(GET_ALONE, self.node, self._instance))
            # Told at once (not at their next heartbeat): a record naming this node, with
            # nothing in it, on the store's channel, sent as this transaction commits.
            store_id = await conn.fetchval(GET_STORE_ID)
            notice = _encode_json([self._instance, []]).decode()
            await conn.execute("SELECT pg_notify($1, $2)", f"wsq_{store_id}", notice)
        names = ", ".join(name for (name,) in asked)
        _log.info("Waiting for %s, alone until now, to publish its writes.", names)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2 * self.lease
        while await conn.fetch(STILL_ALONE, self.node):
            if loop.time() > deadline:
                raise ServerError(f"Node {names} did not answer within {2 * self.lease:g} s.")
            await asyncio.sleep(min(0.05, self.lease / 20))
        return False

    async def end_alone(self) -> None:
        """See :meth:`StateStore.end_alone`."""

        async def query(conn: _Reader) -> None:
            await conn.execute(END_ALONE, self.node, self._instance)

        await self._read(query)

    @property
    def heartbeat_every(self) -> float:
        return self.lease / 5

    async def heartbeat(self) -> Heartbeat:
        """See :meth:`StateStore.heartbeat`: renew this node's lease; take the active runs
        of nodes whose lease ran out over (one transaction: of two nodes, one takes
        them)."""

        async def query(conn: _Reader) -> Heartbeat:
            index = None
            async with conn.transaction():
                # First, as a starting node's ask (_join) takes it before it locks the rows
                # of wsq_nodes: the other order would deadlock with it.
                await conn.execute(ALONE_LOCK, ALONE_KEY)
                kept = await conn.fetchval(RENEW_LEASE, self.node, self._instance, self.lease)
                if not kept:
                    index = await _lease(conn, self.node, self._instance, self.lease, retry=False)
                expired = await conn.fetch(DROP_EXPIRED, self.node)
                dead = [name for (name, _) in expired]
                if not all(ended for (_, ended) in expired):
                    await conn.execute(NODE_DIED)
                rows = await conn.fetch(ADOPT_RUNS, _NO_PAYLOAD, self.node, dead) if dead else []
                if dead:
                    await conn.execute(DROP_DEAD_WORKERS, dead)
                await conn.execute(DROP_OLD_RECORDS, RECORDS_KEPT)
                if not kept:  # back: lone nodes must publish again (see _join)
                    await conn.execute(ASK_NOT_ALONE, self.node)
                elif self.may_be_alone:
                    await conn.execute(BECOME_ALONE, self.node, self._instance, RECORDS_KEPT)
                alone = await conn.fetchval(GET_ALONE, self.node, self._instance)
            tasks = sorted((_task_from_row(row) for row in rows), key=lambda t: t.seq)
            return Heartbeat(adopted=tasks, dead=dead, lost=not kept, node_index=index, alone=alone)

        return await self._read(query)

    async def _listen_connect(self) -> asyncpg.Connection:
        settings = {**_settings(self.dsn, self.schema), **_KEEPALIVES}
        return await asyncpg.connect(
            self.dsn, timeout=self.connect_timeout, server_settings=settings
        )

    def listen(self, deliver: Callable[[str | None], None]) -> None:
        """See :meth:`StateStore.listen`: LISTEN on the store's channel from :meth:`open`
        on, on a connection of its own, connected again (and ``deliver(None)``) when it
        is lost."""
        self._deliver = deliver

    async def close(self) -> None:
        """Commit every job submitted so far (or fail it), then close the connections.
        Idempotent; concurrent calls all wait for the same shutdown."""
        if self._writer is None:
            return
        if self._closing is None:
            loop = asyncio.get_running_loop()
            self._closing = loop.create_task(self._shut_down(), name="wsq-postgres-close")
        await asyncio.shield(self._closing)

    async def _shut_down(self) -> None:
        writer, pool = self._writer, self._pool
        assert writer is not None and pool is not None
        listener, self._listener = self._listener, None
        try:
            if listener is not None:
                await listener.stop()
            await writer.stop(CLOSE_GRACE)
            await _end_lease(pool, self.node, self._instance)
            # PostgreSQL may not answer: then drop the connections. (Not wait_for: it would
            # wait for the cancelled close, which waits on PostgreSQL.)
            closing = asyncio.ensure_future(pool.close())
            await asyncio.wait({closing}, timeout=1.0)
            if not closing.done():
                pool.terminate()
                await asyncio.wait({closing}, timeout=1.0)
                closing.cancel()
            elif closing.exception() is not None:
                pool.terminate()
        finally:
            self._past_commits += writer.commits
            self._writer = self._pool = None
            self._closing = None

    # -- the ordered pipe ------------------------------------------------------------------

    def submit(self, ops: Sequence[Op]) -> asyncio.Future[builtins.list[Any]]:
        """Queue ``ops`` for the next group commit; see :meth:`StateStore.submit`. Must be
        called with the event loop running; never blocks."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[builtins.list[Any]] = loop.create_future()
        if self._writer is None or self._closing is not None or not self._writer.accepting:
            future.set_exception(ServerError("The state store is closed."))
            return future
        self._writer.put(_Job(tuple(ops), future))
        return future

    # -- reads -----------------------------------------------------------------------------

    async def _read(self, query: Callable[[_Reader], Awaitable[T]]) -> T:
        """``query(connection)`` on a pooled connection. Raises ServerError if the store is
        closed, Unavailable if PostgreSQL is out of reach."""
        pool = self._pool
        if pool is None or self._closing is not None:
            raise ServerError("The state store is closed.")
        try:
            async with asyncio.timeout(self.timeout), pool.acquire() as conn:
                try:
                    return await query(conn)
                except BaseException as exc:  # decided while conn is still ours
                    error = _store_error(exc, conn)
                    if isinstance(error, Unavailable | asyncio.CancelledError):
                        # Its state is unknown; returned as it is, the pool would wait
                        # on a cancel request to a server that may not answer.
                        conn.terminate()
                    if error is exc:
                        raise
                    raise error from exc
        except (Unavailable, ServerError):
            raise
        except Exception as exc:  # acquiring (connecting), the timeout, or a bug
            error = _store_error(exc)
            if error is exc:
                raise
            raise error from exc

    async def counts(self) -> dict[tuple[str, State], int]:
        """Committed tasks per queue and state, from wsq_counts (the sums over nodes)."""

        async def query(conn: _Reader) -> dict[tuple[str, State], int]:
            return _counts(await conn.fetch(GET_COUNTS))

        return await self._read(query)

    async def workers(self) -> builtins.list[WorkerRow]:
        """See :meth:`StateStore.workers`: the rows of the nodes whose lease is live, with
        the active runs each holds (one snapshot: two reads in one transaction)."""

        async def query(conn: _Reader) -> builtins.list[WorkerRow]:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                rows = await conn.fetch(GET_WORKERS)
                holders = sorted({row[8] for row in rows})
                runs = await conn.fetch(GET_WORKER_RUNS, holders) if holders else []
            held: dict[tuple[str, str], builtins.list[tuple[str, int, float]]] = {}
            for holder, worker, task_id, run, progress in runs:
                held.setdefault((holder, worker), []).append((task_id, run, progress))
            return [
                WorkerRow(
                    key=row[1],
                    name=row[2],
                    queue=row[3],
                    concurrency=row[4],
                    since=row[5],
                    node=row[0],
                    client=_untext(row[6]),
                    peer=row[7],
                    runs=tuple(held.get((row[8], row[1]), ())),
                )
                for row in rows
            ]

        return await self._read(query)

    async def get(self, task_id: str) -> Task | None:
        """The committed task ``task_id``, or ``None``."""

        async def query(conn: _Reader) -> Task | None:
            row = await conn.fetchrow(GET_TASK, task_id)
            return None if row is None else _task_from_row(row)

        return await self._read(query)

    async def get_many(self, task_ids: Sequence[str]) -> dict[str, Task]:
        """The committed tasks with these ids, by id, in one query."""
        ids = list(task_ids)

        async def query(conn: _Reader) -> dict[str, Task]:
            return {row[0]: _task_from_row(row) for row in await conn.fetch(GET_TASKS, ids)}

        return await self._read(query)

    async def queues(self) -> builtins.list[str]:
        """Sorted names of queues holding at least one task."""

        async def query(conn: _Reader) -> builtins.list[str]:
            return [name for (name,) in await conn.fetch(GET_QUEUES)]

        return await self._read(query)

    async def attempts(self, task_id: str) -> builtins.list[Attempt]:
        """The committed attempts of ``task_id``, oldest run first."""

        async def query(conn: _Reader) -> builtins.list[Attempt]:
            return with_last(await conn.fetch(GET_ATTEMPTS, task_id), _attempt_from_row)

        return await self._read(query)

    async def blob_keys(self) -> set[str]:
        """Every blob key a stored task references."""

        async def query(conn: _Reader) -> set[str]:
            return {key for (key,) in await conn.fetch(GET_BLOB_KEYS)}

        return await self._read(query)

    async def reserve_blob(self, key: str) -> None:
        """See :meth:`StateStore.reserve_blob`: a row of wsq_blobs with no task yet, this
        node's instance's."""

        async def query(conn: _Reader) -> None:
            await conn.execute(RESERVE_BLOB, key, self.node, self._instance)

        await self._read(query)

    async def release_blobs(self, keys: Sequence[str]) -> None:
        """See :meth:`StateStore.release_blobs`."""
        if not keys:
            return

        async def query(conn: _Reader) -> None:
            await conn.execute(RELEASE_BLOBS, list(keys))

        await self._read(query)

    async def sweep_uploads(self) -> builtins.list[str]:
        """See :meth:`StateStore.sweep_uploads`: the uploads of node instances holding no
        live lease, marked swept (which fences their inserts)."""

        async def query(conn: _Reader) -> builtins.list[str]:
            async with conn.transaction():
                keys = [key for (key,) in await conn.fetch(SWEEP_UPLOADS)]
                await conn.execute(DROP_SWEPT)
            return keys

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
        ``seq > after`` when given, at most ``limit``."""
        params: builtins.list[Any] = [
            MIN_INT if after is None else clamp(after),
            clamp(max(limit, 0)),
        ]
        if queue is None and state is None:
            sql = LIST_TASKS
        elif state is None:
            sql = LIST_TASKS_OF_QUEUE
            params.append(queue)
        elif queue is None:
            sql = LIST_TASKS_IN_STATE
            params.append(State(state).value)
        else:
            sql = LIST_TASKS_OF_QUEUE_IN_STATE
            params += [queue, State(state).value]

        async def query(conn: _Reader) -> builtins.list[Task]:
            return [_task_from_row(row) for row in await conn.fetch(sql, *params)]

        return await self._read(query)
