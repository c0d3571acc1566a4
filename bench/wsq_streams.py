"""Workload 3 for wsq: a big stream up and down, against a raw loopback socket copy.

    python -m bench.wsq_streams [--quick] [--json PATH] [--mib N]

A producer process uploads N MiB (default 1024; quick: 32) with
``queue.add({"blob": async_generator})`` in 1 MiB chunks (drawn from a pool of 8 random
1 MiB blocks in a non-periodic order, so a lost, repeated or reordered chunk changes the
hash; the pool is 8 MiB of the producer's RSS); upload MB/s is bytes over the time of the
``add`` call (it returns once the blob is durable). Then a worker process reads it back in
its handler (``async for chunk in task.data["blob"]``), checksumming it with CRC-32 in a
thread, pipelined with the download; download MB/s is bytes over the time from the first to
the last chunk. The checksums and byte counts of both sides must match. CRC-32 rather than
sha256 because the check runs on the same two cores as the transfer it measures, and
CRC-32 is the cheaper check.
(The 1 GiB durability test checks its stream with sha256.)

In the same run, two more processes copy the same number of bytes over plain TCP on
127.0.0.1 (1 MiB sends) for the raw reference (the median of 3 copies). For context only
(printed, not in the results), the parent also times writing the same number of bytes to
a new file beside the server's data and fsyncing it, since ``add`` returns only once the
blob is durable. The parent samples the RSS of the server, the producer and the worker
from /proc every 50 ms and reports each peak.

Units: MB = 2**20 bytes, for rates and memory alike.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from bench.common import PYTHON, ROOT, arguments, rss_bytes, run_loop, write_results, wsq_server

MB = 1 << 20
CHUNK = 1 << 20
QUEUE = "streams"
SAMPLE_S = 0.05
RAW_RUNS = 3  # raw copies; the median counts
POOL = 8  # distinct 1 MiB blocks the producer sends


# -- children -------------------------------------------------------------------------------


async def produce(url: str, total: int) -> dict[str, Any]:
    import wsq

    # A pool of random blocks, picked in a non-periodic order: a fresh 1 MiB object per
    # chunk costs allocation and copies in the producer, which shares two cores with the
    # server here.
    pool = [os.urandom(CHUNK) for _ in range(POOL)]

    def chunk(index: int, size: int) -> bytes:
        block = pool[(index * 2654435761 >> 7) % POOL]
        return block if size == CHUNK else block[:size]

    def sizes() -> Iterator[tuple[int, int]]:
        sent = 0
        index = 0
        while sent < total:
            size = min(CHUNK, total - sent)
            yield index, size
            sent += size
            index += 1

    checksum = 0  # before the timed part: the upload does not checksum
    for index, size in sizes():
        checksum = zlib.crc32(chunk(index, size), checksum)

    sent_at = 0.0

    async def blob() -> AsyncIterator[bytes]:
        nonlocal sent_at
        for index, size in sizes():
            yield chunk(index, size)
        sent_at = time.perf_counter()  # all handed over; at most a window is unacknowledged

    async with wsq.Client(url) as client:
        queue = client.queue(QUEUE)
        start = time.perf_counter()
        task = await queue.add({"blob": blob()}, timeout=-1)
        done = time.perf_counter()
    return {
        "crc32": checksum,
        "upload_s": done - start,
        "tail_s": done - sent_at,
        "task": task.id,
    }


async def consume(url: str, total: int) -> dict[str, Any]:
    import wsq

    result: dict[str, Any] = {}
    finished = asyncio.Event()

    async def handler(task: wsq.Task) -> None:
        loop = asyncio.get_running_loop()
        checksum = 0
        received = 0
        first = 0.0
        summing: asyncio.Future[int] | None = None
        async for chunk in task.data["blob"]:
            if received == 0:
                first = time.perf_counter()
            received += len(chunk)
            if summing is not None:
                checksum = await summing
            # zlib releases the GIL for big buffers: sum this chunk while the next arrives.
            summing = loop.run_in_executor(None, zlib.crc32, chunk, checksum)
        if summing is not None:
            checksum = await summing
        last = time.perf_counter()
        result.update(crc32=checksum, bytes=received, download_s=last - first, task=task.id)
        finished.set()

    async with wsq.Client(url) as client:
        worker = client.queue(QUEUE).process(handler)
        await asyncio.wait_for(finished.wait(), 600)
        await worker.stop()
    return result


def raw_receive(total: int) -> dict[str, Any]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        print(listener.getsockname()[1], flush=True)
        conn, _ = listener.accept()
        with conn:
            buffer = bytearray(CHUNK)
            received = 0
            while received < total:
                n = conn.recv_into(buffer)
                if n == 0:
                    raise RuntimeError(f"raw copy: connection closed after {received} bytes")
                received += n
            conn.sendall(b"k")
    return {"bytes": received}


def raw_send(port: int, total: int) -> dict[str, Any]:
    block = memoryview(os.urandom(CHUNK))
    with socket.create_connection(("127.0.0.1", port)) as conn:
        start = time.perf_counter()
        sent = 0
        while sent < total:
            size = min(CHUNK, total - sent)
            conn.sendall(block[:size])
            sent += size
        if conn.recv(1) != b"k":
            raise RuntimeError("raw copy: no acknowledgement")
        elapsed = time.perf_counter() - start
    return {"bytes": sent, "raw_s": elapsed}


# -- the parent -----------------------------------------------------------------------------


class PeakRss:
    """Samples the RSS of named processes every 50 ms in a thread; keeps each peak."""

    def __init__(self) -> None:
        self.pids: dict[str, int] = {}
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def watch(self, name: str, pid: int) -> None:
        self.pids[name] = pid

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            for name, pid in list(self.pids.items()):
                try:
                    rss = rss_bytes(pid)
                except OSError:  # exited
                    continue
                self.peaks[name] = max(self.peaks.get(name, 0), rss)


def child(role: str, *args: str) -> list[str]:
    return [PYTHON, "-m", "bench.wsq_streams", "--role", role, *args]


def finish(proc: subprocess.Popen[str], what: str, timeout: float = 600) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode})")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def raw_copy(total: int) -> float:
    """Seconds to copy ``total`` bytes over loopback TCP between two processes."""
    receiver = subprocess.Popen(
        child("raw-receive", "--bytes", str(total)), stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert receiver.stdout is not None
    port = receiver.stdout.readline().strip()
    sender = subprocess.Popen(
        child("raw-send", "--bytes", str(total), "--port", port),
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    sent = finish(sender, "raw sender", 300)
    finish(receiver, "raw receiver", 30)
    elapsed: float = sent["raw_s"]
    return elapsed


def disk_write(total: int) -> float:
    """Seconds to write ``total`` bytes to a new file where the server keeps its data, in
    1 MiB writes, and fsync it: what a durable upload cannot beat (printed, for context)."""
    block = os.urandom(CHUNK)
    with tempfile.TemporaryDirectory(prefix="wsq-bench-disk-") as folder:
        start = time.perf_counter()
        with open(Path(folder) / "blob", "wb", buffering=0) as file:
            written = 0
            while written < total:
                written += file.write(block[: min(CHUNK, total - written)])
            os.fsync(file.fileno())
        return time.perf_counter() - start


def run(total: int) -> dict[str, Any]:
    raw_s = statistics.median(raw_copy(total) for _ in range(RAW_RUNS))
    disk_s = disk_write(total)
    with PeakRss() as peaks, wsq_server() as (url, server):
        peaks.watch("server", server.pid)
        args = ["--url", url, "--bytes", str(total)]
        producer = subprocess.Popen(
            child("produce", *args), stdout=subprocess.PIPE, text=True, cwd=ROOT
        )
        peaks.watch("producer", producer.pid)
        produced = finish(producer, "producer")
        worker = subprocess.Popen(
            child("consume", *args), stdout=subprocess.PIPE, text=True, cwd=ROOT
        )
        peaks.watch("worker", worker.pid)
        consumed = finish(worker, "worker")
    if consumed["bytes"] != total or consumed["crc32"] != produced["crc32"]:
        raise RuntimeError(f"stream corrupted: sent {total} {produced}, got {consumed}")
    upload = total / MB / produced["upload_s"]
    download = total / MB / consumed["download_s"]
    raw = total / MB / raw_s
    print(
        f"{total / MB:.0f} MiB: upload {produced['upload_s']:.2f} s,"
        f" ({produced['tail_s']:.2f} s of it after the last chunk was handed over: the"
        f" final write and fsync), download {consumed['download_s']:.2f} s, raw copy"
        f" {raw_s:.2f} s, disk write + fsync {disk_s:.2f} s ({total / MB / disk_s:.0f} MB/s)",
        file=sys.stderr,
    )
    return {
        "bytes": total,
        "upload_mb_s": upload,
        "download_mb_s": download,
        "raw_copy_mb_s": raw,
        "upload_ratio": upload / raw,
        "download_ratio": download / raw,
        "peak_rss_mb": {
            name: peaks.peaks.get(name, 0) / MB for name in ("server", "producer", "worker")
        },
    }


ROLES = {"produce": produce, "consume": consume}


def main() -> None:
    parser = arguments(__doc__ or "")
    parser.add_argument("--mib", type=int, default=None, help="payload size in MiB")
    parser.add_argument("--role", choices=[*sorted(ROLES), "raw-receive", "raw-send"])
    parser.add_argument("--url")
    parser.add_argument("--bytes", type=int, default=0)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    if args.role == "raw-receive":
        print(json.dumps(raw_receive(args.bytes)))
        return
    if args.role == "raw-send":
        print(json.dumps(raw_send(args.port, args.bytes)))
        return
    if args.role:
        print(json.dumps(run_loop(ROLES[args.role](args.url, args.bytes))))
        return
    mib = args.mib or (32 if args.quick else 1024)
    write_results(args.json, run(mib * MB))


if __name__ == "__main__":
    main()
