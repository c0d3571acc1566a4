"""The task record and its lifecycle, as data.

A task moves ``waiting -> active -> completed | failed``; a failure with retries left, and
an explicit retry, move it back to ``waiting`` (docs/protocol.md §6). The allowed moves are
one table, :data:`TRANSITIONS`; :func:`check_transition` is the single gate every state
change passes, and the stores apply the same rule atomically (``WHERE state = expected``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from wsq.core.values import value
from wsq.exceptions import InvalidState


class State(enum.StrEnum):
    WAITING = "waiting"
    ACTIVE = "active"
    COMPLETED = "completed"
    FAILED = "failed"


# Each state's text: ``State.value`` goes through enum's descriptor, several times slower
# than a dict lookup, and every event snapshot (Task.to_json) and stored row reads it.
STATE_TEXT: dict[State, str] = {state: state.value for state in State}

TRANSITIONS: dict[State, frozenset[State]] = {
    State.WAITING: frozenset({State.ACTIVE}),
    # active -> waiting: a failed attempt with retries left.
    State.ACTIVE: frozenset({State.COMPLETED, State.FAILED, State.WAITING}),
    State.COMPLETED: frozenset(),
    # failed -> waiting: task.retry().
    State.FAILED: frozenset({State.WAITING}),
}


def check_transition(task_id: str, current: State, target: State) -> None:
    """Raise :class:`InvalidState` unless ``current -> target`` is in :data:`TRANSITIONS`."""
    if target not in TRANSITIONS[current]:
        raise InvalidState(f"Task {task_id} is {current.value}; it cannot become {target.value}.")


@value
class Options:
    """Per-task options. ``timeout`` is seconds (-1 disables); ``retries`` -1 is forever."""

    timeout: float = 60.0
    retries: int = 0
    autoremove: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"timeout": self.timeout, "retries": self.retries, "autoremove": self.autoremove}


@value
class StreamRef:
    """Where a stream sits in the task data and what holds its bytes.

    ``path`` is the list of keys and indexes leading to the value in the data. Exactly one
    of ``blob`` (a key in the blob store) and ``inline`` (the bytes themselves) is set.
    """

    path: tuple[str | int, ...]
    size: int
    blob: str | None = None
    inline: bytes | None = None


@dataclass(slots=True)
class Task:
    """One task as the server knows it.

    ``data`` is the task's JSON document, kept as encoded bytes so that it travels from
    producer to store to worker without being parsed again. ``seq`` orders the queue
    (FIFO by time queued); it is reassigned whenever the task is queued again. ``run``
    counts the times the task was handed to a worker; a worker's report names the run it
    belongs to, so a late report from an attempt that already ended is refused.
    """

    id: str
    queue: str
    state: State
    seq: int
    data: bytes | None
    streams: tuple[StreamRef, ...] = ()
    options: Options = field(default_factory=Options)
    progress: float = 0.0
    retries: int = 0
    error: str | None = None
    run: int = 0
    worker: str | None = None
    created: float = 0.0
    updated: float = 0.0
    owner: str | None = None
    not_before: float = 0.0
    """``owner``: the name of the principal that added it, when the server has an auth
    file. ``not_before``: a waiting task is not claimed before this time (a back-off
    after a run that timed out, with a shared store: docs/architecture.md); 0: any time.

    ``data`` is ``None`` when the task's payload is not held in memory (the core keeps
    ids and order, not data, beyond a small budget): then ``streams`` lists only the
    streams held in blobs (what deleting the task needs), and the full task is in the
    state store."""

    def copy(self) -> Task:
        """A snapshot (much faster than ``dataclasses.replace`` on this hot path)."""
        return Task(
            self.id,
            self.queue,
            self.state,
            self.seq,
            self.data,
            self.streams,
            self.options,
            self.progress,
            self.retries,
            self.error,
            self.run,
            self.worker,
            self.created,
            self.updated,
            self.owner,
            self.not_before,
        )

    @property
    def payload_size(self) -> int:
        """Bytes of data and inline streams this record holds in memory."""
        size = len(self.data or b"")
        if self.streams:
            size += sum(len(ref.inline) for ref in self.streams if ref.inline is not None)
        return size

    def strip(self) -> None:
        """Drop the payload from memory (see ``data``); keep the blob refs."""
        self.data = None
        if self.streams:
            self.streams = tuple(ref for ref in self.streams if ref.blob is not None)

    @property
    def blobs(self) -> list[str]:
        return [ref.blob for ref in self.streams if ref.blob is not None]

    def to_json(self) -> dict[str, Any]:
        """The task as events and listings show it (docs/protocol.md §5.1), without data."""
        return {
            "id": self.id,
            "queue": self.queue,
            "state": STATE_TEXT[self.state],
            "progress": self.progress,
            "retries": self.retries,
            "error": self.error,
            "options": self.options.to_json(),
            "worker": self.worker,
            "created": self.created,
            "updated": self.updated,
        }
