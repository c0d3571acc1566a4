"""How the PostgreSQL store cuts a batch into statements (wsq.storage.postgres.plan): one
per run of writes to distinct tasks, so a batch costs few round trips."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from wsq.core.task import State, StreamRef, Task
from wsq.storage.base import (
    Attempt,
    AttemptOutcome,
    Delete,
    Insert,
    LoadWaiting,
    RecordAttempt,
    SetProgress,
    Update,
)
from wsq.storage.postgres import Writes, plan, write_statement


def task(task_id: str, **fields: object) -> Task:
    base = Task(id=task_id, queue="q", state=State.WAITING, seq=1, data=b"{}")
    return replace(base, **fields)


def shape(steps: list[Writes | LoadWaiting]) -> list[object]:
    return [step if isinstance(step, LoadWaiting) else step.slots for step in steps]


def test_writes_to_distinct_tasks_are_one_statement() -> None:
    a, b, c = task("a"), task("b"), task("c")
    active = replace(b, state=State.ACTIVE, run=1, worker="w")
    done = replace(c, state=State.COMPLETED)
    ops = [
        Insert(a),
        Update(active, State.WAITING),
        Update(done, State.ACTIVE),
        SetProgress("d", 0.5, 1.0),
        Delete("e"),
        Update(replace(a, seq=9), State.FAILED),  # a second write to a: a new statement
    ]
    steps = plan(ops)
    assert shape(steps) == [
        [("insert", "a"), ("start", "b"), ("finish", "c"), ("progress", "d"), ("delete", "e")],
        [("update", "a")],
    ]
    sql, params = steps[0].statement() if isinstance(steps[0], Writes) else ("", [])
    assert sql == write_statement(("insert", "start", "finish", "progress", "delete"))
    placeholders = {int(n) for n in re.findall(r"\$(\d+)", sql)}
    assert placeholders == set(range(1, len(params) + 1))  # one array per parameter
    assert all(len(column) == 1 for column in params[:18])  # the insert's columns
    assert sql.startswith("WITH ins AS (INSERT INTO wsq_tasks")


def test_a_load_is_a_step_of_its_own_where_it_stands() -> None:
    load = LoadWaiting("q", 10)
    steps = plan([Insert(task("a")), load, Insert(task("b"))])
    assert shape(steps) == [[("insert", "a")], load, [("insert", "b")]]


def test_progress_after_progress_stays_in_the_statement_with_the_last_value() -> None:
    steps = plan([SetProgress("a", n / 10, float(n)) for n in range(5)] + [Delete("a")])
    assert shape(steps) == [[("progress", "a")] * 5, [("delete", "a")]]
    assert isinstance(steps[0], Writes)
    assert steps[0].rows["progress"] == [("a", 0.4, 4.0)]


def test_inserts_carry_their_blob_keys() -> None:
    streams = (
        StreamRef(path=("x",), size=1, blob="k1"),
        StreamRef(path=("y",), size=1, inline=b"y"),
    )
    [step] = plan([Insert(task("a", streams=streams)), Insert(task("b"))])
    assert isinstance(step, Writes) and step.blobs == [("k1", "a")]


def test_something_that_is_no_op_is_refused_before_anything_runs() -> None:
    with pytest.raises(TypeError, match="Not a state store op"):
        plan([Insert(task("a")), object()])  # type: ignore[list-item]


def record(task_id: str, run: int = 1) -> RecordAttempt:
    return RecordAttempt(Attempt(task_id, run, ended=1.0, outcome=AttemptOutcome.COMPLETED))


def test_attempts_share_the_statement_of_their_tasks_updates() -> None:
    # As the core emits them: each task's Update, then its attempt; 100 completions are
    # one statement, not one per task.
    ops = []
    for n in range(100):
        ops += [Update(task(f"t{n}", state=State.COMPLETED), State.ACTIVE), record(f"t{n}")]
    (step,) = plan(ops)
    assert isinstance(step, Writes)
    assert len(step.rows["finish"]) == len(step.rows["attempt"]) == 100
    sql, params = step.statement()
    assert sql == write_statement(("finish", "attempt"))
    assert {int(n) for n in re.findall(r"\$(\d+)", sql)} == set(range(1, len(params) + 1))


def test_an_attempt_is_kept_apart_from_its_task_s_insert_or_delete() -> None:
    # The statement's snapshot would not see the insert, and the delete would not see
    # the new record: their order matters, so they are separate statements.
    steps = plan([Insert(task("a")), record("a"), Delete("a"), record("a", 2), record("a", 3)])
    assert shape(steps) == [
        [("insert", "a")],
        [("attempt", "a")],
        [("delete", "a")],
        [("attempt", "a")],
        [("attempt", "a")],
    ]


def test_a_column_the_same_in_every_row_is_sent_as_one_value() -> None:
    # New tasks of one batch differ in id, seq and data alone: the other columns (state,
    # queue, options, times...) travel once, not once per row (postgres._rows).
    tasks = [task(f"t{n}", seq=n, data=b"%d" % n, created=5.0, updated=5.0) for n in range(3)]
    [step] = plan([Insert(t) for t in tasks])
    assert isinstance(step, Writes)
    _, params = step.statement()
    sizes = [len(column) for column in params[:19]]  # then the blob keys' two arrays
    assert sizes == [3, 1, 1, 3, 3] + [1] * 14
    assert params[0] == ("t0", "t1", "t2") and params[1] == ("q",)
