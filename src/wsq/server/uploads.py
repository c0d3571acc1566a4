"""A cluster node's blob store: every blob it writes is first reserved in the state store.

Nodes share one blob store (S3). A node that dies while it uploads leaves what it wrote
(an unfinished multipart upload, or an object its task never got to reference) that no
other node could tell from an upload still in progress elsewhere. So each node records the
key of a blob in the state store before writing any of it (:meth:`StateStore.reserve_blob`,
one committed row), and the add's insert takes that row over. When a node's lease runs
out, a live node sweeps its reservations (:meth:`StateStore.sweep_uploads`, which also
fences any insert that still names them) and discards the blobs
(:meth:`BlobStore.discard`: deleted, their unfinished uploads aborted).

A store no other server shares reserves nothing (its orphans are swept at start), but
uses this class too: a blob whose abort could not reach the blob store is discarded again
later (:meth:`ReservedBlobs.discard_left`), rather than left until the store's next start.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable

from wsq.blobs.base import BlobReader, BlobStore, BlobWriter
from wsq.exceptions import WsqError
from wsq.storage.base import StateStore

logger = logging.getLogger("wsq.server")


class ReservedBlobs(BlobStore):
    """``blobs`` with each new blob reserved in ``store`` first, and released when it is
    deleted or its writer aborted."""

    def __init__(self, blobs: BlobStore, store: StateStore) -> None:
        self.blobs = blobs
        self.store = store
        self.left: set[str] = set()
        """Keys whose writer could not remove what it wrote (the store was out of reach):
        :meth:`discard_left` tries again; their reservations are kept meanwhile."""

    async def discard_left(self) -> None:
        """Discard the blobs aborts left behind, then release their reservations. Raises
        what the stores raise (the keys stay for the next try)."""
        keys = sorted(self.left)
        if keys:
            await self.blobs.discard(keys)
            await self.store.release_blobs(keys)
            self.left.difference_update(keys)

    @property
    def used_bytes(self) -> int:
        return self.blobs.used_bytes

    @used_bytes.setter
    def used_bytes(self, value: int) -> None:
        self.blobs.used_bytes = value

    async def open(self) -> None:
        await self.blobs.open()

    async def create(self) -> BlobWriter:
        """A writer whose key is reserved. Raises what the reservation raised
        (``unavailable`` while PostgreSQL is away): nothing is written then."""
        writer = await self.blobs.create()
        try:
            await self.store.reserve_blob(writer.key)
        except BaseException:
            await writer.abort()
            raise
        return _ReservedWriter(writer, self)

    async def reader(self, key: str, offset: int = 0) -> BlobReader:
        return await self.blobs.reader(key, offset)

    async def delete(self, keys: Iterable[str]) -> None:
        """Delete the blobs, then their reservations (those no task took over)."""
        keys = list(keys)
        await self.blobs.delete(keys)
        await self.store.release_blobs(keys)

    async def delete_unreserved(self, keys: Iterable[str]) -> None:
        """Delete blobs that hold no reservation (a removed task's, whose rows went with
        it, or orphans no row names): no round trip to the state store."""
        await self.blobs.delete(keys)

    async def discard(self, keys: Iterable[str]) -> None:
        await self.blobs.discard(keys)

    def keys(self, min_age: float = 0.0) -> AsyncIterator[str]:
        return self.blobs.keys(min_age)

    async def claim(self, owner: str) -> str | None:
        return await self.blobs.claim(owner)

    async def close(self) -> None:
        await self.blobs.close()

    async def check(self) -> None:
        await self.blobs.check()


class _ReservedWriter(BlobWriter):
    def __init__(self, writer: BlobWriter, owner: ReservedBlobs) -> None:
        self.key = writer.key
        self._writer = writer
        self._owner = owner

    async def write(self, data: bytes | memoryview) -> None:
        await self._writer.write(data)

    async def commit(self) -> int:
        return await self._writer.commit()

    async def abort(self) -> None:
        """Abort the write, then release the reservation; if the abort left something
        behind, keep it and leave the key to :meth:`ReservedBlobs.discard_left`. (A release
        that fails leaves the row until this node's lease ends and it is swept.)"""
        await self._writer.abort()
        if self._writer.left:
            self.left = True
            self._owner.left.add(self.key)
            return
        try:
            await self._owner.store.release_blobs([self.key])
        except WsqError as exc:
            logger.warning("Could not release the reservation of blob %s: %s", self.key, exc)
