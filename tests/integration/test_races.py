"""State races a careless or hostile client can start (issue 10, "State races").

Each test misbehaves over a :class:`RawClient` (several requests in one frame, a stream id
used again at once, a worker id another principal uses) and then checks that the server's
state is what the store says and that every acknowledged task is whole.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from typing import Any

import wsq
from tests.conftest import eventually
from tests.integration.rawclient import RawClient
from wsq import protocol

BIG = protocol.WINDOW + 3 * protocol.CHUNK // 2  # more than one window of credit


def _content(size: int) -> bytes:
    block = hashlib.sha256(b"race").digest() * (1 << 15)  # 1 MiB
    return (block * (size // len(block) + 1))[:size]


def _open_files() -> dict[int, str]:
    found = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            found[int(fd)] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
    return found


def _stored_blobs(server: wsq.Server) -> list[str]:
    root = server.data_dir / "blobs"
    files = [p.relative_to(root) for p in root.rglob("*") if p.is_file()]
    return [str(p) for p in files if p.parts[0] != "tmp"]


def _download_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("wsq-download-")]


async def _read_download(raw: RawClient, stream: int) -> bytes:
    """The bytes of download ``stream`` until its ``end``, granting credit as they come."""
    received = bytearray()
    while True:
        message = await raw.receive(timeout=10)
        if message["op"] == "_binary":
            frame = message["frame"]
            if int.from_bytes(frame[:4], "big") == stream:
                received += frame[4:]
                credit = {"op": "credit", "stream": stream, "bytes": len(frame) - 4}
                await raw.send(credit)
        elif message["op"] == "end" and message["stream"] == stream:
            assert message["size"] == len(received)
            return bytes(received)
        elif message["op"] == "stream_error":
            raise AssertionError(message)


# -- downloads -----------------------------------------------------------------------------


async def test_download_stream_id_reused_after_cancel_is_a_new_download(
    server: wsq.Server, client: wsq.Client
) -> None:
    """Cancel a download that used up its credit and ask again under the same id in the
    same frame: the new download gets credit and delivers every byte; nothing leaks."""
    content = _content(BIG)
    task = await client.queue("dl").add({"file": content})
    async with RawClient(server.url) as raw:
        # A first download of the same blob opens the server's lazily opened files.
        await raw.send({"op": "download", "stream": 1, "task": task.id, "index": 0, "offset": 0})
        await _read_download(raw, 1)
        files_before = _open_files()
        await raw.send({"op": "download", "stream": 9, "task": task.id, "index": 0, "offset": 0})
        received = 0
        while received < protocol.WINDOW:  # the first window, then the server stops
            message = await raw.receive(timeout=10)
            if message["op"] == "_binary":
                received += len(message["frame"]) - 4
        again = {"op": "download", "stream": 9, "task": task.id, "index": 0, "offset": 0}
        await raw.send([{"op": "cancel", "stream": 9}, again])
        assert await _read_download(raw, 9) == content
        await eventually(lambda: not _download_tasks())
        await eventually(lambda: set(_open_files()) <= set(files_before))


# -- uploads -------------------------------------------------------------------------------


async def test_upload_abort_cannot_delete_the_blob_of_an_accepted_add(
    server: wsq.Server,
) -> None:
    """An add names two uploads; the first is stored, then the client aborts it while the
    second is still open. Whatever the add's answer, an acknowledged task's streams are
    all readable."""
    first, second = _content(1000), _content(2000)
    async with RawClient(server.url) as raw:
        assert raw.ws is not None
        for stream in (1, 2):
            await raw.send({"op": "upload", "stream": stream})
        await raw.ws.send(b"\x00\x00\x00\x01" + first)
        await raw.send({"op": "upload_end", "stream": 1})
        add = {
            "op": "add",
            "id": 7,
            "queue": "up",
            "data": {"a": None, "b": None},
            "streams": [{"path": ["a"], "upload": 1}, {"path": ["b"], "upload": 2}],
        }
        await raw.send(add)
        await eventually(lambda: _stored_blobs(server))  # the first upload is stored
        await raw.send({"op": "upload_abort", "stream": 1, "error": "changed my mind"})
        await raw.ws.send(b"\x00\x00\x00\x02" + second)
        await raw.send({"op": "upload_end", "stream": 2})
        while (answer := await raw.receive())["op"] not in ("result", "error") or answer.get(
            "id"
        ) != 7:
            pass
        if answer["op"] == "error":
            assert await server.store.list() == []
            return
        task_id = answer["result"]["id"]
        await raw.send({"op": "download", "stream": 11, "task": task_id, "index": 0, "offset": 0})
        assert await _read_download(raw, 11) == first
        await raw.send({"op": "download", "stream": 12, "task": task_id, "index": 1, "offset": 0})
        assert await _read_download(raw, 12) == second
