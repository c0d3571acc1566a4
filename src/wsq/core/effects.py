"""What the queue core asks its caller to do. The core never does I/O; the server applies
these in order (docs/architecture.md, "Applying effects")."""

from __future__ import annotations

from typing import Any

from wsq.core.ops import ClaimWaiting, Op
from wsq.core.task import Task
from wsq.core.values import value


@value
class Write:
    """Submit ``op`` to the state store. Every send that follows it in the same list, or in
    a later one, must wait until it is durable."""

    op: Op


@value
class Load:
    """Read the first ``limit`` waiting tasks of ``queue`` through the store's ordered pipe
    and hand them to :meth:`Core.loaded`, each with its payload only if that is at most
    ``max_payload`` bytes (else ``data`` is ``None``)."""

    queue: str
    limit: int
    max_payload: int | None = None


@value
class Claim:
    """Submit ``op`` through the store's ordered pipe (a shared store: dispatch claims
    tasks there instead of taking them from a window) and hand its result, or ``None`` if
    it failed, to :meth:`Core.claimed`."""

    op: ClaimWaiting


@value
class Offer:
    """Send these runs (snapshots of active tasks) to ``worker`` on ``connection``. A
    snapshot whose ``data`` is ``None`` needs its payload read from the store first; a
    run that is no longer current by then (:meth:`Core.is_current`) is left out."""

    connection: str
    worker: str
    tasks: tuple[Task, ...]


@value
class Abort:
    """Tell ``worker`` on ``connection`` to stop run ``run`` of ``task``."""

    connection: str
    worker: str
    task: str
    run: int
    reason: str


@value
class Emit:
    """Send event ``event`` with JSON-ready ``args`` to the listeners of ``queue``.
    ``tells``: the write (an op of a :class:`Write` before it in the same list) whose
    change the event tells of; if that write does not apply, the event is not sent,
    here or to the other nodes (with a shared store, another node may have taken the run
    over before this one heard of it)."""

    event: str
    queue: str
    args: tuple[Any, ...]
    tells: Op | None = None


@value
class DeleteBlobs:
    """Delete these blobs, once the writes before this effect are durable."""

    keys: tuple[str, ...]


Effect = Write | Load | Claim | Offer | Abort | Emit | DeleteBlobs
