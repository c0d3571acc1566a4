"""The asyncio client: one WebSocket to the server, kept alive and reconnected.

Requests carry ids and may be many in flight; outgoing messages produced in one turn of
the event loop leave as one frame (docs/protocol.md §2). While disconnected, requests
wait and are sent once the connection is back; requests in flight when it dropped are
sent again (the server makes them idempotent, §4.3), except the ``add`` of a task whose
streams were being uploaded, which raises :class:`wsq.ConnectionLost`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from ssl import SSLContext, create_default_context
from types import TracebackType
from typing import Any

import msgspec
from picows.websockets import (
    ClientConnection,
    ConnectionClosed,
    InvalidURI,
    WebSocketException,
    connect,
)

from wsq import protocol
from wsq.client.events import SERVER_EVENTS, Emitter, Event, Handler
from wsq.client.queue import Queue, Worker
from wsq.client.streams import Downloading, Uploader, extract
from wsq.client.task import Task
from wsq.exceptions import (
    ConnectionLost,
    ProtocolError,
    Unauthorized,
    WsqError,
    error_from_wire,
)
from wsq.link import answered
from wsq.wslog import TransportLog

logger = logging.getLogger("wsq.client")
_transport_log = TransportLog("wsq.client.transport")

CLOSE_TIMEOUT = 2.0
"""Seconds a closing handshake may take before the connection is simply dropped."""
_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()
_EVENTS_MAX = 65536


def default_backoff(tries: int) -> float:
    """The seed's default, in seconds: ``min((tries * 10) ** 2 ms, 60 s)``."""
    return min((tries * 10) ** 2, 60_000) / 1000


def _addresses(address: str | Sequence[str]) -> tuple[str, ...]:
    """``Client``'s address argument as a non-empty tuple of ``ws://``/``wss://`` URLs."""
    found = (address,) if isinstance(address, str) else tuple(address)
    if not found:
        raise ValueError("wsq.Client needs at least one address.")
    for one in found:
        if not isinstance(one, str):
            raise TypeError(f"wsq.Client: an address must be a string, not {one!r}.")
    return found


@dataclass(slots=True)
class _Request:
    message: dict[str, Any]
    future: asyncio.Future[Any]
    resend: bool


@dataclass(slots=True)
class _Limits:
    window: int = protocol.WINDOW
    chunk: int = protocol.CHUNK
    inline: int = protocol.INLINE_MAX
    max_message: int = protocol.MAX_MESSAGE
    batch: int = protocol.MAX_BATCH
    heartbeat: float = 5.0


class Client(Emitter):
    """A connection to a wsq server at ``address`` (``ws://host:port``), or to one of the
    nodes of a cluster given as a list of addresses: each reconnection moves to the next
    address, so a dead node is left at once (one address behind a load balancer works too).

    ``backoff(tries)`` returns the seconds to wait before reconnect attempt ``tries``; with
    several addresses it is waited once a whole round of them failed (``tries`` counts
    rounds), and not between the addresses of a round.
    Events: ``'connect'``, ``'disconnect'``, ``'error'`` and every server event name;
    handlers may be sync or async. Task events call ``handler(task, *extra)``.
    """

    def __init__(
        self,
        address: str | Sequence[str],
        backoff: Callable[[int], float] | None = None,
        *,
        token: str | None = None,
        ssl: SSLContext | None = None,
        ca_file: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        self.addresses = _addresses(address)
        self.address = self.addresses[0]  # the one in use, or tried next
        self._address_index = 0
        self.node: str | None = None  # the name of the node this client last greeted
        self.backoff = backoff or default_backoff
        self._token = token
        if ssl is None and ca_file is not None:
            ssl = create_default_context(cafile=os.fspath(ca_file))
        self._ssl = ssl
        self._ws: ClientConnection | None = None
        self._sock: socket.socket | None = None  # the connection's, for link_state
        self._ids = itertools.count(1)
        self._stream_ids = itertools.count(1)
        self._id_prefix = uuid.uuid4().hex[:16]
        self._session_id = uuid.uuid4().hex  # lets a reconnection take its workers back
        self._task_counter = itertools.count(1)
        self._requests: dict[int, _Request] = {}
        self._queues: dict[str, Queue] = {}
        self._workers: dict[str, Worker] = {}
        self._subscriptions: dict[str | None, int] = {}
        self._watched: dict[str, set[Task]] = {}  # tasks with listeners, until final
        self._event_queues: set[asyncio.Queue[Event | None]] = set()
        self._downloads: dict[int, Downloading] = {}
        self._uploads: dict[int, Uploader] = {}
        self._out: deque[tuple[bool, bytes]] = deque()
        self._wake = asyncio.Event()
        self._limits = _Limits()
        self._connected: asyncio.Event | None = None
        self._runner: asyncio.Task[None] | None = None
        self._closed = False
        self._reopened: asyncio.Event | None = None  # set by connect() after close()
        self._generation = 0  # counts connections; a wsq.Stream belongs to one
        self._heard = 0  # frames received from the server (the heartbeat looks)

    def new_task_id(self) -> str:
        """A fresh task id: this client's random 64-bit prefix and a counter (a uuid4 per
        task costs a system call, which the bulk path notices)."""
        return f"{self._id_prefix}{next(self._task_counter):x}"

    # -- connection ------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._ws is not None

    async def connect(self) -> None:
        """Connect, retrying with :attr:`backoff` until the server answers. After
        :meth:`close`, this connects again: workers, listeners and calls made meanwhile
        carry on as before."""
        if self._closed:
            self._closed = False
            self._runner = None
            assert self._reopened is not None
            self._reopened.set()
        await self._wait_connected()

    async def close(self) -> None:
        """Disconnect and stop reconnecting. Running worker handlers are cancelled
        unreported (the server times them out); use ``await worker.stop()`` first to let
        them finish. Calls made while closed wait for the next :meth:`connect`; requests
        in flight fail."""
        if self._closed:
            return
        self._closed = True
        self._reopened = asyncio.Event()
        for worker in self._workers.values():
            worker.cancel_runs()
        if self._runner is not None:
            self._runner.cancel()
            await asyncio.gather(self._runner, return_exceptions=True)
        self._fail_requests(lambda r: True, WsqError("The client was closed."))
        for queue in self._event_queues:
            queue.put_nowait(None)

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _wait_connected(self) -> None:
        """Return once connected; raise if the client can never connect. While the
        client is closed, wait for the next :meth:`connect`."""
        while self._ws is None:
            if self._closed:
                assert self._reopened is not None
                await self._reopened.wait()
                continue
            self._ensure_running()
            assert self._connected is not None and self._runner is not None
            runner = self._runner
            waiter = asyncio.ensure_future(self._connected.wait())
            await asyncio.wait({waiter, runner}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if runner.done() and not runner.cancelled() and runner.exception():
                raise WsqError(f"Cannot connect to {self.address}: {runner.exception()}")

    async def _run(self) -> None:
        tries = 0
        while not self._closed:
            try:
                ws, welcome = await self._open()
            except (OSError, TimeoutError, WebSocketException, WsqError) as exc:
                if isinstance(exc, InvalidURI | Unauthorized):  # retrying cannot help
                    self.emit("error", exc)
                    self._fail_requests(lambda r: True, WsqError(f"Cannot connect: {exc}"))
                    raise
                tries += 1
                if self.listens("error"):
                    self.emit("error", exc)
                self._next_address()
                rounds, rest = divmod(tries, len(self.addresses))
                if not rest:  # every address failed once more: back off
                    await asyncio.sleep(self.backoff(rounds))
                continue
            tries = 0
            if self._closed:  # closed while it connected
                with contextlib.suppress(Exception):
                    await ws.close()
                return
            await self._session(ws, welcome)
            self._next_address()  # the node may be gone: the next one is tried first

    def _next_address(self) -> None:
        self._address_index = (self._address_index + 1) % len(self.addresses)
        self.address = self.addresses[self._address_index]

    def _tls(self) -> dict[str, Any]:
        """``connect``'s ``ssl`` argument: a custom context, if one was given."""
        return {"ssl": self._ssl} if self._ssl is not None else {}

    async def _open(self) -> tuple[ClientConnection, dict[str, Any]]:
        sockets: list[socket.socket] = []

        async def tcp(url: Any) -> socket.socket:
            # (asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that
            # comes as the connect completes, and close() would wait on a live session.)
            async with asyncio.timeout(10):
                sockets.append(await _tcp_socket(url.host, url.port))
            return sockets[-1]

        try:
            ws = await connect(
                self.address,
                max_size=None,
                compression=None,
                ping_interval=None,
                open_timeout=10,
                close_timeout=CLOSE_TIMEOUT,
                user_agent_header=f"wsq-python/{_version()}",
                logger=_transport_log,
                socket_factory=tcp,  # a socket of our own, for link_state
                **self._tls(),
            )
        except AssertionError:
            # picows 2.3's websockets-compatible connect() asserts when the peer closes the
            # TCP connection before answering the upgrade (a node shutting down, a load
            # balancer with no backend): an ordinary refused connection (docs/decisions.md).
            raise ConnectionError(
                f"{self.address} closed the connection before the handshake"
            ) from None
        try:
            hello: dict[str, Any] = {
                "op": "hello",
                "protocol": protocol.PROTOCOL_VERSION,
                "client": "wsq-python",
                "session": self._session_id,
            }
            if self._token is not None:
                hello["token"] = self._token
            await ws.send(_encoder.encode(hello), text=True)
            async with asyncio.timeout(10):
                welcome = _decoder.decode(await ws.recv())
            if welcome.get("op") != "welcome":
                message = welcome.get("message", "The server refused the hello.")
                if welcome.get("code") == "unauthorized":
                    raise Unauthorized(message)
                raise ProtocolError(message)
            self._sock = sockets[-1] if sockets else None
            return ws, welcome
        except BaseException:
            await ws.close()
            raise

    async def _session(self, ws: ClientConnection, welcome: dict[str, Any]) -> None:
        node = welcome.get("node")
        self.node = node if isinstance(node, str) else None
        limits = welcome.get("limits", {})
        self._limits = _Limits(
            window=limits.get("window", protocol.WINDOW),
            chunk=limits.get("chunk", protocol.CHUNK),
            inline=limits.get("inline", protocol.INLINE_MAX),
            max_message=limits.get("max_message", protocol.MAX_MESSAGE),
            batch=limits.get("batch", protocol.MAX_BATCH),
            heartbeat=welcome.get("heartbeat", 5.0),
        )
        self._ws = ws
        self._generation += 1
        self._out.clear()
        self._restore()
        assert self._connected is not None
        self._connected.set()
        self.emit("connect")
        helpers = [
            asyncio.create_task(self._heartbeat(ws), name="wsq-heartbeat"),
            asyncio.create_task(self._write_loop(ws), name="wsq-client-writer"),
        ]
        try:
            await self._read(ws)
        finally:
            for helper in helpers:
                helper.cancel()
            self._ws = None
            self._connected.clear()
            self._out.clear()
            self._connection_lost()
            self.emit("disconnect")
            with contextlib.suppress(Exception):
                await ws.close()

    def _restore(self) -> None:
        """After (re)connecting: listeners, workers, then requests that were waiting."""
        for queue in self._subscriptions:
            self._send({"op": "subscribe", "id": next(self._ids), "queue": queue})
        for worker in self._workers.values():
            if not worker.stopped:
                self._send({**worker.register_message(), "id": next(self._ids)})
        for request in sorted(self._requests.values(), key=lambda r: r.message["id"]):
            self._send(request.message)

    def _connection_lost(self) -> None:
        lost = ConnectionLost("The connection to the server was lost.")
        self._fail_requests(lambda r: not r.resend, lost)
        for download in self._downloads.values():
            download.fail(lost)
        self._downloads.clear()
        for upload in self._uploads.values():
            upload.connection_lost()
        self._uploads.clear()

    def _fail_requests(self, which: Callable[[_Request], bool], error: WsqError) -> None:
        for request_id, request in list(self._requests.items()):
            if which(request):
                del self._requests[request_id]
                if not request.future.done():
                    request.future.set_exception(error)

    async def _heartbeat(self, ws: ClientConnection) -> None:
        """Ping every heartbeat interval; no pong for three intervals means the server is
        gone, so drop the connection and reconnect (§9). But while frames from the server
        keep arriving, or bytes keep moving either way (the kernel says, on Linux), the
        path is alive and the pong may be waiting behind what fills a slow link (a large
        upload): it is waited for as long as that lasts."""
        interval = self._limits.heartbeat
        if interval <= 0:
            return  # the server runs without heartbeats (--heartbeat-interval 0)
        with contextlib.suppress(ConnectionClosed):
            while True:
                await asyncio.sleep(interval)
                pong = await ws.ping()
                if not await answered(pong, interval * 3, self._sock, lambda: self._heard):
                    logger.warning("no pong from %s; reconnecting", self.address)
                    # A dead path will not finish a closing handshake either: after
                    # CLOSE_TIMEOUT the connection is dropped, and _session reconnects.
                    await ws.close(1011, "No pong")
                    return

    # -- sending ---------------------------------------------------------------------------

    def _send(self, message: dict[str, Any]) -> None:
        """Queue a text message; messages queued while a frame is being written leave
        together in the next one. Dropped while disconnected (requests are kept and sent
        again by :meth:`_restore`)."""
        if self._ws is not None:
            self._out.append((True, _encoder.encode(message)))
            self._wake.set()

    def _send_chunk(self, stream: int, payload: bytes | memoryview) -> None:
        if self._ws is not None:
            self._out.append((False, protocol.pack_chunk(stream, payload)))
            self._wake.set()

    async def _write_loop(self, ws: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                while not self._out:
                    self._wake.clear()
                    await self._wake.wait()
                    # One more turn of the loop lets messages made by other tasks
                    # in the meantime leave in the same frame (one syscall).
                    await asyncio.sleep(0)
                if self._out[0][0]:
                    await ws.send(self._take_text(), text=True)
                else:
                    await ws.send(self._out.popleft()[1], text=False)

    def _take_text(self) -> bytes:
        """Queued text messages for one frame, within the server's message limit and
        batch size (a single larger message goes alone, and gets its own too_large
        answer)."""
        parts = [self._out.popleft()[1]]
        size = len(parts[0])
        limit = self._limits.max_message - 2
        while (
            self._out
            and self._out[0][0]
            and size + len(self._out[0][1]) + 1 <= limit
            and len(parts) < self._limits.batch
        ):
            data = self._out.popleft()[1]
            parts.append(data)
            size += len(data) + 1
        return protocol.join_frame(parts)

    async def _request(self, message: dict[str, Any], *, resend: bool = True) -> Any:
        """Send a request and return its result; raise the error it got."""
        await self._wait_connected()
        return await self._request_nowait(message, resend=resend)

    def _request_nowait(
        self, message: dict[str, Any], *, resend: bool = True
    ) -> asyncio.Future[Any]:
        """Send a request now if connected (else once connected) and return the future of
        its answer. With ``resend``, a connection lost before the answer sends it again."""
        request_id = next(self._ids)
        message["id"] = request_id
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._requests[request_id] = _Request(message, future, resend)
        self._send(message)
        return future

    # -- receiving -------------------------------------------------------------------------

    async def _read(self, ws: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for frame in ws:
                self._heard += 1
                try:
                    self._receive_frame(frame)
                except Exception as exc:  # a bad frame must not end the session
                    logger.exception("could not handle a frame from the server")
                    self.emit("error", exc)

    def _receive_frame(self, frame: str | bytes) -> None:
        if isinstance(frame, str):
            decoded = _decoder.decode(frame)
            for message in decoded if isinstance(decoded, list) else [decoded]:
                self._receive(message)
        else:
            self._receive_chunk(frame)

    def _receive(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        handler = self._receivers.get(op or "")
        if handler is None:
            logger.warning("unknown message from server: %r", op)
            return
        handler(self, message)

    def _on_result(self, message: dict[str, Any]) -> None:
        request = self._requests.pop(message["id"], None)
        if request is not None and not request.future.done():
            request.future.set_result(message.get("result"))

    def _on_error(self, message: dict[str, Any]) -> None:
        error = error_from_wire(message.get("code", "error"), message.get("message", ""))
        request = self._requests.pop(message.get("id") or 0, None)
        if request is not None:
            if not request.future.done():
                request.future.set_exception(error)
        else:
            logger.warning("error from server: %s", error)
            self.emit("error", error)

    def _on_event(self, message: dict[str, Any]) -> None:
        name, args = message["event"], message.get("args", [])
        event = Event(name, args)
        for events in self._event_queues:
            if events.qsize() < _EVENTS_MAX:
                events.put_nowait(event)
        self._dispatch_event(name, args)

    def _on_offer(self, message: dict[str, Any]) -> None:
        worker = self._workers.get(message["worker"])
        if worker is None or worker.stopped:
            # Sent before the server had our stop: decline it, the task waits untouched.
            runs = [[item["task"]["id"], item["run"]] for item in message["tasks"]]
            self._send({"op": "release", "runs": runs})
            return
        worker.offer(message["tasks"])

    def _on_abort(self, message: dict[str, Any]) -> None:
        worker = self._workers.get(message["worker"])
        if worker is not None:
            worker.abort(message["task"], message["run"], message.get("reason", ""))

    def _on_credit(self, message: dict[str, Any]) -> None:
        upload = self._uploads.get(message["stream"])
        if upload is not None:
            upload.grant(message["bytes"])

    def _on_end(self, message: dict[str, Any]) -> None:
        download = self._downloads.pop(message["stream"], None)
        if download is not None:
            download.end()

    def _on_stream_error(self, message: dict[str, Any]) -> None:
        stream = message["stream"]
        download = self._downloads.pop(stream, None)
        if download is not None:
            download.fail_from_wire(message.get("code", "error"), message.get("message", ""))
        upload = self._uploads.get(stream)
        if upload is not None:
            upload.fail(error_from_wire(message.get("code", "error"), message.get("message", "")))

    def _receive_chunk(self, frame: bytes) -> None:
        stream, payload = protocol.unpack_chunk(frame)
        download = self._downloads.get(stream)
        if download is not None:
            download.receive(bytes(payload))

    _receivers: dict[str, Callable[[Client, dict[str, Any]], None]] = {
        "result": _on_result,
        "error": _on_error,
        "event": _on_event,
        "offer": _on_offer,
        "abort": _on_abort,
        "credit": _on_credit,
        "end": _on_end,
        "stream_error": _on_stream_error,
    }

    # -- events ----------------------------------------------------------------------------

    def on(self, event: str, handler: Handler) -> Handler:
        """Listen to ``event``: 'connect', 'disconnect', 'error' or a server event name."""
        if event in SERVER_EVENTS:
            self._subscribe(None)
        return super().on(event, handler)

    def events(self) -> AsyncIterator[Event]:
        """Every server event as it arrives, until the client closes."""
        self._subscribe(None)
        events: asyncio.Queue[Event | None] = asyncio.Queue()
        self._event_queues.add(events)
        return self._iterate_events(events)

    async def _iterate_events(self, events: asyncio.Queue[Event | None]) -> AsyncIterator[Event]:
        try:
            while (event := await events.get()) is not None:
                yield event
        finally:
            self._event_queues.discard(events)

    def _subscribe(self, queue: str | None) -> None:
        if queue in self._subscriptions:
            return
        self._subscriptions[queue] = 1
        self._send({"op": "subscribe", "id": next(self._ids), "queue": queue})

    def _watch_task(self, task: Task) -> bool:
        """Deliver the task's events to it until it is final (held strongly: a listener
        fires even if the caller dropped the task; released when it is final). Returns
        whether it was not watched before."""
        self._subscribe(task.queue)
        watchers = self._watched.setdefault(task.id, set())
        fresh = task not in watchers
        watchers.add(task)
        return fresh

    def _unwatch_task(self, task: Task) -> None:
        watchers = self._watched.get(task.id)
        if watchers is not None:
            watchers.discard(task)
            if not watchers:
                del self._watched[task.id]

    def _dispatch_event(self, name: str, args: list[Any]) -> None:
        first = args[0] if args else {}
        queue_name = first.get("queue") if isinstance(first, dict) else None
        queue = self._queues.get(queue_name) if queue_name else None
        if name.startswith("task ") and isinstance(first, dict):
            self._dispatch_task_event(name, first, args[1:], queue)
            return
        extra = [Task(self, a) if isinstance(a, dict) and "state" in a else a for a in args[1:]]
        self.emit(name, first, *extra)
        if queue is not None and (self.listens(name) or queue.listens(name)):
            queue.emit(name, first, *extra)

    def _dispatch_task_event(
        self, name: str, info: dict[str, Any], extra: list[Any], queue: Queue | None
    ) -> None:
        if self.listens(name) or (queue is not None and queue.listens(name)):
            task = Task(self, info)
            self.emit(name, task, *extra)
            if queue is not None:
                queue.emit(name, task, *extra)
        # One loop turn later: a caller whose add() just returned (its answer read just
        # before this event, in the same turn) attaches its listeners first.
        asyncio.get_running_loop().call_soon(self._notify_watchers, name, info, extra)

    def _notify_watchers(self, name: str, info: dict[str, Any], extra: list[Any]) -> None:
        watchers = self._watched.get(info["id"])
        if watchers is None:
            return
        if _is_final(name, info, extra):
            del self._watched[info["id"]]
        for watched in list(watchers):
            watched.update(info)
            # Listeners get the task as this event tells it (as the original does): an
            # async listener that runs later must not see a newer event's fields.
            snapshot = Task(self, info)
            snapshot.listened = watched  # its retry() takes watched's listeners up again
            watched.emit(name[5:], snapshot, *extra)

    # -- queues, workers, adds, downloads --------------------------------------------------

    def queue(self, name: str) -> Queue:
        """The queue called ``name`` (made on the server when first used)."""
        queue = self._queues.get(name)
        if queue is None:
            queue = self._queues[name] = Queue(self, name)
        return queue

    async def list_queues(self) -> list[Queue]:
        """Queues the server holds tasks or workers for, in name order."""
        return [self.queue(name) for name in await self._pages({"op": "queues"})]

    async def stats(self) -> list[dict[str, Any]]:
        """Every queue's task counts by state and its workers (docs/protocol.md, ``stats``):
        ``[{"name", "waiting", "active", "completed", "failed", "workers": [...]}, ...]``
        in name order."""
        return await self._pages({"op": "stats"})

    async def _pages(self, message: dict[str, Any], field: str = "queues") -> list[Any]:
        """Every page of a listing (``queues``, ``stats``, ``workers``), cursor to cursor
        (the first asked for as before pages, so that a server without them answers it
        whole); ``field`` holds a page's items."""
        found: list[Any] = []
        while True:
            answer = await self._request(message)
            found += answer[field]
            if answer.get("cursor") is None:
                return found
            message = {**message, "cursor": answer["cursor"]}

    async def workers(self, queue: str | None = None) -> list[dict[str, Any]]:
        """The workers connected now, of ``queue`` or of every queue this client may
        observe, each with the runs it holds (docs/protocol.md, ``workers``; times are
        Unix seconds)."""
        message: dict[str, Any] = {"op": "workers"}
        if queue is not None:
            message["queue"] = queue
        return await self._pages(message, "workers")

    async def attempts(self, task_id: str) -> list[dict[str, Any]]:
        """The runs of task ``task_id``, oldest first (docs/protocol.md, ``attempts``):
        each ``{"run", "worker", "client", "node", "offered", "started", "ended",
        "outcome", "error", "progress"}`` (times are Unix seconds, ``None`` when unknown;
        the run in progress, if any, comes last with ``ended`` and ``outcome`` ``None``).
        The server keeps the last 100 runs of a task. Raises TaskNotFound if there is no
        such task, or this client may not read it."""
        answer = await self._request({"op": "attempts", "task": task_id})
        attempts: list[dict[str, Any]] = answer["attempts"]
        return attempts

    async def history(self, queue: str, since: float | None = None) -> dict[str, Any]:
        """The last hour of ``queue``, second by second (docs/protocol.md §4.6):
        ``{"queue", "start", "end", "added", "completed", "failed", "waiting",
        "latency"}``, one list entry per second from ``start`` to ``end`` (Unix seconds,
        inclusive; the last second is still in progress). ``since`` (Unix seconds) asks
        for the seconds from then on only. Needs the observe role on the queue."""
        message: dict[str, Any] = {"op": "history", "queue": queue}
        if since is not None:
            message["since"] = since
        answer: dict[str, Any] = await self._request(message)
        return answer

    def _ensure_running(self) -> None:
        """Start connecting in the background if nobody called :meth:`connect` yet."""
        if self._runner is None and not self._closed:
            self._connected = asyncio.Event()
            self._runner = asyncio.create_task(self._run(), name="wsq-client")

    def _start_worker(self, worker: Worker) -> None:
        self._workers[worker.id] = worker
        self._ensure_running()
        if self._ws is not None:
            self._send({**worker.register_message(), "id": next(self._ids)})

    async def _stop_worker(self, worker: Worker) -> None:
        try:
            if not self._closed:  # a closed client's workers are registered nowhere
                await self._request({"op": "stop", "worker": worker.id})
        finally:
            self._workers.pop(worker.id, None)

    async def _add(
        self, queue: str, data: Any, options: dict[str, Any], task_id: str
    ) -> dict[str, Any]:
        plain, found = extract(data)
        # Listen to the queue before the add reaches the server, so that a listener
        # attached to the task as soon as add() returns misses none of its events.
        self._subscribe(queue)
        message: dict[str, Any] = {"op": "add", "queue": queue, "options": options, "task": task_id}
        message["data"] = msgspec.Raw(_encoder.encode(plain))
        if not found:
            result: dict[str, Any] = await self._request(message)
            return result
        await self._wait_connected()
        generation = self._generation
        message["streams"] = await self._upload_all(found)
        uploads = any("upload" in s for s in message["streams"])
        if uploads and (self._ws is None or generation != self._generation):
            # The uploads went to a connection that is gone (and with it, on the server,
            # the streams): the add cannot name them on another.
            raise ConnectionLost("The connection was lost after the upload, before the add.")
        result = await self._request_nowait(message, resend=not uploads)
        return result

    async def _add_many(
        self, queue: str, items: Iterable[Any], options: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """Send the tasks in messages of at most ``batch`` tasks and half the message
        limit each, all in flight at once; answers come back in order."""
        # Unlike add(), no subscription first: the bulk path would get two events back per
        # task (docs/decisions.md, "Producers listen to the queues they add to").
        await self._wait_connected()
        limit = protocol.MAX_BATCH
        budget = self._limits.max_message // 2
        batches: list[list[dict[str, Any]]] = [[]]
        size = 0
        for item in items:
            spec = self._new_task_spec(item, options)
            cost = len(spec["data"]) + sum(len(s["inline"]) * 4 // 3 for s in spec["streams"])
            if batches[-1] and (len(batches[-1]) >= limit or size + cost > budget):
                batches.append([])
                size = 0
            batches[-1].append(spec)
            size += cost + 200
        requests = [
            self._request({"op": "add_many", "queue": queue, "tasks": batch})
            for batch in batches
            if batch
        ]
        answers = await asyncio.gather(*requests)
        return [
            _created(item, queue, options, answer["created"]) if isinstance(item, str) else item
            for answer in answers
            for item in answer["tasks"]
        ]

    def _new_task_spec(self, item: Any, options: dict[str, Any]) -> dict[str, Any]:
        plain, found = extract(item)
        streams = []
        for path, value in found:
            small = _small_bytes(value, self._limits.inline)
            if small is None:
                raise ValueError("add_many carries only small bytes as streams; use add().")
            streams.append({"path": path, "inline": small})
        return {
            "data": msgspec.Raw(_encoder.encode(plain)),
            "streams": streams,
            "options": options,
            "task": self.new_task_id(),
        }

    async def _upload_all(self, found: list[tuple[list[Any], Any]]) -> list[dict[str, Any]]:
        streams: list[dict[str, Any]] = []
        uploaders: list[tuple[Uploader, Any]] = []
        for path, value in found:
            small = _small_bytes(value, self._limits.inline)
            if small is not None:
                streams.append({"path": path, "inline": small})
                continue
            uploader = Uploader(
                self, next(self._stream_ids), self._limits.window, self._limits.chunk
            )
            self._uploads[uploader.stream] = uploader
            uploaders.append((uploader, value))
            streams.append({"path": path, "upload": uploader.stream})
        results = await asyncio.gather(*(u.send(v) for u, v in uploaders), return_exceptions=True)
        for uploader, _ in uploaders:
            self._uploads.pop(uploader.stream, None)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            # No task will hold any of these streams: let the server drop them all now.
            for uploader, _ in uploaders:
                uploader.abort(errors[0])
            raise errors[0]
        return streams

    async def _download(self, task_id: str, index: int, generation: int) -> AsyncIterator[bytes]:
        """Read a stream on the connection it was obtained on (``generation``): once that
        connection is gone, raise ConnectionLost rather than wait for another."""
        if self._ws is None or generation != self._generation:
            raise ConnectionLost("The connection this stream was obtained on was lost.")
        stream = next(self._stream_ids)
        window = self._limits.window
        state = Downloading(stream, window)
        self._downloads[stream] = state
        self._send({"op": "download", "stream": stream, "task": task_id, "index": index})
        consumed = 0
        finished = False
        try:
            while (chunk := await state.next()) is not None:
                consumed += len(chunk)
                if consumed >= window // 2:
                    self._send({"op": "credit", "stream": stream, "bytes": consumed})
                    consumed = 0
                yield chunk
            finished = True
        finally:
            if not finished and self._downloads.pop(stream, None) is not None:
                self._send({"op": "cancel", "stream": stream})


def _is_final(name: str, info: dict[str, Any], extra: list[Any]) -> bool:
    """Whether no more events of this task will come (unless someone retries it)."""
    if name == "task completed":
        return not info.get("options", {}).get("autoremove", False)  # else 'deleted' follows
    if name == "task failed":
        return not (extra and extra[0])
    return name == "task deleted"


def _created(task_id: str, queue: str, options: dict[str, Any], when: float) -> dict[str, Any]:
    """The record of a task add_many just created, which its answer names by id only."""
    return {
        "id": task_id,
        "queue": queue,
        "state": "waiting",
        "progress": 0.0,
        "retries": 0,
        "error": None,
        "options": options,
        "worker": None,
        "created": when,
        "updated": when,
    }


def _small_bytes(value: Any, limit: int) -> bytes | None:
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        return data if len(data) <= limit else None
    return None


def _version() -> str:
    from wsq import __version__

    return __version__


async def _tcp_socket(host: str, port: int) -> socket.socket:
    """A TCP socket connected to ``host``: each of its addresses in turn."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error: OSError = OSError(f"{host} has no address")
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise error
