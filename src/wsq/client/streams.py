"""Streams in task data, on the client side (docs/protocol.md §8).

Sending: :func:`extract` finds the stream values in the data a producer passes to
``queue.add`` (bytes, binary file objects, async iterables of bytes, :class:`Stream`) and
replaces each with ``null``; :class:`Uploader` sends one of them under the server's
flow-control credit. Receiving: :func:`resolve` puts a :class:`Stream` at each stream's
path in the data a worker or reader gets; iterating it downloads the bytes lazily.
"""

from __future__ import annotations

import asyncio
import base64
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator
from typing import TYPE_CHECKING, Any

from wsq.exceptions import ConnectionLost, WsqError, error_from_wire

if TYPE_CHECKING:
    from wsq.client.client import Client

PathItem = str | int


def is_stream(value: Any) -> bool:
    return (
        isinstance(value, bytes | bytearray | memoryview | Stream)
        or hasattr(value, "__aiter__")
        or (hasattr(value, "read") and not isinstance(value, str))
    )


def extract(data: Any) -> tuple[Any, list[tuple[list[PathItem], Any]]]:
    """Return ``data`` with every stream value replaced by ``None``, and the streams as
    ``(path, value)`` pairs. Dict keys must be strings; tuples become lists."""
    found: list[tuple[list[PathItem], Any]] = []

    def walk(value: Any, path: list[PathItem]) -> Any:
        if is_stream(value):
            found.append((path, value))
            return None
        if isinstance(value, dict):
            return {_key(k): walk(v, [*path, k]) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [walk(v, [*path, i]) for i, v in enumerate(value)]
        return value

    return walk(data, []), found


def _key(key: Any) -> str:
    if not isinstance(key, str):
        raise TypeError(f"Task data keys must be strings, not {type(key).__name__}.")
    return key


def resolve(client: Client, task_id: str, data: Any, streams: list[dict[str, Any]]) -> Any:
    """Put a :class:`Stream` at the path of each stream descriptor of task ``task_id``."""
    for index, info in enumerate(streams):
        inline = info.get("inline")
        raw = base64.b64decode(inline) if inline is not None else None
        stream = Stream(client, task_id, index, info["size"], raw)
        path = info["path"]
        if not path:
            return stream
        target = data
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = stream
    return data


class Stream:
    """A stream of a task's data: an async iterable of ``bytes`` chunks.

    Nothing is fetched until you iterate; each iteration reads the stream from the start
    (``async for chunk in stream``), holding at most one flow-control window in memory.
    ``await stream.read()`` returns the whole stream as one ``bytes``. Once the
    connection it was obtained on is lost, reading raises :class:`wsq.ConnectionLost`,
    whether the read began before or after (it never waits for a reconnection; get the
    data again with ``task.get_data()``).
    """

    def __init__(
        self, client: Client, task_id: str, index: int, size: int, inline: bytes | None = None
    ) -> None:
        self._client = client
        self.task_id = task_id
        self.index = index
        self.size = size
        self._inline = inline
        self._generation = client._generation  # the connection it was obtained on

    def __repr__(self) -> str:
        return f"<wsq.Stream task={self.task_id} index={self.index} size={self.size}>"

    def __aiter__(self) -> AsyncIterator[bytes]:
        if self._inline is not None:
            return _once(self._inline)
        return self._client._download(self.task_id, self.index, self._generation)

    async def read(self) -> bytes:
        """The whole stream. Mind the size (:attr:`size`) before calling this."""
        parts = [chunk async for chunk in self]
        return b"".join(parts)


async def _once(data: bytes) -> AsyncIterator[bytes]:
    if data:
        yield data


class Downloading:
    """Client-side state of one download: chunks arrive from the read loop, the consumer
    takes them and grants credit back as it goes."""

    def __init__(self, stream: int, window: int) -> None:
        self.stream = stream
        self.window = window
        self.chunks: deque[bytes] = deque()
        self.done = False
        self.error: WsqError | None = None
        self.wake = asyncio.Event()

    def receive(self, payload: bytes) -> None:
        self.chunks.append(payload)
        self.wake.set()

    def end(self) -> None:
        self.done = True
        self.wake.set()

    def fail(self, error: WsqError) -> None:
        self.error = error
        self.wake.set()

    def fail_from_wire(self, code: str, message: str) -> None:
        self.fail(error_from_wire(code, message))

    async def next(self) -> bytes | None:
        while not self.chunks and not self.done and self.error is None:
            self.wake.clear()
            await self.wake.wait()
        if self.error is not None:
            raise self.error
        if self.chunks:
            return self.chunks.popleft()
        return None


class Uploader:
    """Sends one stream value as an upload, never more than the granted credit ahead."""

    def __init__(self, client: Client, stream: int, window: int, chunk: int) -> None:
        self._client = client
        self.stream = stream
        self._credit = window
        self._chunk = chunk
        self._wake = asyncio.Event()
        self._stopped = asyncio.Event()  # lost, or failed: stop waiting for the source
        self.lost = False
        self.error: WsqError | None = None

    def grant(self, count: int) -> None:
        self._credit += count
        self._wake.set()

    def fail(self, error: WsqError) -> None:
        """The server refused or stopped this upload (a limit, a full disk)."""
        self.error = error
        self._wake.set()
        self._stopped.set()

    def connection_lost(self) -> None:
        self.lost = True
        self._wake.set()
        self._stopped.set()

    async def send(self, value: Any) -> None:
        """Upload all of ``value``; raise what reading it raised, or ConnectionLost (at
        once, even while an async iterable source has not yielded its next piece)."""
        self._client._send({"op": "upload", "stream": self.stream})
        chunks = _chunks(value, self._chunk)
        # A source that may wait (an async iterable) is watched while it does.
        next_piece = self._next if hasattr(value, "__aiter__") else _plain_next
        try:
            while (piece := await next_piece(chunks)) is not None:
                await self._wait_credit(len(piece))
                self._credit -= len(piece)
                self._client._send_chunk(self.stream, piece)
        finally:
            await chunks.aclose()
        self._check()
        self._client._send({"op": "upload_end", "stream": self.stream})

    async def _next(self, chunks: AsyncIterator[bytes | memoryview]) -> bytes | memoryview | None:
        """The source's next piece, unless the upload stops first (then raise why)."""
        self._check()
        step = asyncio.ensure_future(anext(chunks, None))
        stop = asyncio.ensure_future(self._stopped.wait())
        try:
            await asyncio.wait((step, stop), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not step.done():
                step.cancel()
                await asyncio.gather(step, return_exceptions=True)
        if step.cancelled():
            self._check()
        return step.result()

    async def _wait_credit(self, need: int) -> None:
        while self._credit < need and not self.lost and self.error is None:
            self._wake.clear()
            await self._wake.wait()
        self._check()

    def _check(self) -> None:
        if self.error is not None:
            raise self.error
        if self.lost:
            raise ConnectionLost("The connection dropped during an upload.")

    def abort(self, error: BaseException) -> None:
        if not self.lost:
            message = f"{type(error).__name__}: {error}"[:1000]
            self._client._send({"op": "upload_abort", "stream": self.stream, "error": message})


async def _plain_next(chunks: AsyncIterator[bytes | memoryview]) -> bytes | memoryview | None:
    return await anext(chunks, None)


async def _chunks(value: Any, size: int) -> AsyncGenerator[bytes | memoryview, None]:
    """Pieces of at most ``size`` bytes from any stream value; file reads run in a thread."""
    if isinstance(value, bytes | bytearray | memoryview):
        view = memoryview(value).cast("B")
        for start in range(0, len(view), size):
            yield view[start : start + size]  # pack_chunk copies it once, with the header
        return
    if hasattr(value, "__aiter__"):
        async for part in _split(value, size):
            yield part
        return
    while True:
        part = await asyncio.to_thread(value.read, size)
        if not part:
            return
        if isinstance(part, str):
            raise TypeError("Stream files must be opened in binary mode.")
        yield bytes(part)


async def _split(source: AsyncIterable[Any], size: int) -> AsyncIterator[bytes | memoryview]:
    async for part in source:
        if not isinstance(part, bytes | bytearray | memoryview):
            raise TypeError(f"A stream yielded {type(part).__name__}, not bytes.")
        if isinstance(part, bytes) and len(part) <= size:
            yield part  # the common case: no slicing
            continue
        view = memoryview(part).cast("B")
        for start in range(0, len(view), size):
            yield view[start : start + size]
