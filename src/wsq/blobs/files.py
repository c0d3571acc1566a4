"""The embedded blob store: one file per blob under a root folder.

Layout::

    root/tmp/<key>            being written; open() deletes what is left here (only what is
                              older than stale_upload_age when given: a shared folder)
    root/<key[:2]>/<key>      committed (256 fan-out folders, so 1M blobs make ~4k per folder)

A blob is durable once :meth:`FileBlobWriter.commit` returns: the file is fsynced, renamed into
its fan-out folder, and that folder is fsynced (and the root, the first time this store uses a
fan-out folder). A kill -9 or power loss before that leaves at most a file in ``tmp``.

Threads: every blocking call (open, write, read, fsync, rename, unlink, scandir) runs in a
ThreadPoolExecutor owned by the store, not in asyncio's default executor. fsync can stall for
hundreds of milliseconds on a busy disk; a dedicated pool keeps such stalls from starving
``getaddrinfo`` and other users of ``asyncio.to_thread``, bounds the disk concurrency
(``max_workers``), and lets :meth:`FileBlobStore.close` wait for I/O still in flight.

Writers buffer up to :data:`WRITE_BUFFER` bytes and readers read ahead :data:`READ_AHEAD`
bytes, so a stream of small chunks costs one thread hop per ~1 MiB, and a writer or reader
never holds more than that plus the caller's own chunk.

Calls on one writer or reader run in order in the pool even when their coroutine is cancelled
(the blocking call is shielded and still finishes), so a close never races a write.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import io
import math
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import TypeVar

from wsq.blobs.base import OWNER_MARK, BlobNotFound, BlobStore, BlobWriter, check_key, new_key
from wsq.blobs.memory import check_offset
from wsq.blobs.threads import Lane, ReadAheadReader

T = TypeVar("T")

WRITE_BUFFER = 1 << 20
"""A writer hands its buffer to a thread once it holds this many bytes."""

_FANOUT = re.compile(r"^[0-9a-f]{2}$")
_KEY = re.compile(r"^[0-9a-f]{32}$")
_OPEN, _BROKEN, _COMMITTED, _ABORTED = "open", "broken", "committed", "aborted"


class FileBlobWriter(BlobWriter):
    """Writes ``root/tmp/<key>``; :meth:`commit` moves it into place.

    Call :meth:`write` sequentially (await each call), then :meth:`commit` or :meth:`abort`.
    If a call fails or is cancelled the writer is broken: :meth:`write` and :meth:`commit` raise
    RuntimeError and only :meth:`abort` is left, which the caller must then call.
    """

    def __init__(self, store: FileBlobStore, key: str, file: io.FileIO) -> None:
        self.key = key
        self._store = store
        self._file = file
        self._lane = Lane(store._executor)
        self._buffer = bytearray()
        self._size = 0
        self._state = _OPEN
        self._commit_tried = False

    async def write(self, data: bytes | memoryview) -> None:
        """Append ``data``: buffered, and written in a thread once the buffer is full.

        Raise OSError (disk full...) or RuntimeError if the writer is not open.
        """
        self._check_open()
        self._size += len(data)
        if len(self._buffer) + len(data) < WRITE_BUFFER:
            self._buffer += data
            return
        buffer, self._buffer = self._buffer, bytearray()
        await self._run(_write_all, self._file, buffer, data)

    async def commit(self) -> int:
        """Write the rest, fsync, move into place, fsync the folder; return the size.

        The blob is durable once this returns. On an error, call :meth:`abort`.
        """
        self._check_open()
        self._commit_tried = True
        buffer, self._buffer = self._buffer, bytearray()
        paths = self._store._paths(self.key)
        await self._run(_commit_file, self._file, buffer, self._store, *paths)
        self._state = _COMMITTED
        self._store.used_bytes += self._size
        return self._size

    async def abort(self) -> None:
        """Close and delete the file. Idempotent; does nothing after a successful commit.
        Also deletes the committed file if :meth:`commit` failed or was cancelled after the
        rename, since its caller never learned of it."""
        if self._state in (_COMMITTED, _ABORTED):
            return
        self._state = _ABORTED
        self._buffer = bytearray()
        tmp, final = self._store._paths(self.key)
        paths = (tmp, final) if self._commit_tried else (tmp,)
        await self._lane.run(_discard_file, self._file, *paths)

    async def _run(self, fn: Callable[..., None], *args: object) -> None:
        try:
            await self._lane.run(fn, *args)
        except BaseException:
            self._state = _BROKEN
            raise

    def _check_open(self) -> None:
        if self._state != _OPEN:
            raise RuntimeError(f"Blob writer {self.key} is {self._state}")


def _write_all(file: io.FileIO, *chunks: bytes | bytearray) -> None:
    for chunk in chunks:
        view = memoryview(chunk)
        while view:
            view = view[file.write(view) :]


def _commit_file(
    file: io.FileIO, rest: bytearray, store: FileBlobStore, tmp: Path, final: Path
) -> None:
    with file:
        _write_all(file, rest)
        os.fsync(file.fileno())
    store._ensure_fanout(final.parent)
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def _discard_file(file: io.FileIO, *paths: Path) -> None:
    file.close()
    for path in paths:
        path.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileBlobReader(ReadAheadReader):
    """Reads one committed file with ``pread`` (OSError on a read error)."""

    def __init__(self, store: FileBlobStore, file: io.FileIO, size: int, offset: int) -> None:
        super().__init__(store._executor, size, offset)
        self._file = file

    def _read_sync(self, at: int, want: int) -> bytes:
        return _pread_all(self._file, want, at)

    def _release_sync(self) -> None:
        self._file.close()


def _pread_all(file: io.FileIO, n: int, offset: int) -> bytes:
    """Up to ``n`` bytes from ``offset``: fewer only at the end of the file."""
    parts: list[bytes] = []
    while n > 0:
        part = os.pread(file.fileno(), n, offset)
        if not part:
            break
        parts.append(part)
        n -= len(part)
        offset += len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _open_reader(path: Path, offset: int) -> tuple[io.FileIO, int]:
    file = io.FileIO(path, "r")
    try:
        size = os.fstat(file.fileno()).st_size
        check_offset(offset, size)
    except BaseException:
        file.close()
        raise
    return file, size


class FileBlobStore(BlobStore):
    """Blobs as files under ``root``. Call :meth:`open` once, before any other method and
    while no writer of this root exists (it deletes unfinished writes). Call :meth:`close`
    after every writer and reader is done; it waits for I/O in flight.

    ``max_workers`` bounds the threads doing disk I/O for this store. ``stale_upload_age``
    (seconds) is for a folder several servers share (``--storage file:///path``): then
    :meth:`open` deletes only unfinished writes untouched for that long, not the other
    servers' uploads in progress; by default it deletes them all (the folder is this
    server's alone).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        max_workers: int = 8,
        stale_upload_age: float | None = None,
    ) -> None:
        self.root = Path(root)
        self.stale_upload_age = stale_upload_age
        self._tmp = self.root / "tmp"
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix="wsq-blobs"
        )
        # Fan-out folders known to be durable in root (created, then root fsynced).
        self._durable_fanouts: set[str] = set()
        self.used_bytes = 0

    async def open(self) -> None:
        """Create ``root`` (durably) and ``root/tmp``; delete what is left in ``tmp`` (with
        ``stale_upload_age``, only what is that old); add up the sizes of the committed
        blobs (one ``stat`` each: about 1 s per million)."""
        self.used_bytes = await self._run(self._open_sync)

    def _open_sync(self) -> int:
        _make_dirs_durably(self.root)
        self._tmp.mkdir(exist_ok=True)
        age = self.stale_upload_age
        cutoff = time.time() - age if age is not None else math.inf
        with os.scandir(self._tmp) as entries:
            for entry in entries:
                if age is None or _modified(entry) <= cutoff:
                    _remove_leftover(Path(entry.path))
        return sum(_folder_bytes(fanout) for fanout in _list_fanouts(self.root))

    async def create(self) -> FileBlobWriter:
        """Start a blob under a fresh key (creates ``tmp/<key>``). Raise OSError."""
        key = new_key()
        path = self._tmp / key
        file = await self._run_owning(_create_tmp, path, cleanup=_discard_orphan)
        return FileBlobWriter(self, key, file)

    async def reader(self, key: str, offset: int = 0) -> FileBlobReader:
        """Read ``key`` from ``offset``. The caller must close the reader.

        Raise InvalidArgument for a malformed key or an offset outside ``0..size``,
        BlobNotFound if no committed blob has that key, OSError on other errors.
        """
        path = self._paths(check_key(key))[1]
        try:
            file, size = await self._run_owning(_open_reader, path, offset, cleanup=_close_first)
        except FileNotFoundError:
            raise BlobNotFound(key) from None
        return FileBlobReader(self, file, size, offset)

    async def delete(self, keys: Iterable[str]) -> None:
        """Unlink these blobs; missing ones are ignored. Every key is checked first, so a
        malformed one raises InvalidArgument before anything is deleted. Not fsynced: a
        deletion lost in a power cut leaves an orphan for the sweep."""
        paths = [self._paths(check_key(key))[1] for key in keys]
        if paths:
            self.used_bytes -= await self._run(_unlink_all, paths)

    async def discard(self, keys: Iterable[str]) -> None:
        """See :meth:`BlobStore.discard`: unlink these blobs and their ``tmp`` files."""
        checked = [check_key(key) for key in keys]
        if checked:
            await self._run(_unlink_all, [self._paths(key)[0] for key in checked])
            await self.delete(checked)

    async def keys(self, min_age: float = 0.0) -> AsyncIterator[str]:
        """Every committed key (with ``min_age``: whose file was last modified at least
        that many seconds ago), one fan-out folder (one thread hop) at a time. Files
        whose names are not keys, or that sit in the wrong folder, are skipped."""
        for fanout in await self._run(_list_fanouts, self.root):
            for key in await self._run(_list_keys, fanout, min_age):
                yield key

    async def claim(self, owner: str) -> str | None:
        """See :meth:`BlobStore.claim`: the owner is the file ``root/wsq-store``, made with
        ``O_EXCL`` and fsynced (an empty one, left by a crash, counts as none)."""
        return await self._run(_claim, self.root, owner)

    async def close(self) -> None:
        """Wait for I/O in flight and stop the threads. Idempotent."""
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    async def check(self) -> None:
        """Raise OSError unless the root and its ``tmp`` folder are folders the server may
        write (a store whose folder was removed, replaced or unmounted is not ready)."""
        await self._run(_check_folders, self.root, self._tmp)

    def _paths(self, key: str) -> tuple[Path, Path]:
        """``(tmp, committed)`` paths of a checked key."""
        return self._tmp / key, self.root / key[:2] / key

    def _ensure_fanout(self, folder: Path) -> None:
        """In a thread: create ``folder`` if needed and make its entry in root durable."""
        if folder.name in self._durable_fanouts:
            return
        folder.mkdir(exist_ok=True)
        _fsync_dir(self.root)
        self._durable_fanouts.add(folder.name)

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _run_owning(
        self, fn: Callable[..., T], *args: object, cleanup: Callable[[T], object]
    ) -> T:
        """Run ``fn``, which returns something to release; if the caller is cancelled first,
        ``cleanup`` releases it once it arrives."""
        future = self._executor.submit(fn, *args)
        try:
            return await asyncio.shield(asyncio.wrap_future(future))
        except asyncio.CancelledError:
            future.add_done_callback(lambda done: _release(done, cleanup))
            raise


def _release(done: concurrent.futures.Future[T], cleanup: Callable[[T], object]) -> None:
    if not done.cancelled() and done.exception() is None:
        with contextlib.suppress(OSError):
            cleanup(done.result())


def _check_folders(*folders: Path) -> None:
    for folder in folders:
        if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
            raise NotADirectoryError(f"{folder} is not a writable folder")


def _create_tmp(path: Path) -> io.FileIO:
    return io.FileIO(path, "x")


def _discard_orphan(file: io.FileIO) -> None:
    file.close()
    os.unlink(file.name)


def _close_first(opened: tuple[io.FileIO, int]) -> None:
    opened[0].close()


def _make_dirs_durably(path: Path) -> None:
    """``mkdir -p path``, then fsync the parent of every folder it created."""
    missing = [path, *path.parents]
    missing = missing[: next(i for i, p in enumerate(missing) if p.exists())]
    path.mkdir(parents=True, exist_ok=True)
    for folder in reversed(missing):
        _fsync_dir(folder.parent)


def _remove_leftover(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        for child in path.iterdir():
            _remove_leftover(child)
        path.rmdir()
    else:
        path.unlink(missing_ok=True)


def _unlink_all(paths: list[Path]) -> int:
    """Unlink ``paths``; return the bytes they held."""
    freed = 0
    for path in paths:
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            continue
        freed += size
    return freed


def _folder_bytes(folder: Path) -> int:
    """Bytes of the committed blobs in one fan-out folder."""
    total = 0
    with os.scandir(folder) as entries:
        for entry in entries:
            if _KEY.match(entry.name) and entry.name.startswith(folder.name):
                with contextlib.suppress(FileNotFoundError):
                    total += entry.stat(follow_symlinks=False).st_size
    return total


def _claim(root: Path, owner: str) -> str | None:
    """The mark appears whole or not at all: written and fsynced under a name of its own,
    then hard-linked to ``wsq-store`` (a link fails if the name exists: of several first
    claims, one wins and the others read it)."""
    path = root / OWNER_MARK
    draft = root / f"{OWNER_MARK}.{uuid.uuid4().hex}"
    fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, owner.encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        while True:
            try:
                os.link(draft, path)
            except FileExistsError:
                try:
                    found = path.read_text(encoding="utf-8", errors="replace").strip()
                except FileNotFoundError:
                    continue  # removed meanwhile (by hand): try again
                if found:
                    return None if found == owner else found
                os.replace(draft, path)  # an empty mark (made by hand): ours replaces it
            _fsync_dir(root)
            return None
    finally:
        draft.unlink(missing_ok=True)


def _list_fanouts(root: Path) -> list[Path]:
    with os.scandir(root) as entries:
        return sorted(
            Path(e.path)
            for e in entries
            if _FANOUT.match(e.name) and e.is_dir(follow_symlinks=False)
        )


def _list_keys(folder: Path, min_age: float = 0.0) -> list[str]:
    cutoff = time.time() - min_age
    try:
        with os.scandir(folder) as entries:
            return [
                e.name
                for e in entries
                if _KEY.match(e.name)
                and e.name.startswith(folder.name)
                and e.is_file(follow_symlinks=False)
                and (min_age <= 0 or _modified(e) <= cutoff)
            ]
    except FileNotFoundError:
        return []


def _modified(entry: os.DirEntry[str]) -> float:
    try:
        return entry.stat(follow_symlinks=False).st_mtime
    except FileNotFoundError:
        return math.inf  # deleted meanwhile: not an orphan to sweep
