"""A server whose stream data lives in S3 (``storage="s3://..."``): moto's server stands in
for S3 (an emulator, tests/s3emulator.py), configured through the standard AWS variables."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import wsq
from tests.conftest import budget, eventually
from tests.integration.procs import ServerProcess
from tests.integration.proxy import Proxy
from tests.s3emulator import MotoServer
from wsq.blobs.base import OWNER_MARK

PREFIX = "queues/streams"


@pytest.fixture
async def s3_server(bucket: str, data_dir: Path) -> AsyncIterator[wsq.Server]:
    storage = f"s3://{bucket}/{PREFIX}"
    async with wsq.Server(data_dir=data_dir, port=0, storage=storage) as server:
        yield server


def objects(moto_server: MotoServer, bucket: str) -> list[str]:
    """The bucket's objects that are blobs (not the mark naming the database they serve)."""
    answer = moto_server.client().list_objects_v2(Bucket=bucket)
    keys = [item["Key"] for item in answer.get("Contents", [])]
    return [key for key in keys if key.rpartition("/")[2] != OWNER_MARK]


def stream_bytes(size: int, seed: int) -> bytes:
    blocks = (hashlib.sha256(f"{seed}/{i}".encode()).digest() for i in range(size // 32 + 1))
    return b"".join(blocks)[:size]


def unfinished_uploads(moto_server: MotoServer, bucket: str) -> list[str]:
    """The object names of the bucket's multipart uploads not completed nor aborted."""
    answer = moto_server.client().list_multipart_uploads(Bucket=bucket)
    return [upload["Key"] for upload in answer.get("Uploads", [])]


async def stalled_stream() -> AsyncIterator[bytes]:
    """9 MiB (a part and more: S3 holds an unfinished upload), then nothing, ever."""
    for n in range(9):
        yield stream_bytes(1 << 20, seed=n)
    await asyncio.Event().wait()


async def test_streams_go_through_s3_and_removal_leaves_no_object(
    s3_server: wsq.Server, moto_server: MotoServer, bucket: str
) -> None:
    big = stream_bytes(21 << 20, seed=1)  # three parts of a multipart upload
    assert not (s3_server.data_dir / "blobs").exists()
    async with wsq.Client(s3_server.url) as producer, wsq.Client(s3_server.url) as worker:
        task = await producer.queue("s3").add({"name": "big", "blob": big})
        assert [name.rpartition("/")[0] for name in objects(moto_server, bucket)] == [PREFIX]
        got: dict[str, bytes] = {}

        async def handler(work: wsq.Task) -> None:
            got["blob"] = await work.data["blob"].read()

        queue = worker.queue("s3")
        queue.process(handler)
        await eventually(lambda: queue.completed(), timeout=60)
        assert hashlib.sha256(got["blob"]).digest() == hashlib.sha256(big).digest()
        await task.remove()
        await eventually(lambda: objects(moto_server, bucket) == [], timeout=30)
    assert not (s3_server.data_dir / "blobs").exists()


async def test_s3_unreachable_fails_the_add_with_unavailable_and_the_server_goes_on(
    bucket: str, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    own = MotoServer()
    monkeypatch.setenv("AWS_ENDPOINT_URL", own.url)
    own_bucket = own.bucket()
    try:
        storage = f"s3://{own_bucket}/{PREFIX}"
        async with (
            wsq.Server(data_dir=data_dir, port=0, storage=storage) as server,
            wsq.Client(server.url) as client,
        ):
            own.stop()
            with pytest.raises(wsq.Unavailable, match="S3 unreachable"):
                await client.queue("s3").add({"blob": stream_bytes(100_000, seed=2)})
            task = await client.queue("s3").add({"small": "no stream, no S3"})
            assert (await task.get_data())["small"] == "no stream, no S3"
    finally:
        own.stop()


async def test_an_upload_aborted_while_s3_is_away_is_aborted_once_it_is_back(
    bucket: str,
    moto_server: MotoServer,
    data_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A producer goes away mid-upload while S3 is unreachable: the server cannot abort
    the multipart upload then, and does so once S3 answers again (not a day later)."""
    proxy = await Proxy("127.0.0.1", moto_server.port).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")

    def uploads() -> list[str]:
        return unfinished_uploads(moto_server, bucket)

    try:
        storage = f"s3://{bucket}/{PREFIX}"
        async with wsq.Server(data_dir=data_dir, port=0, storage=storage) as server:
            client = wsq.Client(server.url)
            await client.connect()
            adding = asyncio.ensure_future(client.queue("s3").add({"blob": stalled_stream()}))
            await eventually(lambda: len(uploads()) == 1, timeout=budget(30))
            proxy.refuse()
            await client.close()  # the server aborts the upload: S3 does not answer
            with pytest.raises(wsq.WsqError):
                await adding
            await asyncio.sleep(1.0)
            assert len(uploads()) == 1
            proxy.restore()
            await eventually(lambda: uploads() == [], timeout=budget(15))
            assert objects(moto_server, bucket) == []
    finally:
        await proxy.close()


async def test_a_server_whose_s3_stopped_answering_stops_in_bounded_time(
    bucket: str,
    moto_server: MotoServer,
    data_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """S3 stops answering while a stream is on its way into it: a server told to stop
    does not wait out boto3's timeouts and retries for the upload it aborts."""
    proxy = await Proxy("127.0.0.1", moto_server.port).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")

    def uploads() -> list[str]:
        return unfinished_uploads(moto_server, bucket)

    try:
        server = wsq.Server(data_dir=data_dir, port=0, storage=f"s3://{bucket}/{PREFIX}")
        await server.start()
        try:
            client = wsq.Client(server.url)
            await client.connect()
            adding = asyncio.ensure_future(client.queue("s3").add({"blob": stalled_stream()}))
            await eventually(lambda: len(uploads()) == 1, timeout=budget(30))
            proxy.blackhole()
            started = time.monotonic()
            await asyncio.wait_for(server.close(), 60)
            assert time.monotonic() - started < 10
            await client.close()
            with pytest.raises(wsq.WsqError):
                await adding
        finally:
            await server.close()
    finally:
        await proxy.close()  # the calls left running fail now (connection reset), and end

    def s3_threads() -> list[str]:
        return [t.name for t in threading.enumerate() if t.name.startswith("wsq-s3")]

    await eventually(lambda: s3_threads() == [], timeout=budget(30))


async def test_a_server_process_whose_s3_stopped_answering_exits_in_bounded_time(
    bucket: str,
    moto_server: MotoServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same for ``wsq server``: once it has stopped, the process exits without
    waiting for the S3 calls its threads are still in (boto3 ends them only after its
    timeouts and retries: minutes)."""
    proxy = await Proxy("127.0.0.1", moto_server.port).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    server = ServerProcess(tmp_path / "data", None, "--storage", f"s3://{bucket}/{PREFIX}")
    try:
        await server.start()
        client = wsq.Client(server.url)
        await client.connect()
        adding = asyncio.ensure_future(client.queue("s3").add({"blob": stalled_stream()}))
        await eventually(
            lambda: len(unfinished_uploads(moto_server, bucket)) == 1, timeout=budget(30)
        )
        proxy.blackhole()
        started = time.monotonic()
        assert server.stop(timeout=20) == 0
        assert time.monotonic() - started < 15
        with pytest.raises(wsq.WsqError):
            await adding
        await client.close()
    finally:
        server.kill()
        await proxy.close()


async def test_bad_storage_url_is_refused_at_once(data_dir: Path) -> None:
    with pytest.raises(ValueError, match="s3://bucket/prefix"):
        wsq.Server(data_dir=data_dir, port=0, storage="s3:/nobucket")
    with pytest.raises(ValueError, match="not both"):
        wsq.Server(data_dir=data_dir, port=0, storage="file:///tmp/x", blob_store=object())  # type: ignore[arg-type]


async def test_file_storage_puts_blobs_at_its_path(data_dir: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    async with (
        wsq.Server(data_dir=data_dir, port=0, storage=f"file://{elsewhere}") as server,
        wsq.Client(server.url) as client,
    ):
        task = await client.queue("f").add({"blob": stream_bytes(300_000, seed=3)})
        blobs = [p for p in elsewhere.rglob("*") if p.is_file() and p.name != OWNER_MARK]
        assert len(blobs) == 1
        assert await (await task.get_data())["blob"].read() == stream_bytes(300_000, seed=3)
    assert not (data_dir / "blobs").exists()


def run_server(data_dir: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wsq", "server", "--port", "0", "--data-dir", str(data_dir), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=budget(60),
    )


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--storage", "bogus"], {}),
        (["--storage", "s3://"], {}),
        (["--storage", "file:relative/path"], {}),
        ([], {"WSQ_STORAGE": "s3://bucket/p?x=1"}),
    ],
)
def test_a_bad_storage_url_is_one_line_and_exit_2(
    data_dir: Path, args: list[str], env: dict[str, str]
) -> None:
    done = run_server(data_dir, *args, env=env)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "--storage" in lines[0] and "Traceback" not in done.stderr


def test_an_unreachable_s3_at_start_is_one_line_and_exit_1(
    data_dir: Path, moto_server: MotoServer
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there once it is closed
    env = {**moto_server.environ(), "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    done = run_server(data_dir, "--storage", "s3://some-bucket/p", env=env)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert "could not run: S3 unreachable" in done.stderr.splitlines()[-1]
