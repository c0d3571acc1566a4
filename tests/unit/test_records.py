"""What a node publishes for the others (``wsq.server.app._publish``): records that
PostgreSQL's NOTIFY takes (at most RECORD_MAX bytes each), however big an event is, with
no event of a write that did not apply."""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from wsq.core.effects import Emit
from wsq.core.ops import RECORD_MAX, Publish
from wsq.core.task import State, Task
from wsq.server.app import _adoption_records, _decode_record, _publish


def texts(publish: Publish, applied: Callable[[int], bool]) -> list[str]:
    """The records a store sends for ``publish``, given which ops applied (the contract
    of :class:`Publish`, as PostgreSQL's statement builds them)."""
    chunks: dict[int, list[str]] = {}
    for text, chunk, op in publish.events:
        if op is None or applied(op):
            chunks.setdefault(chunk, []).append(text)
    return [publish.head + ",".join(items) + publish.tail for items in chunks.values()]


def _records(instance: str, emits: list[Emit]) -> list[str]:
    """The records sent for ``emits``, none of them tied to a write."""
    return texts(_publish(instance, [(emit, None) for emit in emits]), lambda op: True)


def failed(task_id: str, error: str) -> Emit:
    task = Task(task_id, "q", State.FAILED, 1, b"{}", error=error).to_json()
    return Emit("task failed", "q", (task, False))


def test_many_events_are_cut_into_records_that_fit_and_keep_their_order() -> None:
    emits = [failed(f"t{n}", "x" * 100) for n in range(300)]
    records = _records("me", emits)
    assert len(records) > 1 and all(len(r.encode()) <= RECORD_MAX for r in records)
    decoded = [_decode_record(r) for r in records]
    assert {r.instance for r in decoded} == {"me"}
    ids = [args[0]["id"] for r in decoded for _, _, args in r.events]
    assert ids == [f"t{n}" for n in range(300)]


def test_an_event_too_big_alone_has_its_error_cut_even_when_escapes_inflate_it() -> None:
    # Control characters encode as \u00XX: six bytes each.
    for error in ("e" * 50_000, "\x01" * 50_000, "é" * 30_000, '\n"' * 20_000):
        [record] = _records("me", [failed("big", error)])
        assert len(record.encode()) <= RECORD_MAX
        [(_, _, args)] = _decode_record(record).events
        assert args[0]["error"].endswith("(truncated)") and args[1] is False


def test_an_event_that_cannot_fit_is_left_out_not_sent_over_the_limit() -> None:
    huge = Emit("worker added", "q", ({"id": "w" * 10_000},))
    assert _records("me", [huge, failed("t", "x")]) == _records("me", [failed("t", "x")])
    assert msgspec.json.decode(_records("me", [failed("t", "x")])[0])[0] == "me"


def test_events_of_writes_that_did_not_apply_are_left_out_and_so_are_records_left_empty() -> None:
    emits = [(failed(f"t{n}", "x" * 1000), n) for n in range(30)]  # tied to ops 0-29
    publish = _publish("me", [*emits, (failed("untied", ""), None)], batch=7)
    everything = texts(publish, lambda op: True)
    assert len(everything) > 2
    kept = texts(publish, lambda op: op % 2 == 0)
    decoded = [_decode_record(r) for r in kept]
    ids = [args[0]["id"] for r in decoded for _, _, args in r.events]
    assert ids == [f"t{n}" for n in range(0, 30, 2)] + ["untied"]
    assert {r.batch for r in decoded} == {7}
    only_untied = texts(publish, lambda op: False)
    assert [[args[0]["id"] for _, _, args in _decode_record(r).events] for r in only_untied] == [
        ["untied"]
    ]


def test_runs_taken_over_are_cut_into_records_that_fit() -> None:
    runs = [(f"task-{n:04d}" + "x" * 200, n) for n in range(200)]
    records = texts(_adoption_records("me", runs), lambda op: True)
    assert len(records) > 1 and all(len(r.encode()) <= RECORD_MAX for r in records)
    decoded = [_decode_record(r) for r in records]
    assert [tuple(ref) for r in decoded for ref in r.adopted] == runs
    assert all(r.instance == "me" and r.events == [] for r in decoded)
