"""The blob store contract (wsq.blobs.base), run against every backend: memory, files, and
S3 (moto's server, tests/contract/conftest.py; S3's own tests are in test_s3_blob_store.py).

The files-only tests at the end check what the memory backend cannot have: the layout on
disk, crash recovery (kill -9 in a child process), and bounded memory for a large blob.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

import wsq
from tests.s3emulator import MotoServer
from wsq.blobs.base import BlobNotFound, BlobStore, check_key, new_key
from wsq.blobs.files import WRITE_BUFFER, FileBlobStore
from wsq.blobs.memory import MemoryBlobStore
from wsq.blobs.s3 import S3BlobStore
from wsq.blobs.threads import READ_AHEAD
from wsq.exceptions import InvalidArgument

T = TypeVar("T")

HOSTILE_KEYS = [
    "../../etc/passwd",
    "/etc/passwd",
    "",
    "a" * 33,
    "a" * 31,
    "A" * 32,
    "0" * 31 + "\x00",
    "0" * 30 + "/x",
    "../" + "0" * 29,
    "tmp",
    "g" * 32,
    # Keys are the store's own, never a task's id: scoped ids (docs/protocol.md §3) are not keys.
    "uploader/job-1",
    "alice/" + "0" * 32,
]


@pytest.fixture(params=["memory", "files", "s3"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobStore]:
    backend: BlobStore
    if request.param == "memory":
        backend = MemoryBlobStore()
    elif request.param == "files":
        backend = FileBlobStore(tmp_path / "blobs")
    else:
        s3: MotoServer = request.getfixturevalue("s3")
        backend = S3BlobStore(s3.bucket(), "wsq/blobs")
    await backend.open()
    yield backend
    await backend.close()


@pytest.fixture
async def files(tmp_path: Path) -> AsyncIterator[FileBlobStore]:
    backend = FileBlobStore(tmp_path / "blobs")
    await backend.open()
    yield backend
    await backend.close()


def pattern(size: int, seed: int = 0) -> bytes:
    """``size`` bytes that never repeat (SHA-256 in counter mode), so a misplaced, lost or
    doubled chunk shows."""
    prefix = f"{seed}/".encode()
    blocks = (hashlib.sha256(prefix + i.to_bytes(8, "big")).digest() for i in range(size // 32 + 1))
    return b"".join(blocks)[:size]


def split(data: bytes, sizes: list[int]) -> Iterator[bytes]:
    """``data`` in chunks of the given sizes, cycling."""
    pos, i = 0, 0
    while pos < len(data):
        yield data[pos : pos + sizes[i % len(sizes)]]
        pos += sizes[i % len(sizes)]
        i += 1


async def put(store: BlobStore, chunks: Iterator[bytes] | list[bytes]) -> tuple[str, int]:
    writer = await store.create()
    for chunk in chunks:
        await writer.write(chunk)
    return writer.key, await writer.commit()


async def get(store: BlobStore, key: str, offset: int = 0, n: int = 65536) -> bytes:
    reader = await store.reader(key, offset)
    try:
        parts = []
        while chunk := await reader.read(n):
            parts.append(chunk)
        return b"".join(parts)
    finally:
        await reader.close()


async def all_keys(store: BlobStore) -> set[str]:
    return {key async for key in store.keys()}  # noqa: SIM118 (an async iterator, not a dict)


# -- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "chunk_sizes"),
    [
        (0, [1]),
        (1, [1]),
        (1000, [1000]),
        (100_000, [1, 7, 4096, 65535]),
        (3 * WRITE_BUFFER + 17, [WRITE_BUFFER - 1, 3, WRITE_BUFFER + 5]),
        (2 * WRITE_BUFFER + 5, [5 * WRITE_BUFFER]),
        (WRITE_BUFFER * 3 // 2, [12345]),
    ],
)
async def test_round_trip(store: BlobStore, size: int, chunk_sizes: list[int]) -> None:
    data = pattern(size, seed=size)
    key, written = await put(store, split(data, chunk_sizes))
    assert written == size
    assert await get(store, key) == data
    reader = await store.reader(key)
    assert reader.size == size
    await reader.close()


async def test_empty_writes_are_harmless(store: BlobStore) -> None:
    key, size = await put(store, [b"", b"ab", b"", b"c", b""])
    assert size == 3
    assert await get(store, key) == b"abc"


async def test_no_write_at_all_makes_an_empty_blob(store: BlobStore) -> None:
    key, size = await put(store, [])
    assert size == 0
    assert await get(store, key) == b""


@pytest.mark.parametrize("offset", [0, 1, 4095, READ_AHEAD - 1, READ_AHEAD, READ_AHEAD + 3])
async def test_read_from_offset(store: BlobStore, offset: int) -> None:
    data = pattern(READ_AHEAD * 2 + 100, seed=3)
    key, _ = await put(store, [data])
    assert await get(store, key, offset=offset, n=10_000) == data[offset:]


async def test_read_at_the_end_offset_is_empty(store: BlobStore) -> None:
    key, _ = await put(store, [b"abc"])
    reader = await store.reader(key, 3)
    assert reader.size == 3
    assert await reader.read(10) == b""
    await reader.close()


@pytest.mark.parametrize("offset", [-1, 4, 10**12])
async def test_offset_outside_the_blob_is_rejected(store: BlobStore, offset: int) -> None:
    key, _ = await put(store, [b"abc"])
    with pytest.raises(InvalidArgument):
        await store.reader(key, offset)


@pytest.mark.parametrize("n", [1, 3, 1000, 65536, READ_AHEAD - 1, READ_AHEAD + 1, 5 * READ_AHEAD])
async def test_read_returns_exactly_n_until_the_end(store: BlobStore, n: int) -> None:
    data = pattern((3 if n > 3 else 1) * READ_AHEAD + 777, seed=n)  # n=1: 1M reads are enough
    key, _ = await put(store, [data])
    reader = await store.reader(key, 5)
    chunks = []
    while chunk := await reader.read(n):
        chunks.append(chunk)
    await reader.close()
    assert b"".join(chunks) == data[5:]
    assert all(len(c) == n for c in chunks[:-1])
    assert 0 < len(chunks[-1]) <= n


async def test_read_sizes_may_vary_between_calls(store: BlobStore) -> None:
    data = pattern(2 * READ_AHEAD + 1, seed=9)
    key, _ = await put(store, [data])
    reader = await store.reader(key)
    got = [await reader.read(n) for n in (1, READ_AHEAD, 2, READ_AHEAD + 10, 5)]
    await reader.close()
    assert [len(c) for c in got] == [1, READ_AHEAD, 2, READ_AHEAD - 2, 0]
    assert b"".join(got) == data


@pytest.mark.parametrize("n", [0, -1])
async def test_read_size_below_one_is_rejected(store: BlobStore, n: int) -> None:
    key, _ = await put(store, [b"abc"])
    reader = await store.reader(key)
    with pytest.raises(InvalidArgument):
        await reader.read(n)
    await reader.close()


async def test_reader_close_is_idempotent_and_ends_reads(store: BlobStore) -> None:
    key, _ = await put(store, [b"abc"])
    reader = await store.reader(key)
    await reader.close()
    await reader.close()
    with pytest.raises(RuntimeError):
        await reader.read(1)


async def test_readers_are_independent(store: BlobStore) -> None:
    data = pattern(100_000, seed=5)
    key, _ = await put(store, [data])
    one, two = await store.reader(key), await store.reader(key, 50_000)
    assert await one.read(10) == data[:10]
    assert await two.read(10) == data[50_000:50_010]
    assert await one.read(10) == data[10:20]
    await one.close()
    await two.close()


async def test_a_reader_outlives_the_deletion_of_its_blob(store: BlobStore) -> None:
    key, _ = await put(store, [b"abcdef"])
    reader = await store.reader(key)
    assert await reader.read(2) == b"ab"
    await store.delete([key])
    assert await reader.read(10) == b"cdef"
    await reader.close()


# -- visibility, abort, delete, keys --------------------------------------------------------


async def test_blob_is_invisible_until_commit(store: BlobStore) -> None:
    writer = await store.create()
    await writer.write(b"x" * (WRITE_BUFFER + 1))
    with pytest.raises(BlobNotFound):
        await store.reader(writer.key)
    assert writer.key not in await all_keys(store)
    await writer.commit()
    assert await get(store, writer.key) == b"x" * (WRITE_BUFFER + 1)
    assert writer.key in await all_keys(store)


async def test_abort_discards(store: BlobStore) -> None:
    writer = await store.create()
    await writer.write(b"x" * (2 * WRITE_BUFFER))
    await writer.abort()
    await writer.abort()
    with pytest.raises(BlobNotFound):
        await store.reader(writer.key)
    assert await all_keys(store) == set()


async def test_writer_is_finished_after_commit_or_abort(store: BlobStore) -> None:
    committed = await store.create()
    await committed.write(b"abc")
    await committed.commit()
    with pytest.raises(RuntimeError):
        await committed.write(b"more")
    with pytest.raises(RuntimeError):
        await committed.commit()
    await committed.abort()  # harmless: the blob stays
    assert await get(store, committed.key) == b"abc"

    aborted = await store.create()
    await aborted.abort()
    with pytest.raises(RuntimeError):
        await aborted.write(b"x")
    with pytest.raises(RuntimeError):
        await aborted.commit()


async def test_keys_are_fresh_and_well_formed(store: BlobStore) -> None:
    writers = [await store.create() for _ in range(20)]
    assert len({w.key for w in writers}) == 20
    for writer in writers:
        assert check_key(writer.key) == writer.key
        await writer.abort()


async def test_delete(store: BlobStore) -> None:
    keys = [(await put(store, [pattern(10, seed=i)]))[0] for i in range(5)]
    await store.delete([keys[0], keys[2], new_key(), keys[2]])
    assert await all_keys(store) == {keys[1], keys[3], keys[4]}
    for key in (keys[0], keys[2]):
        with pytest.raises(BlobNotFound):
            await store.reader(key)
    assert await get(store, keys[1]) == pattern(10, seed=1)
    await store.delete([])
    await store.delete(iter([keys[1]]))
    assert await all_keys(store) == {keys[3], keys[4]}


async def test_used_bytes_counts_committed_blobs(store: BlobStore) -> None:
    assert store.used_bytes == 0
    keys = [(await put(store, [pattern(1000 * (i + 1), seed=i)]))[0] for i in range(3)]
    assert store.used_bytes == 1000 + 2000 + 3000
    pending = await store.create()
    await pending.write(b"y" * 500)
    assert store.used_bytes == 6000  # not committed: not counted
    await pending.abort()
    await store.delete([keys[1], keys[1], new_key()])  # a repeat and a missing key free nothing
    assert store.used_bytes == 4000
    await store.delete(keys)
    assert store.used_bytes == 0


async def test_used_bytes_are_counted_again_when_opened(tmp_path: Path) -> None:
    first = FileBlobStore(tmp_path / "blobs")
    await first.open()
    for i in range(20):
        await put(first, [pattern(100 + i, seed=i)])
    # An unfinished write left by a crash: open() deletes it, it does not count.
    (tmp_path / "blobs" / "tmp" / new_key()).write_bytes(b"z" * 300)
    expected = first.used_bytes
    await first.close()
    second = FileBlobStore(tmp_path / "blobs")
    await second.open()
    assert second.used_bytes == expected == sum(100 + i for i in range(20))
    await second.close()


async def test_keys_lists_every_committed_blob(store: BlobStore) -> None:
    assert await all_keys(store) == set()
    committed = {(await put(store, [b"x"]))[0] for _ in range(300)}
    pending = await store.create()
    assert await all_keys(store) == committed
    await pending.abort()


async def test_missing_blob_is_not_found(store: BlobStore) -> None:
    with pytest.raises(BlobNotFound):
        await store.reader(new_key())
    assert issubclass(BlobNotFound, KeyError)


# -- hostile keys ---------------------------------------------------------------------------


@pytest.mark.parametrize("key", HOSTILE_KEYS)
async def test_hostile_key_is_rejected_by_reader(store: BlobStore, key: str) -> None:
    with pytest.raises(InvalidArgument):
        await store.reader(key)


@pytest.mark.parametrize("key", HOSTILE_KEYS)
async def test_hostile_key_is_rejected_by_delete(store: BlobStore, key: str) -> None:
    good, _ = await put(store, [b"keep"])
    with pytest.raises(InvalidArgument):
        await store.delete([good, key])
    assert await get(store, good) == b"keep"  # checked before anything was deleted


@pytest.mark.parametrize("key", [None, b"0" * 32, 42])
async def test_non_string_key_is_rejected(store: BlobStore, key: object) -> None:
    with pytest.raises(InvalidArgument):
        await store.reader(key)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        await store.delete([key])  # type: ignore[list-item]


async def test_a_store_is_claimed_by_one_database(store: BlobStore) -> None:
    """Blobs are swept against one database's references: the first claim holds, the
    same owner may claim again, another owner is told who holds it; the mark is no key."""
    assert await store.claim("database-one") is None
    assert await store.claim("database-one") is None
    assert await store.claim("database-two") == "database-one"
    assert await all_keys(store) == set()


async def test_a_claim_outlives_the_store_object(tmp_path: Path, s3: MotoServer) -> None:
    bucket = s3.bucket()
    for make in (
        lambda: FileBlobStore(tmp_path / "b"),
        lambda: S3BlobStore(bucket, "claimed"),
    ):
        first = make()
        await first.open()
        assert await first.claim("database-one") is None
        await first.close()
        again = make()
        await again.open()
        assert await again.claim("database-two") == "database-one"
        await again.close()
    (tmp_path / "b" / "wsq-store").write_text("")  # a crash before the owner was written
    unclaimed = FileBlobStore(tmp_path / "b")
    await unclaimed.open()
    assert await unclaimed.claim("database-two") is None
    await unclaimed.close()


async def test_of_first_claims_at_once_one_wins(tmp_path: Path) -> None:
    """The files store's mark is written whole, then hard-linked into place. (S3's is a
    conditional write, atomic on AWS; moto's emulation of it is not atomic under
    concurrent requests, so S3 is not raced here.)"""
    for round_ in range(10):
        stores = [FileBlobStore(tmp_path / f"race-{round_}") for _ in range(8)]
        for store in stores:
            await store.open()
        answers = await asyncio.gather(*(s.claim(f"db-{n}") for n, s in enumerate(stores)))
        winners = [f"db-{n}" for n, answer in enumerate(answers) if answer is None]
        assert len(winners) == 1, answers
        assert all(answer in (None, winners[0]) for answer in answers)
        for store in stores:
            await store.close()


async def test_keys_with_a_min_age_leave_out_young_blobs(store: BlobStore) -> None:
    """A node sweeping a store other nodes share asks only for blobs older than a grace."""
    key, _ = await put(store, [b"young"])
    assert key in await all_keys(store)
    assert key not in {k async for k in store.keys(3600)}
    assert key in {k async for k in store.keys(0)}


async def test_keys_with_a_min_age_include_old_blobs(tmp_path: Path) -> None:
    """Ages come from the blob's own time: a file last modified two hours ago counts."""
    files = FileBlobStore(tmp_path / "b")
    memory = MemoryBlobStore()
    for store in (files, memory):
        await store.open()
        old, _ = await put(store, [b"old"])
        await put(store, [b"young"])
        if store is files:
            path = files.root / old[:2] / old
            os.utime(path, (time.time() - 7200, time.time() - 7200))
        else:
            memory._committed[old] -= 7200
        assert {k async for k in store.keys(3600)} == {old}
        await store.close()


async def test_a_shared_folder_keeps_other_servers_uploads_in_progress(tmp_path: Path) -> None:
    """With ``stale_upload_age`` (a folder several servers share), open() deletes only
    unfinished writes that old; by default, all of them."""
    first = FileBlobStore(tmp_path / "shared")
    await first.open()
    writer = await first.create()
    await writer.write(b"in progress")
    stale = await first.create()
    await stale.write(b"abandoned")
    old = time.time() - 2 * 86400
    os.utime(first.root / "tmp" / stale.key, (old, old))
    second = FileBlobStore(tmp_path / "shared", stale_upload_age=86400)
    await second.open()
    assert sorted(p.name for p in (first.root / "tmp").iterdir()) == [writer.key]
    await writer.write(b" and done")
    await writer.commit()
    assert await get(second, writer.key) == b"in progress and done"
    await stale.abort()
    alone = FileBlobStore(tmp_path / "shared")
    await alone.open()
    assert list((first.root / "tmp").iterdir()) == []
    for store in (first, second, alone):
        await store.close()


async def test_hostile_keys_never_touch_the_filesystem(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    store = FileBlobStore(tmp_path / "a" / "b" / "blobs")
    await store.open()
    for key in [str(victim), "../../../../victim", "../victim", "00/../../../../victim"]:
        with pytest.raises(InvalidArgument):
            await store.delete([key])
        with pytest.raises(InvalidArgument):
            await store.reader(key)
    await store.close()
    assert victim.read_bytes() == b"precious"


# -- files only: layout, recovery -----------------------------------------------------------


async def test_committed_blob_sits_in_its_fanout_folder(files: FileBlobStore) -> None:
    writer = await files.create()
    await writer.write(b"hello")
    tmp_file = files.root / "tmp" / writer.key
    assert tmp_file.exists()
    await writer.commit()
    assert not tmp_file.exists()
    assert (files.root / writer.key[:2] / writer.key).read_bytes() == b"hello"
    assert list((files.root / "tmp").iterdir()) == []


async def test_abort_leaves_no_file(files: FileBlobStore) -> None:
    writer = await files.create()
    await writer.write(b"x" * (WRITE_BUFFER + 10))
    await writer.abort()
    assert list((files.root / "tmp").iterdir()) == []
    assert not (files.root / writer.key[:2] / writer.key).exists()


async def test_open_removes_tmp_leftovers(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    first = FileBlobStore(root)
    await first.open()
    committed, _ = await put(first, [b"kept"])
    unfinished = await first.create()
    await unfinished.write(b"y" * 100)
    await unfinished.abort()  # close our fd; put a leftover back as a crash would leave it
    (root / "tmp" / unfinished.key).write_bytes(b"y" * 100)
    (root / "tmp" / "junk").write_bytes(b"z")
    (root / "tmp" / "nested").mkdir()
    (root / "tmp" / "nested" / "deeper").write_bytes(b"z")
    await first.close()

    second = FileBlobStore(root)
    await second.open()
    assert list((root / "tmp").iterdir()) == []
    assert await all_keys(second) == {committed}
    assert await get(second, committed) == b"kept"
    await second.close()


async def test_keys_skips_foreign_files(files: FileBlobStore) -> None:
    key, _ = await put(files, [b"x"])
    misplaced = ("ff" if key[:2] != "ff" else "00") + key[2:]
    (files.root / key[:2] / misplaced).write_bytes(b"")
    (files.root / key[:2] / "README").write_bytes(b"")
    (files.root / key[:2] / ("0" * 32 + ".part")).write_bytes(b"")
    (files.root / "zz").mkdir()
    (files.root / "zz" / ("z" * 32)).write_bytes(b"")
    (files.root / "stray-file").write_bytes(b"")
    assert await all_keys(files) == {key}


async def test_store_can_be_reused_after_reopen(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    keys = []
    for round_ in range(3):
        store = FileBlobStore(root)
        await store.open()
        keys.append((await put(store, [pattern(1000, seed=round_)]))[0])
        assert await all_keys(store) == set(keys)
        await store.close()
        await store.close()


CHILD = textwrap.dedent(
    """
    import asyncio, hashlib, sys
    from wsq.blobs.files import FileBlobStore

    def chunk(i, j):
        return hashlib.sha256(f"{i}/{j}".encode()).digest() * 1000  # 32000 bytes

    async def main(root, count):
        store = FileBlobStore(root)
        await store.open()
        for i in range(count):
            writer = await store.create()
            for j in range(i * 7 + 1):
                await writer.write(chunk(i, j))
            size = await writer.commit()
            print(writer.key, i, size, flush=True)
        writer = await store.create()
        for j in range(100):
            await writer.write(chunk(-1, j))
        print("writing", writer.key, flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
    """
)


def child_content(i: int) -> bytes:
    return b"".join(hashlib.sha256(f"{i}/{j}".encode()).digest() * 1000 for j in range(i * 7 + 1))


def read_lines_until(proc: subprocess.Popen[str], prefix: str, timeout: float) -> list[str]:
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while not lines or not lines[-1].startswith(prefix):
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        line = proc.stdout.readline() if ready else ""
        if not line:
            raise AssertionError(f"child said {lines!r}, then nothing (rc={proc.poll()})")
        lines.append(line.strip())
    return lines


def run_child_until_killed(root: Path, count: int) -> list[str]:
    """Run CHILD, SIGKILL it once it is writing its last blob; return what it printed."""
    src = str(Path(wsq.__file__).parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    with subprocess.Popen(
        [sys.executable, "-c", CHILD, str(root), str(count)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    ) as proc:
        try:
            lines = read_lines_until(proc, "writing", timeout=60)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return lines


async def test_kill_9_keeps_every_committed_blob(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    lines = await asyncio.to_thread(run_child_until_killed, root, 8)
    in_flight = lines[-1].split()[1]
    assert (root / "tmp" / in_flight).exists()  # the kill came mid-write

    store = FileBlobStore(root)
    await store.open()
    assert list((root / "tmp").iterdir()) == []
    printed = [line.split() for line in lines[:-1]]
    assert len(printed) == 8
    for key, i, size in printed:
        data = await get(store, key)
        assert len(data) == int(size)
        assert data == child_content(int(i))
    assert await all_keys(store) == {key for key, _, _ in printed}
    with pytest.raises(BlobNotFound):
        await store.reader(in_flight)
    await store.close()


# -- files only: cancellation ---------------------------------------------------------------


async def started(coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """A task running ``coro``, now blocked at its first await (a thread call)."""
    task = asyncio.create_task(coro)
    await asyncio.sleep(0)
    assert not task.done()
    return task


async def test_cancelled_write_breaks_the_writer(files: FileBlobStore) -> None:
    writer = await files.create()
    await writer.write(b"a" * 100)
    task = await started(writer.write(b"b" * (2 * WRITE_BUFFER)))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(RuntimeError):
        await writer.write(b"c")
    with pytest.raises(RuntimeError):
        await writer.commit()
    await writer.abort()  # waits for the write still running in its thread
    assert list((files.root / "tmp").iterdir()) == []


async def test_cancelled_commit_then_abort_removes_the_blob(files: FileBlobStore) -> None:
    writer = await files.create()
    await writer.write(b"a" * 100)
    task = await started(writer.commit())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await writer.abort()  # the commit ran to its end in its thread; its caller never knew
    assert await all_keys(files) == set()
    assert list((files.root / "tmp").iterdir()) == []


async def test_cancelled_read_loses_nothing(files: FileBlobStore) -> None:
    data = pattern(3 * READ_AHEAD, seed=1)
    key, _ = await put(files, [data])
    reader = await files.reader(key)
    assert await reader.read(10) == data[:10]
    task = await started(reader.read(2 * READ_AHEAD))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await reader.read(2 * READ_AHEAD) == data[10 : 10 + 2 * READ_AHEAD]
    task = await started(reader.read(2 * READ_AHEAD))
    task.cancel()
    await reader.close()  # runs after the cancelled read's thread call
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_cancelled_create_and_reader_leak_nothing(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path / "blobs")
    await store.open()
    key, _ = await put(store, [b"abc"])
    for coro in (store.create(), store.reader(key)):
        task = await started(coro)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    await store.close()  # waits for the threads, which close (and unlink) what they opened
    assert list((store.root / "tmp").iterdir()) == []


# -- files only: memory stays bounded -------------------------------------------------------


def rss() -> int:
    """This process's resident set size in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


async def round_trip_growth(
    store: BlobStore, size: int, chunk_size: int, every: int
) -> tuple[int, int]:
    """Write a ``size``-byte blob in chunks, then read it back, sampling this process's
    RSS every ``every`` chunks; check the bytes and return the growth while writing and
    while reading, in bytes."""
    block = os.urandom(chunk_size)

    def chunks() -> Iterator[bytes]:
        for i in range(size // chunk_size):
            yield i.to_bytes(8, "big") + block[8:]

    expected = hashlib.sha256()
    baseline = peak = rss()
    writer = await store.create()
    for i, chunk in enumerate(chunks()):
        expected.update(chunk)
        await writer.write(chunk)
        if i % every == 0:
            peak = max(peak, rss())
    assert await writer.commit() == size
    written = peak - baseline

    actual = hashlib.sha256()
    reader = await store.reader(writer.key)
    baseline = peak = rss()
    reads = 0
    while chunk := await reader.read(chunk_size):
        actual.update(chunk)
        reads += 1
        if reads % every == 0:
            peak = max(peak, rss())
    await reader.close()
    assert actual.hexdigest() == expected.hexdigest()
    return written, peak - baseline


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")
async def test_large_blob_keeps_memory_bounded(files: FileBlobStore) -> None:
    written, read = await round_trip_growth(files, 256 << 20, 64 << 10, every=64)
    assert written < 64 << 20, f"RSS grew by {written >> 20} MiB while writing"
    assert read < 64 << 20, f"RSS grew by {read >> 20} MiB while reading"
