"""The blob store interface: where stream bytes live (docs/architecture.md).

Shaped like abstract-blob-store: a blob is written once through a :class:`BlobWriter`,
becomes visible and durable on :meth:`BlobWriter.commit`, is read as chunks from any offset,
and is deleted by key. Keys are made by the store, never by a client, and every method
that takes a key rejects one the store could not have made (:func:`check_key`), so no key
can name a path outside the store.

Backends: :mod:`wsq.blobs.memory` (tests), :mod:`wsq.blobs.files` (the embedded default) and
:mod:`wsq.blobs.s3` (S3 and stores with its API).
One contract suite (``tests/contract/test_blob_store.py``) runs against every backend.
"""

from __future__ import annotations

import re
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable

from wsq.exceptions import InvalidArgument

_KEY = re.compile(r"^[0-9a-f]{32}$")


def new_key() -> str:
    return uuid.uuid4().hex


def check_key(key: str) -> str:
    """Return ``key`` if it has the form :func:`new_key` makes, else raise InvalidArgument."""
    if not isinstance(key, str) or not _KEY.match(key):
        raise InvalidArgument(f"Not a blob key: {key!r}")
    return key


OWNER_MARK = "wsq-store"
"""The name (beside the blobs, never a key) under which a blob store records its owner."""


class BlobNotFound(KeyError):
    """No committed blob has that key."""


class BlobWriter(ABC):
    """One blob being written. Call :meth:`write` any number of times, then exactly one of
    :meth:`commit` and :meth:`abort`."""

    key: str
    left: bool = False
    """After :meth:`abort`: what was written could not all be removed (the store was out of
    reach); :meth:`BlobStore.discard` of the key, later, removes it."""

    @abstractmethod
    async def write(self, data: bytes | memoryview) -> None:
        """Append ``data``. Off the event loop for stores that do I/O."""

    @abstractmethod
    async def commit(self) -> int:
        """Make the blob durable and visible under :attr:`key`; return its size in bytes."""

    @abstractmethod
    async def abort(self) -> None:
        """Discard everything written. Idempotent; harmless after commit fails."""


class BlobReader(ABC):
    """Sequential reads of one committed blob."""

    size: int

    @abstractmethod
    async def read(self, n: int) -> bytes:
        """Up to ``n`` bytes; ``b""`` at the end."""

    @abstractmethod
    async def close(self) -> None:
        """Release the reader. Idempotent."""


class BlobStore(ABC):
    used_bytes: int = 0
    """Bytes of committed blobs: counted by :meth:`open`, raised by each commit, lowered by
    each delete. The server checks its ``max_blob_bytes`` quota against it."""

    @abstractmethod
    async def open(self) -> None:
        """Prepare the store (create folders, drop leftovers of uncommitted writes) and
        count :attr:`used_bytes`."""

    @abstractmethod
    async def create(self) -> BlobWriter:
        """Start a new blob under a fresh key."""

    @abstractmethod
    async def reader(self, key: str, offset: int = 0) -> BlobReader:
        """Read the committed blob ``key`` from ``offset``; raise :class:`BlobNotFound`."""

    @abstractmethod
    async def delete(self, keys: Iterable[str]) -> None:
        """Delete these blobs; keys that do not exist are ignored."""

    async def discard(self, keys: Iterable[str]) -> None:
        """Delete these blobs, and what is written of them if they are still being
        written, by a writer that will never finish (its server died). By default
        :meth:`delete`: a store whose unfinished writes are not kept under their keys."""
        await self.delete(keys)

    @abstractmethod
    def keys(self, min_age: float = 0.0) -> AsyncIterator[str]:
        """Every committed key (for the orphan sweep); with ``min_age``, only those
        committed at least that many seconds ago, measured on the store's own clock (a
        node sweeping a store other nodes share spares their uploads in progress)."""

    @abstractmethod
    async def claim(self, owner: str) -> str | None:
        """Record that this store's blobs belong to the state store ``owner`` (its
        ``Recovery.store_id``), unless another one's are here already: then return that
        one's id and change nothing. A store's blobs are swept against one database's
        references, so two databases sharing a store would delete each other's."""

    @abstractmethod
    async def close(self) -> None:
        """Release resources. Idempotent."""

    async def check(self) -> None:
        """Raise if the store cannot be reached now (the server's ``/ready``). By default
        one read of a key no blob has, which must answer :class:`BlobNotFound`."""
        try:
            reader = await self.reader(_PROBE_KEY)
        except BlobNotFound:
            return
        await reader.close()


_PROBE_KEY = "0" * 32
