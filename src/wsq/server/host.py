"""What a connection needs from the server that holds it.

:class:`~wsq.server.connection.Connection` is written against :class:`Host`, not against
:class:`~wsq.server.app.Server`: ``app.py`` imports ``connection.py`` and never the other
way round, and what a connection may reach of the server is listed here in one place.
``Host`` is generic in the connection type (``Host[Connection]``) so that this module
needs nothing from ``connection.py`` either.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Protocol, TypeVar

from wsq.blobs.base import BlobStore
from wsq.core.effects import Effect
from wsq.core.engine import Core
from wsq.core.ops import Op
from wsq.server.auth import Authenticator
from wsq.server.budget import Budget
from wsq.server.listen import Gate
from wsq.server.locks import TaskLocks
from wsq.server.metrics import Metrics
from wsq.server.replay import Replay
from wsq.server.streams import BlobQuota
from wsq.storage.base import StateStore

Outcome = list[Any] | BaseException
"""What a store write came to: its results, one per op, or the exception that failed it."""

C = TypeVar("C")


class Host(Protocol[C]):
    """The server as its connections (of type ``C``) see it."""

    core: Core
    store: StateStore
    blobs: BlobStore
    blob_quota: BlobQuota | None
    auth: Authenticator | None
    budget: Budget
    replay: Replay
    task_locks: TaskLocks
    metrics: Metrics
    gate: Gate | None
    connections: dict[str, C]
    node_name: str
    heartbeat_interval: float
    worker_timeout: float
    max_connections: int
    max_requests: int
    max_uploads: int
    max_workers: int
    max_message_size: int
    max_outgoing: int
    max_data_size: int
    max_stream_size: int | None
    min_task_timeout: float

    def apply(self, effects: list[Effect]) -> None:
        """Apply the core's effects in order (stores, then sends, durable first)."""

    def submit(self, ops: Sequence[Op], then: Callable[[Outcome], None] | None = None) -> int:
        """Queue writes for the next group commit; ``then`` gets their outcome. Returns
        the index of the first of them among the ops of that commit."""

    def astray(self) -> bool:
        """Whether a write failed and the core was not yet set right from what the store
        holds (a resync is on its way)."""

    def lease_in_doubt(self) -> bool:
        """Whether this node's lease in a shared store may have run out (not renewed for
        most of its term): then it ends no run until a heartbeat says."""

    def later(
        self, send: Callable[[], None], failed: Callable[[BaseException], None] | None = None
    ) -> None:
        """Run ``send`` once every write submitted before it is durable; ``failed``
        instead (when given) if the batch it waited for failed."""

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run ``coro`` in the background until it ends or the server closes."""

    async def adopt_runs(self, runs: Sequence[tuple[str, int]], workers: Sequence[str]) -> None:
        """Shared store: take over the runs (task id, run) another node holds whose
        worker, one of ``workers``, moved here; runs that are not taken stay stale."""

    def subscribe(self, connection: C, queue: str | None) -> None: ...

    def unsubscribe(self, connection: C, queue: str | None) -> None: ...

    def blob_stored(self, key: str) -> None:
        """An upload was stored: keep the orphan sweep off it."""

    def shed_load(self) -> None:
        """Over ``--max-buffered``: drop the connection with the most unsent bytes."""
