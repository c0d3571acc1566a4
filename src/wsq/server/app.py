"""The wsq server: a thin asyncio shell around :class:`wsq.core.engine.Core`.

It owns the state store, the blob store, the WebSocket listener and the timer, and it
applies the core's effects. The one rule that makes ``kill -9`` safe: no answer and no
event goes out before the store writes it was decided with are durable
(:meth:`Server.later`). Offers are the one exception (see :meth:`Server._apply_one`): the
offered task is durable already, and losing the record of its start only means it is
offered again after a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import logging
import math
import os
import re
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from http import HTTPStatus
from pathlib import Path
from ssl import SSLContext
from types import TracebackType
from typing import Any

import msgspec
from multidict import CIMultiDict
from picows.websockets import Request, Response, ServerConnection, ServerHandshakeConnection, serve
from picows.websockets import Server as WsServer

from wsq import protocol
from wsq.blobs import STALE_UPLOAD_AGE
from wsq.blobs.base import BlobStore
from wsq.core import observations as seen
from wsq.core.effects import Abort, Claim, DeleteBlobs, Effect, Emit, Load, Offer, Write
from wsq.core.engine import Core
from wsq.core.history import History
from wsq.core.observations import Observation
from wsq.core.ops import ClaimWaiting, claims_may_pass
from wsq.core.task import State, Task
from wsq.exceptions import ServerError
from wsq.server import health, web
from wsq.server.auth import Authenticator
from wsq.server.budget import Budget
from wsq.server.connection import Connection
from wsq.server.host import Outcome
from wsq.server.listen import Gate, GuardedSocket, listening_sockets
from wsq.server.locks import TaskLocks
from wsq.server.logs import log, logger, name_node
from wsq.server.metrics import Metrics
from wsq.server.origins import OriginPolicy
from wsq.server.replay import Replay
from wsq.server.streams import BlobQuota
from wsq.server.uploads import ReservedBlobs
from wsq.storage.base import (
    RECORD_MAX,
    AdoptRuns,
    LoadWaiting,
    Op,
    Publish,
    StateStore,
)
from wsq.wslog import TransportLog

CLOSE_TIMEOUT = 2.0
"""Seconds a closing handshake may take before the connection is simply dropped."""
RESYNC_AFTER = 1.0
"""A store of one server: seconds after a batch failed (a full disk) before the core is
set right from what the store holds (Server._resync)."""
UNSURE_BATCHES = 256
"""Shared store: of how many failed batches the task events are kept, in case the node's
own record shows one committed after all (Server._tell)."""
HANDSHAKE_TIMEOUT = 10.0
"""Seconds a TLS handshake, and then the HTTP upgrade, may each take."""

_LOG_LEVELS = {"task progress": logging.DEBUG}
COUNTS_EVERY = 1.0
"""Seconds between reads of a shared store's counts, for metrics and history."""
CLOSE_GRACE = 2.0
"""Seconds close waits for the writes in flight before it closes the store."""
DISCARD_LEFT_EVERY = 2.0
"""Seconds between tries to discard what aborted uploads left behind."""
STATE_NAMES = tuple(state.value for state in State)


def _where(task: asyncio.Task[Any]) -> str:
    """Where a task waits: the innermost of the coroutines it awaits, for a log line."""
    places = []
    awaited: Any = task.get_coro()
    while awaited is not None:
        frame = getattr(awaited, "cr_frame", None)
        if frame is not None:
            places.append(f"{frame.f_code.co_name}:{frame.f_lineno}")
        awaited = getattr(awaited, "cr_await", None)
    return " > ".join(places[-4:]) or task.get_name()


def _log_stuck(tasks: list[asyncio.Task[Any]], what: str) -> None:
    """One log line for tasks a close leaves behind: how many, and where the first wait."""
    if tasks:
        where = "; ".join(_where(task) for task in tasks[:5])
        log(logging.ERROR, "close timeout", f"{len(tasks)} {what}: {where}")


def _transitions_logged() -> bool:
    return logger.isEnabledFor(logging.INFO)


def _outcome(future: asyncio.Future[list[Any]]) -> Outcome:
    """What a store write's future came to: the ops' results, or why they failed."""
    if future.cancelled():
        return ServerError("The state store write was cancelled.")
    return future.exception() or future.result()


class _Batch:
    """Ops submitted during one turn of the event loop, on their way to the store."""

    __slots__ = ("callbacks", "claims_pass", "done", "emits", "error", "number", "ops", "results")

    def __init__(self, done: asyncio.Future[None], number: int = 0) -> None:
        self.number = number  # in the records it publishes (_Record.batch)
        self.ops: list[Op] = []
        # For the other nodes of a shared store: each event, and the index in ops of the
        # write it tells of (Emit.tells), if any.
        self.emits: list[tuple[Emit, int | None]] = []
        self.callbacks: list[tuple[int, int, Callable[[Outcome], None]]] = []
        self.done = done
        self.error: BaseException | None = None  # why the commit failed, once done
        self.results: list[Any] = []  # each op's result, once committed
        # Whether a claim may go to the store ahead of every op so far (claims_may_pass).
        self.claims_pass = True

    def applied(self, index: int | None) -> bool:
        """Whether the op at ``index`` (``None``: no op) did not fail to apply, as far as
        is known: a batch not yet done or failed tells nothing."""
        return index is None or index >= len(self.results) or self.results[index] is not False

    def settle(self, future: asyncio.Future[list[Any]]) -> None:
        outcome = _outcome(future)
        if isinstance(outcome, BaseException):
            log(logging.ERROR, "store failed", f"State store write failed: {outcome}")
            self.error = outcome
        else:
            self.results = outcome
        for start, end, then in self.callbacks:
            then(outcome if isinstance(outcome, BaseException) else outcome[start:end])
        self.done.set_result(None)


# What Server.later runs once the barrier (a batch) is done: a callable and what to run
# instead if the batch failed, or an event to tell and the index in the batch of the
# write it tells of (Server._tell). A tuple: one per answer and per event, on the hot path.
_Later = tuple[
    "_Batch | None",
    "Callable[[], None] | Emit",
    "Callable[[BaseException], None] | int | None",
]


class Server:
    """A wsq server. ``async with Server(...) as server:`` or :meth:`start` / :meth:`close`.

    Times are seconds. ``port=0`` picks a free port; :attr:`url` tells which. By default
    state lives in SQLite at ``data_dir/wsq.db`` and blobs under ``data_dir/blobs``; pass
    ``state_store`` / ``blob_store`` to use other backends, ``database`` (a
    ``postgresql://`` URL) for the state, or ``storage`` (a URL: ``s3://bucket/prefix`` or
    ``file:///path``) for the blobs. ``metrics_max_queues``
    queues get a ``queue`` label of their own in ``GET /metrics`` (the others count
    under ``_other``); the ``history`` op keeps the last hour of ``history_max_queues``
    busy queues (docs/operations.md, "Metrics").
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] = "./wsq-data",
        host: str = "127.0.0.1",
        port: int = 4242,
        heartbeat_interval: float = 5.0,
        worker_timeout: float = 1.0,
        *,
        state_store: StateStore | None = None,
        blob_store: BlobStore | None = None,
        storage: str | None = None,
        database: str | None = None,
        window: int = 1000,
        max_message_size: int = protocol.MAX_MESSAGE,
        max_outgoing: int = 64 << 20,
        max_buffered: int = 1 << 30,
        auth: Authenticator | str | os.PathLike[str] | None = None,
        allowed_origins: Sequence[str] = (),
        server_names: Sequence[str] = (),
        ssl: SSLContext | None = None,
        max_data_size: int = protocol.MAX_MESSAGE,
        max_stream_size: int | None = None,
        max_blob_bytes: int | None = None,
        max_connections: int = 10_000,
        max_requests: int = 10_000,
        max_uploads: int = 100,
        max_pending: int = 1024,
        max_workers: int = 1000,
        min_task_timeout: float = 0.1,
        node_name: str | None = None,
        sweep_grace: float | None = None,
        metrics_max_queues: int = 100,
        history_max_queues: int = 100,
        lease: float | None = None,
    ) -> None:
        _check_seconds("heartbeat_interval", heartbeat_interval, zero_disables=True)
        _check_seconds("worker_timeout", worker_timeout)
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be 0 to 65535, not {port!r}")
        if not 0 <= min_task_timeout < math.inf:
            raise ValueError(
                f"min_task_timeout must be a number of seconds >= 0, not {min_task_timeout!r}"
            )
        self.min_task_timeout = min_task_timeout
        if node_name is not None:
            check_node_name(node_name)
        self._named = node_name is not None
        # This node's name in logs, stats and the welcome; by default host and port, known
        # once the port is bound.
        self.node_name = node_name or f"{socket.gethostname()}:{port}"
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port
        self.heartbeat_interval = heartbeat_interval
        self.worker_timeout = worker_timeout
        self.max_message_size = max_message_size
        self.max_outgoing = max_outgoing
        # A connection that has not said hello may buffer one frame of up to this size.
        self.budget = Budget(max_buffered, max_message_size * 4 + protocol.CHUNK)
        if max_buffered < self.budget.frame_reserve:
            raise ValueError(
                f"max_buffered ({max_buffered}) must hold at least one frame"
                f" (4 * max_message_size + {protocol.CHUNK} = {self.budget.frame_reserve})"
            )
        if auth is not None and not isinstance(auth, Authenticator):
            auth = Authenticator.load(auth)
        self.auth: Authenticator | None = auth
        self.allowed_origins = list(allowed_origins)
        self.server_names = list(server_names)
        self.origins = OriginPolicy(self.allowed_origins, self.server_names, (), ssl is not None)
        self.ssl = ssl
        self.max_data_size = max_data_size
        self.max_stream_size = max_stream_size
        self.max_connections = max_connections
        self.max_requests = max_requests
        self.max_uploads = max_uploads
        self.max_pending = max_pending
        self.max_workers = max_workers
        # The built-in stores live in data_dir, which one server at a time may use.
        self._uses_data_dir = (state_store is None and database is None) or (
            blob_store is None and storage is None
        )
        self._lock: int | None = None
        if state_store is not None and database is not None:
            raise ValueError("pass state_store or database, not both")
        self.store = state_store or _state_store(database, self.data_dir)
        if self.store.shared and not self.store.node:
            # Its lease, its rows of the cluster's counts, the runs it holds. Unnamed, with
            # port 0 (tests, ephemeral servers), a node gets a name of its own.
            unique = f":{uuid.uuid4().hex[:8]}" if port == 0 and not self._named else ""
            self.store.node = self.node_name + unique
        if lease is not None:
            _check_seconds("lease", lease)
            self.store.lease = lease
        # Records this server publishes carry this, so that it skips its own.
        self._instance = uuid.uuid4().hex
        # Runs this node took over from another (adopt_runs) whose record has not come
        # back through the change feed yet: a record of another node taking the same run
        # that arrives before it was committed before ours, so this node keeps the run.
        self._adopting: dict[tuple[str, int], int] = {}
        # Shared store: a batch failed, or this node's lease ran out, so what the core
        # holds (runs, and workers' rows) may differ from what the store says this node
        # holds: the next heartbeat sets it right (_resync).
        self._astray = False
        self._resync_due = False  # a store of its own: a resync is on its way (RESYNC_AFTER)
        self._beat_soon = asyncio.Event()  # a shared store: renew the lease now
        self._batch_numbers = itertools.count(1)
        # Numbers of batches that failed whose task events were not told: if their own
        # records show they committed after all, the events in them are (_on_record).
        self._unsure_batches: dict[int, None] = {}
        # Shared store: when the lease was last renewed (monotonic: asked then), and
        # whether a timer fired while it was in doubt (lease_in_doubt).
        self._renewed = time.monotonic()
        self._tick_deferred = False
        # Shared store: no other node is alive (Heartbeat.alone), so this one publishes
        # nothing and holds no insert; see _set_alone.
        self._alone = False
        self.store.listen(self._on_record)
        if blob_store is not None and storage is not None:
            raise ValueError("pass blob_store or storage, not both")
        # Each blob reserved in the state store first, where nodes share it; writes that
        # could not be aborted are discarded again later (wsq.server.uploads).
        blobs = ReservedBlobs(blob_store or _blob_store(storage, self.data_dir), self.store)
        self._reserved = blobs
        self.blobs: BlobStore = blobs
        # The orphan sweep deletes blobs no task references. A store named by --storage may
        # be shared with other servers, whose uploads in progress are unreferenced for a
        # while: there it spares blobs younger than the grace and runs again every quarter
        # of it. The default store is this server's alone: swept whole, once, at start.
        if sweep_grace is None:
            sweep_grace = STALE_UPLOAD_AGE if storage is not None else 0.0
        if not 0 <= sweep_grace < math.inf:
            raise ValueError(f"sweep_grace must be seconds >= 0, not {sweep_grace!r}")
        self.sweep_grace = sweep_grace
        self.blob_quota = BlobQuota(self.blobs, max_blob_bytes) if max_blob_bytes else None
        self.core = Core(worker_timeout=worker_timeout, window=window, shared=self.store.shared)
        self.core.node = self.node_name  # recorded with attempts (final once listening)
        self.core.observed = self._observed
        self.core.defer_dispatch = True
        # GET /metrics and the history op (docs/operations.md, "Metrics"); the core
        # appends what it sees to the metrics' list, drained at the end of each turn.
        # With a shared store the counts are every node's: read from it every second.
        self._cluster_counts: dict[str, dict[str, int]] = {}
        self.metrics = Metrics(
            counts=self._counts,
            workers=self.core.worker_counts,
            waiting=self._waiting_counts,
            connections=lambda: len(self.connections),
            max_queues=metrics_max_queues,
            history=History(max_queues=history_max_queues),
        )
        self.core.observations = self.metrics.observations
        self.readiness = health.Readiness(self.store, self.blobs)
        self.subscribers: dict[str | None, set[Connection]] = {}
        self.connections: dict[str, Connection] = {}
        self.replay = Replay()  # answers to requests a client may send again (§4.2)
        self.task_locks = TaskLocks()
        # Blobs stored while the start-up sweep runs; the sweep must not delete them.
        self._fresh_blobs: set[str] | None = set()
        self._ids = itertools.count(1)
        self._barrier: _Batch | None = None  # the last batch sent, until it settled
        self._batch: _Batch | None = None
        self._pending: deque[_Later] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._turn_scheduled = False
        self._listeners: list[WsServer] = []
        self.gate: Gate | None = None
        self._restore_handler: Callable[[], None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._closing = False
        self.url = ""

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the stores, recover, and start listening. Raise ServerError if another
        server uses the data folder, OSError if the port is taken (nothing stays open)."""
        if self._uses_data_dir:
            self._lock = await asyncio.to_thread(_lock_data_dir, self.data_dir)
        try:
            opening = time.monotonic()
            recovery = await self.store.open()
            self._renewed = opening  # open took the lease
            await self.blobs.open()
            await self._claim_blobs(recovery.store_id)
            self.apply(self.core.recover(recovery, time.time()))
            if recovery.alone:
                self._set_alone(True)
            await self.readiness.check()
            self._listeners = [await self._serve(sock) for sock in self._bind()]
            if self.ssl is not None:
                self._quiet_tls_failures()
        except BaseException:
            await self.close()
            raise
        sockets = [sock for listener in self._listeners for sock in listener.sockets]
        host, port = sockets[0].getsockname()[:2]
        self.port = port
        self.url = f"{'wss' if self.ssl else 'ws'}://{_url_host(host)}:{port}"
        if not self._named:
            self.node_name = f"{socket.gethostname()}:{port}"
        self.core.node = self.node_name
        name_node(self.node_name, shown=self._named)
        bound = [self.host, *(s.getsockname()[0] for s in sockets)]
        self.origins = OriginPolicy(self.allowed_origins, self.server_names, bound, bool(self.ssl))
        self.spawn(self._sweep_orphans(), "wsq-sweep")
        self.spawn(self._discard_left(), "wsq-discard-left")
        if self.store.shared:
            await self._refresh_counts()
            self.spawn(self._keep_counts(), "wsq-counts")
            self.spawn(self._keep_lease(), "wsq-lease")
            self.spawn(self._watch_alone(), "wsq-alone")
        self.spawn(self.metrics.run(), "wsq-metrics")
        self.spawn(self.readiness.run(), "wsq-readiness")
        log(
            logging.INFO,
            "listening",
            f"wsq server {self.node_name} listening on {self.url}",
            data=str(self.data_dir),
        )

    def _quiet_tls_failures(self) -> None:
        """A TLS handshake that fails (a client that closes, or speaks plain HTTP) is the
        client's affair: one DEBUG line, not asyncio's traceback of several KB per
        connection, which any client could use to flood the log. Other reports go to the
        loop's previous handler; :meth:`close` puts it back."""
        loop = asyncio.get_running_loop()
        previous = loop.get_exception_handler()

        def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            if str(context.get("message", "")).startswith("SSL handshake failed"):
                text = f"TLS handshake failed: {context.get('exception')!r}"
                log(logging.DEBUG, "tls handshake failed", text)
            elif previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)

        loop.set_exception_handler(handle)
        self._restore_handler = lambda: loop.set_exception_handler(previous)

    def _bind(self) -> list[GuardedSocket]:
        self.gate = Gate(self.max_pending)
        return listening_sockets(self.host, self.port, self.gate)

    async def _serve(self, sock: GuardedSocket) -> WsServer:
        # TLS: the handshake gets the same bound as the plain port's HTTP upgrade.
        tls: dict[str, Any] = {}
        if self.ssl is not None:
            tls = {"ssl": self.ssl, "ssl_handshake_timeout": HANDSHAKE_TIMEOUT}
        listener: WsServer = await serve(
            self._handle,
            sock=sock,
            max_size=self.budget.frame_reserve,
            ping_interval=None,  # each greeted connection pings (Connection._keepalive)
            ping_timeout=None,
            compression=None,
            process_request=self._http,
            server_header=f"wsq/{_version()}",
            open_timeout=HANDSHAKE_TIMEOUT,
            close_timeout=CLOSE_TIMEOUT,
            logger=TransportLog("wsq.transport"),
            **tls,
        )
        return listener

    async def close(self) -> None:
        """Stop listening, close every connection, and flush the stores. Idempotent."""
        if self._closing:
            return
        self._closing = True
        for listener in self._listeners:
            listener.close(close_connections=True)
        if self.gate is not None:
            self.gate.drop_waiting()
        for listener in self._listeners:
            await self._connections_closed(listener)
        if self.gate is not None:
            self.gate.close()
        if self._restore_handler is not None:
            self._restore_handler()
        await self._stop_background()
        if self._timer is not None:
            self._timer.cancel()
        if self._barrier is not None:  # the last batch settles (the store may not answer)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._barrier.done), CLOSE_GRACE)
        await self.store.close()
        await self.blobs.close()
        if self._lock is not None:
            os.close(self._lock)  # releases the lock
            self._lock = None
        log(logging.INFO, "stopped", "wsq server stopped")

    async def _stop_background(self) -> None:
        """Cancel the background tasks and wait for them, for a bounded time (a task
        that does not stop is logged with where it waits, and left)."""
        for task in list(self._background):
            task.cancel()
        if self._background:
            _, stuck = await asyncio.wait(list(self._background), timeout=CLOSE_GRACE)
            _log_stuck(list(stuck), "tasks did not stop")

    async def _connections_closed(self, listener: WsServer) -> None:
        """Wait for the listener's connections to close and their handlers to clean up,
        for a bounded time: a close must end. What still runs then is logged with where it
        waits, and left to end by itself."""
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT + 2 * CLOSE_GRACE):
                await listener.wait_closed()
        except TimeoutError:
            handlers = getattr(listener, "handlers", {}).values()
            _log_stuck([t for t in handlers if not t.done()], "connections did not finish closing")

    async def serve_forever(self) -> None:
        assert self._listeners, "call start() first"
        await asyncio.gather(*(listener.serve_forever() for listener in self._listeners))

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        """Run ``coro`` in the background; it is cancelled on close."""
        task = asyncio.create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background_done)
        return task

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        """A background task ended: a failure is one log line (e.g. blobs a store could
        not delete: the start-up sweep removes them later), never asyncio's "exception
        was never retrieved" traceback."""
        self._background.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            text = f"{task.get_name()} failed: {exc!r}"
            log(logging.ERROR, "background task failed", text)

    def next_id(self) -> str:
        return f"c{next(self._ids)}"

    # -- applying the core's effects -------------------------------------------------------

    def submit(self, ops: Sequence[Op], then: Callable[[Outcome], None] | None = None) -> int:
        """Send ``ops`` to the store; later sends wait for them (see :meth:`later`).

        Ops submitted in one turn of the event loop travel to the store as one job.
        ``then`` gets these ops' results (or the exception) once they are durable.
        Returns the index of the first of them in that job.
        """
        batch = self._batch
        if batch is None:
            batch = self._batch = _Batch(
                asyncio.get_running_loop().create_future(), next(self._batch_numbers)
            )
            self._barrier = batch
            batch.done.add_done_callback(lambda _: self._flush(batch))
            asyncio.get_running_loop().call_soon(self._send_batch)
        start = len(batch.ops)
        batch.ops.extend(ops)
        if batch.claims_pass:
            batch.claims_pass = all(claims_may_pass(op) for op in ops)
        if then is not None:
            batch.callbacks.append((start, len(batch.ops), then))
        return start

    def _send_batch(self) -> None:
        batch, self._batch = self._batch, None
        assert batch is not None
        if batch.emits:
            batch.ops.append(_publish(self._instance, batch.emits, batch.number))
        sent = time.perf_counter()
        future = self.store.submit(batch.ops)
        future.add_done_callback(batch.settle)
        future.add_done_callback(self._check_written)
        if not self.store.shared:  # the core forgets the ends this batch stored
            mark = self.core.ends_made()
            future.add_done_callback(lambda done: self._written(done, mark))
        commit = self.metrics.commit_seconds
        future.add_done_callback(lambda _: commit.observe(time.perf_counter() - sent))

    def _claims_go_first(self, ops: list[Op]) -> bool:
        """Whether ``ops``, claims only, may go to the store ahead of the batch open now:
        none of that batch's writes changes what they find (:func:`claims_may_pass`: a
        run's end, a progress, an attempt, the writes that free the slots the claims
        fill). Then the claims commit on their own, first, and their offers go out while
        those writes commit (docs/architecture.md, "Claims go first")."""
        batch = self._batch
        return (batch is None or batch.claims_pass) and all(
            isinstance(op, ClaimWaiting) for op in ops
        )

    def _submit_claims(self, ops: list[Op], then: Callable[[Outcome], None]) -> None:
        """Send claims to the store now, before the open batch (:meth:`_claims_go_first`);
        ``then`` gets their results once durable. Nothing waits on them but ``then``:
        answers and events wait on the batches (:meth:`later`), and offers on nothing."""
        sent = time.perf_counter()
        future = self.store.submit(ops)

        def settled(future: asyncio.Future[list[Any]]) -> None:
            self.metrics.commit_seconds.observe(time.perf_counter() - sent)
            outcome = _outcome(future)
            if isinstance(outcome, BaseException):
                log(logging.ERROR, "store failed", f"State store claim failed: {outcome}")
            then(outcome)

        future.add_done_callback(settled)
        future.add_done_callback(self._check_written)

    def _check_written(self, future: asyncio.Future[list[Any]]) -> None:
        """A batch failed (PostgreSQL out of reach, a full disk), so what the core holds
        may differ from what the store says this node holds: the next heartbeat that
        reaches a shared store sets it right (:meth:`_resync`); with a store of its own,
        a resync RESYNC_AFTER seconds later (and again while one fails)."""
        if not (future.cancelled() or future.exception() is not None):
            return
        self._astray = True
        self.core.write_failed()
        if not self.store.shared and not self._resync_due and not self._closing:
            self._resync_due = True
            asyncio.get_running_loop().call_later(RESYNC_AFTER, self._resync_own)

    def _written(self, future: asyncio.Future[list[Any]], mark: int) -> None:
        """A batch of a store of one server is done: if it was stored, so are the ends
        the core made before it was sent (:meth:`Core.writes_durable`)."""
        if not (future.cancelled() or future.exception() is not None):
            self.core.writes_durable(mark)

    def _resync_own(self) -> None:
        self._resync_due = False
        if self._astray and not self._closing:
            self._resync()

    def later(
        self, send: Callable[[], None], failed: Callable[[BaseException], None] | None = None
    ) -> None:
        """Run ``send`` once every store write submitted so far is durable, in order; if
        the batch it waited for failed, run ``failed`` instead (``None``: ``send`` all the
        same)."""
        barrier = self._barrier
        if not self._pending and (barrier is None or barrier.done.done()):
            if failed is not None and barrier is not None and barrier.error is not None:
                failed(barrier.error)
            else:
                send()
        else:
            self._pending.append((barrier, send, failed))

    def _tell_later(self, effect: Emit, op: int | None) -> None:
        """Tell ``effect`` once the writes before it are durable (:meth:`_tell`); ``op``:
        the index in the current batch of the write it tells of."""
        barrier = self._barrier
        if not self._pending and (barrier is None or barrier.done.done()):
            self._tell(barrier, effect, op)
        else:
            self._pending.append((barrier, effect, op))

    def _tell(self, barrier: _Batch | None, effect: Emit, op: int | None = None) -> None:
        """Broadcast an event whose batch is done, unless the write it tells of (``op``,
        an index into the batch) did not apply: another node took the run over first.
        A task's event tells of writes: if its batch failed, it is not told; with a
        shared store, unless this node hears its own record of that batch (a COMMIT cut
        off may have applied: :meth:`_on_record`), which is looked for in the records of
        the last UNSURE_BATCHES batches. A worker's event tells of this node's own
        state, which holds whatever the store did."""
        if barrier is None or barrier.error is None or not effect.event.startswith("task "):
            if barrier is None or barrier.applied(op):
                self._broadcast(effect)
        elif barrier.number and self.store.shared:
            self._unsure_batches[barrier.number] = None
            while len(self._unsure_batches) > UNSURE_BATCHES:
                del self._unsure_batches[next(iter(self._unsure_batches))]

    def _flush(self, batch: _Batch) -> None:
        if self._barrier is batch:
            self._barrier = None  # what comes next waits for no batch, nor fails with it
        pending = self._pending
        while pending:
            barrier, send, failed = pending[0]
            if barrier is not None and not barrier.done.done():
                return
            pending.popleft()
            if type(send) is Emit:
                self._tell(barrier, send, failed)  # type: ignore[arg-type]
            elif failed is not None and barrier is not None and barrier.error is not None:
                failed(barrier.error)  # type: ignore[operator]
            else:
                send()  # type: ignore[operator]

    def apply(self, effects: list[Effect]) -> None:
        """Apply the core's effects in order. At the end of this turn of the loop, the core
        dispatches the queues that changed and the timer is re-armed."""
        self._apply_now(effects)
        if not self._turn_scheduled:
            self._turn_scheduled = True
            asyncio.get_running_loop().call_soon(self._end_of_turn)

    def _end_of_turn(self) -> None:
        self._turn_scheduled = False
        now = time.time()
        if not self._closing:
            self._apply_now(self.core.flush(now))
        self.metrics.drain(now)
        self._rearm()

    def _apply_now(self, effects: list[Effect]) -> None:
        ops: list[Op] = []
        reads: list[tuple[int, Load | Claim]] = []  # ops whose results the core awaits
        tells = False  # whether an event tells of a write (Emit.tells)
        for effect in effects:
            if isinstance(effect, Write):
                ops.append(effect.op)
            elif isinstance(effect, Load):
                reads.append((len(ops), effect))
                ops.append(LoadWaiting(effect.queue, effect.limit, effect.max_payload))
            elif isinstance(effect, Claim):
                reads.append((len(ops), effect))
                ops.append(effect.op)
            elif type(effect) is Emit and effect.tells is not None:
                tells = True
        start = 0
        if ops and self._claims_go_first(ops):
            self._submit_claims(ops, lambda outcome: self._loaded(outcome, reads))
        elif ops:
            then = (lambda outcome: self._loaded(outcome, reads)) if reads else None
            start = self.submit(ops, then)
        # Where in the batch each write an event tells of went (the ops are in the batch
        # for as long as this runs, so their ids are theirs).
        at = {id(op): start + n for n, op in enumerate(ops)} if tells else {}
        for effect in effects:
            if type(effect) is Emit:
                self._emit(effect, at.get(id(effect.tells)) if effect.tells is not None else None)
            else:
                self._apply_one(effect)

    def _counts(self) -> dict[str, dict[str, int]]:
        """Tasks per queue and state: this server's, or a shared store's (every node's)."""
        return self._cluster_counts if self.store.shared else self.core.counts()

    def _waiting_counts(self) -> dict[str, int]:
        if not self.store.shared:
            return self.core.waiting_counts()
        return {name: n["waiting"] for name, n in self._cluster_counts.items() if n["waiting"]}

    async def _refresh_counts(self) -> None:
        try:
            counts = await self.store.counts()
        except Exception as exc:  # PostgreSQL unavailable: keep the last, try again
            log(logging.WARNING, "counts unavailable", f"Reading the task counts failed: {exc}")
            return
        fresh: dict[str, dict[str, int]] = {}
        for (queue, state), n in counts.items():
            fresh.setdefault(queue, dict.fromkeys(STATE_NAMES, 0))[state.value] = n
        self._cluster_counts = fresh

    async def _keep_lease(self) -> None:
        """Renew this node's lease in the shared store, and hold the runs of dead nodes."""
        while True:
            with contextlib.suppress(TimeoutError):  # or sooner: _on_record
                async with asyncio.timeout(self.store.heartbeat_every):
                    await self._beat_soon.wait()
            self._beat_soon.clear()
            asked = time.monotonic()
            try:
                beat = await self.store.heartbeat()
            except Exception as exc:  # PostgreSQL unavailable: the lease may run out
                log(logging.WARNING, "lease not renewed", f"Renewing the lease failed: {exc}")
                continue
            self._renewed = asked
            now = time.time()
            if beat.node_index is not None:
                self.core.set_node_index(beat.node_index)
            if beat.lost:
                log(
                    logging.ERROR,
                    "lease lost",
                    "This node's lease had run out and other nodes took its runs over;"
                    " its workers' reports for them are refused from now on.",
                )
                self.core.drop_runs()
                self.apply(self.core.wake(None, now))
                self._astray = True  # the node that took over deleted its workers' rows
            if self._astray:
                self._resync()
            if self._tick_deferred:  # timers that fired while the lease was in doubt
                self._tick_deferred = False
                self.apply(self.core.tick(time.time()))
            self._heard_alone(beat.alone)
            if beat.adopted or beat.dead:
                log(
                    logging.WARNING,
                    "took over",
                    f"Nodes {', '.join(beat.dead)} stopped renewing their lease: this node"
                    f" holds their {len(beat.adopted)} active runs now.",
                )
                self.apply(self.core.adopt(beat.adopted, now))
            if beat.dead:
                self.spawn(self._sweep_uploads(), "wsq-sweep-uploads")

    def _heard_alone(self, alone: bool | None) -> None:
        """What the heartbeat said of this node being alone (:attr:`Heartbeat.alone`)."""
        if alone is True:
            if not self._alone and not self.lease_in_doubt():
                self._set_alone(True)
            return
        if self._alone:
            self._set_alone(False)
        if alone is None:  # a node that started waits: answer once all made alone is told
            self.later(self._answer_joiner)

    def _set_alone(self, alone: bool) -> None:
        """Alone: events go to this node's subscribers only (and snapshots are made only
        for queues someone here observes), and inserts are not held. Not alone: every
        event is published with the writes it reports, and inserts are held until then."""
        self._alone = alone
        self.core.alone = alone
        log(
            logging.INFO,
            "alone" if alone else "not alone",
            "No other node is alive: this node publishes nothing."
            if alone
            else "Publishing this node's events to the other nodes.",
        )

    def _answer_joiner(self) -> None:
        self.spawn(self._end_alone(), "wsq-end-alone")

    async def _end_alone(self) -> None:
        try:
            await self.store.end_alone()
        except Exception as exc:  # the next heartbeat asks again
            log(logging.WARNING, "not alone", f"Answering a starting node failed: {exc}")

    async def _watch_alone(self) -> None:
        """Stop being alone once the lease has gone unrenewed for half its term: it may
        run out, and another node start and serve beside this one, before the heartbeat
        can say so."""
        while True:
            await asyncio.sleep(self.store.lease / 10)
            if self._alone and time.monotonic() - self._renewed > self.store.lease / 2:
                self._set_alone(False)

    def _resync(self) -> None:
        """After a batch failed or (shared store) the lease ran out: read the runs the
        store says this node holds (and, with a store of its own, the counts), in the
        write pipe (so it sees every write before it), and set the core right
        (:meth:`Core.resynced`); write this node's workers' rows anew. A read that fails
        leaves it for the next heartbeat (or, alone, the next try)."""
        self._astray = False
        reads = self.core.begin_resync()
        shared = self.store.shared

        def then(outcome: Outcome) -> None:
            if isinstance(outcome, BaseException) or self._closing:
                return  # _check_written saw it: the next heartbeat tries again
            counts, records = (None, None) if shared else (outcome[1], outcome[2])
            done = self.core.resynced(outcome[0], time.time(), counts, records)
            if done.dropped or done.held or done.started:
                log(
                    logging.WARNING,
                    "runs resynced",
                    f"After writes that failed: {done.held} runs held again (their ends were"
                    f" not stored), {done.started} runs kept and their start written again,"
                    f" {done.dropped} runs forgotten (the store gives them to no worker"
                    " here).",
                )
            self.apply(done.effects)

        self.submit(reads, then)
        self.apply(self.core.sync_workers())

    async def adopt_runs(self, runs: Sequence[tuple[str, int]], workers: Sequence[str]) -> None:
        """See :meth:`Host.adopt_runs`: the store makes the runs this node's (those still
        active, of these workers), a record tells the other nodes, and the node that held
        them forgets them when it hears it (:meth:`_heard_adopted`); here they are held,
        timed from now, as after a takeover. Raises what the store raised."""
        refs = tuple(dict.fromkeys(runs))
        done: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        for ref in refs:
            self._adopting[ref] = self._adopting.get(ref, 0) + 1
        ops: list[Op] = [AdoptRuns(refs, tuple(workers))]
        ops += [_adoption_records(self._instance, refs)]

        def settle(outcome: Outcome) -> None:
            if not done.done():
                done.set_result(outcome)

        self.submit(ops, settle)
        outcome = await done
        if isinstance(outcome, BaseException):
            self._heard_adopted(self._instance, refs)  # no record is coming
            raise outcome
        adopted: list[Task] = outcome[0]
        if adopted:
            log(
                logging.INFO,
                "runs taken over",
                f"took over {len(adopted)} runs whose worker moved here from another node",
            )
        self.apply(self.core.adopt(adopted, time.time()))

    def _heard_adopted(self, instance: str, runs: Sequence[tuple[str, int]]) -> None:
        """A node took these runs over (``instance``: which; this one's own record comes
        back too, in commit order with the others'): the node holding them forgets them,
        unless it took them over itself after that."""
        for ref in runs:
            ref = (ref[0], ref[1])
            if instance == self._instance:
                left = self._adopting.pop(ref, 0) - 1
                if left > 0:
                    self._adopting[ref] = left
            elif ref not in self._adopting and self.core.drop_run(*ref):
                log(logging.INFO, "run moved", f"run {ref[1]} of {ref[0]} is another node's now")
        self.apply([])

    async def _keep_counts(self) -> None:
        while True:
            await asyncio.sleep(COUNTS_EVERY)
            await self._refresh_counts()

    def _observed(self, queue: str) -> bool:
        if self.store.shared and not self._alone:
            return True  # subscribers of other nodes may observe it
        return _transitions_logged() or None in self.subscribers or queue in self.subscribers

    def _on_record(self, text: str | None) -> None:
        """A record another node published (or ``None``: the store's listening connection
        was away, and is back): its events go to this node's subscribers, and queues that
        have tasks waiting again are looked at by this node's idle workers."""
        if self._closing:
            return
        now = time.time()
        if text is None:
            self._adopting.clear()  # records may be lost: this node's too
            self.apply(self.core.wake(None, now))
            return
        try:
            record = _decode_record(text)
        except msgspec.ValidationError:
            log(logging.ERROR, "bad record", f"A record from another node is malformed: {text!r}")
            return
        if record.adopted:
            self._heard_adopted(record.instance, record.adopted)
        if record.instance == self._instance:
            self._heard_own(record)
            return
        if self._alone:
            self._beat_soon.set()  # another node started: it may be waiting for an answer
        queued: dict[str, None] = {}
        happened: list[Observation] = []
        for event, queue, args in record.events:
            self._broadcast(Emit(event, queue, tuple(args)))
            if event == "task queued":
                queued[queue] = None
            kind = _HISTORY_KINDS.get(event)
            if kind is not None and not (kind == seen.FAILED and args[1:2] != [False]):
                happened.append((kind, queue, 0.0))
        if happened:  # the charts of every node show every node's tasks
            self.metrics.history.observe(happened, now)
        if queued:
            self.apply(self.core.wake(queued, now))

    def _emit(self, effect: Emit, op: int | None) -> None:
        """An event of the core; ``op``: the index in the current batch of the write it
        tells of (:attr:`Emit.tells`)."""
        self._log_event(effect)
        if self.store.shared and not self._alone:  # to the other nodes, with its writes
            if self._batch is None:
                self.submit([])
            assert self._batch is not None
            self._batch.emits.append((effect, op))
        self._tell_later(effect, op)

    def _heard_own(self, record: _Record) -> None:
        """A record of this node's own: if it is of a batch that seemed to fail, that
        batch committed after all (its COMMIT was cut off): now its task events are
        told, as the record holds them (those of writes that applied)."""
        if record.batch in self._unsure_batches:
            for event, queue, args in record.events:
                if event.startswith("task "):
                    self._broadcast(Emit(event, queue, tuple(args)))

    def _apply_one(self, effect: Effect) -> None:
        if isinstance(effect, Emit):
            self._emit(effect, None)
        elif isinstance(effect, Offer):
            # Offers need not wait for the writes before them: the task's insert is
            # durable already, and a crash before its "active" write only means the task
            # is offered again after the restart (at-least-once), never lost.
            self._send_offer(effect)
        elif isinstance(effect, Abort):
            message = protocol.encode(
                {
                    "op": "abort",
                    "worker": effect.worker,
                    "task": effect.task,
                    "run": effect.run,
                    "reason": effect.reason,
                }
            )
            self.later(lambda: self._send_to(effect.connection, message))
        elif isinstance(effect, DeleteBlobs):
            self.later(lambda: self._delete_blobs(effect.keys))

    def _loaded(self, results: Outcome, reads: list[tuple[int, Load | Claim]]) -> None:
        if self._closing:
            return
        for index, read in reads:
            now = time.time()
            # A failed batch applied nothing: the core tries its claims and loads later.
            if isinstance(read, Claim):
                claimed = None if isinstance(results, BaseException) else results[index]
                self.apply(self.core.claimed(read.op, claimed, now))
            elif isinstance(results, BaseException):
                self.apply(self.core.load_failed(read.queue, now))
            else:
                self.apply(self.core.loaded(read.queue, results[index], read.limit, now))

    def _send_to(self, connection_id: str, message: bytes) -> None:
        connection = self.connections.get(connection_id)
        if connection is not None:
            connection.send_text(message)

    def _send_offer(self, offer: Offer) -> None:
        connection = self.connections.get(offer.connection)
        if connection is not None:  # else the ack timeout fails these runs
            connection.offer(offer.worker, offer.tasks)

    def _broadcast(self, emit: Emit) -> None:
        everyone = self.subscribers.get(None, set())
        this_queue = self.subscribers.get(emit.queue, set())
        targets = everyone | this_queue if this_queue else everyone
        if not targets:
            return
        message = protocol.encode({"op": "event", "event": emit.event, "args": list(emit.args)})
        for connection in targets:
            # Subscribers to every queue get the events of the queues they may observe.
            if connection in this_queue or connection.may_observe(emit.queue):
                connection.send_text(message)

    def _log_event(self, emit: Emit) -> None:
        level = _LOG_LEVELS.get(emit.event, logging.INFO)
        if not logger.isEnabledFor(level):
            return
        first = emit.args[0] if emit.args else {}
        if emit.event.startswith("worker"):
            fields: dict[str, Any] = {"worker": first.get("id"), "queue": emit.queue}
            if len(emit.args) > 1:
                fields["task"] = emit.args[1].get("id")
        else:
            fields = {"task": first.get("id"), "queue": emit.queue}
            if emit.event == "task failed":
                fields["error"] = first.get("error")
                fields["will_retry"] = emit.args[1]
        log(level, emit.event, **fields)

    def _delete_blobs(self, keys: Sequence[str]) -> None:
        self.spawn(self._reserved.delete_unreserved(keys), "wsq-delete-blobs")

    # -- timer -----------------------------------------------------------------------------

    def _rearm(self) -> None:
        """Make sure a timer fires by the core's next deadline. A timer set for an
        earlier moment is kept (it ticks, finds nothing due, and re-arms), since moving
        it on every change would cost more than the spare tick."""
        deadline = self.core.next_deadline()
        armed = self._timer_at
        if deadline == armed or (deadline is not None and armed is not None and armed < deadline):
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = None
        if deadline is not None and not self._closing and not self._tick_deferred:
            # (While the lease is in doubt no timer is armed: the heartbeat ticks.)
            self._timer_at = deadline
            loop = asyncio.get_running_loop()
            delay = max(0.0, deadline - time.time())
            self._timer = loop.call_at(loop.time() + delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        if self.lease_in_doubt():
            self._tick_deferred = True  # the next heartbeat that renews it ticks
            return
        self.apply(self.core.tick(time.time()))

    def astray(self) -> bool:
        """See :meth:`Host.astray`: a batch failed, until the resync that follows is done
        (its read is in flight meanwhile)."""
        return self._astray or self.core.unsure

    def lease_in_doubt(self) -> bool:
        """See :meth:`Host.lease_in_doubt`: a shared store's lease not renewed for 90% of
        its term (PostgreSQL out of reach, say) may have run out, and another node may
        have taken this node's runs over: until the next heartbeat says, this node ends
        no run (its timers wait, its workers' final reports are refused as unavailable),
        so it never tells of an end the store did not make."""
        if not self.store.shared:
            return False
        return time.monotonic() - self._renewed > 0.9 * self.store.lease

    # -- connections -----------------------------------------------------------------------

    async def _handle(self, websocket: ServerConnection) -> None:
        connection = Connection(self, websocket, self.next_id())
        try:
            await connection.run()  # the connection joins self.connections at hello
        finally:
            self.connections.pop(connection.id, None)
            await connection.cleanup()

    @property
    def buffered(self) -> int:
        """Bytes counted against ``max_buffered`` now (wsq/server/budget.py)."""
        return self.budget.used

    def shed_load(self) -> None:
        """Over ``max_buffered``: drop the connection with the most unsent bytes."""
        largest = self.budget.pick_largest(list(self.connections.values()))
        if largest is not None and largest.backlog > 0:
            log(
                logging.WARNING,
                "slow consumer",
                "dropping the client with the most unsent bytes: the server's buffers are full",
                connection=largest.id,
            )
            largest.drop(1008, "Slow consumer")

    def subscribe(self, connection: Connection, queue: str | None) -> None:
        self.subscribers.setdefault(queue, set()).add(connection)

    def unsubscribe(self, connection: Connection, queue: str | None) -> None:
        subscribers = self.subscribers.get(queue)
        if subscribers is not None:
            subscribers.discard(connection)
            if not subscribers:
                del self.subscribers[queue]

    def _http(self, connection: ServerHandshakeConnection, request: Request) -> Response | None:
        response = self._route(connection, request)
        if response is not None:
            response.headers.extend(web.SECURITY_HEADERS)
        return response

    def _route(self, connection: ServerHandshakeConnection, request: Request) -> Response | None:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            # Cross-site WebSocket hijacking and DNS rebinding (wsq/server/origins.py):
            # only WebSocket requests carry authority.
            origin = request.headers.get("Origin")
            if origin is not None and not self.origins.allows(origin, request.headers.get("Host")):
                text = f"refused a WebSocket from origin {origin[:200]!r}"
                log(logging.WARNING, "origin refused", text)
                return connection.respond(HTTPStatus.FORBIDDEN, "wsq: origin not allowed.\n")
            if len(self.connections) >= self.max_connections:
                log(logging.WARNING, "connection refused", "refused a connection: at the limit")
                return connection.respond(
                    HTTPStatus.SERVICE_UNAVAILABLE, "wsq: too many connections.\n"
                )
            return None
        # Plain GETs need no Host check: they serve the same public files to anyone (a
        # rebinding page learns nothing it could not fetch cross-origin); data only ever
        # travels over the WebSocket, which is checked above.
        path = request.path.partition("?")[0]
        answer = health.respond(
            connection,
            request,
            path,
            readiness=self.readiness,
            metrics=self.metrics,
            auth=self.auth,
        )
        if answer is not None:
            return answer
        asset = web.asset(path)
        if asset is not None:
            return Response(int(HTTPStatus.OK), "OK", CIMultiDict(asset.headers), asset.body)
        return connection.respond(HTTPStatus.NOT_FOUND, "wsq: connect with a WebSocket.\n")

    async def _claim_blobs(self, store_id: str) -> None:
        """Refuse to start on a blob store that holds another database's blobs: the orphan
        sweep would take them for orphans (every blob this database does not reference)."""
        if not store_id:
            return  # a state store without an identity (an older or foreign backend)
        other = await self.blobs.claim(store_id)
        if other is not None:
            raise ServerError(
                f"The blob store holds the streams of another wsq database (store {other};"
                f" this server's is {store_id}): give each database its own --storage."
            )

    async def _sweep_orphans(self) -> None:
        """Delete blobs no task references, left by a crash between upload and insert: at
        start, and with a shared store (:attr:`sweep_grace`) every quarter of the grace."""
        while True:
            try:
                await self._sweep_uploads()
                await self._sweep_once()
            except Exception as exc:
                if not self.sweep_grace:
                    raise
                log(logging.WARNING, "sweep failed", f"The orphan sweep failed: {exc}")
            finally:
                self._fresh_blobs = None
            if not self.sweep_grace:
                return
            await asyncio.sleep(self.sweep_grace / 4)
            self._fresh_blobs = set()  # blobs stored while this round runs are spared

    async def _discard_left(self) -> None:
        """Every few seconds, discard what aborted uploads could not remove (the blob store
        was out of reach then), until it is gone."""
        while True:
            await asyncio.sleep(DISCARD_LEFT_EVERY)
            if not self._reserved.left:
                continue
            try:
                await self._reserved.discard_left()
            except Exception as exc:
                log(logging.INFO, "discard failed", f"Discarding aborted uploads failed: {exc}")

    async def _sweep_uploads(self) -> None:
        """Shared store: discard the blobs dead nodes were writing (wsq.server.uploads).
        Keys that fail to go are left for the orphan sweep and the blob store's own."""
        keys = await self.store.sweep_uploads()
        if not keys:
            return
        try:
            await self.blobs.discard(keys)
        except Exception as exc:
            log(logging.WARNING, "sweep failed", f"Discarding dead nodes' uploads failed: {exc}")
            return
        log(logging.INFO, "swept", f"Discarded {len(keys)} uploads of nodes that died")

    async def _sweep_once(self) -> None:
        referenced = await self.store.blob_keys()
        fresh = self._fresh_blobs
        assert fresh is not None
        listing = self.blobs.keys(self.sweep_grace)
        orphans = [k async for k in listing if k not in referenced and k not in fresh]
        if orphans:
            # Keys made since the listing began may have been claimed meanwhile.
            referenced = await self.store.blob_keys()
            orphans = [k for k in orphans if k not in referenced and k not in fresh]
            await self._reserved.delete_unreserved(orphans)
            log(logging.INFO, "swept", f"Deleted {len(orphans)} orphaned blobs")

    def blob_stored(self, key: str) -> None:
        """An upload was stored; keep the start-up sweep (if still running) off it."""
        if self._fresh_blobs is not None:
            self._fresh_blobs.add(key)


_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,99}\Z")


# The events of another node's record that its history counts (core/observations.py):
# a task added, a run completed, a run failed with no retry left ("task failed" with
# will_retry false). Enqueue-to-start latency is known only to the node that offered.
_HISTORY_KINDS = {
    "task added": seen.ADDED,
    "task completed": seen.COMPLETED,
    "task failed": seen.FAILED,
}


class _Record(msgspec.Struct, array_like=True):
    """What a node publishes per batch for the others: its instance, its events, and the
    runs (task id, run) it took over from another node (:meth:`Server.adopt_runs`)."""

    instance: str
    events: list[tuple[str, str, list[Any]]]
    adopted: list[tuple[str, int]] = msgspec.field(default_factory=list)
    batch: int = 0  # the number of the batch that published it (0: not numbered)


_decode_record = msgspec.json.Decoder(_Record).decode
_encode = msgspec.json.Encoder().encode
_TRUNCATED = "… (truncated)"


def _publish(instance: str, emits: Sequence[tuple[Emit, int | None]], batch: int = 0) -> Publish:
    """``emits`` (each with the index of the write it tells of) as :class:`_Record`
    texts of at most RECORD_MAX bytes each (:class:`Publish` chunks). An event too big
    alone has its task's error text cut to fit (an event that does not fit even so is
    left out, and logged: a NOTIFY over the limit would fail the writes it goes with)."""
    head = f"[{_encode(instance).decode()},["
    tail = f"],[],{batch}]"
    room = _room(head, tail)
    events: list[tuple[bytes, int | None]] = []
    for emit, op in emits:
        event = _encode((emit.event, emit.queue, emit.args))
        if len(event) > room:
            shrunk = _shrunk(emit, room)
            if shrunk is None:
                log(logging.ERROR, "event not published", f"{emit.event} is too big to publish")
                continue
            event = shrunk
        events.append((event, op))
    return Publish(events=_chunked(events, room), head=head, tail=tail)


def _adoption_records(instance: str, runs: Sequence[tuple[str, int]]) -> Publish:
    """``runs`` as :class:`_Record` texts of at most RECORD_MAX bytes each (task ids are
    at most a few hundred bytes, so each record holds at least a few)."""
    head = f"[{_encode(instance).decode()},[],["
    tail = "]]"
    refs = [(_encode(ref), None) for ref in runs]
    return Publish(events=_chunked(refs, _room(head, tail)), head=head, tail=tail)


def _room(head: str, tail: str) -> int:
    """Bytes a record with ``head`` and ``tail`` has left for its comma-joined items."""
    return RECORD_MAX - len(head.encode()) - len(tail.encode())


def _chunked(
    items: Sequence[tuple[bytes, int | None]], room: int
) -> tuple[tuple[str, int, int | None], ...]:
    """Encoded items (each at most ``room`` bytes, with the op it is tied to) numbered
    by the chunk they go in: as many in a row as fit in ``room``, comma-joined."""
    chunked: list[tuple[str, int, int | None]] = []
    chunk = size = 0
    for item, op in items:
        if size and size + 1 + len(item) > room:
            chunk, size = chunk + 1, 0
        size += len(item) + (1 if size else 0)
        chunked.append((item.decode(), chunk, op))
    return tuple(chunked)


def _shrunk(emit: Emit, room: int) -> bytes | None:
    """The event with its task's error cut until it encodes in ``room`` bytes (escapes
    make the encoding longer than the text), or ``None`` if it never does."""
    task = dict(emit.args[0]) if emit.args and isinstance(emit.args[0], dict) else {}
    error = task.get("error") or ""
    while True:
        task["error"] = error + _TRUNCATED
        event = _encode((emit.event, emit.queue, (task, *emit.args[1:])))
        if len(event) <= room:
            return event
        if not error:
            return None
        # Keep the share of the text that fits, a little less (escapes make the encoding
        # longer than the text); each round keeps less, so it ends.
        error = error[: max(0, min(len(error) - 1, len(error) * room // len(event) - 16))]


def check_node_name(name: str) -> str:
    """``name`` if it is a valid node name (1-100 letters, digits and ``_.:@-``, starting
    with a letter or digit), else ValueError."""
    if not isinstance(name, str) or not _NODE_NAME.match(name):
        raise ValueError(
            f"node name must be 1-100 letters, digits or _.:@- (starting with a letter or "
            f"digit), not {name!r}"
        )
    return name


def _lock_data_dir(data_dir: Path) -> int:
    """Hold ``data_dir/wsq.lock`` (an advisory lock, released when the process exits, even
    by kill -9): a second server on the same folder would delete the first one's uploads
    in progress and fight over the store. Raise ServerError if another holds it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / "wsq.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ServerError(f"Another wsq server is using {data_dir}.") from None
    return fd


def _default_state_store(data_dir: Path) -> StateStore:
    from wsq.storage.sqlite import SqliteStateStore

    return SqliteStateStore(data_dir / "wsq.db")


def _state_store(database: str | None, data_dir: Path) -> StateStore:
    """The state store at ``database`` (ValueError if it is no database URL), else SQLite
    in ``data_dir``."""
    if database is None:
        return _default_state_store(data_dir)
    from wsq.storage import state_store_from_url

    return state_store_from_url(database)


def _default_blob_store(data_dir: Path) -> BlobStore:
    from wsq.blobs.files import FileBlobStore

    return FileBlobStore(data_dir / "blobs")


def _blob_store(storage: str | None, data_dir: Path) -> BlobStore:
    """The blob store named by ``storage`` (ValueError if it is no storage URL), else the
    files store in ``data_dir``."""
    if storage is None:
        return _default_blob_store(data_dir)
    from wsq.blobs import blob_store_from_url

    return blob_store_from_url(storage)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _version() -> str:
    from wsq import __version__

    return __version__


def _check_seconds(name: str, value: float, *, zero_disables: bool = False) -> None:
    """A duration option: finite and positive (or 0 where 0 turns the feature off)."""
    low = "0 (off) or more" if zero_disables else "more than 0"
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_disables):
        raise ValueError(f"{name} must be a number of seconds, {low}, not {value!r}")
