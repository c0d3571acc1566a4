"""The state store interface: where tasks live (docs/architecture.md).

The queue core decides; a state store remembers. The ops (:mod:`wsq.core.ops`, re-exported
here) are the core's: it emits them, and a store applies them. Writes go through
:meth:`StateStore.submit`, one ordered pipe whose batches are group-committed: the
returned future resolves only once every op in it is durable (committed and synced), and
ops submitted later never become visible before ops submitted earlier.
:class:`LoadWaiting` travels the same pipe so that it sees every write submitted before
it. Reads that need no ordering (:meth:`get`, :meth:`list`, :meth:`queues`,
:meth:`attempts`) see committed data and run off the event loop.

Backends: :mod:`wsq.storage.memory` (tests, ephemeral servers) and
:mod:`wsq.storage.sqlite` (the embedded default). One contract suite
(``tests/contract/test_state_store.py``) runs against every backend.
"""

from __future__ import annotations

import asyncio
import builtins
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from wsq.core.ops import (
    KEPT_ATTEMPTS,
    Attempt,
    AttemptOutcome,
    Delete,
    Insert,
    LoadWaiting,
    Op,
    RecordAttempt,
    Recovery,
    SetProgress,
    Update,
)
from wsq.core.task import State, Task

__all__ = [
    "KEPT_ATTEMPTS",
    "Attempt",
    "AttemptOutcome",
    "Delete",
    "Insert",
    "LoadWaiting",
    "Op",
    "RecordAttempt",
    "Recovery",
    "SetProgress",
    "StateStore",
    "Update",
]


class StateStore(ABC):
    """A durable home for tasks. Methods are called from the event loop only."""

    @abstractmethod
    async def open(self) -> Recovery:
        """Open (creating or migrating as needed) and return what a starting server needs."""

    @abstractmethod
    def submit(self, ops: Sequence[Op]) -> asyncio.Future[list[Any]]:
        """Queue ``ops`` for the next group commit and return a future of their results,
        one per op in order. The future resolves after the commit is durable; it raises
        if the commit failed (then none of the batch's ops applied). The caller must not
        change a submitted op's task afterwards (the core passes snapshots)."""

    @abstractmethod
    async def get(self, task_id: str) -> Task | None:
        """The committed task with this id, or ``None``."""

    @abstractmethod
    async def get_many(self, task_ids: Sequence[str]) -> dict[str, Task]:
        """The committed tasks with these ids (with their payloads), by id; ids with no
        task are left out. One read, however many ids."""

    @abstractmethod
    async def list(
        self,
        *,
        queue: str | None = None,
        state: State | None = None,
        limit: int = 1000,
        after: int | None = None,
    ) -> builtins.list[Task]:
        """Committed tasks in ``seq`` order, filtered by ``queue`` and ``state`` when given,
        starting after ``seq == after`` (a cursor), at most ``limit`` of them."""

    @abstractmethod
    async def queues(self) -> builtins.list[str]:
        """Names of queues that hold at least one task, sorted."""

    @abstractmethod
    async def attempts(self, task_id: str) -> builtins.list[Attempt]:
        """The committed attempts of the task (:class:`RecordAttempt`), oldest run first;
        empty if there are none or no such task."""

    @abstractmethod
    async def blob_keys(self) -> set[str]:
        """Every blob key that a stored task references (for the orphan sweep)."""

    @abstractmethod
    async def close(self) -> None:
        """Finish pending commits and release resources. Idempotent."""
