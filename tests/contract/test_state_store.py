"""The state store contract (wsq.storage.base), run against every backend.

The SQLite-only tests at the end check what the memory backend cannot have: persistence
in the file, group commit, crash safety (kill -9 in a child process) and the file's
directory being created.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import sqlite3
import sys
import textwrap
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import wsq
from tests.pg import Schema
from wsq.core.task import Options, State, StreamRef, Task
from wsq.exceptions import ServerError
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
    PutWorker,
    ReadTasks,
    RecordAttempt,
    SetProgress,
    StateStore,
    Update,
    WorkerRow,
)
from wsq.storage.memory import MemoryStateStore
from wsq.storage.postgres import PostgresStateStore
from wsq.storage.sqlite import SqliteStateStore

SRC = Path(wsq.__file__).resolve().parents[1]


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StateStore]:
    backend: StateStore
    schema: Schema | None = None
    if request.param == "memory":
        backend = MemoryStateStore()
    elif request.param == "sqlite":
        backend = SqliteStateStore(tmp_path / "s.db")
    else:  # a fresh schema per test (tests/pg.py)
        schema = await Schema(request.getfixturevalue("postgres_dsn")).create()
        backend = PostgresStateStore(schema.base, schema=schema.name)
    await backend.open()
    yield backend
    await backend.close()
    if schema is not None:
        await schema.drop()


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SqliteStateStore]:
    backend = SqliteStateStore(tmp_path / "s.db")
    await backend.open()
    yield backend
    await backend.close()


def make(
    task_id: str,
    seq: int,
    *,
    queue: str = "q",
    state: State = State.WAITING,
    **fields: Any,
) -> Task:
    return Task(id=task_id, queue=queue, state=state, seq=seq, data=b'{"n": %d}' % seq, **fields)


def full_task() -> Task:
    """A task with every field away from its default."""
    return Task(
        id="full",
        queue="images",
        state=State.ACTIVE,
        seq=7,
        data=b'{"a": [1, {"b": null}], "s": "\xc3\xa9"}',
        streams=(
            StreamRef(path=("a", 1, "b"), size=3, inline=b"\x00\xff\n"),
            StreamRef(path=("0", 0), size=0, inline=b""),
            StreamRef(path=(), size=1 << 40, blob="0" * 32),
        ),
        options=Options(timeout=-1.0, retries=-1, autoremove=True),
        progress=0.5,
        retries=2,
        error="boom\nwith a second line",
        run=3,
        worker="worker-1",
        created=1700000000.25,
        updated=1700000001.5,
    )


async def insert(store: StateStore, *tasks: Task) -> None:
    assert await store.submit([Insert(t) for t in tasks]) == [True] * len(tasks)


async def reopen(store: StateStore) -> Any:
    await store.close()
    return await store.open()


# -- insert and get ------------------------------------------------------------------------


async def test_insert_get_round_trips_every_field(store: StateStore) -> None:
    full = full_task()
    bare = make("bare", 8, error=None, worker=None)
    await insert(store, full, bare)

    got = await store.get("full")
    assert got == full
    assert got is not None
    assert [type(item) for item in got.streams[0].path] == [str, int, str]
    assert [type(item) for item in got.streams[1].path] == [str, int]
    assert got.streams[0].inline == b"\x00\xff\n"
    assert got.streams[1].inline == b""
    assert isinstance(got.state, State)
    assert await store.get("bare") == bare


async def test_get_missing_is_none(store: StateStore) -> None:
    assert await store.get("nope") is None


async def test_stored_tasks_are_copies(store: StateStore) -> None:
    """Tasks read back are the caller's to change. (Submitted tasks are the store's until
    the commit: the caller must not change them, so that no copy is needed per write.)"""
    await store.submit([Insert(make("a", 1))])
    got = await store.get("a")
    assert got is not None and got.progress == 0.0
    got.state = State.FAILED
    [loaded] = (await store.submit([LoadWaiting("q", 10)]))[0]
    loaded.seq = 99
    assert await store.get("a") == make("a", 1)


async def test_a_duplicate_among_many_inserts_is_reported_alone(store: StateStore) -> None:
    """Runs of inserts may be executed together; a duplicate among them still gets its own
    False, and every other insert of the run (and of other submits) still applies."""
    await insert(store, make("dup", 1))
    many = [Insert(make(f"t{n}", 10 + n)) for n in range(5)]
    many.insert(3, Insert(make("dup", 99)))
    first = store.submit(many)
    other = store.submit([Insert(make("x", 50)), Update(make("t0", 10), State.WAITING)])
    assert await first == [True, True, True, False, True, True]
    assert await other == [True, True]
    dup = await store.get("dup")
    assert dup is not None and dup.seq == 1
    assert len(await store.list()) == 7


async def test_duplicate_insert_returns_false_and_writes_nothing(store: StateStore) -> None:
    first = make("a", 1, streams=(StreamRef(path=("x",), size=1, blob="1" * 32),))
    await insert(store, first)
    other = make("a", 2, queue="other", streams=(StreamRef(path=("y",), size=1, blob="2" * 32),))
    assert await store.submit([Insert(other)]) == [False]
    assert await store.get("a") == first
    assert await store.blob_keys() == {"1" * 32}
    assert await store.queues() == ["q"]


# -- update, progress, delete --------------------------------------------------------------


async def test_update_applies_only_from_the_expected_state(store: StateStore) -> None:
    task = make("a", 1, created=10.0)
    await insert(store, task)
    active = replace(task, state=State.ACTIVE, run=1, worker="w", updated=11.0)
    assert await store.submit([Update(active, expected=State.ACTIVE)]) == [False]
    assert await store.get("a") == task
    assert await store.submit([Update(active, expected=State.WAITING)]) == [True]
    assert await store.get("a") == active


async def test_update_overwrites_only_the_mutable_fields(store: StateStore) -> None:
    task = full_task()
    await insert(store, task)
    changed = replace(
        make("full", 20, queue="elsewhere", created=1.0),
        state=State.WAITING,
        options=Options(),
        progress=0.0,
        retries=3,
        error=None,
        run=3,
        worker=None,
        updated=1700000002.0,
    )
    assert await store.submit([Update(changed, expected=State.ACTIVE)]) == [True]
    mutable = ("state", "seq", "progress", "retries", "error", "run", "worker", "updated")
    expected = replace(task, **{name: getattr(changed, name) for name in mutable})
    assert await store.get("full") == expected


async def test_error_text_round_trips_every_character(store: StateStore) -> None:
    """A worker's error message is any JSON string: NUL (which PostgreSQL text cannot
    hold), control characters, any plane."""
    task = make("a", 1, state=State.ACTIVE)
    await insert(store, task)
    text = "nul\x00 tab\t bell\x07 \u00e9 \U0001f600 \\ '\""
    failed = replace(task, state=State.FAILED, error=text, updated=2.0)
    assert await store.submit([Update(failed, State.ACTIVE)]) == [True]
    assert await store.get("a") == failed
    again = replace(failed, state=State.WAITING, seq=2, error=text + "!")
    assert await store.submit([Update(again, State.FAILED)]) == [True]
    assert await store.get("a") == again


async def test_update_of_a_missing_task_is_false(store: StateStore) -> None:
    assert await store.submit([Update(make("a", 1), expected=State.WAITING)]) == [False]
    assert await store.get("a") is None


async def test_set_progress_applies_to_active_tasks_only(store: StateStore) -> None:
    await insert(store, make("w", 1), make("a", 2, state=State.ACTIVE))
    results = await store.submit(
        [SetProgress("a", 0.25, 5.0), SetProgress("w", 0.5, 6.0), SetProgress("x", 1.0, 7.0)]
    )
    assert results == [True, False, False]
    got = await store.get("a")
    assert got is not None and (got.progress, got.updated) == (0.25, 5.0)
    assert await store.get("w") == make("w", 1)


async def test_runs_of_progress_keep_the_last_value(store: StateStore) -> None:
    """A worker reports progress often; every report applies while the task is active."""
    await insert(store, make("a", 1, state=State.ACTIVE), make("b", 2, state=State.ACTIVE))
    reports = [SetProgress(task_id, n / 10, float(n)) for n in range(1, 6) for task_id in "ab"]
    done = replace(make("b", 2), state=State.COMPLETED, progress=1.0, updated=9.0)
    first = store.submit([*reports, Update(done, State.ACTIVE), SetProgress("b", 0.9, 10.0)])
    second = store.submit([SetProgress("a", 0.75, 11.0), SetProgress("a", 0.8, 12.0)])
    assert await first == [True] * 10 + [True, False]
    assert await second == [True, True]
    a, b = await store.get("a"), await store.get("b")
    assert a is not None and (a.progress, a.updated) == (0.8, 12.0)
    assert b is not None and (b.state, b.progress, b.updated) == (State.COMPLETED, 1.0, 9.0)


async def test_delete_removes_the_task_and_its_blob_keys(store: StateStore) -> None:
    streams = (
        StreamRef(path=("a",), size=1, blob="a" * 32),
        StreamRef(path=("b",), size=1, blob="b" * 32),
        StreamRef(path=("c",), size=1, inline=b"c"),
    )
    keep = (StreamRef(path=("k",), size=1, blob="c" * 32),)
    await insert(store, make("a", 1, streams=streams), make("b", 2, streams=keep))
    assert await store.blob_keys() == {"a" * 32, "b" * 32, "c" * 32}
    assert await store.submit([Delete("a")]) == [True]
    assert await store.get("a") is None
    assert await store.blob_keys() == {"c" * 32}
    assert await store.submit([Delete("a")]) == [False]


async def test_delete_with_expected_state_applies_only_in_that_state(store: StateStore) -> None:
    keep = (StreamRef(path=("k",), size=1, blob="d" * 32),)
    await insert(store, make("a", 1, streams=keep))
    assert await store.submit([Delete("a", expected=State.FAILED)]) == [False]
    assert await store.get("a") is not None
    assert await store.blob_keys() == {"d" * 32}
    assert await store.submit([Delete("a", expected=State.WAITING)]) == [True]
    assert await store.get("a") is None
    assert await store.blob_keys() == set()
    assert await store.submit([Delete("a", expected=State.WAITING)]) == [False]


# -- LoadWaiting -----------------------------------------------------------------------------


async def test_load_waiting_returns_the_first_waiting_tasks_by_seq(store: StateStore) -> None:
    seqs = [5, 2, 9, 1, 7, 3]
    await insert(store, *(make(f"t{s}", s) for s in seqs))
    await insert(
        store,
        make("other-queue", 0, queue="other"),
        make("active", 4, state=State.ACTIVE),
        make("done", 6, state=State.COMPLETED),
        make("failed", 8, state=State.FAILED),
    )
    [first] = await store.submit([LoadWaiting("q", 3)])
    assert [t.id for t in first] == ["t1", "t2", "t3"]
    assert first[0] == make("t1", 1)
    [every, none, missing] = await store.submit(
        [LoadWaiting("q", 10**30), LoadWaiting("q", 0), LoadWaiting("nope", 10)]
    )
    assert [t.seq for t in every] == [1, 2, 3, 5, 7, 9]
    assert none == [] and missing == []


async def test_an_update_out_of_active_applies_only_to_the_same_run(store: StateStore) -> None:
    """A node that lost a run (another took it over) cannot end the new one."""
    active = make("a", 1, state=State.ACTIVE, run=2, worker="w")
    await insert(store, active)
    for stale in (
        replace(active, state=State.COMPLETED, run=1),
        replace(active, state=State.WAITING, run=1, worker=None),
    ):
        assert await store.submit([Update(stale, expected=State.ACTIVE)]) == [False]
    assert await store.get("a") == active
    done = replace(active, state=State.COMPLETED, updated=5.0)
    assert await store.submit([Update(done, expected=State.ACTIVE)]) == [True]
    assert await store.get("a") == done


# -- claims (the shared store's dispatch) ----------------------------------------------------


async def test_claim_takes_the_oldest_due_waiting_tasks_one_per_slot(store: StateStore) -> None:
    await insert(store, *(make(f"t{s}", s, updated=float(s)) for s in (5, 2, 9, 1, 7)))
    await insert(
        store,
        make("other-queue", 0, queue="other"),
        make("active", 3, state=State.ACTIVE, run=1),
        make("failed", 4, state=State.FAILED),
    )
    [claimed] = await store.submit([ClaimWaiting("q", ("w1", "w1", "w2"), now=100.0)])
    assert [t.id for t in claimed] == ["t1", "t2", "t5"]
    assert [(t.state, t.run, t.worker) for t in claimed] == [
        (State.ACTIVE, 1, "w1"),
        (State.ACTIVE, 1, "w1"),
        (State.ACTIVE, 1, "w2"),
    ]
    # The result gives when each was queued; the store holds the claim's time.
    assert [t.updated for t in claimed] == [1.0, 2.0, 5.0]
    assert claimed[0].data == b'{"n": 1}'
    stored = await store.get("t2")
    assert stored is not None and (stored.state, stored.worker, stored.updated) == (
        State.ACTIVE,
        "w1",
        100.0,
    )
    [rest, nothing] = await store.submit(
        [ClaimWaiting("q", ("w3",) * 5, now=101.0), ClaimWaiting("q", ("w3",), now=102.0)]
    )
    assert [t.id for t in rest] == ["t7", "t9"] and nothing == []
    assert [t.state for t in await store.list(queue="q", state=State.WAITING)] == []


async def test_claim_skips_tasks_whose_back_off_is_not_over(store: StateStore) -> None:
    await insert(store, make("a", 1), make("b", 2, state=State.ACTIVE, run=1))
    backing_off = replace(
        make("b", 3), run=1, retries=1, updated=10.0, not_before=20.0
    )  # queued again after its run timed out
    assert await store.submit([Update(backing_off, expected=State.ACTIVE)]) == [True]
    [claimed] = await store.submit([ClaimWaiting("q", ("w", "w"), now=15.0)])
    assert [t.id for t in claimed] == ["a"]
    [claimed] = await store.submit([ClaimWaiting("q", ("w",), now=20.0)])
    assert [(t.id, t.run, t.retries) for t in claimed] == [("b", 2, 1)]


async def test_an_inserted_task_is_not_claimed_before_its_not_before(store: StateStore) -> None:
    """A task inserted held (not_before ahead: Core.admit on a shared store, until its
    "task added" is published) is claimed by no one before then."""
    await insert(store, replace(make("held", 1), not_before=50.0), make("free", 2))
    [claimed] = await store.submit([ClaimWaiting("q", ("w", "w"), now=10.0)])
    assert [t.id for t in claimed] == ["free"]
    [claimed] = await store.submit([ClaimWaiting("q", ("w",), now=50.0)])
    assert [t.id for t in claimed] == ["held"]


async def test_claim_strips_payloads_over_max_payload(store: StateStore) -> None:
    blob = StreamRef(path=("f",), size=9, blob="k" * 32)
    note = StreamRef(path=("n",), size=3, inline=b"abc")
    await insert(store, replace(make("big", 1), data=b"x" * 100, streams=(note, blob)))
    [[claimed]] = await store.submit([ClaimWaiting("q", ("w",), now=1.0, max_payload=10)])
    assert claimed.data is None and claimed.streams == (blob,)
    full = await store.get("big")
    assert full is not None and full.data == b"x" * 100 and full.streams == (note, blob)


async def test_adopt_runs_gives_the_active_runs_of_the_named_workers(store: StateStore) -> None:
    """A worker that moved to this node reports for its runs (AdoptRuns): the tasks
    whose stored run and worker match come back, stripped; others do not."""
    await insert(store, *(make(f"t{n}", n) for n in range(1, 5)))
    await store.submit([ClaimWaiting("q", ("w1", "w1", "w2"), now=1.0)])
    runs = (("t2", 1), ("t1", 1), ("t3", 1), ("t1", 2), ("t4", 0), ("nope", 1), ("t2", 1))
    [adopted] = await store.submit([AdoptRuns(runs, ("w1", "w9"))])
    assert [(t.id, t.state, t.run, t.worker, t.data) for t in adopted] == [
        ("t1", State.ACTIVE, 1, "w1", None),
        ("t2", State.ACTIVE, 1, "w1", None),
    ]
    assert await store.submit([AdoptRuns((), ("w1",))]) == [[]]
    stored = await store.get("t1")
    assert stored is not None and stored.data == b'{"n": 1}'  # nothing else changed


async def test_held_runs_are_the_active_tasks_of_this_node_in_seq_order(
    store: StateStore,
) -> None:
    """HeldRuns reads, in the pipe, the active runs this node holds (one server: every
    active task), stripped: it sees the writes submitted before it."""
    await insert(store, *(make(f"t{n}", n) for n in range(1, 5)))
    [claimed] = await store.submit([ClaimWaiting("q", ("w1", "w2", "w1"), now=1.0)])
    done = replace(claimed[1], state=State.COMPLETED)
    _, held = await store.submit([Update(done, expected=State.ACTIVE), HeldRuns()])
    assert [(t.id, t.run, t.worker, t.data) for t in held] == [
        ("t1", 1, "w1", None),
        ("t3", 1, "w1", None),
    ]


async def test_count_tasks_reads_the_counts_in_the_pipe(store: StateStore) -> None:
    """CountTasks counts the stored tasks per queue and state as of its place in the
    pipe: the writes submitted before it are in; no zeros."""
    await insert(store, *(make(f"t{n}", n) for n in range(1, 5)), make("o", 5, queue="other"))
    [claimed] = await store.submit([ClaimWaiting("q", ("w1", "w2"), now=1.0)])
    done = replace(claimed[0], state=State.COMPLETED)
    _, _, counts = await store.submit(
        [Update(done, expected=State.ACTIVE), Delete("o"), CountTasks()]
    )
    assert counts == {
        ("q", State.WAITING): 2,
        ("q", State.ACTIVE): 1,
        ("q", State.COMPLETED): 1,
    }
    assert counts == await store.counts()


async def test_read_tasks_reads_the_records_in_the_pipe_whatever_their_state(
    store: StateStore,
) -> None:
    """ReadTasks reads the stored tasks asked for, stripped, in seq order, as of its
    place in the pipe; unknown and repeated ids add nothing."""
    await insert(store, *(make(f"t{n}", n) for n in range(1, 5)))
    [claimed] = await store.submit([ClaimWaiting("q", ("w1", "w2"), now=1.0)])
    done = replace(claimed[0], state=State.COMPLETED)
    ops = [
        Update(done, expected=State.ACTIVE),
        Delete("t4"),
        ReadTasks(("t4", "t3", "x", "t1", "t2", "t1")),
    ]
    _, _, read = await store.submit(ops)
    assert [(t.id, t.state, t.run, t.data) for t in read] == [
        ("t1", State.COMPLETED, 1, None),
        ("t2", State.ACTIVE, 1, None),
        ("t3", State.WAITING, 0, None),
    ]


@pytest.mark.parametrize("end", [State.COMPLETED, State.FAILED, State.WAITING])
async def test_a_store_of_one_server_ends_a_run_whose_start_it_did_not_store(
    store: StateStore, end: State
) -> None:
    """The start of run 2 was not stored (a full disk): the task waits at run 1. The end
    of run 2 (completed, failed, or queued again) applies all the same with a store of
    one server (the run took place: its worker reported it); a shared store ends only
    the run it holds active. The end of a run the store has seen end does not apply."""
    await insert(store, make("t", 1, run=1))
    ended = make("t", 1, state=end, run=2, worker="w1", retries=1, error="boom", updated=5.0)
    [applied] = await store.submit([Update(ended, expected=State.ACTIVE)])
    assert applied is not store.shared
    stored = await store.get("t")
    assert stored is not None
    if store.shared:
        assert (stored.state, stored.run) == (State.WAITING, 1)
        return
    assert (stored.state, stored.run, stored.worker, stored.retries) == (end, 2, "w1", 1)
    again = make("t", 1, state=end, run=1)
    assert await store.submit([Update(again, expected=State.ACTIVE)]) == [False]


@pytest.fixture(params=["memory", "postgres"])
async def shared_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StateStore]:
    """The stores several servers may share: PostgreSQL, and the memory store playing
    one (as the tests of several cores over one store use it)."""
    if request.param == "memory":
        backend: StateStore = MemoryStateStore(shared=True)
        await backend.open()
        yield backend
        await backend.close()
        return
    schema = await Schema(request.getfixturevalue("postgres_dsn")).create()
    pg = PostgresStateStore(schema.dsn, node="me")
    await pg.open()
    yield pg
    await pg.close()
    await schema.drop()


async def test_a_shared_store_lists_the_workers_of_every_node_with_their_runs(
    shared_store: StateStore,
) -> None:
    """PutWorker records a worker (replacing its row), DropWorkers forgets some or all of
    one node's; workers() lists them by node and key, each with the active runs of its
    key in seq order (task, run, progress). Text round-trips, NUL included."""
    store = shared_store
    node = store.node or "me"
    w1 = WorkerRow("k1", "w1", "q", 2, 5.0, node, client="c\x00li\u00e9nt", peer="1.2.3.4:5")
    w2 = WorkerRow("k2", "w2", "other", 1, 6.0, node)
    await insert(store, *(make(f"t{n}", n) for n in range(1, 4)))
    await store.submit(
        [
            PutWorker(replace(w1, concurrency=9)),
            PutWorker(w1),  # replaces the row
            PutWorker(w2),
            ClaimWaiting("q", ("k1", "k1"), now=1.0),
            SetProgress("t2", 0.5, 2.0),
        ]
    )
    listed = await store.workers()
    assert listed == [
        replace(w1, runs=(("t1", 1, 0.0), ("t2", 1, 0.5))),
        w2,
    ]
    await store.submit([DropWorkers(node, ("k1", "nope")), DropWorkers("elsewhere")])
    assert await store.workers() == [w2]
    await store.submit([PutWorker(w1), DropWorkers(node)])
    assert await store.workers() == []


async def test_a_store_of_one_server_keeps_no_worker_rows(store: StateStore) -> None:
    """A store no other server shares: its one core lists its workers itself."""
    if store.shared:
        pytest.skip("a shared store keeps them (the test above)")
    row = WorkerRow("k1", "w1", "q", 1, 5.0, "me")
    assert await store.submit([PutWorker(row), DropWorkers("me", ("k2",))]) == [None, None]
    assert await store.workers() == []


async def test_claims_on_their_way_together_never_take_one_task_twice(
    store: StateStore,
) -> None:
    await insert(store, *(make(f"t{n:03}", n) for n in range(1, 201)))
    claims = [store.submit([ClaimWaiting("q", (f"w{n}",) * 7, now=1.0)]) for n in range(40)]
    results = [task for [claimed] in await asyncio.gather(*claims) for task in claimed]
    assert sorted(t.id for t in results) == [f"t{n:03}" for n in range(1, 201)]


async def test_counts_follow_every_kind_of_write(store: StateStore) -> None:
    """Inserts (waiting or already active), starts, finishes, updates, deletes and claims
    all move the counts; ops that do not apply move nothing."""
    await insert(store, *(make(f"t{n}", n) for n in range(1, 7)))
    await insert(store, make("x", 7, queue="other", state=State.ACTIVE, run=1, worker="w"))
    t1 = await store.get("t1")
    assert t1 is not None
    started = replace(t1, state=State.ACTIVE, run=1, worker="w")
    await store.submit(
        [
            Update(started, expected=State.WAITING),
            Update(replace(started, state=State.COMPLETED), expected=State.ACTIVE),
            Update(replace(started, state=State.COMPLETED), expected=State.ACTIVE),  # no-op
            Delete("t2", expected=State.WAITING),
            Delete("nope"),
            Insert(make("t1", 99)),  # a taken id: no-op
            ClaimWaiting("q", ("w", "w"), now=5.0),
        ]
    )
    x = await store.get("x")
    assert x is not None
    requeued = replace(x, state=State.WAITING, worker=None, seq=50)
    await store.submit(
        [Update(requeued, expected=State.ACTIVE), Delete("t3"), SetProgress("t4", 0.5, 6.0)]
    )
    tasks = await store.list(limit=100)
    expected = {(t.queue, t.state): 0 for t in tasks}
    for t in tasks:
        expected[t.queue, t.state] += 1
    assert await store.counts() == expected
    assert expected == {
        ("q", State.COMPLETED): 1,
        ("q", State.ACTIVE): 1,  # t4 (t3, claimed, was deleted)
        ("q", State.WAITING): 2,
        ("other", State.WAITING): 1,
    }
    assert (await reopen(store)).counts == expected


async def test_load_waiting_sees_writes_submitted_before_it(store: StateStore) -> None:
    await insert(store, make("a", 1), make("b", 2))
    # Neither future is awaited before the next submit: the order of calls decides.
    first = store.submit(
        [Insert(make("c", 3)), Update(make("a", 1, state=State.ACTIVE), State.WAITING)]
    )
    second = store.submit([Insert(make("d", 0)), LoadWaiting("q", 10)])
    third = store.submit([LoadWaiting("q", 10)])
    assert await first == [True, True]
    assert [t.id for t in (await second)[1]] == ["d", "b", "c"]
    assert [t.id for t in (await third)[0]] == ["d", "b", "c"]


async def test_load_waiting_strips_payloads_over_max_payload(store: StateStore) -> None:
    """Big payloads stay in the store: data None, only the blob refs (for deletes)."""
    streams = (
        StreamRef(path=("a",), size=5, blob="e" * 32),
        StreamRef(path=("b",), size=3, inline=b"xyz"),
    )
    big = make("big", 1, streams=streams)
    big.data = b'{"pad": "%s"}' % (b"p" * 100_000)
    await insert(store, big, make("small", 2))
    (loaded,) = await store.submit([LoadWaiting("q", 10, max_payload=1000)])
    assert [t.id for t in loaded] == ["big", "small"]
    assert loaded[0].data is None and loaded[0].blobs == ["e" * 32]
    assert [ref.inline for ref in loaded[0].streams] == [None]
    assert loaded[1] == make("small", 2)
    (whole,) = await store.submit([LoadWaiting("q", 10)])
    assert whole[0] == big
    assert await store.get_many(["big", "nope", "small"]) == {
        "big": big,
        "small": make("small", 2),
    }


async def test_recovery_holds_active_tasks_without_their_payloads(store: StateStore) -> None:
    keep = (StreamRef(path=("k",), size=1, blob="f" * 32),)
    await insert(store, make("a", 1, state=State.ACTIVE, streams=keep, worker="w", run=1))
    recovery = await reopen(store)
    (active,) = recovery.active
    assert (active.id, active.data, active.blobs, active.worker) == ("a", None, ["f" * 32], "w")


# -- list, queues, blob keys ------------------------------------------------------------------


async def listing_fixture(store: StateStore) -> list[Task]:
    tasks = [
        make("a1", 1, queue="a"),
        make("b2", 2, queue="b", state=State.ACTIVE),
        make("a3", 3, queue="a", state=State.COMPLETED),
        make("b4", 4, queue="b"),
        make("a5", 5, queue="a"),
        make("a6", 6, queue="a", state=State.FAILED),
        make("b7", 7, queue="b"),
    ]
    await insert(store, *reversed(tasks))
    return tasks


async def test_listings_read_no_payloads(store: StateStore) -> None:
    """A page of a thousand 1 MiB tasks would be a GiB read for a listing that shows
    none of it: the stores leave data and streams out (every other field is there)."""
    task = full_task()
    await insert(store, task)
    for found in (
        await store.list(),
        await store.list(queue="images"),
        await store.list(state=State.ACTIVE),
        await store.list(queue="images", state=State.ACTIVE),
    ):
        assert found == [listed(task)]
    assert await store.get("full") == task  # a get still has all of it


def listed(task: Task) -> Task:
    """``task`` as a listing gives it: without its payload."""
    return replace(task, data=None, streams=())


async def test_list_orders_by_seq_and_filters(store: StateStore) -> None:
    tasks = await listing_fixture(store)
    assert await store.list() == [listed(t) for t in tasks]

    def ids(found: list[Task]) -> list[str]:
        return [t.id for t in found]

    assert ids(await store.list(queue="a")) == ["a1", "a3", "a5", "a6"]
    assert ids(await store.list(state=State.WAITING)) == ["a1", "b4", "a5", "b7"]
    assert ids(await store.list(queue="b", state=State.WAITING)) == ["b4", "b7"]
    assert ids(await store.list(queue="b", state=State.COMPLETED)) == []
    assert ids(await store.list(queue="nope")) == []
    assert ids(await store.list(limit=2)) == ["a1", "b2"]
    assert ids(await store.list(limit=0)) == []
    assert ids(await store.list(after=5)) == ["a6", "b7"]
    assert ids(await store.list(queue="a", after=1, limit=2)) == ["a3", "a5"]
    # Any int is a valid cursor or limit, even one beyond SQLite's 64-bit integers.
    assert ids(await store.list(after=2**63 - 1)) == []
    assert ids(await store.list(after=10**30)) == []
    assert ids(await store.list(after=-(10**30), limit=10**30)) == ids(tasks)
    assert ids(await store.list(queue="a", after=-(10**30), limit=10**30)) == [
        "a1",
        "a3",
        "a5",
        "a6",
    ]


async def test_list_pages_with_a_cursor(store: StateStore) -> None:
    tasks = await listing_fixture(store)
    for queue in (None, "a"):
        seen: list[Task] = []
        after: int | None = None
        while page := await store.list(queue=queue, limit=2, after=after):
            assert len(page) <= 2
            seen += page
            after = page[-1].seq
        assert seen == [listed(t) for t in tasks if queue is None or t.queue == queue]


async def test_queues_are_the_sorted_names_of_queues_with_tasks(store: StateStore) -> None:
    assert await store.queues() == []
    await insert(
        store,
        make("1", 1, queue="zeta"),
        make("2", 2, queue="alpha", state=State.COMPLETED),
        make("3", 3, queue="mu"),
        make("4", 4, queue="zeta"),
    )
    assert await store.queues() == ["alpha", "mu", "zeta"]
    await store.submit([Delete("3")])
    assert await store.queues() == ["alpha", "zeta"]


async def test_blob_keys_are_those_stored_tasks_reference(store: StateStore) -> None:
    assert await store.blob_keys() == set()
    await insert(
        store,
        make("a", 1, streams=(StreamRef(path=(0,), size=5, blob="a" * 32),)),
        make("b", 2, streams=(StreamRef(path=(0,), size=5, inline=b"hello"),)),
        make("c", 3, state=State.COMPLETED, streams=(StreamRef(("x",), 1, blob="c" * 32),)),
    )
    assert await store.blob_keys() == {"a" * 32, "c" * 32}


# -- ordering and failures ----------------------------------------------------------------


async def test_ops_in_one_submit_apply_in_order(store: StateStore) -> None:
    task = make("a", 1)
    active = replace(task, state=State.ACTIVE, run=1, worker="w")
    done = replace(active, state=State.COMPLETED, progress=1.0)
    ops: list[Op] = [
        Insert(task),
        Update(active, State.WAITING),
        SetProgress("a", 0.5, 2.0),
        Update(done, State.ACTIVE),
        SetProgress("a", 0.7, 3.0),  # completed now: refused
        LoadWaiting("q", 10),
        Delete("a"),
        Insert(task),
    ]
    assert await store.submit(ops) == [True, True, True, True, False, [], True, True]
    assert await store.get("a") == task


async def test_concurrent_submits_apply_and_resolve_in_call_order(store: StateStore) -> None:
    resolved: list[int] = []
    futures = []
    for i in range(200):
        task = make(f"t{i % 10}", i)
        op: Op = Insert(task) if i < 10 else Update(task, State.WAITING)
        future = store.submit([op])
        future.add_done_callback(functools.partial(lambda i, _: resolved.append(i), i))
        futures.append(future)
    assert await asyncio.gather(*futures) == [[True]] * 200
    assert resolved == list(range(200))
    assert [t.seq for t in await store.list()] == list(range(190, 200))


class Bogus:
    """Not an op: makes a submit fail in the middle, in every backend."""


async def test_a_failing_submit_writes_nothing_and_the_others_go_on(store: StateStore) -> None:
    await insert(store, make("a", 1))
    before = store.submit([Insert(make("b", 2))])
    failing = store.submit(
        [Insert(make("c", 3)), Delete("a"), Bogus()]  # type: ignore[list-item]
    )
    after = store.submit([Insert(make("d", 4)), LoadWaiting("q", 10)])
    assert await before == [True]
    with pytest.raises(TypeError):
        await failing
    inserted, loaded = await after
    assert inserted is True
    assert [t.id for t in loaded] == ["a", "b", "d"]
    assert [t.id for t in await store.list()] == ["a", "b", "d"]
    assert await store.submit([Insert(make("c", 3))]) == [True]


# -- attempts -----------------------------------------------------------------------------------


def attempt(task_id: str, run: int, **fields: Any) -> Attempt:
    fields.setdefault("outcome", AttemptOutcome.FAILED)
    fields.setdefault("ended", 10.0 + run)
    return Attempt(task_id, run, **fields)


async def test_attempts_round_trip_every_field_oldest_run_first(store: StateStore) -> None:
    await insert(store, make("a", 1))
    full = Attempt(
        "a", 2, "principal/w-1", "wsq-python/1.0", "host-a:4242", 1.25, 1.5, 2.75,
        AttemptOutcome.FAILED, "bad \x00 \u00e9 \U0001f600", 0.5,
    )  # fmt: skip
    bare = attempt("a", 1, outcome=AttemptOutcome.NO_RESPONSE)
    assert await store.submit([RecordAttempt(full), RecordAttempt(bare)]) == [True, True]
    assert await store.attempts("a") == [bare, full]
    assert await store.attempts("missing") == []
    await reopen(store)
    assert await store.attempts("a") == [bare, full]


async def test_an_attempt_goes_with_its_task_s_update_in_one_batch(store: StateStore) -> None:
    task = make("a", 1)
    await insert(store, task)
    active = replace(task, state=State.ACTIVE, run=1, worker="w")
    await store.submit([Update(active, State.WAITING)])
    # As the core emits them: the task's Update, then its attempt, for many tasks.
    done = replace(active, state=State.COMPLETED)
    record = attempt("a", 1, outcome=AttemptOutcome.COMPLETED)
    assert await store.submit([Update(done, State.ACTIVE), RecordAttempt(record)]) == [True] * 2
    assert await store.attempts("a") == [record]
    assert (await store.get("a")) == done


async def test_a_completed_run_s_attempt_is_stored_with_its_update(store: StateStore) -> None:
    # Update.attempt: a completion's record goes with its task's row, read back as the
    # newest attempt, after those recorded apart; many tasks in one batch, as the core
    # sends them.
    tasks = [make(f"t{n}", n) for n in range(1, 4)]
    await insert(store, *tasks)
    failed = [attempt(t.id, 1) for t in tasks]
    await store.submit([Update(replace(t, state=State.ACTIVE, run=2, worker="w"), State.WAITING)
                        for t in tasks] + [RecordAttempt(a) for a in failed])  # fmt: skip
    done = [replace(t, state=State.COMPLETED, run=2, worker="w", updated=20.0) for t in tasks]
    records = [
        Attempt(t.id, 2, "w", "wsq-python/1.0 \x00 \u00e9", "host-a:4242", 12.5, 13.0, 20.0,
                AttemptOutcome.COMPLETED, None, 0.75)
        for t in tasks
    ]  # fmt: skip
    ops: list[Op] = [Update(d, State.ACTIVE, r) for d, r in zip(done, records, strict=True)]
    assert await store.submit(ops) == [True] * 3
    for task, first, last in zip(done, failed, records, strict=True):
        assert await store.attempts(task.id) == [first, last]
        assert await store.get(task.id) == task
    await reopen(store)
    assert await store.attempts("t1") == [failed[0], records[0]]
    # An update that does not apply (the run is over) stores no record; a delete takes it.
    again = Update(done[0], State.ACTIVE, replace(records[0], run=3))
    assert await store.submit([again, Delete("t2")]) == [False, True]
    assert await store.attempts("t1") == [failed[0], records[0]]
    assert await store.attempts("t2") == []


async def test_a_completed_run_s_attempt_counts_in_the_newest_kept(store: StateStore) -> None:
    await insert(store, make("a", 1))
    last = KEPT_ATTEMPTS + 3
    await store.submit([RecordAttempt(attempt("a", run)) for run in range(1, last)])
    started = replace(make("a", 1), state=State.ACTIVE, run=last, worker="w")
    await store.submit([Update(started, State.WAITING)])
    done = replace(started, state=State.COMPLETED)
    record = attempt("a", last, worker="w", outcome=AttemptOutcome.COMPLETED)
    assert await store.submit([Update(done, State.ACTIVE, record)]) == [True]
    kept = await store.attempts("a")
    assert [a.run for a in kept] == list(range(last - KEPT_ATTEMPTS + 1, last + 1))
    assert kept[-1] == record


async def test_a_failing_submit_stores_no_completed_run_s_attempt(store: StateStore) -> None:
    await insert(store, make("a", 1))
    started = replace(make("a", 1), state=State.ACTIVE, run=1, worker="w")
    await store.submit([Update(started, State.WAITING)])
    done = replace(started, state=State.COMPLETED)
    record = attempt("a", 1, worker="w", outcome=AttemptOutcome.COMPLETED)
    failing = store.submit([Update(done, State.ACTIVE, record), Bogus()])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        await failing
    assert await store.attempts("a") == []
    assert (await store.get("a")) == started


def _one_odd(n: int, same: Any, odd: Any) -> Any:
    """``odd`` for the last of four rows, ``same`` for the others."""
    return odd if n == 3 else same


async def test_each_row_of_a_batch_keeps_its_own_values(store: StateStore) -> None:
    # Batches of every kind of write where a field holds one value in every row (a
    # value away from its default, or NULL), in all rows but one, or NULL in some: each
    # row is stored with its own values (the PostgreSQL store sends a column that is
    # the same in every row of a batch as one value).
    def unheld(task: Task | None) -> Task | None:
        return None if task is None else replace(task, not_before=0.0)

    inline = (StreamRef(path=("x",), size=1, inline=b"z"),)
    new = [
        Task(f"t{n}", "q", State.WAITING, n + 1, _one_odd(n, b"{}", b"[]"),
             _one_odd(n, (), inline), Options(timeout=5.0, retries=_one_odd(n, 2, 0)),
             created=10.0, updated=_one_odd(n, 10.0, 11.0), owner=_one_odd(n, None, "alice"),
             not_before=_one_odd(n, 50.0, 0.0))
        for n in range(4)
    ]  # fmt: skip
    await insert(store, *new)
    for task in new:
        assert unheld(await store.get(task.id)) == unheld(task)
    [claimed] = await store.submit([ClaimWaiting("q", ("w",) * 4, now=20.0)])
    assert [t.id for t in claimed] == ["t3"]  # the others are held until 50
    started = [replace(t, state=State.ACTIVE, run=1, worker=_one_odd(n, "w", "v"), updated=60.0)
               for n, t in enumerate(new[:3])]  # fmt: skip
    assert await store.submit([Update(t, State.WAITING) for t in started]) == [True] * 3
    progress = [SetProgress(t.id, 0.5, _one_odd(n, 61.0, 62.0)) for n, t in enumerate(started)]
    assert await store.submit(list(progress)) == [True] * 3
    ended = [
        replace(t, state=_one_odd(n, State.COMPLETED, State.FAILED), progress=0.5,
                error=_one_odd(n, None, "boom"), updated=70.0)
        for n, t in enumerate([*started, replace(claimed[0], updated=60.0)])
    ]  # fmt: skip
    records = [
        Attempt(t.id, 1, t.worker, _one_odd(n, "c", None), "node", 21.0, 22.0, 70.0,
                _one_odd(n, AttemptOutcome.COMPLETED, AttemptOutcome.FAILED),
                _one_odd(n, None, "boom"), 0.5)
        for n, t in enumerate(ended)
    ]  # fmt: skip
    ops: list[Op] = [
        Update(t, State.ACTIVE, r) for t, r in zip(ended[:3], records[:3], strict=True)
    ]
    ops += [Update(ended[3], State.ACTIVE), RecordAttempt(records[3])]
    assert await store.submit(ops) == [True] * 5
    for task, record in zip(ended, records, strict=True):
        assert unheld(await store.get(task.id)) == unheld(task)
        assert await store.attempts(task.id) == [record]
    again = [
        replace(t, state=State.WAITING, seq=_one_odd(n, 90 + n, 99), retries=_one_odd(n, 1, 0),
                error=None, progress=0.0, updated=80.0)
        for n, t in enumerate(ended)
    ]  # fmt: skip
    requeued: list[Op] = [Update(t, State(e.state)) for t, e in zip(again, ended, strict=True)]
    assert await store.submit(requeued) == [True] * 4
    for task in again:
        assert unheld(await store.get(task.id)) == unheld(task)
    deletes = [Delete(t.id, _one_odd(n, State.WAITING, None)) for n, t in enumerate(again)]
    assert await store.submit(list(deletes)) == [True] * 4
    assert [await store.get(t.id) for t in again] == [None] * 4


async def test_an_attempt_of_a_missing_task_is_not_stored(store: StateStore) -> None:
    assert await store.submit([RecordAttempt(attempt("nope", 1))]) == [False]
    assert await store.attempts("nope") == []


async def test_an_attempt_recorded_again_replaces_the_first(store: StateStore) -> None:
    await insert(store, make("a", 1))
    await store.submit([RecordAttempt(attempt("a", 1, error="first"))])
    await store.submit([RecordAttempt(attempt("a", 1, error="second"))])
    assert [a.error for a in await store.attempts("a")] == ["second"]


async def test_a_task_keeps_only_its_newest_attempts(store: StateStore) -> None:
    await insert(store, make("a", 1), make("b", 2))
    runs = range(1, KEPT_ATTEMPTS + 8)
    # In one batch and in many: the bound holds either way.
    await store.submit([RecordAttempt(attempt("a", run)) for run in runs])
    for run in runs:
        await store.submit([RecordAttempt(attempt("b", run))])
    for task_id in ("a", "b"):
        kept = [a.run for a in await store.attempts(task_id)]
        assert kept == list(range(8, KEPT_ATTEMPTS + 8))


async def test_deleting_a_task_deletes_its_attempts(store: StateStore) -> None:
    await insert(store, make("a", 1), make("b", 2))
    await store.submit([RecordAttempt(attempt(t, 1)) for t in ("a", "b")])
    # A delete that does not apply (wrong state) keeps them.
    assert await store.submit([Delete("a", State.FAILED)]) == [False]
    assert len(await store.attempts("a")) == 1
    assert await store.submit([Delete("a")]) == [True]
    assert await store.attempts("a") == []
    assert len(await store.attempts("b")) == 1
    # A new task with the id starts with none, and an attempt after a delete in one
    # batch finds no task.
    await insert(store, make("a", 3))
    assert await store.attempts("a") == []
    ops: list[Op] = [Delete("b"), RecordAttempt(attempt("b", 2))]
    assert await store.submit(ops) == [True, False]
    assert await store.attempts("b") == []


async def test_a_failing_submit_records_no_attempt(store: StateStore) -> None:
    await insert(store, make("a", 1))
    kept = attempt("a", 1)
    await store.submit([RecordAttempt(kept)])
    failing = store.submit(
        [RecordAttempt(attempt("a", 2)), Delete("a"), Bogus()]  # type: ignore[list-item]
    )
    with pytest.raises(TypeError):
        await failing
    assert await store.attempts("a") == [kept]


# -- lifecycle ----------------------------------------------------------------------------------


async def test_recovery_of_an_empty_store(store: StateStore) -> None:
    recovery = await reopen(store)
    assert (recovery.next_seq, recovery.active, recovery.waiting_queues) == (1, [], [])
    assert recovery.counts == {}


async def test_a_store_has_one_identity_for_good(store: StateStore) -> None:
    """``Recovery.store_id`` names the store's data: the same after close and open."""
    first = (await reopen(store)).store_id
    assert isinstance(first, str) and len(first) >= 16
    assert (await reopen(store)).store_id == first


async def test_recovery_after_close_and_open(store: StateStore) -> None:
    active = [make("act2", 12, queue="b", state=State.ACTIVE, worker="w", run=1)]
    active.insert(0, replace(full_task(), id="act1", seq=3))
    await insert(
        store,
        make("w1", 41, queue="waits"),
        make("w2", 5, queue="also-waits"),
        make("done", 42, queue="done", state=State.COMPLETED),
        make("failed", 2, queue="b", state=State.FAILED),
        *active,
    )
    recovery = await reopen(store)
    assert recovery.next_seq == 43
    stripped = [replace(task) for task in active]
    for task in stripped:
        task.strip()  # active tasks come back without their payloads
    assert recovery.active == stripped
    assert recovery.waiting_queues == ["also-waits", "waits"]
    assert await store.get("w1") == make("w1", 41, queue="waits")
    assert recovery.counts == {
        ("waits", State.WAITING): 1,
        ("also-waits", State.WAITING): 1,
        ("done", State.COMPLETED): 1,
        ("b", State.FAILED): 1,
        ("b", State.ACTIVE): 1,
        (active[0].queue, State.ACTIVE): 1,
    }


async def test_a_closed_store_refuses_calls(store: StateStore) -> None:
    await store.close()
    await store.close()  # idempotent
    with pytest.raises(ServerError):
        await store.submit([Insert(make("a", 1))])
    with pytest.raises(ServerError):
        await store.get("a")
    with pytest.raises(ServerError):
        await store.list()
    await store.open()  # the fixture closes it again


async def test_open_refuses_a_second_open(store: StateStore) -> None:
    with pytest.raises(ServerError):
        await store.open()


async def test_close_finishes_pending_writes(store: StateStore) -> None:
    futures = [store.submit([Insert(make(f"t{i}", i))]) for i in range(100)]
    await store.close()
    assert await asyncio.gather(*futures) == [[True]] * 100
    recovery = await store.open()
    assert recovery.next_seq == 100
    assert len(await store.list()) == 100


# -- SQLite only -------------------------------------------------------------------------------


async def test_sqlite_data_persists_across_instances(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "wsq.db"  # directories are created
    first = SqliteStateStore(path)
    await first.open()
    await insert(first, full_task(), make("w", 9, queue="later"))
    await first.close()

    second = SqliteStateStore(str(path))
    recovery = await second.open()
    try:
        assert recovery.next_seq == 10
        stripped = full_task()
        stripped.strip()
        assert recovery.active == [stripped]
        assert recovery.waiting_queues == ["later"]
        assert await second.get("full") == full_task()
        assert await second.blob_keys() == {"0" * 32}
    finally:
        await second.close()


async def test_sqlite_groups_concurrent_submits_into_few_commits(
    sqlite_store: SqliteStateStore,
) -> None:
    submits = 2000
    before = sqlite_store.commits
    futures = [sqlite_store.submit([Insert(make(f"t{i}", i))]) for i in range(submits)]
    assert await asyncio.gather(*futures) == [[True]] * submits
    commits = sqlite_store.commits - before
    assert 1 <= commits < submits / 5
    assert len(await sqlite_store.list(limit=submits + 1)) == submits


async def test_sqlite_batch_max_bounds_a_batch(tmp_path: Path) -> None:
    store = SqliteStateStore(tmp_path / "s.db", batch_max=3)
    await store.open()
    try:
        futures = [store.submit([Insert(make(f"t{i}", i))]) for i in range(30)]
        big = store.submit([Insert(make(f"u{i}", 100 + i)) for i in range(10)])  # not split
        await asyncio.gather(*futures, big)
        assert store.commits >= 11
    finally:
        await store.close()


async def test_sqlite_open_of_an_unusable_path_raises(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    store = SqliteStateStore(tmp_path / "file" / "s.db")
    with pytest.raises((ServerError, OSError)):
        await store.open()
    await store.close()  # never opened: nothing to do


async def test_sqlite_a_failed_transaction_fails_its_batch_only(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = SqliteStateStore(path, busy_timeout=0.01)
    await store.open()
    try:
        await insert(store, make("a", 1))
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as other:
            other.execute("BEGIN IMMEDIATE")  # holds the write lock: BEGIN in the writer fails
            futures = [
                store.submit([Insert(make("b", 2))]),
                store.submit([Delete("a"), LoadWaiting("q", 10)]),
            ]
            for future in futures:
                with pytest.raises(ServerError, match="locked"):
                    await future
            other.execute("ROLLBACK")
        assert await store.submit([LoadWaiting("q", 10)]) == [[make("a", 1)]]
        await insert(store, make("b", 2))
    finally:
        await store.close()


async def test_sqlite_reads_do_not_see_uncommitted_writes(
    sqlite_store: SqliteStateStore,
) -> None:
    # submit() returns before the commit; a read issued right after sees the state
    # before or after that commit, never half of it.
    future = sqlite_store.submit([Insert(make(f"t{i}", i)) for i in range(500)])
    count = len(await sqlite_store.list(limit=1000))
    assert count in (0, 500)
    await future
    assert len(await sqlite_store.list(limit=1000)) == 500


def child_script(store: str) -> str:
    """A script that opens ``store`` (``module:Class``, made from the script's one
    argument) and inserts tasks in batches of 25, printing each id once its insert is
    acknowledged, until it is killed."""
    module, cls = store.split(":")
    return textwrap.dedent(
        f"""
        import asyncio, sys
        from wsq.core.task import State, Task
        from wsq.storage.base import Insert
        from {module} import {cls}

        async def main(where):
            store = {cls}(where)
            n = (await store.open()).next_seq - 1  # continue after the previous run
            while True:
                pending = []
                for _ in range(25):
                    n += 1
                    task = Task(id=f"t{{n}}", queue="q", state=State.WAITING, seq=n, data=b"{{}}")
                    pending.append((task.id, store.submit([Insert(task)])))
                for task_id, future in pending:
                    await future
                    sys.stdout.write(task_id + "\\n")
                sys.stdout.flush()

        asyncio.run(main(sys.argv[1]))
        """
    )


CHILD = child_script("wsq.storage.sqlite:SqliteStateStore")


async def run_child_until_killed(path: Path | str, acks: int, child: str = CHILD) -> list[str]:
    """Run ``child`` (CHILD by default) against ``path``, SIGKILL it once it acknowledged
    ``acks`` inserts, and return every task id it acknowledged (a line is printed after
    its future resolved)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        child,
        str(path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None
    acked: list[str] = []
    while len(acked) < acks:
        line = await proc.stdout.readline()
        if not line.endswith(b"\n"):
            break
        acked.append(line.decode().strip())
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGKILL)
    rest, err = await proc.communicate()
    assert len(acked) >= acks, err.decode()
    assert proc.returncode == -signal.SIGKILL
    # Lines printed before the kill are still in the pipe; a torn last line is not an ack.
    acked += [line.decode() for line in rest.split(b"\n")[:-1]]
    return acked


async def test_sqlite_kill_9_loses_no_acknowledged_write(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    acked: list[str] = []
    for _ in range(3):  # each run recovers from the previous kill, then is killed too
        acked += await run_child_until_killed(path, acks=600)

    store = SqliteStateStore(path)
    recovery = await store.open()
    try:
        stored = {t.id for t in await store.list(limit=10**6)}
    finally:
        await store.close()
    assert len(set(acked)) == len(acked) >= 1800
    assert set(acked) <= stored
    assert recovery.next_seq > max(int(task_id[1:]) for task_id in acked)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
