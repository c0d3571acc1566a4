"""One client connection: decode its messages, route them, answer, and send in batches.

The read loop never waits on the store or the blob store: requests that need either run
as their own tasks, and answers that depend on a write go out only after it is durable
(:meth:`Server.later`). Outgoing messages queue here and leave in batches, several text
messages per frame (docs/protocol.md §2); a client that lets more than ``max_outgoing``
bytes pile up is disconnected rather than allowed to grow the server's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any

import msgspec
from picows.websockets import ConnectionClosed, ServerConnection

from wsq import protocol as p
from wsq.blobs.base import BlobReader
from wsq.core.effects import Effect
from wsq.core.task import Options, State, StreamRef, Task
from wsq.exceptions import (
    Forbidden,
    InvalidArgument,
    InvalidState,
    LimitExceeded,
    ProtocolError,
    ServerError,
    StaleRun,
    TaskNotFound,
    TooLarge,
    Unavailable,
    UploadFailed,
    WsqError,
)
from wsq.link import answered, delivered, link_state
from wsq.server.auth import EVERYONE, ROLES, Principal
from wsq.server.host import Host, Outcome
from wsq.server.logs import log
from wsq.server.replay import Entry, Key
from wsq.server.streams import Download, InlineReader, Upload, stream_json
from wsq.storage.base import Delete, Insert, Op, WorkerRow

MAX_SUBSCRIPTIONS = 10_000
"""Queues one connection may subscribe to at once (one subscription covers every queue)."""
HELLO_TIMEOUT = 5.0
"""Seconds a connection may take to say hello after its WebSocket handshake."""
_FRAME_BYTES = 1 << 20
_LIST_SLICE = 500  # tasks per store read of a listing (Connection._list)


class Connection:
    def __init__(
        self, server: Host[Connection], websocket: ServerConnection, connection_id: str
    ) -> None:
        self.server = server
        self.ws = websocket
        self.id = connection_id
        self.principal: Principal = EVERYONE
        self.session: str | None = None  # the client instance, across its reconnections
        self.client = ""  # what its hello says it is
        self._checked = server.auth is not None  # False: every check passes, skip them
        self._out: deque[tuple[bool, bytes]] = deque()
        self._out_bytes = 0
        self._wake = asyncio.Event()
        self._closing = False
        # Offers that wait for room in the outgoing buffer (or for payloads to be read):
        # (worker, snapshots of the runs); _offering: the task sending them is running.
        self._offers: deque[tuple[str, list[Task]]] = deque()
        self._offering: asyncio.Task[None] | None = None
        self._room = asyncio.Event()  # set each time the outgoing buffer shrinks
        self._sock: socket.socket | None = None  # for link_state, once greeted
        self._heard = 0  # frames received since hello
        self._watching: asyncio.Task[None] | None = None  # _watch_delivery
        self._uploads: dict[int, Upload] = {}
        self._downloads: dict[int, Download] = {}
        self._unclaimed: set[str] = set()
        self._subscriptions: set[str | None] = set()
        self._workers: set[str] = set()  # registered here: stop and cleanup look here
        self._requests: set[asyncio.Task[Any]] = set()
        # Tasks of its own (offers, keepalive, delivery watch): stopped with it, and not
        # requests in flight (max_requests).
        self._helpers: set[asyncio.Task[None]] = set()
        self._storing = 0  # adds waiting for their store job
        # Uploads refused at open (max_uploads): an add naming one gets the same error.
        self._refused: dict[int, WsqError] = {}
        self._claimed: set[int] = set()  # uploads an add waits for (still in _uploads)
        # Requests whose answer the server remembers (§4.2), until they are answered.
        self._replaying: dict[int, tuple[Key, Entry]] = {}
        self._writer: asyncio.Task[None] | None = None
        self._handlers: dict[type[Any], Callable[[Any], None]] = {
            p.Hello: self._on_hello,
            p.Add: self._on_add,
            p.AddMany: self._on_add_many,
            p.ListTasks: self._on_list,
            p.Queues: self._on_queues,
            p.Get: self._on_get,
            p.Attempts: self._on_attempts,
            p.Remove: self._on_remove,
            p.Retry: self._on_retry,
            p.Subscribe: self._on_subscribe,
            p.Unsubscribe: self._on_unsubscribe,
            p.Work: self._on_work,
            p.StopWork: self._on_stop,
            p.Ack: self._on_ack,
            p.Progress: self._on_progress,
            p.Touch: self._on_touch,
            p.Complete: self._on_complete,
            p.CompleteMany: self._on_complete_many,
            p.Release: self._on_release,
            p.Fail: self._on_fail,
            p.Upload: self._on_upload,
            p.UploadEnd: self._on_upload_end,
            p.UploadAbort: self._on_upload_abort,
            p.Download: self._on_download,
            p.Credit: self._on_credit,
            p.Cancel: self._on_cancel,
            p.Ping: self._on_ping,
            p.Stats: self._on_stats,
            p.Workers: self._on_workers,
            p.History: self._on_history,
        }

    # -- life ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Greet, then read until the connection ends (§4.1)."""
        budget = self.server.budget
        if not budget.start_greeting(self):
            await self._refuse("too_many", "The server is busy; try again.", close_code=1013)
            return
        try:
            greeted = await self._greet()
        finally:
            budget.end_greeting(self)
        if not greeted:
            return
        self._writer = asyncio.create_task(self._write_loop(), name=f"wsq-writer-{self.id}")
        if self.server.heartbeat_interval > 0:
            self._helper(self._keepalive(), f"wsq-keepalive-{self.id}")
        try:
            async for frame in self.ws:
                self._heard += 1
                if isinstance(frame, str):
                    self._receive_text(frame)
                else:
                    self._receive_binary(frame)
        except ConnectionClosed:
            pass

    def _helper(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(work, name=name)
        self._helpers.add(task)
        task.add_done_callback(self._helpers.discard)
        return task

    async def _keepalive(self) -> None:
        """Ping every heartbeat interval; the pong is due within three (§9). A pong that
        waits behind what fills a slow link (a large upload from the client, offers and
        downloads to it) may take longer: while frames from the client keep arriving or
        bytes move either way, the path is alive and the pong is waited for as long
        (:func:`wsq.link.answered`). A client silent that long is dropped (1011, "No pong")."""
        interval = self.server.heartbeat_interval
        with contextlib.suppress(ConnectionClosed):
            while not self._closing:
                await asyncio.sleep(interval)
                pong = await self.ws.ping()
                if not await answered(pong, interval * 3, self._sock, lambda: self._heard):
                    log(logging.WARNING, "no pong", "dropping a client that does not answer",
                        connection=self.id)  # fmt: skip
                    self.drop(1011, "No pong")
                    return

    async def cleanup(self) -> None:
        """Undo everything this connection held: workers, subscriptions, streams."""
        self._closing = True
        self._release_outgoing()
        for request in [*self._requests, *self._helpers]:
            request.cancel()
        await asyncio.gather(*self._requests, *self._helpers, return_exceptions=True)
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
        for worker_id in self._workers:
            if self.server.core.worker_connection(worker_id) == self.id:
                self.server.apply(self.server.core.remove_worker(worker_id))
        for queue in list(self._subscriptions):
            self.server.unsubscribe(self, queue)
        for upload in list(self._uploads.values()):
            await upload.close()
        for download in list(self._downloads.values()):  # closing removes it from the dict
            await download.close()
        if self._unclaimed:
            await self.server.blobs.delete(self._unclaimed)
        log(logging.INFO, "disconnect", connection=self.id)

    async def _greet(self) -> bool:
        try:
            async with asyncio.timeout(HELLO_TIMEOUT):
                frame = await self.ws.recv()
        except (TimeoutError, ConnectionClosed):
            return False
        try:
            hello = p.decode_one(frame)
        except p.BadMessage as exc:
            return await self._refuse("bad_message", f"Expected hello: {exc}", exc.request_id)
        if not isinstance(hello, p.Hello):
            request_id = getattr(hello, "id", None)
            return await self._refuse("bad_message", "The first message must be hello.", request_id)
        if hello.protocol != p.PROTOCOL_VERSION:
            message = f"Protocol {hello.protocol} is not supported; this server speaks 1."
            return await self._refuse("unsupported_protocol", message)
        if self.server.auth is not None:
            principal = self.server.auth.authenticate(hello.token)
            if principal is None:
                log(
                    logging.WARNING,
                    "unauthorized",
                    f"refused {_peer(self.ws)}: "
                    + ("no token" if hello.token is None else "unknown token"),
                    connection=self.id,
                )
                text = "A valid token is required." if hello.token else "A token is required."
                return await self._refuse("unauthorized", text, close_code=1008)
            self.principal = principal
        self.session = hello.session
        self.client = hello.client
        server = self.server
        # Only greeted connections count: silent ones cannot take the places of clients.
        if len(server.connections) >= server.max_connections:
            log(logging.WARNING, "connection refused", "refused a connection: at the limit")
            text = "Too many connections; try again."
            return await self._refuse("too_many", text, close_code=1013)
        server.connections[self.id] = self
        if server.gate is not None:
            self._sock = server.gate.greeted(self.ws.remote_address)
        welcome = p.welcome(
            self.id,
            f"wsq/{_version()}",
            server.heartbeat_interval,
            server.max_message_size,
            node=server.node_name,
            scope=self._task_key("") if self._checked else None,
        )
        await self.ws.send(welcome, text=True)
        log(
            logging.INFO,
            "connect",
            f"connection from {_peer(self.ws)} ({hello.client or 'unknown client'})",
            connection=self.id,
            principal=self.principal.name,
        )
        return True

    async def _refuse(
        self, code: str, message: str, request_id: int | None = None, close_code: int = 1002
    ) -> bool:
        with contextlib.suppress(ConnectionClosed):
            await self.ws.send(p.error(request_id, code, message), text=True)
            await self.ws.close(close_code, message[:120])
        return False

    # -- access control (docs/security.md) -------------------------------------------------

    def _require(self, role: str, queue: str | None) -> None:
        """Raise Forbidden unless this connection holds ``role`` on ``queue``."""
        if self._checked and not self.principal.may(role, queue):
            where = "every queue" if queue is None else f"queue {queue!r}"
            raise Forbidden(f"Token {self.principal.name!r} has no {role} role on {where}.")

    def _require_held(self, role: str) -> None:
        """Raise Forbidden unless this connection holds ``role`` on some queue: checked
        before a request looks anything up, so its answer tells nothing about the task."""
        if self._checked and not self.principal.holds(role):
            raise Forbidden(f"Token {self.principal.name!r} has no {role} role.")

    def _may_read(self, task: Task) -> bool:
        """Reading a task and its data: observe or work on its queue, or produce if this
        principal added it."""
        principal = self.principal
        if not self._checked or principal.may("observe", task.queue):
            return True
        if principal.may("work", task.queue):
            return True
        return task.owner == principal.name and principal.may("produce", task.queue)

    def _require_read(self, task: Task) -> None:
        """A task this principal may not read is answered as one that does not exist."""
        if not self._may_read(task):
            raise _not_found(task.id)

    def _require_admin_on(self, task: Task) -> None:
        """Admin on the task's queue; a task this principal may not even read does not
        exist for it (``_require_held`` has refused principals with no admin at all)."""
        if self._checked and not self.principal.may("admin", task.queue):
            self._require_read(task)
            self._require("admin", task.queue)

    def _require_work_on(self, task_id: str, run: int) -> None:
        """A worker's report: the work role on the task's queue. A task the core does not
        hold, or holds on a queue this principal does not work on, gets the core's own
        answer (a stale run)."""
        if self._checked:
            self._require_held("work")
            held = self.server.core.lookup(task_id)
            if held is not None and not self.principal.may("work", held.queue):
                raise StaleRun(f"Run {run} of task {task_id} is not active.")

    def may_observe(self, queue: str | None) -> bool:
        return not self._checked or self.principal.may("observe", queue)

    # -- outgoing --------------------------------------------------------------------------

    def send_text(self, message: bytes) -> None:
        self._enqueue(True, message)

    def send_binary(self, frame: bytes) -> None:
        """A chunk of a download: the stream id (4 bytes), then the stream's bytes."""
        self.server.metrics.sent_bytes.inc(len(frame) - 4)
        self._enqueue(False, frame)

    def _enqueue(self, text: bool, data: bytes) -> None:
        if self._closing:
            return
        self._out.append((text, data))
        self._out_bytes += len(data)
        self.server.budget.used += len(data)
        self._wake.set()
        if self._out_bytes > self.server.max_outgoing:
            self._drop_slow()
        elif self.server.budget.over:
            self.server.shed_load()

    def _drop_slow(self) -> None:
        log(
            logging.WARNING,
            "slow consumer",
            "dropping a client that does not read",
            connection=self.id,
        )
        self.drop(1008, "Slow consumer")

    def _stalled_after(self) -> float:
        """How long offers wait on a client that reads nothing before it is dropped: half
        the worker timeout (the runs it holds would time out unacknowledged soon after,
        and must not be offered to it again), 10 s when runs have no worker timeout."""
        timeout = self.server.worker_timeout
        return timeout / 2 if timeout >= 0 else 10.0

    @property
    def backlog(self) -> int:
        """Outgoing bytes queued here, not yet handed to the socket."""
        return self._out_bytes

    def drop(self, code: int, reason: str) -> None:
        """Close this connection; what it had queued to send is given up at once."""
        if self._closing:
            return
        self._closing = True
        self._release_outgoing()
        self.server.spawn(self.ws.close(code, reason), f"wsq-drop-{self.id}")

    def _release_outgoing(self) -> None:
        self.server.budget.used -= self._out_bytes
        self._out.clear()
        self._out_bytes = 0
        self._offers.clear()
        self._room.set()

    # -- offers ----------------------------------------------------------------------------

    def offer(self, worker: str, tasks: Sequence[Task]) -> None:
        """Send an offer of these runs to ``worker``. The server makes offers in bursts a
        worker did not ask to be paced (a worker of concurrency 100 on a queue of 1 MiB
        tasks is offered 100 MiB at once), so they never fill the outgoing buffer past
        half of ``max_outgoing``: what does not fit waits here, as the runs' snapshots
        without payloads, and leaves in slices of at most a quarter of it as the client
        reads (:meth:`_send_offers`); a payload the window did not keep is read from the
        store then. The wait is bounded by the worker's concurrency (offered runs hold
        its slots), and a worker that does not read is dropped by the ``max_outgoing``
        rule all the same, once what it was sent before piles up."""
        if self._closing:
            return
        if (
            not self._offers
            and all(task.data is not None for task in tasks)
            and self._out_bytes + _offer_bytes(tasks, 0) <= self.server.max_outgoing // 2
        ):
            self._send_offer(worker, tasks)
            return
        self._offers.append((worker, list(tasks)))
        if self._offering is None:
            self._offering = self._helper(self._send_offers(), f"wsq-offers-{self.id}")

    async def _send_offers(self) -> None:
        server = self.server
        try:
            while self._offers and not self._closing:
                while self._out_bytes > server.max_outgoing // 2 and not self._closing:
                    self._room.clear()
                    before = link_state(self._sock)
                    try:
                        async with asyncio.timeout(self._stalled_after()):
                            await self._room.wait()
                    except TimeoutError:
                        if not delivered(before, link_state(self._sock)):
                            self._drop_slow()  # the client reads nothing (or none can tell)
                            return
                if self._closing:
                    return
                worker, tasks = self._offers[0]
                budget, size, count = server.max_outgoing // 4, 0, 0
                for task in tasks:
                    cost = _offer_bytes((task,), server.max_message_size)
                    if count and size + cost > budget:
                        break
                    size += cost
                    count += 1
                part = [t for t in tasks[:count] if server.core.is_current(t.id, t.run)]
                del tasks[:count]
                if not tasks:
                    self._offers.popleft()
                missing = [task.id for task in part if task.data is None]
                if missing:
                    try:
                        stored = await server.store.get_many(missing)
                    except Exception as exc:  # these runs time out and are offered again
                        log(logging.ERROR, "store failed", f"Reading offered tasks failed: {exc}")
                        continue
                    read = [_with_payload(t, stored) for t in part]
                    part = [
                        t for t in read if t is not None and server.core.is_current(t.id, t.run)
                    ]
                if part and not self._closing:
                    self._send_offer(worker, part)
        finally:
            self._offering = None

    def _send_offer(self, worker: str, tasks: Sequence[Task]) -> None:
        """Offer ``tasks`` in messages of at most about _FRAME_BYTES each (one task more
        if need be): a message arrives whole or not at all, and on a slow link one of
        many megabytes would keep the worker from hearing anything for longer than its
        heartbeat waits (§9)."""
        offered: list[dict[str, Any]] = []
        size = 0
        for task in tasks:
            cost = _offer_bytes((task,), 0)
            if offered and size + cost > _FRAME_BYTES:
                self.send_text(p.encode({"op": "offer", "worker": worker, "tasks": offered}))
                offered, size = [], 0
            offered.append(
                {
                    "task": task.to_json(),
                    "run": task.run,
                    "data": msgspec.Raw(task.data or b"null"),
                    "streams": [stream_json(ref) for ref in task.streams],
                }
            )
            size += cost
        if offered:
            self.send_text(p.encode({"op": "offer", "worker": worker, "tasks": offered}))
        if self._watching is None and self.server.worker_timeout >= 0:
            self._watching = self._helper(self._watch_delivery(), f"wsq-delivery-{self.id}")

    async def _watch_delivery(self) -> None:
        """While bytes for the client are on their way and its TCP keeps acknowledging
        them, the runs its workers were offered wait for acknowledgments from now on
        (:meth:`wsq.core.engine.Core.delivering`): a slow link is not a dead worker."""
        try:
            period = self.server.worker_timeout / 4
            state = link_state(self._sock)
            while state is not None and not self._closing:
                await asyncio.sleep(period)
                now = link_state(self._sock)
                if now is None:
                    return
                if delivered(state, now):
                    self.server.core.delivering(self._workers, time.time())
                state = now
                if not (self._offers or self._out or state.unsent):
                    return
        finally:
            self._watching = None

    async def _write_loop(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                while not self._out:
                    self._wake.clear()
                    await self._wake.wait()
                    # One more turn of the loop lets messages made by other tasks
                    # in the meantime leave in the same frame (one syscall).
                    await asyncio.sleep(0)
                text, data = self._out[0]
                if text:
                    frame = self._take_text()
                else:
                    self._out.popleft()
                    self._out_bytes -= len(data)
                    self.server.budget.used -= len(data)
                    frame = data
                self._room.set()
                await self.ws.send(frame, text=text)

    def _take_text(self) -> bytes:
        parts: list[bytes] = []
        size = 0
        while self._out and self._out[0][0] and size < _FRAME_BYTES:
            data = self._out.popleft()[1]
            parts.append(data)
            size += len(data)
        self._out_bytes -= size
        self.server.budget.used -= size
        return p.join_frame(parts)

    def answer(self, request_id: int | None, value: Any = None) -> None:
        """Answer once every write made so far is durable; if the batch it waited for
        failed, answer with its error instead (the request's writes may be lost)."""
        if request_id is not None:
            message = p.result(request_id, value)
            self.server.later(
                lambda: self._reply(request_id, message),
                lambda exc: self.send_error(request_id, _as_error(exc)),
            )

    def answer_now(self, request_id: int | None, value: Any = None) -> None:
        if request_id is not None:
            self._reply(request_id, p.result(request_id, value))

    def send_error(self, request_id: int | None, exc: WsqError) -> None:
        """Answer with ``exc``; an internal error's text (store paths, SQL) stays in the log."""
        if exc.code == "internal":
            log(logging.ERROR, "internal error", str(exc), connection=self.id)
            exc = ServerError("Internal server error.")
        self._reply(request_id, p.error(request_id, exc.code, str(exc)))

    def _reply(self, request_id: int | None, message: bytes) -> None:
        """Send the answer to a request, remembering it if the request may be re-sent."""
        tracked = self._replaying.pop(request_id, None) if request_id is not None else None
        if tracked is not None:
            tracked[1].settle(message)
        self.send_text(message)

    def _replayed(self, message: Any, request_id: int | None) -> bool:
        """Whether this request was seen before in this session (§4.2): then it is
        answered as the first time (at once, or when the first copy is answered) and not
        done again. Otherwise its answer will be remembered."""
        if self.session is None or request_id is None or type(message) not in _REPLAYED:
            return False
        key = (self.principal.name, self.session, request_id)
        entry = self.server.replay.seen(key)
        if entry is None:
            self._replaying[request_id] = (key, self.server.replay.begin(key))
            return False
        if entry.answer is not None:
            self.send_text(entry.answer)
        else:
            entry.waiters.append(functools.partial(self._first_copy_done, message))
        return True

    def _first_copy_done(self, message: Any, answer: bytes | None) -> None:
        if answer is not None:
            self.send_text(answer)
        elif not self._closing:
            self._dispatch(message)  # the first copy never acted: handle this one

    def _abandon(self, request_id: int | None) -> None:
        """A request dropped (its connection closed) before it acted."""
        tracked = self._replaying.pop(request_id, None) if request_id is not None else None
        if tracked is not None:
            key, entry = tracked
            self.server.replay.forget(key, entry)
            entry.abandon()

    # -- incoming --------------------------------------------------------------------------

    def _receive_text(self, frame: str) -> None:
        size = len(frame) if frame.isascii() else len(frame.encode("utf-8", "surrogatepass"))
        if size > self.server.max_message_size:
            found = p.probe_id(frame)
            limit = self.server.max_message_size
            text = f"Message of {size} bytes exceeds the limit of {limit}; use a stream."
            self.send_text(p.error(found, "too_large", text))
            return
        try:
            messages = p.decode_frame(frame)
        except Exception as exc:  # the decoder must never take the connection down
            log(logging.ERROR, "internal error", f"decoding a frame: {exc!r}", connection=self.id)
            self.send_text(p.error(None, "internal", "Internal server error."))
            return
        for message in messages:
            if isinstance(message, p.BadMessage):
                self.send_text(p.error(message.request_id, "bad_message", str(message)))
            else:
                self._dispatch(message)

    def _dispatch(self, message: Any) -> None:
        request_id = getattr(message, "id", None)
        try:
            if type(message) in _BOUNDED and self._in_flight() >= self.server.max_requests:
                raise self._too_many_requests()
            if self._replayed(message, request_id):
                return
            self._handlers[type(message)](message)
        except WsqError as exc:
            self.send_error(request_id, exc)
        except Exception as exc:
            log(
                logging.ERROR,
                "internal error",
                f"{type(message).__name__}: {exc!r}",
                connection=self.id,
            )
            self._reply(request_id, p.error(request_id, "internal", "Internal server error."))

    def _in_flight(self) -> int:
        """Requests that hold server resources: those waiting on a store, and downloads."""
        return len(self._requests) + self._storing + len(self._downloads)

    def _too_many_requests(self) -> LimitExceeded:
        limit = self.server.max_requests
        return LimitExceeded(f"More than {limit} requests in flight on this connection.")

    def _receive_binary(self, frame: bytes) -> None:
        try:
            stream, payload = p.unpack_chunk(frame)
        except ValueError as exc:
            self.send_error(None, ProtocolError(str(exc)))
            return
        upload = self._uploads.get(stream)
        if upload is None:
            return  # §8.2: chunks for a stream that is not open are discarded.
        self.server.metrics.received_bytes.inc(len(payload))
        try:
            upload.receive(payload)
        except ProtocolError as exc:
            self.send_error(None, exc)

    def _spawn(self, request_id: int | None, coro: Coroutine[Any, Any, Any]) -> None:
        """Run a request that must wait on I/O; its result (or error) is the answer."""

        async def run() -> None:
            try:
                value = await coro
                if value is not _NO_ANSWER:
                    self.answer_now(request_id, value)
            except WsqError as exc:
                self.send_error(request_id, exc)
            except asyncio.CancelledError:
                self._abandon(request_id)  # requests act last, so this one did not
                raise
            except Exception as exc:
                log(logging.ERROR, "internal error", repr(exc), connection=self.id)
                self._reply(request_id, p.error(request_id, "internal", "Internal server error."))

        task = asyncio.create_task(run(), name=f"wsq-request-{self.id}-{request_id}")
        self._requests.add(task)
        task.add_done_callback(self._requests.discard)
        # A request cancelled before it started (its connection closed) never awaits
        # ``coro``: close it, so that it neither warns nor keeps the connection alive.
        task.add_done_callback(lambda _: coro.close())

    # -- handlers: tasks -------------------------------------------------------------------

    def _on_hello(self, message: p.Hello) -> None:
        raise ProtocolError("Already greeted: hello is only the first message.")

    def _on_add(self, message: p.Add) -> None:
        uploads = [s.upload for s in message.streams if s.upload is not None]
        try:
            self._require("produce", message.queue)
            options = _options(message.options, self.server.min_task_timeout)
            _check_stream_paths(message.data, message.streams)
            if len(set(uploads)) != len(uploads):
                raise InvalidArgument("An upload can hold only one stream of the data.")
            for stream in uploads:
                if stream in self._refused:
                    raise self._refused.pop(stream)
                if stream in self._claimed:
                    raise InvalidArgument(f"Stream {stream} is already referenced by an add.")
            missing = [stream for stream in uploads if stream not in self._uploads]
            if missing:
                raise InvalidArgument(f"Stream {missing[0]} is not an open upload.")
            self._check_data_size(message)
        except WsqError:
            # No task will hold this add's uploads: drop them now, not at disconnect
            # (those an earlier add waits for stay its own).
            for stream in uploads:
                if stream not in self._claimed:
                    self._drop_upload(stream, "Its add was refused.")
            raise
        # The uploads stay open (an upload_end may still come) until they are stored.
        pending = [self._uploads[stream] for stream in uploads]
        self._claimed.update(uploads)
        if pending:
            self._spawn(message.id, self._add_after_uploads(message, options, pending))
        else:
            self._insert(message, options, {})

    async def _add_after_uploads(
        self, message: p.Add, options: Options, pending: list[Upload]
    ) -> Any:
        try:
            results = await asyncio.gather(*(u.done for u in pending), return_exceptions=True)
        except asyncio.CancelledError:
            # The connection closed first: stop the uploads here, discarding their blobs.
            for upload in pending:
                await upload.close()
            raise
        finally:
            for upload in pending:
                self._claimed.discard(upload.stream)
                if self._uploads.get(upload.stream) is upload:
                    del self._uploads[upload.stream]
        done = {u.stream: r for u, r in zip(pending, results, strict=True)}
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            await self.server.blobs.delete([r[0] for r in results if isinstance(r, tuple)])
            self._unclaimed.difference_update(r[0] for r in results if isinstance(r, tuple))
            raise failed[0]
        self._insert(message, options, done)  # type: ignore[arg-type]
        return _NO_ANSWER

    def _insert(
        self, message: p.Add, options: Options, uploads: dict[int, tuple[str, int]]
    ) -> None:
        task = self._new_task(message.queue, message, options, uploads, time.time())
        keys = set(task.blobs)
        self._unclaimed -= keys
        self._storing += 1
        record = self.server.core.admit(task, time.time())
        self.server.submit(
            [Insert(record)], lambda outcome: self._inserted(outcome, message.id, task, keys)
        )

    def _inserted(self, outcome: Outcome, request_id: int, task: Task, keys: set[str]) -> None:
        self._storing -= 1
        if isinstance(outcome, BaseException) or not outcome[0]:
            self.server.core.abandon_seq(task.seq)
            self.server.spawn(self.server.blobs.delete(keys), "wsq-delete-blobs")
            if isinstance(outcome, BaseException):
                self.send_error(request_id, _store_failed("Could not store the task", outcome))
            else:
                self._spawn(request_id, self._existing(task))
            return
        self.server.apply(self.server.core.add(task, time.time()))
        self.answer(request_id, task.to_json())

    def _new_task(
        self,
        queue: str,
        spec: p.Add | p.NewTask,
        options: Options,
        uploads: dict[int, tuple[str, int]],
        now: float,
    ) -> Task:
        self._check_data_size(spec)
        return Task(
            id=self._task_key(spec.task) if spec.task else uuid.uuid4().hex,
            queue=queue,
            state=State.WAITING,
            seq=self.server.core.allocate_seq(now),
            data=bytes(spec.data),
            streams=tuple(_stream_ref(s, uploads) for s in spec.streams) if spec.streams else (),
            options=options,
            created=now,
            updated=now,
            owner=self.principal.name if self._checked else None,
        )

    def _task_key(self, chosen: str) -> str:
        """The id of a task whose id this principal chose: scoped to the principal, as
        worker ids are, so that ids of other principals' tasks can neither collide with
        it nor be probed by adding them (docs/security.md). The server's own ids (hex,
        no ``/``) stay bare; the chosen part keeps the limits of §3."""
        return f"{self.principal.name}/{chosen}" if self._checked else chosen

    def _check_data_size(self, spec: p.Add | p.NewTask) -> None:
        if len(spec.data) > self.server.max_data_size:
            limit = self.server.max_data_size
            raise TooLarge(f"Task data of {len(spec.data)} bytes exceeds the limit of {limit}.")

    def _on_add_many(self, message: p.AddMany) -> None:
        """Several tasks in one message, one store job and one answer (§4.3)."""
        self._require("produce", message.queue)
        options = [_options(spec.options, self.server.min_task_timeout) for spec in message.tasks]
        for spec in message.tasks:
            if any(stream.upload is not None for stream in spec.streams):
                raise InvalidArgument("add_many takes inline streams only; use add to upload.")
            _check_stream_paths(spec.data, spec.streams)
        now = time.time()  # one time for the batch, as its answer gives (§4.3)
        tasks = [
            self._new_task(message.queue, spec, opts, {}, now)
            for spec, opts in zip(message.tasks, options, strict=True)
        ]
        self._storing += 1
        self.server.submit(
            [Insert(self.server.core.admit(task, now)) for task in tasks],
            lambda outcome: self._inserted_many(outcome, message.id, tasks),
        )

    def _inserted_many(self, outcome: Outcome, request_id: int, tasks: list[Task]) -> None:
        self._storing -= 1
        core = self.server.core
        if isinstance(outcome, BaseException):
            for task in tasks:
                core.abandon_seq(task.seq)
            self.send_error(request_id, _store_failed("Could not store tasks", outcome))
            return
        if all(outcome):
            now = time.time()
            effects = []
            for task in tasks:
                effects += core.add(task, now)
            self.server.apply(effects)
            self.answer(request_id, {"created": tasks[0].created, "tasks": [t.id for t in tasks]})
        else:
            self._spawn(request_id, self._existing_many(request_id, tasks, outcome))

    async def _existing_many(self, request_id: int, tasks: list[Task], inserted: list[bool]) -> Any:
        """Some ids existed. If each is the same add sent again, answer their records in
        place of their ids and announce the new tasks; if one is in use elsewhere, the
        request is refused and the new tasks, stored but never announced, are deleted."""
        core = self.server.core
        new = [task for task, fresh in zip(tasks, inserted, strict=True) if fresh]
        for task, fresh in zip(tasks, inserted, strict=True):
            if not fresh:
                core.abandon_seq(task.seq)
        try:
            answers = [
                task.id if fresh else await self._existing(task)
                for task, fresh in zip(tasks, inserted, strict=True)
            ]
        except BaseException:
            for task in new:
                core.abandon_seq(task.seq)
            if new:
                self.server.submit([Delete(task.id) for task in new])
                await self._durable()
            raise
        now = time.time()
        effects = []
        for task in new:
            effects += core.add(task, now)
        self.server.apply(effects)
        # Answered through the durable pipe, not after an await: once the tasks are
        # announced, closing the connection cannot lose the answer (§4.2, re-sent).
        self.answer(request_id, {"created": tasks[0].created, "tasks": answers})
        return _NO_ANSWER

    async def _existing(self, task: Task) -> Any:
        """An add whose id exists: the same add sent again after a reconnect (§4.3)."""
        stored = self.server.core.lookup(task.id) or await self._stored(task.id)
        if stored is None or stored.queue != task.queue or stored.owner != task.owner:
            raise InvalidArgument(f"Task id {task.id} is already in use.")
        return stored.to_json()

    def _on_list(self, message: p.ListTasks) -> None:
        self._require("observe", message.queue)
        self._spawn(message.id, self._list(message))

    async def _list(self, message: p.ListTasks) -> Any:
        """A page of at most ``limit`` tasks, and of at most a quarter of
        ``max_outgoing`` bytes (a task's error may be 64 KiB: a full page of them would
        be 640 MB): a page cut short by its size has a cursor like any other. Read in
        slices of :data:`_LIST_SLICE`, so that what a page costs the server is bounded
        by the same, however many tasks it asks for."""
        after = int(message.cursor) if message.cursor is not None else None
        state = State(message.state) if message.state else None
        await self._durable()  # listings show every transition anyone was told of
        budget = self.server.max_outgoing // 4
        page: list[msgspec.Raw] = []
        size = 0
        while True:
            want = min(message.limit - len(page), _LIST_SLICE)
            # One more than asked for tells whether more follow.
            tasks = await self.server.store.list(
                queue=message.queue, state=state, limit=want + 1, after=after
            )
            for task in tasks[:want]:
                encoded = msgspec.Raw(p.encode(self._fresh(task).to_json()))
                if page and size + len(encoded) > budget:
                    return {"tasks": page, "cursor": str(after)}
                page.append(encoded)
                size += len(encoded)
                after = task.seq
            if len(tasks) <= want:
                return {"tasks": page, "cursor": None}
            if len(page) == message.limit:
                return {"tasks": page, "cursor": str(after)}

    def _fresh(self, task: Task) -> Task:
        """The core's copy of a task when it holds one (its progress may be newer)."""
        held = self.server.core.lookup(task.id)
        return held if held is not None and held.state == task.state else task

    def _on_queues(self, message: p.Queues) -> None:
        # The core knows every queue that holds a task (its counts) or a worker; the names
        # as of now, sent once the writes that made them are durable. A restricted token
        # costs only the names its patterns can match (core/names.py), and a page its own.
        patterns = self.principal.patterns(*ROLES) if self._checked else None
        if self.server.store.shared:
            self._spawn(message.id, self._cluster_queues(message, patterns))
            return
        names = self.server.core.names(patterns, message.cursor)
        page, cursor = self._page(names, message.limit, lambda name: name)
        self.answer(message.id, {"queues": page, "cursor": cursor})

    async def _cluster_queues(self, message: p.Queues, patterns: Sequence[str] | None) -> Any:
        """A shared store's queues are every node's: read as ``stats`` reads them."""
        await self._durable()
        counts = await self.server.store.counts()
        others = await self._other_workers()
        names = self.server.core.names(patterns, message.cursor, counts, others)
        page, cursor = self._page(names, message.limit, lambda name: name)
        return {"queues": page, "cursor": cursor}

    def _page(
        self, items: Iterator[Any], limit: int, name: Callable[[Any], str]
    ) -> tuple[list[msgspec.Raw], str | None]:
        """A page of a listing (queues, stats, workers): at most ``limit`` of ``items``,
        and at most a quarter of ``max_outgoing`` bytes (as a page of ``list``; a queue in
        ``stats`` lists its workers), encoded; and its cursor, the ``name`` of its last
        item, or ``None`` when no item is left. Builds only the page (and one more item),
        however long the listing."""
        budget = self.server.max_outgoing // 4
        page: list[msgspec.Raw] = []
        size, last = 0, None
        for item in items:
            if len(page) == limit:
                return page, last
            encoded = msgspec.Raw(p.encode(item))
            if page and size + len(encoded) > budget:
                return page, last
            page.append(encoded)
            size += len(encoded)
            last = name(item)
        return page, None

    async def _find(self, task_id: str) -> Task:
        """The task as the core holds it (else as stored, read after the writes before
        this request), with its payload."""
        held = self.server.core.lookup(task_id)
        if held is not None and held.data is not None:
            return held
        if held is None:
            await self._durable()  # the store's copy is read after the writes before us
        stored = await self.server.store.get(task_id)
        held = self.server.core.lookup(task_id)  # it may have been taken up meanwhile
        task = stored
        if held is not None and stored is not None:  # the core's state, the payload
            task = held.copy()
            task.data, task.streams = stored.data, stored.streams
        if task is None:
            raise _not_found(task_id)
        return task

    async def _stored(self, task_id: str) -> Task | None:
        """The store's copy, once every write submitted before this read is durable (the
        store's reads see only committed writes, and the core decides ahead of them)."""
        await self._durable()
        held = self.server.core.lookup(task_id)  # it may have been taken up meanwhile
        return held or await self.server.store.get(task_id)

    def _on_get(self, message: p.Get) -> None:
        self._spawn(message.id, self._get(message.task))

    async def _get(self, task_id: str) -> Any:
        task = await self._find(task_id)
        self._require_read(task)
        return {
            "task": task.to_json(),
            "data": msgspec.Raw(task.data or b"null"),
            "streams": [stream_json(ref) for ref in task.streams],
        }

    def _on_attempts(self, message: p.Attempts) -> None:
        self._spawn(message.id, self._attempts(message.task))

    async def _attempts(self, task_id: str) -> Any:
        """The task's attempts as stored, then its run in progress (§4.3 ``attempts``);
        read like ``get``: a task this principal may not read is not found."""
        task = await self._stored(task_id)  # after the writes before this request
        if task is None:
            raise _not_found(task_id)
        self._require_read(task)
        attempts = await self.server.store.attempts(task_id)
        current = self.server.core.current_attempt(task_id)
        # A run may have ended (and the next begun) while the store was read.
        if current is not None and (not attempts or attempts[-1].run < current.run):
            attempts.append(current)
        return {"attempts": [attempt.to_json() for attempt in attempts]}

    def _on_remove(self, message: p.Remove) -> None:
        self._spawn(message.id, self._remove(message.id, message.task))

    async def _remove(self, request_id: int, task_id: str) -> Any:
        self._require_held("admin")
        async with self.server.task_locks.hold(task_id):
            for _ in range(_ATTEMPTS):
                if await self._remove_once(task_id):
                    self.answer(request_id)  # acting is the last step (see _spawn)
                    return _NO_ANSWER
        raise InvalidState(f"Task {task_id} kept changing; try again.")

    async def _remove_once(self, task_id: str) -> bool:
        """One attempt at removing the task as the core or, failing that, the store has
        it; whether it was removed. The store's delete applies only if the task is still
        as read, so counts never move twice (docs/reliability.md)."""
        core = self.server.core
        held, stored = await self._current(task_id)
        if held is not None:
            self._require_admin_on(held)
            self.server.apply(core.remove(task_id, time.time()) or [])
            return True
        if stored is None:
            raise _not_found(task_id)
        self._require_admin_on(stored)
        op = core.begin_delete(stored)
        if op is None:
            return False  # its add is not done: read again
        return await self._submit_one(op, lambda ok: core.deleted(stored, ok, time.time()))

    def _on_retry(self, message: p.Retry) -> None:
        self._spawn(message.id, self._retry(message.id, message.task))

    async def _retry(self, request_id: int, task_id: str) -> Any:
        self._require_held("admin")
        async with self.server.task_locks.hold(task_id):
            for _ in range(_ATTEMPTS):
                retried = await self._retry_once(task_id)
                if retried is not None:
                    self.answer(request_id, retried.to_json())  # acting is the last step
                    return _NO_ANSWER
        raise InvalidState(f"Task {task_id} kept changing; try again.")

    async def _retry_once(self, task_id: str) -> Task | None:
        """One attempt at retrying the task as the core or the store has it: the task
        as retried, or ``None`` if it changed meanwhile (the store's update applies only
        to a task still failed)."""
        held, stored = await self._current(task_id)
        task = held or stored
        if task is None:
            raise _not_found(task_id)
        self._require_admin_on(task)
        core = self.server.core
        op = core.begin_retry(task, time.time())
        if await self._submit_one(op, lambda ok: core.retried(op, ok, time.time())):
            return op.task
        return None

    async def _current(self, task_id: str) -> tuple[Task | None, Task | None]:
        """The core's task if it holds one, else the store's copy once every write made
        so far is durable (or ``None``): ``(held, stored)``."""
        held = self.server.core.lookup(task_id)
        if held is not None:
            return held, None
        await self._durable()
        stored = await self.server.store.get(task_id)
        held = self.server.core.lookup(task_id)  # it may have taken the task meanwhile
        return (held, None) if held is not None else (None, stored)

    async def _submit_one(self, op: Op, then: Callable[[bool], list[Effect]]) -> bool:
        """Submit ``op``, hand whether it applied to ``then`` and apply its effects, even
        if this request is cancelled meanwhile (the core must hear every result)."""
        done: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()

        def settle(outcome: Outcome) -> None:
            applied = not isinstance(outcome, BaseException) and bool(outcome[0])
            self.server.apply(then(applied))
            if not done.done():
                done.set_result(outcome)

        self.server.submit([op], settle)
        outcome = await done
        if isinstance(outcome, BaseException):
            raise _store_failed("Could not store the change", outcome)
        return bool(outcome[0])

    async def _durable(self) -> None:
        """Wait until every write made so far is durable (and sent in order before us)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def release() -> None:
            if not done.done():
                done.set_result(None)

        self.server.later(release)
        await done

    # -- handlers: listeners and workers ---------------------------------------------------

    def _on_subscribe(self, message: p.Subscribe) -> None:
        if message.queue is not None or not self.principal.holds("observe"):
            # Everything: events of the queues this token may observe (filtered as sent).
            self._require("observe", message.queue)
        if message.queue not in self._subscriptions and len(self._subscriptions) >= (
            MAX_SUBSCRIPTIONS
        ):
            raise LimitExceeded(f"More than {MAX_SUBSCRIPTIONS} subscriptions on this connection.")
        self._subscriptions.add(message.queue)
        self.server.subscribe(self, message.queue)
        self.answer_now(message.id)

    def _on_unsubscribe(self, message: p.Unsubscribe) -> None:
        self._subscriptions.discard(message.queue)
        self.server.unsubscribe(self, message.queue)
        self.answer_now(message.id)

    def _on_work(self, message: p.Work) -> None:
        self._require("work", message.queue)
        name = message.worker or uuid.uuid4().hex
        worker_id = self._worker_key(name)
        if worker_id not in self._workers and len(self._workers) >= self.server.max_workers:
            limit = self.server.max_workers
            raise LimitExceeded(f"More than {limit} workers registered on this connection.")
        core = self.server.core
        holder = core.worker_connection(worker_id)
        if holder is not None and holder != self.id:
            # A client that noticed a dead connection before the server did comes back
            # with its worker ids: its new connection takes the worker over (the runs stay
            # the worker's). Only the same client session, under the same principal.
            previous = self.server.connections.get(holder)
            if previous is not None and not (
                self.session is not None
                and previous.session == self.session
                and previous.principal.name == self.principal.name
            ):
                raise InvalidArgument(f"Worker id {name} is already connected.")
            if previous is not None:
                previous._workers.discard(worker_id)
            self.server.apply(core.remove_worker(worker_id))
            log(logging.INFO, "worker moved", connection=self.id, worker=name)
        effects = core.add_worker(
            self.id,
            worker_id,
            message.queue,
            message.concurrency,
            time.time(),
            name=name,
            client=self.client,
            peer=_peer(self.ws),
        )
        self._workers.add(worker_id)
        self.answer(message.id, {"worker": name})
        self.server.apply(effects)

    def _worker_key(self, name: str) -> str:
        """The core's key for this principal's worker ``name``: ids are scoped to their
        principal, so another token using the same id gets a worker of its own and never
        the runs or aborts of this one (docs/security.md)."""
        return f"{self.principal.name}/{name}" if self._checked else name

    def _on_stop(self, message: p.StopWork) -> None:
        worker_id = self._worker_key(message.worker)
        core = self.server.core
        if worker_id not in self._workers or core.worker_connection(worker_id) != self.id:
            raise InvalidArgument(f"Worker {message.worker} is not registered on this connection.")
        self._workers.discard(worker_id)
        self.server.apply(core.remove_worker(worker_id))
        self.answer(message.id)

    def _reported(
        self,
        request_id: int | None,
        runs: Sequence[tuple[str, int]],
        act: Callable[[], None],
        *,
        final: bool = False,
    ) -> None:
        """``act`` on a worker's report for ``runs``. With a shared store, runs this node
        does not hold may be another node's whose worker moved here (its connection to
        that node broke): they are taken over first (:meth:`Host.adopt_runs`), so the
        report is accepted as after a restart; runs that are not taken over stay stale.
        A ``final`` report (one that ends runs) is refused as unavailable while this
        node's lease is in doubt (:meth:`Host.lease_in_doubt`); clients send it again.
        With a store of its own, a report for runs the core does not hold is refused
        so too while a write failed and the core is not set right yet (:meth:`Host.astray`):
        the store may still hold them (their end was not stored)."""
        if final and self.server.lease_in_doubt():
            raise Unavailable(
                "This node is renewing its lease on the shared store; send it again shortly."
            )
        if not self.server.store.shared and self.server.astray():
            core = self.server.core
            if not all(core.is_current(task, run) for task, run in runs):
                raise Unavailable(
                    "A write to the state store failed and the server is setting its state"
                    " right; send it again shortly."
                )
        moved = self._moved(runs)
        if not moved:
            act()
            return

        async def adopt_then_act() -> object:
            await self.server.adopt_runs(moved, sorted(self._workers))
            act()
            return _NO_ANSWER

        self._spawn(request_id, adopt_then_act())

    def _moved(self, runs: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
        """Of ``runs``, those another node may hold for a worker of this connection."""
        if not self.server.store.shared or not self._workers:
            return []
        core = self.server.core
        return [(task, run) for task, run in runs if not core.is_current(task, run)]

    def _on_ack(self, message: p.Ack) -> None:
        refs = [(ref.task, ref.run) for ref in message.runs]
        self._reported(message.id, refs, lambda: self._ack(message))

    def _ack(self, message: p.Ack) -> None:
        now = time.time()
        core = self.server.core
        effects: list[Effect] = []
        for ref in message.runs:  # one apply for them all, as _each_run_now
            try:
                self._require_work_on(ref.task, ref.run)
                effects += core.ack(ref.task, ref.run, now)
            except WsqError:
                continue
        self.server.apply(effects)
        self.answer(message.id)

    def _on_progress(self, message: p.Progress) -> None:
        self._reported(message.id, [(message.task, message.run)], lambda: self._progress(message))

    def _progress(self, message: p.Progress) -> None:
        self._require_work_on(message.task, message.run)
        core = self.server.core
        self.server.apply(core.progress(message.task, message.run, message.progress, time.time()))
        self.answer(message.id)

    def _on_touch(self, message: p.Touch) -> None:
        self._reported(message.id, [(message.task, message.run)], lambda: self._touch(message))

    def _touch(self, message: p.Touch) -> None:
        self._require_work_on(message.task, message.run)
        self.server.apply(self.server.core.touch(message.task, message.run, time.time()))
        self.answer(message.id)

    def _on_complete(self, message: p.Complete) -> None:
        self._reported(
            message.id, [(message.task, message.run)], lambda: self._complete(message), final=True
        )

    def _complete(self, message: p.Complete) -> None:
        self._require_work_on(message.task, message.run)
        self.server.apply(self.server.core.complete(message.task, message.run, time.time()))
        self.answer(message.id)

    def _on_complete_many(self, message: p.CompleteMany) -> None:
        """Several completions in one message."""
        self._each_run(message.id, message.runs, self.server.core.complete)

    def _on_release(self, message: p.Release) -> None:
        """Offered runs a stopped worker declines (§4.5)."""
        self._each_run(message.id, message.runs, self.server.core.release)

    def _each_run(
        self,
        request_id: int | None,
        runs: list[p.RunRef],
        act: Callable[[str, int, float], list[Effect]],
    ) -> None:
        """``act`` on each run; the answer lists the refused ones as stale: not active, of
        tasks on queues this principal does not work on, or (a release) already started."""
        self._require_held("work")
        refs = [(ref.task, ref.run) for ref in runs]
        self._reported(
            request_id, refs, lambda: self._each_run_now(request_id, runs, act), final=True
        )

    def _each_run_now(
        self,
        request_id: int | None,
        runs: list[p.RunRef],
        act: Callable[[str, int, float], list[Effect]],
    ) -> None:
        now = time.time()
        effects: list[Effect] = []
        stale = []
        for ref in runs:
            try:
                self._require_work_on(ref.task, ref.run)
                effects += act(ref.task, ref.run, now)
            except (StaleRun, InvalidState):
                stale.append([ref.task, ref.run])
        self.server.apply(effects)
        self.answer(request_id, {"stale": stale})

    def _on_fail(self, message: p.Fail) -> None:
        self._reported(
            message.id, [(message.task, message.run)], lambda: self._fail(message), final=True
        )

    def _fail(self, message: p.Fail) -> None:
        self._require_work_on(message.task, message.run)
        core = self.server.core
        self.server.apply(core.fail(message.task, message.run, message.error, time.time()))
        self.answer(message.id)

    # -- handlers: streams (§8) ------------------------------------------------------------

    def _on_upload(self, message: p.Upload) -> None:
        if self._checked and not self.principal.holds("produce"):
            raise Forbidden(f"Token {self.principal.name!r} has no produce role.")
        if message.stream in self._uploads or message.stream in self._downloads:
            raise InvalidArgument(f"Stream {message.stream} is already open.")
        if len(self._uploads) >= self.server.max_uploads:
            # Told like any upload failure (§8.2), so the client stops sending for it.
            limit = self.server.max_uploads
            text = f"More than {limit} uploads open on this connection."
            if len(self._refused) >= _MAX_REFUSED:
                del self._refused[next(iter(self._refused))]
            self._refused[message.stream] = LimitExceeded(text)
            self.send_text(p.stream_error(message.stream, LimitExceeded.code, text))
            return
        upload = Upload(
            message.stream,
            self.server.blobs,
            p.WINDOW,
            self.send_text,
            max_size=self.server.max_stream_size,
            quota=self.server.blob_quota,
        )
        upload.done.add_done_callback(self._uploaded)
        self._uploads[message.stream] = upload

    def _uploaded(self, future: asyncio.Future[tuple[str, int]]) -> None:
        if not future.cancelled() and future.exception() is None:
            key = future.result()[0]
            self._unclaimed.add(key)
            self.server.blob_stored(key)

    def _on_upload_end(self, message: p.UploadEnd) -> None:
        upload = self._uploads.get(message.stream)
        if upload is None and message.stream in self._refused:
            return  # the client already heard why (stream_error)
        if upload is None:
            raise InvalidArgument(f"Stream {message.stream} is not an open upload.")
        upload.end()

    def _on_upload_abort(self, message: p.UploadAbort) -> None:
        reason = message.error or "Aborted by the client."
        upload = self._uploads.get(message.stream)
        if upload is not None and message.stream in self._claimed:
            # An add waits for it and owns its blob: stop it if it is still arriving (the
            # add then fails), never delete what the add may already have stored.
            upload.abort(reason)
            return
        self._drop_upload(message.stream, reason)

    def _drop_upload(self, stream: int, reason: str) -> None:
        """Forget an upload no task will hold: stop it, and delete its blob if stored."""
        self._refused.pop(stream, None)
        upload = self._uploads.pop(stream, None)
        if upload is not None:
            upload.abort(reason)
            upload.done.add_done_callback(self._discard_upload)

    def _discard_upload(self, future: asyncio.Future[tuple[str, int]]) -> None:
        """An upload the client gave up on after it was stored: no task will claim it."""
        if not future.cancelled() and future.exception() is None:
            key = future.result()[0]
            self._unclaimed.discard(key)
            self.server.spawn(self.server.blobs.delete([key]), "wsq-delete-blobs")

    def _on_download(self, message: p.Download) -> None:
        if message.stream in self._downloads or message.stream in self._uploads:
            raise InvalidArgument(f"Stream {message.stream} is already open.")
        if self._in_flight() >= self.server.max_requests:
            error = self._too_many_requests()
            self.send_text(p.stream_error(message.stream, error.code, str(error)))
            return

        async def source() -> BlobReader:
            task = await self._find(message.task)
            self._require_read(task)
            if message.index >= len(task.streams):
                raise InvalidArgument(f"Task {task.id} has no stream {message.index}.")
            ref = task.streams[message.index]
            if message.offset > ref.size:
                raise InvalidArgument(f"Offset {message.offset} is past the end ({ref.size}).")
            if ref.inline is not None:
                return InlineReader(ref.inline, message.offset)
            assert ref.blob is not None
            return await self.server.blobs.reader(ref.blob, message.offset)

        download = Download(
            message.stream, source, p.WINDOW, p.CHUNK, self.send_text, self.send_binary
        )
        self._downloads[message.stream] = download
        download.finished.add_done_callback(lambda _: self._forget_download(download))

    def _forget_download(self, download: Download) -> None:
        """Drop a finished download, unless its stream id already names a newer one."""
        if self._downloads.get(download.stream) is download:
            del self._downloads[download.stream]

    def _on_credit(self, message: p.Credit) -> None:
        download = self._downloads.get(message.stream)
        if download is not None:
            download.grant(message.bytes)

    def _on_stats(self, message: p.Stats) -> None:
        patterns = self.principal.patterns("observe") if self._checked else None
        if self.server.store.shared:
            self._spawn(message.id, self._cluster_stats(message, patterns))
            return
        # The counts as of now, sent once the writes they count are durable.
        stats = self.server.core.stats(patterns, after=message.cursor)
        self.answer(message.id, self._stats_page(stats, message.limit))

    def _stats_page(self, stats: Iterator[dict[str, Any]], limit: int) -> dict[str, Any]:
        page, cursor = self._page(stats, limit, lambda queue: queue["name"])
        return {"queues": page, "cursor": cursor}

    async def _cluster_stats(self, message: p.Stats, patterns: Sequence[str] | None) -> Any:
        """A shared store's counts and workers are every node's: read once this node's
        writes so far are durable, so that they agree with every event sent before the
        answer."""
        await self._durable()
        counts = await self.server.store.counts()
        others = await self._other_workers()
        stats = self.server.core.stats(patterns, counts, others, message.cursor)
        return self._stats_page(stats, message.limit)

    async def _other_workers(self) -> list[WorkerRow]:
        """The workers of the other live nodes of a shared store (this node's are the
        core's, which knows their runs' times)."""
        node = self.server.core.node
        return [row for row in await self.server.store.workers() if row.node != node]

    def _on_workers(self, message: p.Workers) -> None:
        if message.queue is not None:
            self._require("observe", message.queue)
        after = _worker_cursor(message.cursor)
        if self.server.store.shared:
            self._spawn(message.id, self._cluster_workers(message, after))
            return
        # Sent once the writes before it are durable, as stats is (§4.2).
        self.answer(message.id, self._workers_page(message, after))

    async def _cluster_workers(self, message: p.Workers, after: tuple[str, str] | None) -> Any:
        await self._durable()
        return self._workers_page(message, after, await self._other_workers())

    def _workers_page(
        self,
        message: p.Workers,
        after: tuple[str, str] | None,
        others: Sequence[WorkerRow] = (),
    ) -> dict[str, Any]:
        """A page of workers (as :meth:`_page` cuts one), each with what its connection's
        key stands for; the cursor is the last one's node and id, as JSON."""
        visible = self.may_observe if self._checked else None
        workers = self.server.core.workers(visible, message.queue, others, after)
        page, cursor = self._page(
            (self._shown_worker(worker) for worker in workers),
            message.limit,
            lambda worker: msgspec.json.encode([worker["node"], worker["id"]]).decode(),
        )
        return {"workers": page, "cursor": cursor}

    def _shown_worker(self, worker: dict[str, Any]) -> dict[str, Any]:
        key = worker.pop("connection")
        if key is not None:  # else another node's: its row says its client and peer
            # The core knows connections by key; observers see what the key stands for.
            holder = self.server.connections.get(key)
            worker["client"] = holder.client if holder is not None else ""
            worker["peer"] = _peer(holder.ws) if holder is not None else "unknown"
        return worker

    def _on_history(self, message: p.History) -> None:
        self._require("observe", message.queue)
        now = time.time()
        self.server.metrics.drain(now)
        series = self.server.metrics.history.series(message.queue, message.since, now)
        self.answer(message.id, series)

    def _on_ping(self, message: p.Ping) -> None:
        self.answer_now(message.id)

    def _on_cancel(self, message: p.Cancel) -> None:
        download = self._downloads.pop(message.stream, None)
        if download is not None:
            # Stopped now, and its chunks not yet sent dropped: from here on the stream id
            # is free for a new, independent download (§8.4).
            download.cancel()
            self._drop_queued_chunks(message.stream)
            self.server.spawn(download.close(), f"wsq-cancel-{self.id}")

    def _drop_queued_chunks(self, stream: int) -> None:
        prefix = stream.to_bytes(4, "big")
        kept = deque(m for m in self._out if m[0] or not m[1].startswith(prefix))
        self._out_bytes = sum(len(m[1]) for m in kept)
        self._out = kept


_MAX_REFUSED = 1000
"""Refused uploads remembered per connection, so that their adds fail alike."""

_ATTEMPTS = 8
"""Reads of a task a remove or retry makes while the task keeps changing under it."""

_BOUNDED = (p.Add, p.AddMany, p.ListTasks, p.Queues, p.Get, p.Remove, p.Retry, p.Attempts)
"""Requests that wait on the store: ``max_requests`` bounds how many may be in flight."""

_REPLAYED = frozenset(
    {
        p.Add,
        p.AddMany,
        p.Remove,
        p.Retry,
        p.StopWork,
        p.Ack,
        p.Progress,
        p.Touch,
        p.Complete,
        p.CompleteMany,
        p.Fail,
    }
)
"""Requests that change state: their answers are remembered per session (§4.2)."""


class _NoAnswer:
    """Returned by a spawned request that answers by itself."""


_NO_ANSWER = _NoAnswer()


def _options(options: p.OptionsIn, floor: float) -> Options:
    return _checked_options(options.timeout, options.retries, options.autoremove, floor)


@functools.lru_cache(maxsize=256)
def _checked_options(timeout: float, retries: int, autoremove: bool, floor: float) -> Options:
    """Options are immutable and most tasks share a few: one object per combination.
    ``floor`` is the server's ``min_task_timeout``: a shorter timeout would let one task
    keep the server busy timing it out (docs/protocol.md §4.3)."""
    if not math.isfinite(timeout) or (timeout < floor and timeout != -1):
        text = f"timeout must be -1 or a number of seconds >= {floor:g}, not {timeout}."
        raise InvalidArgument(text)
    return Options(timeout=timeout, retries=retries, autoremove=autoremove)


def _check_stream_paths(raw: msgspec.Raw, streams: list[p.StreamIn]) -> None:
    if not streams:
        return
    try:
        data = msgspec.json.decode(raw)
    except RecursionError:
        raise InvalidArgument("Task data nested too deeply.") from None
    paths = [tuple(stream.path) for stream in streams]
    prefixes = {path[:n] for path in paths for n in range(len(path))}
    if len(set(paths)) != len(paths):
        raise InvalidArgument("Two streams have the same path.")
    for stream, path in zip(streams, paths, strict=True):
        if (stream.upload is None) == (stream.inline is None):
            raise InvalidArgument("A stream has exactly one of upload and inline.")
        if path in prefixes:
            raise InvalidArgument(f"Stream path {list(path)} holds another stream inside it.")
        if not _resolves(data, path):
            raise InvalidArgument(f"Stream path {list(path)} does not name a value in the data.")


def _resolves(data: Any, path: tuple[Any, ...]) -> bool:
    for key in path:
        in_dict = isinstance(key, str) and isinstance(data, dict) and key in data
        in_list = isinstance(key, int) and isinstance(data, list) and key < len(data)
        if not (in_dict or in_list):
            return False
        data = data[key]
    return True


def _stream_ref(stream: p.StreamIn, uploads: dict[int, tuple[str, int]]) -> StreamRef:
    if stream.inline is not None:
        return StreamRef(tuple(stream.path), len(stream.inline), inline=stream.inline)
    assert stream.upload is not None
    key, size = uploads[stream.upload]
    return StreamRef(tuple(stream.path), size, blob=key)


def _store_failed(what: str, outcome: BaseException) -> WsqError:
    """The answer to a request whose write failed: ``unavailable`` when the store's service
    is out of reach (worth trying again), else an internal error (its text only logged)."""
    if isinstance(outcome, Unavailable):
        return Unavailable(f"{what}: {outcome}")
    if isinstance(outcome, UploadFailed):  # a stream swept meanwhile (wsq.server.uploads)
        return UploadFailed(f"{what}: {outcome}")
    return ServerError(f"{what}: {outcome}")


def _not_found(task_id: str) -> TaskNotFound:
    """The one answer for a task that does not exist or that this principal may not read."""
    return TaskNotFound(f"No task with id {task_id}.")


def _as_error(exc: BaseException) -> WsqError:
    """What a client hears of a failed store write: the store's error (``unavailable``,
    ``storage_full``), or an internal one."""
    return exc if isinstance(exc, WsqError) else ServerError(f"The state store failed: {exc}")


_decode_worker_cursor = msgspec.json.Decoder(tuple[str, str]).decode


def _worker_cursor(cursor: str | None) -> tuple[str, str] | None:
    """A ``workers`` cursor (the JSON ``[node, id]`` of a page's last worker)."""
    if cursor is None:
        return None
    try:
        return _decode_worker_cursor(cursor)
    except msgspec.DecodeError:
        raise InvalidArgument("Not a workers cursor: pass the one the last page gave.") from None


def _peer(websocket: ServerConnection) -> str:
    address = websocket.remote_address
    return f"{address[0]}:{address[1]}" if address else "unknown"


def _version() -> str:
    from wsq import __version__

    return __version__


_OFFER_OVERHEAD = 512  # bytes of an offered run besides its payload (task, run, streams)


def _offer_bytes(tasks: Sequence[Task], unread: int) -> int:
    """About how many bytes an offer of ``tasks`` takes, counting ``unread`` for each
    payload not in memory (at most the largest message a client may send)."""
    return sum(
        _OFFER_OVERHEAD + (task.payload_size if task.data is not None else unread) for task in tasks
    )


def _with_payload(task: Task, stored: dict[str, Task]) -> Task | None:
    """``task`` with its payload as read from the store (``None``: removed meanwhile)."""
    if task.data is not None:
        return task
    full = stored.get(task.id)
    if full is None:
        return None
    task = task.copy()
    task.data, task.streams = full.data, full.streams
    return task
