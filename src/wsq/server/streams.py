"""Stream transfers on one connection: uploads into the blob store and downloads out of it,
each with credit-based flow control (docs/protocol.md §8).

An upload never holds more than the announced window in memory: the client may only send
bytes it has credit for, and credit comes back as chunks reach the blob store. A download
only reads from the blob store what the client has granted credit for. Neither ever blocks
the connection's read loop, so one slow stream cannot stall the rest of its traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from wsq import protocol
from wsq.blobs.base import BlobNotFound, BlobReader, BlobStore, BlobWriter
from wsq.core.task import StreamRef
from wsq.exceptions import (
    ProtocolError,
    StorageFull,
    TooLarge,
    Unavailable,
    UploadFailed,
    WsqError,
)
from wsq.server.logs import log

CLOSE_GRACE = 2.0
"""Seconds closing an upload waits for the blob store to discard what it holds."""


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


SendText = Callable[[bytes], None]
SendBinary = Callable[[bytes], None]


class BlobQuota:
    """``max_blob_bytes``: committed blobs (the store's ``used_bytes``) plus the bytes of
    uploads still in progress (reserved here as they arrive) stay within ``limit``."""

    def __init__(self, blobs: BlobStore, limit: int) -> None:
        self.blobs = blobs
        self.limit = limit
        self.reserved = 0

    def reserve(self, count: int) -> bool:
        if self.blobs.used_bytes + self.reserved + count > self.limit:
            return False
        self.reserved += count
        return True

    def release(self, count: int) -> None:
        self.reserved -= count


class Upload:
    """One stream the client is sending. :attr:`done` resolves to ``(key, size)`` once the
    blob is durable, or raises :class:`UploadFailed` (:class:`StorageFull`, :class:`TooLarge`
    when a limit stopped it).

    A stream over ``max_size`` bytes, over the ``quota``, or that the blob store cannot
    write (a full disk) fails at once: the client hears of it by a ``stream_error`` (it may
    be waiting for credit that will never come, §8.2) and later chunks are discarded.
    """

    def __init__(
        self,
        stream: int,
        blobs: BlobStore,
        window: int,
        send: SendText,
        *,
        max_size: int | None = None,
        quota: BlobQuota | None = None,
    ) -> None:
        self.stream = stream
        self._blobs = blobs
        self._window = window
        self._send = send
        self._max_size = max_size
        self._quota = quota
        self._received = 0
        self._reserved = 0
        self._chunks: deque[memoryview] = deque()
        self._buffered = 0
        self._ended = False
        self._failed: WsqError | None = None
        self._wake = asyncio.Event()
        self.done: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()
        # The caller that awaits ``done`` reports failures; don't warn if none does.
        self.done.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._task = asyncio.create_task(self._pump(), name=f"wsq-upload-{stream}")

    def receive(self, payload: memoryview) -> None:
        """A chunk arrived. Raise ProtocolError if it exceeds the credit granted."""
        if self._ended or self._failed:
            return
        size = len(payload)
        self._buffered += size
        if self._buffered > self._window:
            self.abort("Upload exceeded its flow-control window.")
            raise ProtocolError(f"Stream {self.stream} sent more than its credit.")
        self._received += size
        if self._max_size is not None and self._received > self._max_size:
            limit = self._max_size
            self.fail(TooLarge(f"Stream {self.stream} exceeds the limit of {limit} bytes."))
            return
        if self._quota is not None:
            if not self._quota.reserve(size):
                limit = self._quota.limit
                self.fail(StorageFull(f"The blob storage is full (limit {limit} bytes)."))
                return
            self._reserved += size
        self._chunks.append(payload)  # a view of the received frame: no copy
        self._wake.set()

    def end(self) -> None:
        self._ended = True
        self._wake.set()

    def abort(self, reason: str) -> None:
        """Stop: the pump discards the blob, unless it has already stored it (then the
        caller deletes it, or :meth:`_pump` does if nobody waits for it any more)."""
        self._stop(UploadFailed(reason))

    def fail(self, error: WsqError) -> None:
        """Stop because of ``error``, and tell the client (§8.2)."""
        if self._stop(error):
            self._send_error(error)

    def _stop(self, error: WsqError) -> bool:
        """Stop with ``error`` unless already stopped; whether this call stopped it."""
        if self._failed is not None:
            return False
        self._failed = error
        self._chunks.clear()
        self._wake.set()
        return True

    def _send_error(self, error: WsqError) -> None:
        self._send(protocol.stream_error(self.stream, error.code, str(error)))

    async def close(self) -> None:
        """Stop, discarding the blob unless it was committed. Waits at most
        :data:`CLOSE_GRACE` seconds for the blob store (which may not answer): the pump
        goes on discarding by itself, and what it cannot is swept later."""
        self.abort("Connection closed.")
        await asyncio.wait({self._task}, timeout=CLOSE_GRACE)
        self._task.add_done_callback(_retrieve)  # the pump reported what went wrong

    async def _pump(self) -> None:
        writer: BlobWriter | None = None
        try:
            writer = await self._blobs.create()
            size = await self._copy(writer)
        except Exception as exc:
            if writer is not None:
                await writer.abort()
            failure = self._failed
            if failure is None:
                failure = _store_failure(self.stream, exc)
                self._failed = failure
                self._send_error(failure)
            if not self.done.done():
                self.done.set_exception(failure)
            return
        finally:
            if self._quota is not None:
                self._quota.release(self._reserved)  # committed bytes now count as used
                self._reserved = 0
        if self.done.done():  # nobody waits any more (cancelled): nothing will claim it
            await self._blobs.delete([writer.key])
        else:
            self.done.set_result((writer.key, size))

    async def _copy(self, writer: BlobWriter) -> int:
        while True:
            while not self._chunks and not self._ended and not self._failed:
                self._wake.clear()
                await self._wake.wait()
            if self._failed:
                raise self._failed
            if not self._chunks:
                return await writer.commit()
            chunk = self._chunks.popleft()
            await writer.write(chunk)
            self._buffered -= len(chunk)
            self._send(
                protocol.encode({"op": "credit", "stream": self.stream, "bytes": len(chunk)})
            )


def _store_failure(stream: int, exc: Exception) -> WsqError:
    if isinstance(exc, Unavailable):
        return exc  # the blob store's own clear words, and its code (docs/protocol.md §7)
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(f"The blob store's disk is full; stream {stream} was not stored.")
    # The cause (a path, a key) is for the log, not the client.
    log(logging.ERROR, "blob store failed", f"storing stream {stream}: {exc!r}")
    return UploadFailed(f"Could not store stream {stream}.")


class Download:
    """One stream the server is sending; runs until the end, an error, or cancel."""

    def __init__(
        self,
        stream: int,
        source: Callable[[], Any],
        window: int,
        chunk: int,
        send_text: SendText,
        send_binary: SendBinary,
    ) -> None:
        self.stream = stream
        self._credit = window
        self._chunk = chunk
        self._send_text = send_text
        self._send_binary = send_binary
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(source), name=f"wsq-download-{stream}")
        self.finished: asyncio.Future[None] = self._task

    def grant(self, count: int) -> None:
        self._credit += count
        self._wake.set()

    def cancel(self) -> None:
        """Stop at once: nothing more is sent for this download after this call."""
        self._task.cancel()

    async def close(self) -> None:
        self.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task

    async def _run(self, source: Callable[[], Any]) -> None:
        try:
            reader: BlobReader = await source()
        except Exception as exc:
            self._send_error(*_download_failure(exc))
            return
        try:
            total = await self._copy(reader)
        except Exception as exc:
            log(logging.ERROR, "blob store failed", f"reading a stream: {exc!r}")
            if isinstance(exc, Unavailable):  # docs/protocol.md §7: worth trying again
                self._send_error(exc.code, "The blob store is unavailable; try again.")
            else:
                self._send_error("internal", "Reading the stream failed.")
            return
        finally:
            await reader.close()
        self._send_text(protocol.encode({"op": "end", "stream": self.stream, "size": total}))

    async def _copy(self, reader: BlobReader) -> int:
        total = 0
        while True:
            while self._credit <= 0:
                self._wake.clear()
                await self._wake.wait()
            data = await reader.read(min(self._chunk, self._credit))
            if not data:
                return total
            self._credit -= len(data)
            total += len(data)
            self._send_binary(protocol.pack_chunk(self.stream, data))

    def _send_error(self, code: str, message: str) -> None:
        self._send_text(protocol.stream_error(self.stream, code, message))


def _download_failure(exc: Exception) -> tuple[str, str]:
    """The code and text a client gets for a download that could not start: never the
    blob key or a path (those go to the log)."""
    if isinstance(exc, WsqError) and exc.code != "internal":
        return exc.code, str(exc)
    if isinstance(exc, BlobNotFound):
        log(logging.ERROR, "blob missing", f"a task's blob is gone: {exc}")
        return "not_found", "The stream's data is missing."
    log(logging.ERROR, "blob store failed", f"opening a stream: {exc!r}")
    return "internal", "Internal server error."


class InlineReader(BlobReader):
    """A :class:`BlobReader` over bytes kept inline in the task record."""

    def __init__(self, data: bytes, offset: int) -> None:
        self._view = memoryview(data)[offset:]
        self.size = len(data)

    async def read(self, n: int) -> bytes:
        part, self._view = self._view[:n], self._view[n:]
        return bytes(part)

    async def close(self) -> None:
        self._view = memoryview(b"")


def stream_json(ref: StreamRef) -> dict[str, Any]:
    """A stream as workers and readers see it: where, how big, and inline bytes if any."""
    out: dict[str, Any] = {"path": list(ref.path), "size": ref.size}
    if ref.inline is not None:
        out["inline"] = ref.inline
    return out
