"""Write and read one large blob through FileBlobStore; print MB/s.

Usage: ``python bench/blob_store.py [--size-mib 1024] [--dir PATH]``

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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from wsq.blobs.files import FileBlobStore

MB = 1_000_000


async def write_blob(store: FileBlobStore, size: int, chunk: bytes) -> tuple[str, float, float]:
    """Write ``size`` bytes; return the key, seconds for the writes, seconds for the commit."""
    writer = await store.create()
    start = time.perf_counter()
    for _ in range(size // len(chunk)):
        await writer.write(chunk)
    written = time.perf_counter()
    await writer.commit()
    return writer.key, written - start, time.perf_counter() - written


async def read_blob(store: FileBlobStore, key: str, n: int, digest: bool) -> tuple[int, float]:
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


async def bench(root: Path, size: int, chunk_sizes: list[int], drop_cache: bool) -> None:
    store = FileBlobStore(root)
    await store.open()
    print(f"blob {size / MB:.0f} MB under {root}")
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
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="wsq-bench-", dir=args.dir) as tmp:
        chunks = [kib << 10 for kib in args.chunk_kib]
        asyncio.run(bench(Path(tmp) / "blobs", args.size_mib << 20, chunks, args.drop_cache))


if __name__ == "__main__":
    main()
