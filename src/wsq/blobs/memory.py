"""An in-memory blob store, for tests and ephemeral servers.

Same contract as :mod:`wsq.blobs.files`, checked by the same suite
(``tests/contract/test_blob_store.py``): a blob becomes visible only on commit, keys are
validated by :func:`~wsq.blobs.base.check_key`, and writers and readers fail the same way on
misuse. Nothing is durable: the blobs live as long as the store object.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable

from wsq.blobs.base import BlobNotFound, BlobReader, BlobStore, BlobWriter, check_key, new_key
from wsq.exceptions import InvalidArgument

_OPEN, _COMMITTED, _ABORTED = "open", "committed", "aborted"


class MemoryBlobWriter(BlobWriter):
    """Buffers the chunks in a list; :meth:`commit` joins them into the store."""

    def __init__(self, store: MemoryBlobStore, key: str) -> None:
        self.key = key
        self._store = store
        self._chunks: list[bytes] = []
        self._state = _OPEN

    async def write(self, data: bytes | memoryview) -> None:
        """Append ``data``. Raise RuntimeError after commit or abort."""
        self._check_open()
        if data:
            self._chunks.append(bytes(data))

    async def commit(self) -> int:
        """Make the blob visible; return its size. Raise RuntimeError after commit or abort."""
        self._check_open()
        blob = b"".join(self._chunks)
        self._chunks = []
        self._store._blobs[self.key] = blob
        self._store._committed[self.key] = time.time()
        self._store.used_bytes += len(blob)
        self._state = _COMMITTED
        return len(blob)

    async def abort(self) -> None:
        """Discard the chunks. Idempotent; does nothing after a successful commit."""
        if self._state == _OPEN:
            self._chunks = []
            self._state = _ABORTED

    def _check_open(self) -> None:
        if self._state != _OPEN:
            raise RuntimeError(f"Blob writer {self.key} is {self._state}")


class MemoryBlobReader(BlobReader):
    """Slices of one committed blob (a deleted blob stays readable through its reader)."""

    def __init__(self, blob: bytes, offset: int) -> None:
        self.size = len(blob)
        self._blob = blob
        self._pos = offset
        self._closed = False

    async def read(self, n: int) -> bytes:
        """Exactly ``n`` bytes, fewer only at the end, ``b""`` at the end.

        Raise InvalidArgument if ``n < 1``, RuntimeError after :meth:`close`.
        """
        check_read_size(n)
        if self._closed:
            raise RuntimeError("Blob reader is closed")
        chunk = self._blob[self._pos : self._pos + n]
        self._pos += len(chunk)
        return chunk

    async def close(self) -> None:
        """Release the reader. Idempotent."""
        self._closed = True
        self._blob = b""


class MemoryBlobStore(BlobStore):
    """Blobs in a dict. ``open`` and ``close`` do nothing; the store needs neither."""

    def __init__(self) -> None:
        self._blobs: dict[str, bytes] = {}
        self._committed: dict[str, float] = {}  # key -> when it was committed
        self.owner: str | None = None  # the state store these blobs belong to (claim)
        self.used_bytes = 0

    async def open(self) -> None:
        """Nothing to prepare: uncommitted writes die with their writers."""

    async def create(self) -> MemoryBlobWriter:
        """A writer for a fresh key."""
        return MemoryBlobWriter(self, new_key())

    async def reader(self, key: str, offset: int = 0) -> MemoryBlobReader:
        """Read ``key`` from ``offset``.

        Raise InvalidArgument for a malformed key or an offset outside ``0..size``,
        BlobNotFound if no committed blob has that key.
        """
        check_key(key)
        try:
            blob = self._blobs[key]
        except KeyError:
            raise BlobNotFound(key) from None
        check_offset(offset, len(blob))
        return MemoryBlobReader(blob, offset)

    async def delete(self, keys: Iterable[str]) -> None:
        """Delete these blobs; missing ones are ignored. A malformed key raises
        InvalidArgument before anything is deleted."""
        for key in [check_key(key) for key in keys]:
            blob = self._blobs.pop(key, None)
            self._committed.pop(key, None)
            if blob is not None:
                self.used_bytes -= len(blob)

    async def keys(self, min_age: float = 0.0) -> AsyncIterator[str]:
        """Every committed key (at least ``min_age`` seconds old), as of the first
        iteration."""
        cutoff = time.time() - min_age
        for key, committed in list(self._committed.items()):
            if min_age <= 0 or committed <= cutoff:
                yield key

    async def claim(self, owner: str) -> str | None:
        """See :meth:`BlobStore.claim`."""
        if self.owner is None:
            self.owner = owner
        return None if self.owner == owner else self.owner

    async def close(self) -> None:
        """Nothing to release."""


def check_offset(offset: int, size: int) -> None:
    """Raise InvalidArgument unless ``0 <= offset <= size`` (shared by the backends)."""
    if not 0 <= offset <= size:
        raise InvalidArgument(f"Offset {offset} is outside the blob (size {size})")


def check_read_size(n: int) -> None:
    """Raise InvalidArgument unless ``n >= 1``: ``read(-1)`` of a 10 GB blob is a bug."""
    if n < 1:
        raise InvalidArgument(f"Read size must be at least 1, not {n}")
