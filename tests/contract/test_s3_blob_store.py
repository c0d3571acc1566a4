"""What only the S3 blob store has: multipart uploads, ranged reads that resume, the abort of
leftover uploads at open, and clear errors when S3 is away. S3 here is moto's server (an
emulator, tests/s3emulator.py); tests look behind the store with a plain boto3 client."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.contract.test_blob_store import get, pattern, put, round_trip_growth
from tests.integration.proxy import Proxy
from tests.s3emulator import MotoServer
from wsq.blobs import blob_store_from_url, check_storage_url
from wsq.blobs.base import BlobNotFound, new_key
from wsq.blobs.files import FileBlobStore
from wsq.blobs.s3 import PART_SIZE, S3BlobStore
from wsq.blobs.threads import READ_AHEAD
from wsq.exceptions import InvalidArgument, Unavailable

PREFIX = "wsq/blobs"


@pytest.fixture
async def bucket(s3: MotoServer) -> str:
    return s3.bucket()


@pytest.fixture
async def store(bucket: str) -> AsyncIterator[S3BlobStore]:
    backend = S3BlobStore(bucket, PREFIX)
    await backend.open()
    yield backend
    await backend.close()


def objects(s3: MotoServer, bucket: str) -> dict[str, int]:
    """Every object in the bucket: name -> size."""
    answer = s3.client().list_objects_v2(Bucket=bucket)
    return {item["Key"]: item["Size"] for item in answer.get("Contents", [])}


def uploads(s3: MotoServer, bucket: str) -> list[str]:
    """The names of the unfinished multipart uploads in the bucket."""
    answer = s3.client().list_multipart_uploads(Bucket=bucket)
    return [upload["Key"] for upload in answer.get("Uploads", [])]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- writes ---------------------------------------------------------------------------------


async def test_small_blob_is_one_object_and_no_upload(
    store: S3BlobStore, s3: MotoServer, bucket: str
) -> None:
    writer = await store.create()
    await writer.write(b"x" * (PART_SIZE - 1))
    assert uploads(s3, bucket) == []  # nothing sent before a part is full
    await writer.commit()
    assert objects(s3, bucket) == {f"{PREFIX}/{writer.key}": PART_SIZE - 1}


async def test_large_blob_is_a_multipart_upload_visible_only_at_commit(
    store: S3BlobStore, s3: MotoServer, bucket: str
) -> None:
    data = pattern(3 * PART_SIZE + PART_SIZE // 2, seed=1)
    writer = await store.create()
    for start in range(0, len(data), 100_000):
        await writer.write(data[start : start + 100_000])
    assert uploads(s3, bucket) == [f"{PREFIX}/{writer.key}"]
    assert objects(s3, bucket) == {}
    assert await writer.commit() == len(data)
    assert uploads(s3, bucket) == []
    head = s3.client().head_object(Bucket=bucket, Key=f"{PREFIX}/{writer.key}")
    assert head["ETag"].strip('"').endswith("-4")  # four parts: 3 full, then the rest
    assert await get(store, writer.key) == data


async def test_abort_leaves_no_upload_and_no_object(
    store: S3BlobStore, s3: MotoServer, bucket: str
) -> None:
    writer = await store.create()
    await writer.write(os.urandom(2 * PART_SIZE))
    assert len(uploads(s3, bucket)) == 1
    await writer.abort()
    await writer.abort()
    assert uploads(s3, bucket) == []
    assert objects(s3, bucket) == {}


async def test_cancelled_commit_then_abort_leaves_nothing(
    store: S3BlobStore, s3: MotoServer, bucket: str
) -> None:
    for size in (10, PART_SIZE + 10):  # a PutObject, then a multipart upload
        writer = await store.create()
        await writer.write(b"a" * size)
        task = asyncio.create_task(writer.commit())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await writer.abort()  # the commit ran to its end in its thread; its caller never knew
        assert uploads(s3, bucket) == []
        assert objects(s3, bucket) == {}
    assert store.used_bytes == 0


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")
async def test_large_blob_keeps_memory_bounded(store: S3BlobStore) -> None:
    written, read = await round_trip_growth(store, 12 * PART_SIZE, 64 << 10, every=16)
    # One part buffered, its copy on the wire, and boto3's own buffers: not the blob.
    assert written < 6 * PART_SIZE, f"RSS grew by {written >> 20} MiB while writing"
    assert read < 4 * PART_SIZE, f"RSS grew by {read >> 20} MiB while reading"


# -- reads ----------------------------------------------------------------------------------


class CuttingProxy(Proxy):
    """The test proxy, able to reset every connection through it (S3 dropping them)."""

    def cut(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()


async def test_reader_resumes_with_a_ranged_get_after_the_connection_breaks(
    s3: MotoServer, bucket: str
) -> None:
    proxy = await CuttingProxy("127.0.0.1", s3.port).start()
    store = S3BlobStore(bucket, PREFIX, endpoint_url=f"http://127.0.0.1:{proxy.port}")
    try:
        await store.open()
        data = pattern(2 * PART_SIZE + 5, seed=4)
        key, _ = await put(store, [data])
        offset = 3 * READ_AHEAD + 7
        reader = await store.reader(key, offset)
        first = await reader.read(READ_AHEAD)
        proxy.cut()  # the open GET dies mid-body
        rest = [first]
        while chunk := await reader.read(READ_AHEAD):
            rest.append(chunk)
        await reader.close()
        assert b"".join(rest) == data[offset:]
    finally:
        await store.close()
        await proxy.close()


async def test_the_store_recovers_when_s3_comes_back(s3: MotoServer, bucket: str) -> None:
    proxy = await CuttingProxy("127.0.0.1", s3.port).start()
    port = proxy.port
    store = S3BlobStore(bucket, PREFIX, endpoint_url=f"http://127.0.0.1:{port}")
    try:
        await store.open()
        key, _ = await put(store, [b"before"])
        await proxy.close()  # S3 is gone: connections refused
        with pytest.raises(Unavailable):
            await put(store, [b"during"])
        with pytest.raises(Unavailable):
            await store.reader(key)
        proxy = CuttingProxy("127.0.0.1", s3.port)
        proxy._server = await asyncio.start_server(proxy._accept, "127.0.0.1", port)
        after, _ = await put(store, [b"after"])  # the same store, no restart
        assert await get(store, key) == b"before"
        assert await get(store, after) == b"after"
        assert {k async for k in store.keys()} == {key, after}  # noqa: SIM118
    finally:
        await store.close()
        await proxy.close()


async def test_cancelled_read_loses_nothing(store: S3BlobStore) -> None:
    data = pattern(3 * READ_AHEAD, seed=1)
    key, _ = await put(store, [data])
    reader = await store.reader(key)
    assert await reader.read(10) == data[:10]
    task = asyncio.create_task(reader.read(2 * READ_AHEAD))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await reader.read(2 * READ_AHEAD) == data[10 : 10 + 2 * READ_AHEAD]
    await reader.close()


# -- open: counting, leftovers --------------------------------------------------------------


async def test_open_counts_used_bytes_and_skips_foreign_objects(
    s3: MotoServer, bucket: str
) -> None:
    first = S3BlobStore(bucket, PREFIX)
    await first.open()
    keys = [(await put(first, [pattern(100 + i, seed=i)]))[0] for i in range(20)]
    await first.close()
    client = s3.client()
    client.put_object(Bucket=bucket, Key=f"{PREFIX}/README", Body=b"not a blob")
    client.put_object(Bucket=bucket, Key=f"{PREFIX}/sub/{new_key()}", Body=b"nor this")
    client.put_object(Bucket=bucket, Key=f"other/{new_key()}", Body=b"another prefix")

    second = S3BlobStore(bucket, PREFIX + "/")  # slashes around the prefix do not matter
    await second.open()
    assert second.used_bytes == sum(100 + i for i in range(20))
    assert {key async for key in second.keys()} == set(keys)  # noqa: SIM118
    await second.delete(keys[:5])
    assert second.used_bytes == sum(100 + i for i in range(5, 20))
    await second.close()


async def test_keys_and_delete_span_pages_and_batches(store: S3BlobStore) -> None:
    puts = await asyncio.gather(*(put(store, [b"x"]) for _ in range(1100)))  # 1,000 a LIST page
    keys = [key for key, _ in puts]
    assert {key async for key in store.keys()} == set(keys)  # noqa: SIM118
    await store.delete(keys)  # two DeleteObjects calls
    assert [key async for key in store.keys()] == []  # noqa: SIM118
    assert store.used_bytes == 0


async def test_open_aborts_only_leftover_uploads_older_than_the_age(
    s3: MotoServer, bucket: str
) -> None:
    """moto reports every upload as initiated in 2010, so "young" is tried with an age
    longer than that instead of with a fresh upload."""
    client = s3.client()
    ours = f"{PREFIX}/{new_key()}"
    foreign = [f"{PREFIX}/not-a-key", f"other/{new_key()}"]
    for name in [ours, *foreign]:
        client.create_multipart_upload(Bucket=bucket, Key=name)

    young = S3BlobStore(bucket, PREFIX, stale_upload_age=100 * 365 * 86400.0)
    await young.open()
    await young.close()
    assert sorted(uploads(s3, bucket)) == sorted([ours, *foreign])

    old = S3BlobStore(bucket, PREFIX)  # the default: 24 h
    await old.open()
    await old.close()
    assert sorted(uploads(s3, bucket)) == sorted(foreign)


# -- errors ---------------------------------------------------------------------------------


async def test_unreachable_endpoint_is_unavailable(s3: MotoServer) -> None:
    port = free_port()
    store = S3BlobStore("some-bucket", PREFIX, endpoint_url=f"http://127.0.0.1:{port}")
    with pytest.raises(Unavailable, match=r"S3 unreachable.*some-bucket") as caught:
        await store.open()
    assert caught.value.code == "unavailable"
    await store.close()


async def test_missing_bucket_is_unavailable(s3: MotoServer) -> None:
    store = S3BlobStore("no-such-bucket", PREFIX)
    with pytest.raises(Unavailable, match="NoSuchBucket"):
        await store.open()
    await store.close()


async def test_s3_going_away_fails_calls_clearly_and_abort_stays_quiet(s3: MotoServer) -> None:
    own = MotoServer()
    try:
        bucket = own.bucket()
        store = S3BlobStore(bucket, PREFIX, endpoint_url=own.url)
        await store.open()
        key, _ = await put(store, [b"kept"])
        writer = await store.create()
        await writer.write(b"y" * (PART_SIZE + 1))
        own.stop()
        with pytest.raises(Unavailable):
            await writer.commit()
        await writer.abort()  # logged, not raised: the upload is left for a later open()
        with pytest.raises(Unavailable):
            await store.reader(key)
        with pytest.raises(Unavailable):
            await store.delete([key])
        with pytest.raises(Unavailable):
            await (await store.create()).commit()
        await store.close()
    finally:
        own.stop()


# -- storage URLs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "",
        "bogus",
        "s3://",
        "s3://x",
        "s3://bad_bucket!/p",
        "s3://bucket/p?x=1",
        "http://bucket/p",
        "file://host/path",
        "file:relative",
        "file:///p#frag",
    ],
)
def test_bad_storage_url_is_one_line(url: str) -> None:
    with pytest.raises(ValueError) as caught:
        check_storage_url(url)
    assert "\n" not in str(caught.value)
    with pytest.raises(ValueError):
        blob_store_from_url(url)


async def test_storage_urls_make_their_stores(s3: MotoServer, tmp_path: Path) -> None:
    files = blob_store_from_url(f"file://{tmp_path}/b%20lobs")
    assert isinstance(files, FileBlobStore)
    assert files.root == tmp_path / "b lobs"
    s3_store: Any = blob_store_from_url("s3://my-bucket/a/b/")
    assert isinstance(s3_store, S3BlobStore)
    assert (s3_store.bucket, s3_store.prefix) == ("my-bucket", "a/b")
    await files.close()
    await s3_store.close()


async def test_hostile_key_never_reaches_s3(store: S3BlobStore, s3: MotoServer) -> None:
    for key in ("../other/" + "0" * 32, "0" * 31 + "/", "a" * 33):
        with pytest.raises(InvalidArgument):
            await store.reader(key)
        with pytest.raises(InvalidArgument):
            await store.delete([key])
    with pytest.raises(BlobNotFound):
        await store.reader(new_key())
