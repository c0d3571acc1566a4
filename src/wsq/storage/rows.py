"""What the SQL state stores share: a stored row's columns in :data:`TASK_COLUMNS` order
made into a :class:`Task`, the 64-bit range their cursors and limits are clamped to, and
a task's attempts made of those recorded apart and the one its row holds.
(Writing rows differs per engine: PostgreSQL stores error texts as bytes, and blob-only
stream lists apart.)"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import msgspec

from wsq.core.ops import KEPT_ATTEMPTS, Attempt
from wsq.core.task import Options, State, StreamRef, Task

# Both engines' integers are 64-bit: "seq > MIN_INT" is every task, "seq > MAX_INT" none.
# Cursors and limits are clamped to this range, so that any Python int means what it says.
MIN_INT = -(2**63)
MAX_INT = 2**63 - 1

STATES = {state.value: state for state in State}
decode_streams = msgspec.json.Decoder(tuple[StreamRef, ...]).decode


class Row(Protocol):
    """A row as the drivers give it (a tuple, an asyncpg Record): sliceable."""

    def __getitem__(self, index: slice, /) -> Sequence[Any]: ...


def clamp(value: int) -> int:
    return min(max(value, MIN_INT), MAX_INT)


@functools.lru_cache(maxsize=256)
def options(timeout: float, retries: int, autoremove: int | bool) -> Options:
    """Options are immutable and most tasks share a few: one object per combination."""
    return Options(timeout=timeout, retries=retries, autoremove=bool(autoremove))


def task_from_row(row: Row, error: str | None) -> Task:
    """The :class:`Task` in a row selected as the stores' ``TASK_COLUMNS`` (``id, queue,
    state, seq, data, streams, opt_timeout, opt_retries, opt_autoremove, progress, retries,
    error, run, worker, created, updated, owner``), with ``error`` as text already."""
    (id_, queue_, state, seq, data, streams, timeout, max_retries, autoremove) = row[:9]
    (progress, retries, _, run, worker, created, updated, owner) = row[9:]
    return Task(
        id=id_,
        queue=queue_,
        state=STATES[state],
        seq=seq,
        data=data,
        streams=decode_streams(streams) if streams is not None else (),
        options=options(timeout, max_retries, autoremove),
        progress=progress,
        retries=retries,
        error=error,
        run=run,
        worker=worker,
        created=created,
        updated=updated,
        owner=owner,
    )


def with_last(rows: Iterable[Any], attempt: Callable[[Any], Attempt]) -> list[Attempt]:
    """A task's attempts as ``attempts`` gives them, from the rows of the stores'
    ``GET_ATTEMPTS`` (``last``, then the attempt's columns, made one by ``attempt``):
    those recorded apart, oldest run first, then the record the task's row holds of its
    completed last run (``Update.attempt``), which replaces one of the same run; the
    newest :data:`KEPT_ATTEMPTS`."""
    kept: list[Attempt] = []
    for row in rows:
        found = attempt(row[1:])
        if row[0]:
            kept = [earlier for earlier in kept if earlier.run < found.run]
        kept.append(found)
    return kept[-KEPT_ATTEMPTS:]
