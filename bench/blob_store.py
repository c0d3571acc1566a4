"""Write and read one large blob through a blob store (files or S3); print MB/s.

Usage: ``python bench/blob_store.py [--size-mib 1024] [--dir PATH]``
       ``python bench/blob_store.py --store s3 [--size-mib 256]``

``--store s3`` starts moto's standalone server (an emulator: the numbers measure wsq's S3
store and boto3 against moto on this machine, not S3) on 127.0.0.1, or uses the store at
``AWS_ENDPOINT_URL`` with ``--bucket``. It also times plain boto3 calls on the same server
(one thread, 8 MiB parts, one GET), so the store's own cost shows apart from the emulator's.

Each chunk size runs one write (create, write, commit; the commit includes the fsync) and
one read of the same blob. The read usually comes from the page cache; pass ``--drop-cache``
(needs root) to read from the disk. The loop is timed end to end, so the numbers include
the event loop, thread hops and buffering, which is what a server would see.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from wsq.blobs.base import BlobStore
from wsq.blobs.files import FileBlobStore
from wsq.blobs.s3 import PART_SIZE, S3BlobStore

MB = 1_000_000


async def write_blob(store: BlobStore, size: int, chunk: bytes) -> tuple[str, float, float]:
    """Write ``size`` bytes; return the key, seconds for the writes, seconds for the commit."""
    writer = await store.create()
    start = time.perf_counter()
    for _ in range(size // len(chunk)):
        await writer.write(chunk)
    written = time.perf_counter()
    await writer.commit()
    return writer.key, written - start, time.perf_counter() - written


async def read_blob(store: BlobStore, key: str, n: int, digest: bool) -> tuple[int, float]:
    """Read the blob in ``n``-byte calls; return the bytes read and the seconds taken."""
    reader = await store.reader(key)
    hasher = hashlib.sha256()
    total = 0
    start = time.perf_counter()
    while data := await reader.read(n):
        total += len(data)
        if digest:
            hasher.update(data)
    elapsed = time.perf_counter() - start
    await reader.close()
    return total, elapsed


def drop_page_cache() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


async def bench(store: BlobStore, size: int, chunk_sizes: list[int], drop_cache: bool) -> None:
    await store.open()
    where = store.url if isinstance(store, S3BlobStore) else store.root  # type: ignore[attr-defined]
    print(f"blob {size / MB:.0f} MB under {where}")
    for chunk_size in chunk_sizes:
        key, write_s, commit_s = await write_blob(store, size, os.urandom(chunk_size))
        total_s = write_s + commit_s
        print(
            f"chunk {chunk_size >> 10:>5} KiB  write {size / MB / total_s:7.0f} MB/s "
            f"({write_s:.2f} s writes + {commit_s:.2f} s commit/fsync)"
        )
        if drop_cache:
            await asyncio.to_thread(drop_page_cache)
        for digest in (False, True):
            total, read_s = await read_blob(store, key, chunk_size, digest)
            assert total == size
            label = "read+sha256" if digest else "read       "
            print(f"chunk {chunk_size >> 10:>5} KiB  {label} {size / MB / read_s:7.0f} MB/s")
        await store.delete([key])
    await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--chunk-kib", type=int, nargs="+", default=[64, 1024])
    parser.add_argument("--dir", type=Path, default=None, help="parent folder (default: tmp)")
    parser.add_argument("--drop-cache", action="store_true", help="read from disk (root)")
    parser.add_argument("--store", choices=["files", "s3"], default="files")
    parser.add_argument("--bucket", help="s3: use this bucket at AWS_ENDPOINT_URL, no moto")
    args = parser.parse_args()
    chunks = [kib << 10 for kib in args.chunk_kib]
    if args.store == "s3":
        bench_s3(args.bucket, args.size_mib << 20, chunks)
        return
    with tempfile.TemporaryDirectory(prefix="wsq-bench-", dir=args.dir) as tmp:
        store = FileBlobStore(Path(tmp) / "blobs")
        asyncio.run(bench(store, args.size_mib << 20, chunks, args.drop_cache))


MOTO = """
import logging, sys
from moto.server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.ERROR)
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()
"""


def bench_s3(bucket: str | None, size: int, chunk_sizes: list[int]) -> None:
    moto = None
    if bucket is None:
        moto = subprocess.Popen(
            [sys.executable, "-c", MOTO], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert moto.stdout is not None
        os.environ.update(
            AWS_ENDPOINT_URL=f"http://127.0.0.1:{int(moto.stdout.readline())}",
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench",
            AWS_REGION="us-east-1",
            AWS_EC2_METADATA_DISABLED="true",
        )
        bucket = "wsq-bench"
        plain_client().create_bucket(Bucket=bucket)
    try:
        plain_boto3(bucket, size)
        asyncio.run(bench(S3BlobStore(bucket, "bench"), size, chunk_sizes, False))
    finally:
        if moto is not None:
            assert moto.stdin is not None
            moto.stdin.close()
            moto.wait()


def plain_client() -> Any:
    import boto3

    return boto3.session.Session().client("s3", region_name=os.environ.get("AWS_REGION"))


def plain_boto3(bucket: str, size: int) -> None:
    """The baseline: boto3 alone, one thread, the same part size, no event loop."""
    client = plain_client()
    part = os.urandom(PART_SIZE)
    start = time.perf_counter()
    upload = client.create_multipart_upload(Bucket=bucket, Key="plain")["UploadId"]
    parts = []
    for number in range(1, size // PART_SIZE + 1):
        etag = client.upload_part(
            Bucket=bucket, Key="plain", UploadId=upload, PartNumber=number, Body=part
        )["ETag"]
        parts.append({"PartNumber": number, "ETag": etag})
    client.complete_multipart_upload(
        Bucket=bucket, Key="plain", UploadId=upload, MultipartUpload={"Parts": parts}
    )
    written = time.perf_counter() - start
    start = time.perf_counter()
    body = client.get_object(Bucket=bucket, Key="plain")["Body"]
    total = 0
    while data := body.read(1 << 20):
        total += len(data)
    read = time.perf_counter() - start
    client.delete_object(Bucket=bucket, Key="plain")
    write_mbs, read_mbs = size / MB / written, total / MB / read
    print(f"plain boto3, 8 MiB parts  write {write_mbs:7.0f} MB/s   read {read_mbs:7.0f} MB/s")


if __name__ == "__main__":
    main()
