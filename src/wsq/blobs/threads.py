"""What the blob stores that block (files, S3) share: a lane that runs one writer's or
reader's blocking calls in order in the store's thread pool, and a reader that reads ahead
:data:`READ_AHEAD` bytes per thread hop."""

from __future__ import annotations

import asyncio
import concurrent.futures
from abc import abstractmethod
from collections.abc import Callable
from typing import Any, TypeVar

from wsq.blobs.base import BlobReader
from wsq.blobs.memory import check_read_size

T = TypeVar("T")

READ_AHEAD = 1 << 20
"""A reader reads at least this many bytes per thread hop."""


class Lane:
    """Runs the blocking calls on one file or object in the pool, each after the previous
    one ended."""

    def __init__(self, executor: concurrent.futures.Executor) -> None:
        self._executor = executor
        self._last: concurrent.futures.Future[Any] | None = None

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` in a thread once earlier calls finished. If the caller is cancelled
        the call still runs to its end, so later calls (a close) never overlap it."""
        future = self._executor.submit(_after, self._last, fn, *args)
        self._last = future
        result = await asyncio.shield(asyncio.wrap_future(future))
        if self._last is future:
            self._last = None  # it ended; do not keep its result (a read's bytes) alive
        return result


def _after(previous: concurrent.futures.Future[Any] | None, fn: Callable[..., T], *args: Any) -> T:
    if previous is not None:
        concurrent.futures.wait([previous])
    return fn(*args)


class ReadAheadReader(BlobReader):
    """A reader whose position is kept here, so a cancelled :meth:`read` loses nothing (the
    next call reads the same bytes again). Subclasses read in a thread with
    :meth:`_read_sync` and release what they hold with :meth:`_release_sync`."""

    def __init__(self, executor: concurrent.futures.Executor, size: int, offset: int) -> None:
        self.size = size
        self._lane = Lane(executor)
        self._next = offset  # offset of the first byte not yet in the buffer
        self._buffer = b""
        self._taken = 0  # bytes of the buffer already returned
        self._closed = False

    async def read(self, n: int) -> bytes:
        """Exactly ``n`` bytes, fewer only at the end, ``b""`` at the end. Holds at most
        ``n + READ_AHEAD`` bytes. Raise InvalidArgument if ``n < 1``, RuntimeError after
        :meth:`close`, and what :meth:`_read_sync` raises."""
        check_read_size(n)
        if self._closed:
            raise RuntimeError("Blob reader is closed")
        if len(self._buffer) - self._taken < n and self._next < self.size:
            await self._fill(n)
        chunk = self._buffer[self._taken : self._taken + n]
        self._taken += len(chunk)
        return chunk

    async def _fill(self, n: int) -> None:
        rest = self._buffer[self._taken :]
        want = min(max(n - len(rest), READ_AHEAD), self.size - self._next)
        data = await self._lane.run(self._read_sync, self._next, want)
        self._next += len(data)
        self._buffer, self._taken = rest + data, 0

    async def close(self) -> None:
        """Release the reader (in a thread, after any read in flight). Idempotent."""
        if not self._closed:
            self._closed = True
            self._buffer = b""
            await self._lane.run(self._release_sync)

    @abstractmethod
    def _read_sync(self, at: int, want: int) -> bytes:
        """In a thread: ``want`` bytes from offset ``at``, fewer only at the end."""

    @abstractmethod
    def _release_sync(self) -> None:
        """In a thread: release the file or connection."""
