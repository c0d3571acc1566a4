"""Streams in task data: uploads, lazy downloads, flow control, failures."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import wsq
from tests.conftest import budget, eventually


async def blocks(count: int, size: int = 1 << 16, seed: int = 0) -> AsyncIterator[bytes]:
    for n in range(count):
        yield hashlib.sha256(f"{seed}-{n}".encode()).digest() * (size // 32)


def blob_files(server: wsq.Server) -> list[Path]:
    root = server.data_dir / "blobs"
    # Committed blobs sit in fan-out folders (not tmp/, not the owner mark beside them).
    return [p for p in root.glob("??/*") if p.is_file()]


async def test_bytes_file_and_async_iterable_round_trip(
    client: wsq.Client, server: wsq.Server, tmp_path: Path
) -> None:
    big = os.urandom(3 << 20)
    path = tmp_path / "input.bin"
    path.write_bytes(big[: 1 << 20])
    expected = b"".join([chunk async for chunk in blocks(20)])
    queue = client.queue("streams")
    with path.open("rb") as f:
        await queue.add(
            {"small": b"tiny", "big": big, "file": f, "gen": blocks(20), "nested": [{"x": b"y"}]}
        )
    got: dict[str, bytes] = {}

    async def handler(task: wsq.Task) -> None:
        data = task.data
        assert isinstance(data["big"], wsq.Stream)
        assert data["big"].size == len(big)
        got["small"] = await data["small"].read()
        got["big"] = await data["big"].read()
        got["file"] = b"".join([c async for c in data["file"]])
        got["gen"] = await data["gen"].read()
        got["nested"] = await data["nested"][0]["x"].read()

    queue.process(handler)
    await eventually(lambda: queue.completed())
    assert got == {
        "small": b"tiny",
        "big": big,
        "file": big[: 1 << 20],
        "gen": expected,
        "nested": b"y",
    }
    assert len(blob_files(server)) == 3  # big, file, gen; small ones stay inline


async def test_get_data_reads_streams_lazily(client: wsq.Client) -> None:
    payload = os.urandom(200_000)
    task = await client.queue("lazy").add({"name": "a", "blob": payload})
    data = await task.get_data()
    assert data["name"] == "a"
    assert isinstance(data["blob"], wsq.Stream)
    assert await data["blob"].read() == payload
    assert await data["blob"].read() == payload  # each iteration reads from the start


async def test_whole_data_can_be_a_stream(client: wsq.Client) -> None:
    task = await client.queue("whole").add(os.urandom(100_000))
    data = await task.get_data()
    assert isinstance(data, wsq.Stream)
    assert data.size == 100_000


async def test_failing_stream_creates_no_task_and_leaves_no_blob(
    client: wsq.Client, server: wsq.Server
) -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield b"a" * (3 << 20)
        raise RuntimeError("disk on fire")

    queue = client.queue("broken")
    with pytest.raises(RuntimeError, match="disk on fire"):
        await queue.add({"good": os.urandom(1 << 20), "bad": broken()})
    assert await queue.all() == []
    await eventually(lambda: blob_files(server) == [])
    await eventually(lambda: list((server.data_dir / "blobs" / "tmp").iterdir()) == [])
    await queue.add({"after": b"ok"})  # the connection is still fine
    assert len(await queue.all()) == 1


async def test_remove_deletes_blobs(client: wsq.Client, server: wsq.Server) -> None:
    task = await client.queue("rm").add({"a": os.urandom(1 << 20), "b": os.urandom(1 << 20)})
    assert len(blob_files(server)) == 2
    await task.remove()
    await eventually(lambda: blob_files(server) == [])


async def test_text_file_is_refused(client: wsq.Client, tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("hello")
    with path.open() as f, pytest.raises(TypeError):
        await client.queue("t").add({"f": f})


async def test_video_example(client: wsq.Client) -> None:
    """The seed's example: a worker reads its input stream while it adds a result task
    whose stream is the output it is producing."""
    videos = client.queue("ffmpeg")
    results = client.queue("ffmpeg-results")
    source = os.urandom(5 << 20)

    async def encode(task: wsq.Task) -> None:
        async def encoder() -> AsyncIterator[bytes]:
            done = 0
            async for chunk in task.data["video"]:
                done += len(chunk)
                await task.update_progress(done / task.data["video"].size)
                yield bytes(reversed(chunk))

        await results.add({"video": encoder(), "args": task.data["args"]})

    await videos.add({"video": io.BytesIO(source), "args": ["-c:v", "libx264"]})
    videos.process(encode)
    [result] = await eventually(lambda: results.waiting())
    data = await result.get_data()
    assert data["args"] == ["-c:v", "libx264"]
    encoded = await data["video"].read()
    assert len(encoded) == len(source)
    assert hashlib.sha256(encoded).digest() != hashlib.sha256(source).digest()
    [done] = await videos.completed()
    assert done.progress == 1.0


async def test_slow_reader_does_not_stall_other_traffic(client: wsq.Client) -> None:
    """A download nobody reads fills its window and stops; requests still flow."""
    task = await client.queue("stall").add({"blob": os.urandom(64 << 20)})
    data = await task.get_data()
    iterator = aiter(data["blob"])
    first = await anext(iterator)
    assert first
    for n in range(20):
        await client.queue("other").add(n)
    assert len(await client.queue("other").all()) == 20
    await iterator.aclose()  # type: ignore[attr-defined]


async def test_stream_read_cut_by_lost_connection_raises(server: wsq.Server) -> None:
    async with wsq.Client(server.url, backoff=lambda t: 0.05) as c:
        task = await c.queue("cut").add({"blob": os.urandom(32 << 20)})
        data = await task.get_data()
        iterator = aiter(data["blob"])
        await anext(iterator)
        for connection in list(server.connections.values()):
            await connection.ws.close()
        with pytest.raises(wsq.ConnectionLost):
            while True:
                await asyncio.wait_for(anext(iterator), budget(10))


async def test_connection_closed_while_an_add_waits_for_its_upload(server: wsq.Server) -> None:
    """The add waits for an upload that never ends; the connection drops: no task, no blob."""
    from tests.integration.rawclient import RawClient

    async with RawClient(server.url) as raw:
        await raw.send({"op": "upload", "stream": 1})
        assert raw.ws is not None
        await raw.ws.send(b"\x00\x00\x00\x01" + b"x" * 1000)
        await raw.send(
            {
                "op": "add",
                "id": 1,
                "queue": "cut",
                "data": {"f": None},
                "streams": [{"path": ["f"], "upload": 1}],
            }
        )
        await eventually(lambda: list((server.data_dir / "blobs" / "tmp").iterdir()))
    await eventually(lambda: not server.connections)
    await eventually(lambda: list((server.data_dir / "blobs" / "tmp").iterdir()) == [])
    assert blob_files(server) == []
    assert await server.store.list() == []
