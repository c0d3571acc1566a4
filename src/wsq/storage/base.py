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
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from wsq.core.ops import (
    KEPT_ATTEMPTS,
    NODE_BITS,
    RECORD_MAX,
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
    Update,
    WorkerRow,
)
from wsq.core.task import State, Task

__all__ = [
    "KEPT_ATTEMPTS",
    "NODE_BITS",
    "RECORD_MAX",
    "AdoptRuns",
    "Attempt",
    "AttemptOutcome",
    "ClaimWaiting",
    "CountTasks",
    "Delete",
    "DropWorkers",
    "HeldRuns",
    "Insert",
    "LoadWaiting",
    "Op",
    "Publish",
    "PutWorker",
    "ReadTasks",
    "RecordAttempt",
    "Recovery",
    "SetProgress",
    "StateStore",
    "Update",
    "WorkerRow",
]


@dataclass(slots=True)
class Heartbeat:
    """What :meth:`StateStore.heartbeat` found: runs this node now holds (stripped, as in
    :class:`Recovery`), the dead nodes they came from, and whether this node's own lease
    had run out (then ``node_index`` is the index it holds now, which may differ)."""

    adopted: list[Task] = field(default_factory=list)
    dead: list[str] = field(default_factory=list)
    lost: bool = False
    node_index: int | None = None
    alone: bool | None = False
    """Whether no other node is alive, so that this one need not publish what it writes
    (``True``), or another node that started asks it to publish again (``None``: it does,
    then says so with :meth:`StateStore.end_alone`)."""


class StateStore(ABC):
    """A durable home for tasks. Methods are called from the event loop only."""

    shared: bool = False
    """Whether other servers may use the same data (PostgreSQL): then the core claims the
    tasks it offers (:class:`ClaimWaiting`) instead of keeping a window of them."""
    node: str = ""
    """The name of the server using it (``--node-name``): a shared store keeps per-node
    rows, such as each node's share of the counts."""
    lease: float = 10.0
    """A shared store: seconds after which a node that stopped renewing its lease is dead
    (:meth:`heartbeat`)."""

    @abstractmethod
    async def open(self) -> Recovery:
        """Open (creating or migrating as needed) and return what a starting server needs."""

    @abstractmethod
    def submit(self, ops: Sequence[Op]) -> asyncio.Future[list[Any]]:
        """Queue ``ops`` for the next group commit and return a future of their results,
        one per op in order. The future resolves after the commit is durable; it raises
        if the commit failed (then none of the batch's ops applied). The caller must not
        change a submitted op's task afterwards (the core passes snapshots)."""

    def listen(self, deliver: Callable[[str | None], None]) -> None:
        """Before :meth:`open`: have ``deliver`` called, on the event loop, with each
        record another server sharing the store publishes (:class:`Publish`; this
        server's own come too), in commit order, each once, and with ``None`` after its
        connection to the others was away (records committed meanwhile are delivered
        first, as far as the store still has them; the caller may look at everything
        again). A server that starts while others are alone (:attr:`Heartbeat.alone`)
        sends them a record naming it with nothing in it, ``[instance, []]``, so that
        they answer at once. A store no other server shares never calls it."""
        return None  # a default that does nothing: not an abstract method

    async def heartbeat(self) -> Heartbeat:
        """A shared store, every few seconds (:attr:`heartbeat_every`): renew this node's
        lease, and take over the active runs of nodes whose lease ran out (they died);
        ``lost``: this node's lease had run out itself (others took its runs). Others:
        nothing to do."""
        return Heartbeat()

    async def end_alone(self) -> None:
        """A shared store: tell a node that asked (:attr:`Heartbeat.alone` ``None``) that
        every write this node made alone is durable and told, and that it publishes what
        it writes from now on. Others: nothing to do."""
        return None

    @property
    def heartbeat_every(self) -> float:
        return math.inf

    async def workers(self) -> builtins.list[WorkerRow]:
        """A shared store: the workers (:class:`PutWorker`) of every node whose lease is
        live, this one's included, each with its active runs, by node and key. A store no
        other server shares keeps none (its one core lists its workers itself)."""
        return []

    @abstractmethod
    async def counts(self) -> dict[tuple[str, State], int]:
        """Committed tasks per queue and state (pairs with none left out)."""

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
        starting after ``seq == after`` (a cursor), at most ``limit`` of them, without
        their payloads (``data`` is ``None``, ``streams`` empty: listings show neither, and
        a page of large tasks must not cost their bytes)."""

    @abstractmethod
    async def queues(self) -> builtins.list[str]:
        """Names of queues that hold at least one task, sorted."""

    @abstractmethod
    async def attempts(self, task_id: str) -> builtins.list[Attempt]:
        """The committed attempts of the task (:class:`RecordAttempt`), oldest run first;
        empty if there are none or no such task."""

    @abstractmethod
    async def blob_keys(self) -> set[str]:
        """Every blob key that a stored task references (for the orphan sweep), and, in a
        shared store, every key an upload in progress reserved (:meth:`reserve_blob`)."""

    async def reserve_blob(self, key: str) -> None:
        """A shared store: record, durably, that this node starts to write blob ``key``
        (before any of it reaches the blob store), so that another node may delete it
        if this one dies first (:meth:`sweep_uploads`). An insert naming a blob whose
        reservation was swept fails with UploadFailed. Others: nothing to do."""
        return None

    async def release_blobs(self, keys: Sequence[str]) -> None:
        """A shared store: forget the reservations of these blobs (deleted, no task will
        hold them). Reservations an insert took over are left alone."""
        return None

    async def sweep_uploads(self) -> builtins.list[str]:
        """A shared store: the reserved keys of nodes that died (or of this node's earlier
        life) before their tasks were stored, now swept: the caller deletes their blobs
        and aborts their unfinished uploads. Others: none."""
        return []

    @abstractmethod
    async def close(self) -> None:
        """Finish pending commits and release resources. Idempotent."""
