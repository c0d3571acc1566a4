"""Hostile input: every kind of bad message gets a clear error, and nothing else breaks.

The requirement: a malformed or unknown message, an oversized frame, an invalid option, an
unknown task id, an empty or 200+ character queue name... each gets an ``error`` answer
with a stable code, a readable message and the request's id when it can be read; the
connection, the server and every other client go on, with nothing lost. A client-chosen
id can never name a path outside the blob store or another task's blob.

Most tests misbehave over a :class:`RawClient`; several also keep a well-behaved
``wsq.Client`` (the ``bystander``) connected throughout and check that a task it added
before the abuse is still there and gets processed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import random
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State
from websockets.sync.client import connect as sync_connect

import wsq
from tests.conftest import budget, eventually
from tests.integration.rawclient import RawClient
from wsq import protocol
from wsq.blobs.base import BlobReader, BlobStore, BlobWriter
from wsq.blobs.files import FileBlobStore

ERROR_CODES = {
    "bad_message",
    "invalid_argument",
    "too_large",
    "not_found",
    "invalid_state",
    "stale_run",
    "unsupported_protocol",
}
# Answers a request can get; events, offers and credit grants are skipped while waiting.
_ANSWER_OPS = {"result", "error", "stream_error", "end"}
_BLOB_KEY = re.compile(r"^[0-9a-f]{32}$")
# The websockets hard limit the server sets: max_message * 4 + chunk.
_HARD_LIMIT = protocol.MAX_MESSAGE * 4 + protocol.CHUNK


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# -- fixtures and helpers --------------------------------------------------------------


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(autouse=True)
def server_errors() -> Iterator[list[logging.LogRecord]]:
    """Every ERROR the server (or websockets under it) logs during the test."""
    handler = _Records()
    loggers = [logging.getLogger("wsq"), logging.getLogger("websockets")]
    for each in loggers:
        each.addHandler(handler)
    try:
        yield handler.records
    finally:
        for each in loggers:
            each.removeHandler(handler)


def assert_no_server_errors(records: list[logging.LogRecord]) -> None:
    assert not records, "the server logged errors:\n" + "\n".join(
        f"{r.name}: {r.getMessage()}"
        + (f"\n{logging.Formatter().formatException(r.exc_info)}" if r.exc_info else "")
        for r in records
    )


@dataclass
class Bystander:
    """A well-behaved client that added a task before the abuse began."""

    client: wsq.Client
    queue: wsq.Queue
    task: wsq.Task

    async def check(self) -> None:
        """Still connected; its task is still waiting, and gets processed."""
        assert self.client.connected
        waiting = await asyncio.wait_for(self.queue.waiting(), budget(5))
        assert [t.id for t in waiting] == [self.task.id]
        seen: list[Any] = []
        worker = self.queue.process(lambda t: seen.append(t.data))
        await eventually(lambda: seen == [{"n": 1}], timeout=5)
        [done] = await eventually(lambda: self.queue.completed(), timeout=5)
        assert done.id == self.task.id
        await worker.stop()


@pytest.fixture
async def bystander(make_client: Callable[..., Awaitable[wsq.Client]]) -> Bystander:
    client = await make_client()
    queue = client.queue("bystander")
    task = await queue.add({"n": 1})
    return Bystander(client, queue, task)


async def next_answer(raw: RawClient, timeout: float = 3.0) -> dict[str, Any]:
    """The next answer (result, error, stream_error, end), skipping events and credit."""
    while True:
        message = await raw.receive(timeout)
        if message.get("op") in _ANSWER_OPS:
            return message


async def expect_error(
    raw: RawClient, code: str, request_id: int | None, *, op: str = "error"
) -> dict[str, Any]:
    """The next answer is an error with ``code``, a readable message and ``request_id``."""
    answer = await next_answer(raw)
    assert answer.get("op") == op, f"expected {op} {code}, got {answer}"
    assert answer.get("code") == code, f"expected {op} {code}, got {answer}"
    if op == "error":
        assert "id" in answer, answer
        assert answer["id"] == request_id, f"expected id {request_id}: {answer}"
    message = answer.get("message")
    assert isinstance(message, str), answer
    assert message.strip(), answer
    return answer


async def send_bad(
    raw: RawClient, frame: Any, code: str, request_id: int | None = None
) -> dict[str, Any]:
    await raw.send(frame)
    return await expect_error(raw, code, request_id)


_alive_ids = iter(range(900_000, 10**9))


async def assert_alive(raw: RawClient, records: list[logging.LogRecord]) -> None:
    """The same connection still answers, and no stray error comes before that answer
    (results of earlier requests may)."""
    request_id = next(_alive_ids)
    await raw.send({"op": "queues", "id": request_id})
    while True:
        answer = await next_answer(raw)
        assert answer["op"] == "result", f"unexpected answer {answer}"
        if answer["id"] == request_id:
            break
    assert isinstance(answer["result"]["queues"], list)
    assert_no_server_errors(records)


async def wait_closed(ws: ClientConnection) -> int | None:
    """Read until the server closes; return the close code it sent."""
    with contextlib.suppress(ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), budget(5))
    return ws.close_code


async def add_and_take_offer(raw: RawClient, queue: str) -> tuple[str, int]:
    """Add a task to a queue this raw client works on; return its id and the offered run
    (the offer may come before the add's answer)."""
    await raw.send({"op": "add", "id": 1, "queue": queue, "data": {"n": 1}})
    task_id, offer = None, None
    while task_id is None or offer is None:
        message = await raw.receive()
        if message["op"] == "result" and message["id"] == 1:
            task_id = message["result"]["id"]
        elif message["op"] == "offer":
            offer = message
    [item] = offer["tasks"]
    assert item["task"]["id"] == task_id
    run: int = item["run"]
    return task_id, run


async def add_inline_task(raw: RawClient, queue: str, payload: bytes) -> str:
    answer = await raw.request(
        {
            "op": "add",
            "queue": queue,
            "data": {"f": None},
            "streams": [{"path": ["f"], "inline": b64(payload)}],
        }
    )
    assert answer["op"] == "result", answer
    task_id: str = answer["result"]["id"]
    return task_id


# -- framing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "frame",
    [
        "{not json",
        "hello",
        '{"op":"queues","id":1',  # truncated
        '{"op":"queues",}',
        "\x00",
        "",
        "   ",
        "{'op': 'queues', 'id': 1}",
        '{"op":"add","id":1,"queue":"q","options":{"timeout":NaN}}',
    ],
)
async def test_not_json(server: wsq.Server, server_errors: Any, frame: str) -> None:
    async with RawClient(server.url) as raw:
        await send_bad(raw, frame, "bad_message", None)
        await assert_alive(raw, server_errors)


@pytest.mark.parametrize("frame", ["42", '"queues"', "null", "true", "-1.5e3", "[1]", '["x"]'])
async def test_json_that_is_not_an_object_or_array_of_objects(
    server: wsq.Server, server_errors: Any, frame: str
) -> None:
    async with RawClient(server.url) as raw:
        await send_bad(raw, frame, "bad_message", None)
        await assert_alive(raw, server_errors)


async def test_empty_array(server: wsq.Server, server_errors: Any) -> None:
    """A batch must hold at least one message; ``[]`` is answered like any bad frame
    (as JSON-RPC answers an empty batch), not silently dropped."""
    async with RawClient(server.url) as raw:
        await send_bad(raw, "[]", "bad_message", None)
        await assert_alive(raw, server_errors)


async def test_batch_mixing_good_and_bad_messages(server: wsq.Server, server_errors: Any) -> None:
    batch = json.dumps(
        [
            {"op": "queues", "id": 1},
            42,
            {"op": "bogus", "id": 2},
            {"op": "get", "id": 3, "task": "../x"},
            {"op": "add", "id": 4, "queue": "mixed", "data": {"ok": True}},
            [{"op": "queues", "id": 5}],
            {"op": "list", "id": 6, "queue": "mixed", "limit": 0},
        ]
    )
    async with RawClient(server.url) as raw:
        await raw.send(batch)
        answers = [await next_answer(raw) for _ in range(7)]
        by_id = {a["id"]: a for a in answers if a["id"] is not None}
        anonymous = [a for a in answers if a["id"] is None]
        assert by_id[1]["op"] == "result"
        assert by_id[4]["op"] == "result"
        for request_id in (2, 3, 6):
            assert by_id[request_id]["op"] == "error"
            assert by_id[request_id]["code"] == "bad_message"
            assert by_id[request_id]["message"]
        assert len(anonymous) == 2  # the 42 and the nested array
        assert all(a["op"] == "error" and a["code"] == "bad_message" for a in anonymous)
        added = await raw.request({"op": "get", "task": by_id[4]["result"]["id"]})
        assert added["result"]["data"] == {"ok": True}
        await assert_alive(raw, server_errors)


async def test_truncated_batch(server: wsq.Server, server_errors: Any) -> None:
    async with RawClient(server.url) as raw:
        await send_bad(raw, '[{"op":"queues","id":1},', "bad_message", None)
        await assert_alive(raw, server_errors)


async def test_unknown_op(server: wsq.Server, server_errors: Any) -> None:
    async with RawClient(server.url) as raw:
        answer = await send_bad(raw, {"op": "explode", "id": 5}, "bad_message", 5)
        assert "op" in answer["message"]
        await send_bad(raw, {"op": "", "id": 6}, "bad_message", 6)
        await send_bad(raw, {"op": 7, "id": 7}, "bad_message", 7)
        await send_bad(raw, {"op": None, "id": 8}, "bad_message", 8)
        await send_bad(raw, {"op": "welcome", "id": 9}, "bad_message", 9)  # server-only op
        await assert_alive(raw, server_errors)


async def test_missing_op(server: wsq.Server, server_errors: Any) -> None:
    async with RawClient(server.url) as raw:
        answer = await send_bad(raw, {"id": 6, "queue": "q"}, "bad_message", 6)
        assert "op" in answer["message"]
        await send_bad(raw, {}, "bad_message", None)
        await assert_alive(raw, server_errors)


@pytest.mark.parametrize(
    "message",
    [
        {"op": "queues", "extra": 1},
        {"op": "add", "queue": "q", "priority": 5},
        {"op": "add", "queue": "q", "options": {"timeout": 1, "delay": 5}},
        {"op": "add", "queue": "q", "data": {"f": None}, "streams": [{"path": ["f"], "x": 1}]},
        {"op": "get", "task": "t", "Task": "u"},
        {"op": "work", "queue": "q", "priority": "high"},
    ],
    ids=["queues", "add", "options", "stream", "get", "work"],
)
async def test_unknown_field(server: wsq.Server, server_errors: Any, message: Any) -> None:
    async with RawClient(server.url) as raw:
        answer = await send_bad(raw, {**message, "id": 11}, "bad_message", 11)
        assert "unknown" in answer["message"].lower() or "field" in answer["message"].lower()
        await raw.send({"op": "list", "id": 12, "queue": "q"})
        listed = await next_answer(raw)
        assert listed["op"] == "result" and listed["result"]["tasks"] == []  # nothing added
        await assert_alive(raw, server_errors)


@pytest.mark.parametrize(
    "message",
    [
        {"op": "add", "queue": 5},
        {"op": "add", "queue": None},
        {"op": "add", "queue": ["q"]},
        {"op": "add", "queue": "q", "options": "fast"},
        {"op": "add", "queue": "q", "options": {"timeout": "10"}},
        {"op": "add", "queue": "q", "options": {"retries": 1.5}},
        {"op": "add", "queue": "q", "options": {"autoremove": "yes"}},
        {"op": "add", "queue": "q", "streams": {}},
        {"op": "add", "queue": "q", "streams": [{"path": "f", "inline": ""}]},
        {"op": "add", "queue": "q", "streams": [{"path": [True], "inline": ""}]},
        {"op": "add", "queue": "q", "task": 123},
        {"op": "list", "limit": "10"},
        {"op": "list", "queue": 1},
        {"op": "get", "task": 123},
        {"op": "get", "task": None},
        {"op": "work", "queue": "q", "concurrency": 1.5},
        {"op": "work", "queue": "q", "concurrency": "2"},
        {"op": "stop", "worker": 5},
        {"op": "ack", "runs": "x"},
        {"op": "ack", "runs": [["t", "1"]]},
        {"op": "ack", "runs": [{"task": "t", "run": 1}]},
        {"op": "progress", "task": "t", "run": 1, "progress": "half"},
        {"op": "complete", "task": "t", "run": "1"},
        {"op": "fail", "task": "t", "run": 1, "error": 5},
        {"op": "subscribe", "queue": 5},
    ],
)
async def test_wrong_types(server: wsq.Server, server_errors: Any, message: Any) -> None:
    async with RawClient(server.url) as raw:
        await send_bad(raw, {**message, "id": 21}, "bad_message", 21)
        await assert_alive(raw, server_errors)


@pytest.mark.parametrize(
    "message",
    [
        {"op": "list", "limit": -1},
        {"op": "list", "limit": 10**30},
        {"op": "work", "queue": "q", "concurrency": -3},
        {"op": "work", "queue": "q", "concurrency": 2**64},
        {"op": "ack", "runs": [["t", -1]]},
        {"op": "ack", "runs": [["t", 1]] * 10_001},
        {"op": "add", "queue": "q", "streams": [{"path": [-1], "inline": ""}]},
        {"op": "add", "queue": "q", "streams": [{"path": ["a"] * 65, "inline": ""}]},
        {"op": "add", "queue": "q", "streams": [{"path": [], "inline": ""}] * 1025},
        {"op": "fail", "task": "t", "run": 1, "error": "e" * 65_537},
    ],
)
async def test_negative_and_huge_numbers(
    server: wsq.Server, server_errors: Any, message: Any
) -> None:
    async with RawClient(server.url) as raw:
        await send_bad(raw, {**message, "id": 31}, "bad_message", 31)
        await assert_alive(raw, server_errors)


@pytest.mark.parametrize("request_id", ["7", 7.5, 7.0, True, None, [7], {"n": 7}], ids=repr)
async def test_request_id_of_the_wrong_type(
    server: wsq.Server, server_errors: Any, request_id: Any
) -> None:
    async with RawClient(server.url) as raw:
        await send_bad(raw, {"op": "queues", "id": request_id}, "bad_message", None)
        await assert_alive(raw, server_errors)


@pytest.mark.parametrize("request_id", [-1, 2**53 + 1, 10**30])
async def test_request_id_out_of_range(
    server: wsq.Server, server_errors: Any, request_id: int
) -> None:
    """An integer id outside 0..2**53 is refused; echoing it back is allowed (it is
    readable), and so is answering with id null. Nothing else is."""
    async with RawClient(server.url) as raw:
        await raw.send({"op": "queues", "id": request_id})
        answer = await next_answer(raw)
        assert answer["op"] == "error" and answer["code"] == "bad_message", answer
        assert answer["id"] in (None, request_id), answer
        assert answer["message"]
        await assert_alive(raw, server_errors)


async def test_duplicate_keys_do_not_confuse_the_server(
    server: wsq.Server, server_errors: Any
) -> None:
    async with RawClient(server.url) as raw:
        await raw.send('{"op":"queues","id":41,"op":"queues","id":42}')
        answer = await next_answer(raw)
        assert answer["id"] in (41, 42)
        await assert_alive(raw, server_errors)


# -- handshake -------------------------------------------------------------------------


@pytest.mark.parametrize("version", [0, 2, -1, 2**40])
async def test_hello_with_wrong_protocol_version(
    server: wsq.Server, server_errors: Any, bystander: Bystander, version: int
) -> None:
    async with RawClient(server.url, hello=False) as raw:
        await send_bad(raw, {"op": "hello", "protocol": version}, "unsupported_protocol", None)
        assert raw.ws is not None
        assert await wait_closed(raw.ws) == 1002
    await bystander.check()
    assert_no_server_errors(server_errors)


@pytest.mark.parametrize(
    "hello",
    [
        {"op": "hello", "protocol": "1"},
        {"op": "hello"},
        {"op": "hello", "protocol": 1, "client": "c" * 201},
        {"op": "hello", "protocol": 1, "shake": True},
        [{"op": "hello", "protocol": 1}],
        "not json",
    ],
    ids=["string-version", "no-version", "long-client", "unknown-field", "batch", "garbage"],
)
async def test_malformed_hello(server: wsq.Server, server_errors: Any, hello: Any) -> None:
    async with RawClient(server.url, hello=False) as raw:
        await send_bad(raw, hello, "bad_message", None)
        assert raw.ws is not None
        assert await wait_closed(raw.ws) == 1002
    assert_no_server_errors(server_errors)


async def test_first_message_not_hello(server: wsq.Server, server_errors: Any) -> None:
    """Refused and closed; the refusal carries the request's id, which was readable."""
    async with RawClient(server.url, hello=False) as raw:
        answer = await send_bad(raw, {"op": "queues", "id": 1}, "bad_message", 1)
        assert "hello" in answer["message"]
        assert raw.ws is not None
        assert await wait_closed(raw.ws) == 1002
    assert_no_server_errors(server_errors)


async def test_second_hello(server: wsq.Server, server_errors: Any) -> None:
    async with RawClient(server.url) as raw:
        answer = await send_bad(raw, {"op": "hello", "protocol": 1}, "bad_message", None)
        assert "hello" in answer["message"]
        await send_bad(raw, {"op": "hello", "protocol": 2}, "bad_message", None)
        await assert_alive(raw, server_errors)


# -- sizes -----------------------------------------------------------------------------


async def test_text_message_over_max_size_is_too_large(
    server: wsq.Server, server_errors: Any, bystander: Bystander
) -> None:
    """The id comes first and is plainly readable, so the too_large answer carries it."""
    big = json.dumps({"op": "queues", "id": 9, "pad": "x" * protocol.MAX_MESSAGE})
    async with RawClient(server.url) as raw:
        await send_bad(raw, big, "too_large", 9)
        await assert_alive(raw, server_errors)
    await bystander.check()


async def test_oversized_batch_is_too_large(server: wsq.Server, server_errors: Any) -> None:
    batch = json.dumps([{"op": "add", "queue": "big", "data": "x" * 100_000}] * 11)
    assert len(batch) > protocol.MAX_MESSAGE
    async with RawClient(server.url) as raw:
        await send_bad(raw, batch, "too_large", None)
        listed = await raw.request({"op": "list", "queue": "big"})
        assert listed["result"]["tasks"] == []  # none of the batch was applied
        await assert_alive(raw, server_errors)


async def test_max_message_size_counts_utf8_bytes(server: wsq.Server, server_errors: Any) -> None:
    """1 MiB is a size in bytes: 600,000 'é' are 1.2 MB on the wire (the limit the
    welcome announces as max_message), though only 600,000 characters."""
    data = "é" * 600_000
    message = json.dumps({"op": "add", "id": 8, "queue": "utf8", "data": data}, ensure_ascii=False)
    assert len(message) < protocol.MAX_MESSAGE < len(message.encode())
    async with RawClient(server.url) as raw:
        assert raw.welcome["limits"]["max_message"] == protocol.MAX_MESSAGE
        await send_bad(raw, message, "too_large", 8)
        listed = await raw.request({"op": "list", "queue": "utf8"})
        assert listed["result"]["tasks"] == []
        await assert_alive(raw, server_errors)


async def test_frame_beyond_websocket_limit_closes_only_that_connection(
    server: wsq.Server, server_errors: Any, bystander: Bystander
) -> None:
    async with RawClient(server.url) as other:
        ws = await connect(server.url, max_size=None)
        try:
            await ws.send(json.dumps({"op": "hello", "protocol": 1}))
            await ws.recv()
            with contextlib.suppress(ConnectionClosed):
                await ws.send("x" * (3 * _HARD_LIMIT))
            assert await wait_closed(ws) == 1009
        finally:
            if ws.state is not State.CLOSED:
                await ws.close()
        await assert_alive(other, server_errors)
    await bystander.check()
    assert_no_server_errors(server_errors)


async def test_invalid_utf8_closes_only_that_connection(
    server: wsq.Server, server_errors: Any, bystander: Bystander
) -> None:
    async with RawClient(server.url) as other, RawClient(server.url) as raw:
        assert raw.ws is not None
        await raw.ws.send(b'{"op":"queues","id":1,"x":"\xff\xfe"}', text=True)
        assert await wait_closed(raw.ws) == 1007
        await assert_alive(other, server_errors)
    await bystander.check()


@pytest.mark.parametrize(
    ("frame", "request_id"),
    [
        (nested(10_000), None),
        ('{"op":"queues","id":5,"x":' + nested(10_000) + "}", 5),
        ('{"op":"add","id":6,"queue":"deep","data":' + nested(10_000) + "}", 6),
        ("[" + '{"op":"queues","id":7},' + nested(10_000) + "]", None),
    ],
    ids=["frame", "field", "data", "in-batch"],
)
async def test_deeply_nested_json(
    server: wsq.Server,
    server_errors: Any,
    bystander: Bystander,
    frame: str,
    request_id: int | None,
) -> None:
    """10,000 nested arrays: a clear bad_message, and the connection goes on. The id may
    be left out here, since finding it means parsing past the nesting."""
    async with RawClient(server.url) as raw:
        await raw.send(frame)
        answers = []
        while True:
            answer = await next_answer(raw)
            answers.append(answer)
            if answer["op"] == "error":
                break
        assert answer["code"] == "bad_message", answer
        assert answer["id"] in (None, request_id), answer
        assert answer["message"]
        await assert_alive(raw, server_errors)
        listed = await raw.request({"op": "list", "queue": "deep"})
        assert listed["result"]["tasks"] == []
    await bystander.check()


def _probe_latency(url: str, stop: threading.Event, latencies: list[float]) -> None:
    """Another client on its own thread (so the server's event loop cannot hide a stall
    from its clock): ask, time the answer, repeat until ``stop``."""
    with sync_connect(url, max_size=None) as ws:
        ws.send(json.dumps({"op": "hello", "protocol": 1}))
        ws.recv(timeout=budget(5))
        request_id = 0
        while not stop.is_set():
            request_id += 1
            start = time.monotonic()
            ws.send(json.dumps({"op": "queues", "id": request_id}))
            while json.loads(ws.recv(timeout=budget(30))).get("id") != request_id:
                pass
            latencies.append(time.monotonic() - start)
            stop.wait(0.01)


async def test_batch_of_many_bad_messages_does_not_stall_other_clients(
    server: wsq.Server, server_errors: Any, bystander: Bystander
) -> None:
    """300 KB of ``[1,1,1,...]`` is 150,000 bad messages in one frame (under the
    size limit). The server may refuse the frame or answer each, but must not freeze
    every other client while it does."""
    frame = "[" + ",".join(["1"] * 150_000) + "]"
    assert len(frame) < protocol.MAX_MESSAGE
    stop = threading.Event()
    latencies: list[float] = []
    prober = asyncio.create_task(asyncio.to_thread(_probe_latency, server.url, stop, latencies))
    try:
        await eventually(lambda: len(latencies) >= 3, timeout=5)
        async with RawClient(server.url) as raw:
            assert raw.ws is not None
            await raw.send(frame)
            await raw.send({"op": "queues", "id": 4242})
            answers = 0
            while True:  # until the request after the frame is answered
                data = await asyncio.wait_for(raw.ws.recv(), budget(30))
                assert isinstance(data, str)
                answers += data.count('"op":"error"')
                if '"id":4242' in data:
                    break
            assert answers >= 1  # one for the frame, or one per message
        seen = len(latencies)
        await eventually(lambda: len(latencies) > seen, timeout=5)
    finally:
        stop.set()
        await prober
    worst = max(latencies)
    assert worst < budget(1.0), f"another client waited {worst:.1f} s for an answer"
    await bystander.check()
    assert_no_server_errors(server_errors)


# -- binary frames and streams ---------------------------------------------------------


@pytest.mark.parametrize("frame", [b"", b"\x00", b"\x00\x00\x01"])
async def test_binary_frame_shorter_than_its_header(
    server: wsq.Server, server_errors: Any, frame: bytes
) -> None:
    async with RawClient(server.url) as raw:
        await send_bad(raw, frame, "bad_message", None)
        await assert_alive(raw, server_errors)


async def test_binary_frame_for_a_stream_that_is_not_open_is_ignored(
    server: wsq.Server, server_errors: Any
) -> None:
    async with RawClient(server.url) as raw:
        await raw.send(protocol.pack_chunk(77, b"stray bytes"))
        await raw.send(protocol.pack_chunk(2**32 - 1, b""))
        await raw.send(protocol.pack_chunk(0, os.urandom(100_000)))
        await assert_alive(raw, server_errors)  # the very next answer is the result


class _GatedWriter(BlobWriter):
    def __init__(self, inner: BlobWriter, gate: asyncio.Event) -> None:
        self.key = inner.key
        self._inner = inner
        self._gate = gate

    async def write(self, data: bytes) -> None:
        await self._gate.wait()
        await self._inner.write(data)

    async def commit(self) -> int:
        return await self._inner.commit()

    async def abort(self) -> None:
        await self._inner.abort()


class _GatedBlobs(BlobStore):
    """A file blob store whose writes wait for :attr:`gate`: no upload credit comes back
    until the test opens it, so the upload window is exceeded deterministically."""

    def __init__(self, root: Path) -> None:
        self.inner = FileBlobStore(root)
        self.gate = asyncio.Event()

    async def open(self) -> None:
        await self.inner.open()

    async def create(self) -> BlobWriter:
        return _GatedWriter(await self.inner.create(), self.gate)

    async def reader(self, key: str, offset: int = 0) -> BlobReader:
        return await self.inner.reader(key, offset)

    async def delete(self, keys: Any) -> None:
        await self.inner.delete(keys)

    def keys(self, min_age: float = 0.0) -> AsyncIterator[str]:
        return self.inner.keys(min_age)

    async def claim(self, owner: str) -> str | None:
        return await self.inner.claim(owner)

    async def close(self) -> None:
        self.gate.set()
        await self.inner.close()


async def test_upload_beyond_its_credit_window(data_dir: Path, server_errors: Any) -> None:
    blobs = _GatedBlobs(data_dir / "blobs")
    async with (
        wsq.Server(data_dir=data_dir, port=0, heartbeat_interval=1.0, blob_store=blobs) as srv,
        wsq.Client(srv.url, backoff=lambda tries: 0.05) as good,
        RawClient(srv.url) as raw,
    ):
        kept = await good.queue("kept").add({"n": 1})
        await raw.send({"op": "upload", "stream": 1})
        piece = b"u" * (4 << 20)  # three pieces: 12 MiB against an 8 MiB window
        for _ in range(3):
            await raw.send(protocol.pack_chunk(1, piece))
        answer = await expect_error(raw, "bad_message", None)
        assert "1" in answer["message"]
        blobs.gate.set()
        await raw.send(
            {
                "op": "add",
                "id": 2,
                "queue": "over",
                "data": {"f": None},
                "streams": [{"path": ["f"], "upload": 1}],
            }
        )
        failed = await next_answer(raw)
        assert failed["op"] == "error" and failed["id"] == 2, failed
        assert failed["code"] == "upload_failed" and failed["message"], failed
        await assert_alive(raw, server_errors)
        # The stream is closed: its id can be used again, and works.
        task_id = await _upload_and_add(raw, stream=1, queue="over", payload=b"fine")
        got = await raw.request({"op": "get", "task": task_id})
        assert got["result"]["streams"] == [{"path": ["f"], "size": 4}]
        # The well-behaved client was never disturbed.
        seen: list[Any] = []
        good.queue("kept").process(lambda t: seen.append(t.id))
        await eventually(lambda: seen == [kept.id], timeout=5)
        assert [t.id for t in await good.queue("over").all()] == [task_id]
        assert_no_server_errors(server_errors)


async def _upload_and_add(raw: RawClient, *, stream: int, queue: str, payload: bytes) -> str:
    await raw.send({"op": "upload", "stream": stream})
    await raw.send(protocol.pack_chunk(stream, payload))
    await raw.send({"op": "upload_end", "stream": stream})
    answer = await raw.request(
        {
            "op": "add",
            "queue": queue,
            "data": {"f": None},
            "streams": [{"path": ["f"], "upload": stream}],
        }
    )
    assert answer["op"] == "result", answer
    task_id: str = answer["result"]["id"]
    return task_id


async def test_download_errors_name_their_stream(server: wsq.Server, server_errors: Any) -> None:
    async with RawClient(server.url) as raw:
        task_id = await add_inline_task(raw, "dl", b"hello")

        async def refused(message: dict[str, Any], code: str) -> None:
            await raw.send({"op": "download", "index": 0, **message})
            answer = await expect_error(raw, code, None, op="stream_error")
            assert answer["stream"] == message["stream"], answer

        await refused({"stream": 1, "task": "ghost"}, "not_found")
        await refused({"stream": 2, "task": task_id, "index": 1}, "invalid_argument")
        await refused({"stream": 3, "task": task_id, "index": 10**30}, "invalid_argument")
        await refused({"stream": 4, "task": task_id, "offset": 6}, "invalid_argument")
        await refused({"stream": 5, "task": task_id, "offset": 10**30}, "invalid_argument")
        # The edges still work: an offset at the very end, then a whole read.
        await raw.send({"op": "download", "stream": 6, "task": task_id, "index": 0, "offset": 5})
        assert await next_answer(raw) == {"op": "end", "stream": 6, "size": 0}
        await raw.send({"op": "download", "stream": 1, "task": task_id, "index": 0})
        chunk = await raw.receive()
        assert chunk["op"] == "_binary" and chunk["frame"] == protocol.pack_chunk(1, b"hello")
        assert await next_answer(raw) == {"op": "end", "stream": 1, "size": 5}
        await assert_alive(raw, server_errors)


async def test_stream_control_messages_for_wrong_streams(
    server: wsq.Server, server_errors: Any
) -> None:
    async with RawClient(server.url) as raw:
        task_id = await add_inline_task(raw, "ctl", b"data")
        await raw.send({"op": "upload", "stream": 7})
        await send_bad(raw, {"op": "upload", "stream": 7}, "invalid_argument", None)
        download = {"op": "download", "stream": 7, "task": task_id, "index": 0}
        await send_bad(raw, download, "invalid_argument", None)
        await send_bad(raw, {"op": "upload_end", "stream": 99}, "invalid_argument", None)
        await send_bad(raw, {"op": "upload", "stream": 2**32}, "bad_message", None)
        await send_bad(raw, {"op": "upload", "stream": -1}, "bad_message", None)
        await send_bad(raw, {"op": "credit", "stream": 7, "bytes": 0}, "bad_message", None)
        await send_bad(raw, {"op": "credit", "stream": 7, "bytes": 2**31}, "bad_message", None)
        # Ignored without an answer: credit, cancel and abort for streams not open.
        await raw.send({"op": "credit", "stream": 12345, "bytes": 10})
        await raw.send({"op": "cancel", "stream": 12345})
        await raw.send({"op": "upload_abort", "stream": 12345})
        await assert_alive(raw, server_errors)


# -- add with streams ------------------------------------------------------------------


async def test_add_referencing_an_upload_never_opened(
    server: wsq.Server, server_errors: Any
) -> None:
    async with RawClient(server.url) as raw:
        message = {
            "op": "add",
            "id": 3,
            "queue": "up",
            "data": {"f": None},
            "streams": [{"path": ["f"], "upload": 42}],
        }
        answer = await send_bad(raw, message, "invalid_argument", 3)
        assert "42" in answer["message"]
        # An upload can be claimed by one add only.
        await _upload_and_add(raw, stream=5, queue="up", payload=b"x")
        message = {**message, "id": 4, "streams": [{"path": ["f"], "upload": 5}]}
        await send_bad(raw, message, "invalid_argument", 4)
        listed = await raw.request({"op": "list", "queue": "up"})
        assert len(listed["result"]["tasks"]) == 1
        await assert_alive(raw, server_errors)


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"a": 1}, ["b"]),
        ({"a": 1}, ["a", "x"]),
        ({"a": 1}, [0]),
        ([1, 2], [5]),
        ([1, 2], ["0"]),
        (None, ["a"]),
        ("text", [0]),
        ({"a": {"b": [0]}}, ["a", "b", 1]),
    ],
)
async def test_add_stream_path_that_does_not_resolve(
    server: wsq.Server, server_errors: Any, data: Any, path: list[Any]
) -> None:
    async with RawClient(server.url) as raw:
        message = {
            "op": "add",
            "id": 5,
            "queue": "paths",
            "data": data,
            "streams": [{"path": path, "inline": b64(b"x")}],
        }
        await send_bad(raw, message, "invalid_argument", 5)
        await assert_alive(raw, server_errors)


@pytest.mark.parametrize(
    "streams",
    [
        [{"path": ["f"], "inline": b64(b"x"), "upload": 1}],
        [{"path": ["f"]}],
        [{"path": ["f"], "inline": b64(b"x")}, {"path": ["f"], "inline": b64(b"y")}],
        [{"path": ["f"], "upload": 1}, {"path": ["g"], "upload": 1}],
    ],
    ids=["inline-and-upload", "neither", "duplicate-path", "one-upload-twice"],
)
async def test_add_with_inconsistent_streams(
    server: wsq.Server, server_errors: Any, streams: list[Any]
) -> None:
    async with RawClient(server.url) as raw:
        await raw.send({"op": "upload", "stream": 1})
        message = {
            "op": "add",
            "id": 6,
            "queue": "s",
            "data": {"f": None, "g": None},
            "streams": streams,
        }
        await send_bad(raw, message, "invalid_argument", 6)
        listed = await raw.request({"op": "list", "queue": "s"})
        assert listed["result"]["tasks"] == []
        await assert_alive(raw, server_errors)


async def test_add_with_nested_stream_paths(
    server: wsq.Server, server_errors: Any, bystander: Bystander
) -> None:
    """A stream inside another stream (paths ["a"] and ["a", "b"]) cannot be rebuilt by
    a worker; the server refuses it rather than hand it to every worker of the queue."""
    async with RawClient(server.url) as raw:
        message = {
            "op": "add",
            "id": 7,
            "queue": "bystander",
            "data": {"a": {"b": 1}},
            "streams": [
                {"path": ["a"], "inline": b64(b"outer")},
                {"path": ["a", "b"], "inline": b64(b"inner")},
            ],
        }
        await send_bad(raw, message, "invalid_argument", 7)
        message["streams"] = [
            {"path": [], "inline": b64(b"whole")},
            {"path": ["a"], "inline": b64(b"part")},
        ]
        await send_bad(raw, {**message, "id": 8}, "invalid_argument", 8)
        await assert_alive(raw, server_errors)
    await bystander.check()


async def test_inline_stream_that_is_not_base64(server: wsq.Server, server_errors: Any) -> None:
    async with RawClient(server.url) as raw:
        message = {
            "op": "add",
            "id": 9,
            "queue": "b64",
            "data": {"f": None},
            "streams": [{"path": ["f"], "inline": "!!not base64!!"}],
        }
        await send_bad(raw, message, "bad_message", 9)
        await assert_alive(raw, server_errors)


# -- names and ids ---------------------------------------------------------------------

BAD_QUEUE_NAMES = ["", "x" * 200, "x" * 5000, "a\x00b", "a\nb", "\t", "del\x7f", "\x1b[31mred"]


@pytest.mark.parametrize(
    "template",
    [
        {"op": "add", "data": 1},
        {"op": "list"},
        {"op": "work"},
        {"op": "subscribe"},
        {"op": "unsubscribe"},
    ],
    ids=lambda t: t["op"],
)
async def test_invalid_queue_names(
    server: wsq.Server, server_errors: Any, template: dict[str, Any]
) -> None:
    async with RawClient(server.url) as raw:
        for n, name in enumerate(BAD_QUEUE_NAMES):
            await send_bad(raw, {**template, "queue": name, "id": n}, "bad_message", n)
        await assert_alive(raw, server_errors)
        queues = await raw.request({"op": "queues"})
        assert queues["result"]["queues"] == []


ODD_BUT_VALID_QUEUE_NAMES = [
    "../../etc",
    "/etc/passwd",
    "..",
    "C:\\Windows\\system32",
    "%2e%2e%2f",
    "队列 😀",
    "\u202etxt.exe",
    " spaced ",
    "x" * 199,
    "😀" * 199,
]


async def test_odd_but_valid_queue_names_work(
    server: wsq.Server, client: wsq.Client, server_errors: Any, tmp_path: Path
) -> None:
    """Queue names never touch the filesystem: these all work, and nothing appears
    outside the data dir."""
    added = {name: await client.queue(name).add({"q": name}) for name in ODD_BUT_VALID_QUEUE_NAMES}
    for name, task in added.items():
        assert task.queue == name
    names = [q.name for q in await client.list_queues()]
    assert sorted(names) == sorted(ODD_BUT_VALID_QUEUE_NAMES)
    seen: list[Any] = []
    for name in ODD_BUT_VALID_QUEUE_NAMES:
        client.queue(name).process(lambda t: seen.append(t.data["q"]))
    await eventually(lambda: sorted(seen) == sorted(ODD_BUT_VALID_QUEUE_NAMES), timeout=5)
    assert names_in(tmp_path) == [server.data_dir.name]
    assert set(names_in(server.data_dir)) <= {
        "wsq.lock",
        "wsq.db",
        "wsq.db-wal",
        "wsq.db-shm",
        "blobs",
    }
    assert_no_server_errors(server_errors)


BAD_TASK_IDS = [
    "../x",
    "/etc/passwd",
    "..\\..\\x",
    "x" * 65,
    "",
    "a\x00b",
    "a\nb",
    "a b",
    "é",
    "💥",
    # A task is named by <principal>/<id> at most (docs/protocol.md §3): one "/", after a
    # name that starts with a letter or digit.
    "a/b/c",
    "a//b",
    "./x",
    "a/",
]
BAD_CHOSEN_IDS = [*BAD_TASK_IDS, "a/b"]  # a chosen id has no "/" at all


@pytest.mark.parametrize("op", ["add", "get", "remove", "retry", "complete", "ack"])
async def test_hostile_task_ids(server: wsq.Server, server_errors: Any, op: str) -> None:
    async with RawClient(server.url) as raw:
        for n, task_id in enumerate(BAD_CHOSEN_IDS if op == "add" else BAD_TASK_IDS):
            if op == "add":
                message = {"op": "add", "queue": "ids", "data": 1, "task": task_id}
            elif op == "complete":
                message = {"op": "complete", "task": task_id, "run": 1}
            elif op == "ack":
                message = {"op": "ack", "runs": [[task_id, 1]]}
            else:
                message = {"op": op, "task": task_id}
            await send_bad(raw, {**message, "id": n}, "bad_message", n)
        await assert_alive(raw, server_errors)
        listed = await raw.request({"op": "list"})
        assert listed["result"]["tasks"] == []
        if op in ("get", "remove", "retry"):  # a well-formed scoped id that names nothing
            answer = await raw.request({"op": op, "task": "a/b"})
            assert answer["code"] == "not_found", answer


async def test_hostile_task_ids_in_download(server: wsq.Server, server_errors: Any) -> None:
    async with RawClient(server.url) as raw:
        for n, task_id in enumerate(BAD_TASK_IDS):
            message = {"op": "download", "stream": n, "task": task_id, "index": 0}
            await raw.send(message)
            answer = await next_answer(raw)
            assert answer["code"] == "bad_message", answer
            assert answer["message"], answer
            # An error answer to the stream, or one with no id: either way it is closed.
            assert answer["op"] == "error" or answer.get("stream") == n, answer
        task_id = await add_inline_task(raw, "ids", b"ok")
        await raw.send({"op": "download", "stream": 0, "task": task_id, "index": 0})
        assert (await raw.receive())["frame"] == protocol.pack_chunk(0, b"ok")
        assert await next_answer(raw) == {"op": "end", "stream": 0, "size": 2}
        await assert_alive(raw, server_errors)


def names_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def blob_files(data_dir: Path) -> list[Path]:
    root = data_dir / "blobs"
    # Committed blobs sit in fan-out folders (not tmp/, not the owner mark beside them).
    return [p for p in root.glob("??/*") if p.is_file()]


async def test_client_chosen_ids_never_reach_the_blob_store(
    server: wsq.Server, client: wsq.Client, server_errors: Any, tmp_path: Path
) -> None:
    first = os.urandom(100_000)  # over the inline limit: an uploaded blob
    task = await client.queue("a").add({"f": first}, id="..")
    for odd in (".", "...", "..:..", "-", "x" * 64):
        await client.queue("a").add({"f": os.urandom(70_000)}, id=odd)
    root = server.data_dir / "blobs"
    files = blob_files(server.data_dir)
    assert len(files) == 6
    for path in files:
        assert path.parent.parent == root
        assert _BLOB_KEY.match(path.name) and path.parent.name == path.name[:2]
    # The same id again (a resend): the first task, with its own blob, stays.
    again = await client.queue("a").add({"f": os.urandom(100_000)}, id="..")
    assert again.id == ".."
    # The same id in another queue: refused, and the first task's blob is untouched.
    with pytest.raises(wsq.InvalidArgument):
        await client.queue("b").add({"f": os.urandom(100_000)}, id="..")
    data = await task.get_data()
    assert await data["f"].read() == first
    await eventually(lambda: len(blob_files(server.data_dir)) == 6, timeout=5)
    # A client can never name a blob: there is no field for it.
    key = files[0].name
    async with RawClient(server.url) as raw:
        message = {
            "op": "add",
            "id": 3,
            "queue": "c",
            "data": {"f": None},
            "streams": [{"path": ["f"], "blob": key}],
        }
        await send_bad(raw, message, "bad_message", 3)
        message["streams"] = [{"path": ["f"], "upload": 1, "key": "../../../etc/passwd"}]
        await send_bad(raw, {**message, "id": 4}, "bad_message", 4)
        await assert_alive(raw, server_errors)
    assert names_in(tmp_path) == [server.data_dir.name]


# -- worker reports --------------------------------------------------------------------


async def test_reports_for_an_unknown_task_or_wrong_run(
    server: wsq.Server, server_errors: Any
) -> None:
    async with RawClient(server.url) as raw:
        await raw.request({"op": "work", "queue": "reports", "worker": "w1"})
        task_id, run = await add_and_take_offer(raw, "reports")
        await raw.request({"op": "ack", "runs": [[task_id, run]]})
        n = 100
        for op, extra in [
            ("complete", {}),
            ("fail", {"error": "nope"}),
            ("progress", {"progress": 0.5}),
            ("touch", {}),
        ]:
            for task, wrong_run in [("ghost", run), (task_id, run + 1), (task_id, -1)]:
                n += 1
                message = {"op": op, "id": n, "task": task, "run": wrong_run, **extra}
                await send_bad(raw, message, "stale_run", n)
        # A report without an id still gets its error.
        await send_bad(raw, {"op": "touch", "task": "ghost", "run": 1}, "stale_run", None)
        # The real run was not disturbed: it completes.
        done = await raw.request({"op": "complete", "task": task_id, "run": run})
        assert done["op"] == "result", done
        got = await raw.request({"op": "get", "task": task_id})
        assert got["result"]["task"]["state"] == "completed"
        await assert_alive(raw, server_errors)


async def test_progress_outside_zero_to_one(server: wsq.Server, server_errors: Any) -> None:
    async with RawClient(server.url) as raw:
        await raw.request({"op": "work", "queue": "prog", "worker": "w2"})
        task_id, run = await add_and_take_offer(raw, "prog")
        for n, value in enumerate([1.5, -0.1, 10**30, "0.5", None], start=1):
            message = {"op": "progress", "id": n, "task": task_id, "run": run, "progress": value}
            await send_bad(raw, message, "bad_message", n)
        await send_bad(
            raw,
            f'{{"op":"progress","id":9,"task":"{task_id}","run":{run},"progress":1e999}}',
            "bad_message",
            9,
        )
        ok = await raw.request({"op": "progress", "task": task_id, "run": run, "progress": 1.0})
        assert ok["op"] == "result", ok
        got = await raw.request({"op": "get", "task": task_id})
        assert got["result"]["task"]["progress"] == 1.0
        await assert_alive(raw, server_errors)


# -- options, workers, lists -----------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "code"),
    [
        ('{"timeout":-5}', "invalid_argument"),
        ('{"timeout":-0.5}', "invalid_argument"),
        ('{"timeout":-1e308}', "invalid_argument"),
        # msgspec refuses 1e999 while parsing (it never becomes inf), so it is malformed.
        ('{"timeout":1e999}', "bad_message"),
        ('{"timeout":-1e999}', "bad_message"),
        ('{"timeout":"Infinity"}', "bad_message"),
        ('{"retries":-2}', "bad_message"),
        ('{"retries":true}', "bad_message"),
        ('{"autoremove":1}', "bad_message"),
    ],
)
async def test_invalid_options(
    server: wsq.Server, server_errors: Any, options: str, code: str
) -> None:
    async with RawClient(server.url) as raw:
        frame = f'{{"op":"add","id":12,"queue":"opts","data":1,"options":{options}}}'
        await send_bad(raw, frame, code, 12)
        listed = await raw.request({"op": "list", "queue": "opts"})
        assert listed["result"]["tasks"] == []
        await assert_alive(raw, server_errors)


async def test_retries_beyond_what_the_store_holds(server: wsq.Server, server_errors: Any) -> None:
    """retries has no upper bound in the schema; 10**30 must be refused as a bad
    argument, not reach SQLite and come back as an internal error."""
    async with RawClient(server.url) as raw:
        message = {
            "op": "add",
            "id": 13,
            "queue": "opts",
            "data": 1,
            "options": {"retries": 10**30},
        }
        await raw.send(message)
        answer = await next_answer(raw)
        assert answer["op"] == "error" and answer["id"] == 13, answer
        assert answer["code"] in ("bad_message", "invalid_argument"), answer
        await assert_alive(raw, server_errors)


@pytest.mark.parametrize("concurrency", [0, -1, 10_001])
async def test_invalid_concurrency(
    server: wsq.Server, server_errors: Any, concurrency: int
) -> None:
    async with RawClient(server.url) as raw:
        message = {"op": "work", "id": 14, "queue": "c", "concurrency": concurrency}
        await send_bad(raw, message, "bad_message", 14)
        await assert_alive(raw, server_errors)


async def test_workers_of_other_connections_are_out_of_reach(
    server: wsq.Server, server_errors: Any, bystander: Bystander
) -> None:
    seen: list[Any] = []
    worker = bystander.queue.process(lambda t: seen.append(t.id))
    await eventually(lambda: seen == [bystander.task.id], timeout=5)
    async with RawClient(server.url) as raw:
        stop = {"op": "stop", "id": 15, "worker": worker.id}
        await send_bad(raw, stop, "invalid_argument", 15)
        await send_bad(raw, {**stop, "id": 16, "worker": "nobody"}, "invalid_argument", 16)
        steal = {"op": "work", "id": 17, "queue": "bystander", "worker": worker.id}
        await send_bad(raw, steal, "invalid_argument", 17)
        await assert_alive(raw, server_errors)
    later = await bystander.queue.add({"n": 2})
    await eventually(lambda: seen == [bystander.task.id, later.id], timeout=5)
    await worker.stop()
    assert_no_server_errors(server_errors)


@pytest.mark.parametrize(
    "fields",
    [
        {"cursor": "abc"},
        {"cursor": "-1"},
        {"cursor": "1" * 20},
        {"cursor": ""},
        {"cursor": 5},
        {"limit": 0},
        {"limit": 10_001},
        {"limit": 2.5},
        {"state": "bogus"},
        {"state": "WAITING"},
        {"state": 1},
    ],
    ids=repr,
)
async def test_list_with_bad_arguments(
    server: wsq.Server, server_errors: Any, fields: dict[str, Any]
) -> None:
    async with RawClient(server.url) as raw:
        await send_bad(raw, {"op": "list", "id": 18, **fields}, "bad_message", 18)
        await assert_alive(raw, server_errors)


async def test_list_cursor_past_the_largest_sequence(
    server: wsq.Server, server_errors: Any
) -> None:
    """The schema allows a 19-digit cursor; one beyond SQLite's 64-bit integers means
    "after every task", not an internal error."""
    async with RawClient(server.url) as raw:
        await add_inline_task(raw, "cur", b"x")
        for cursor in ("9223372036854775807", "9999999999999999999"):
            answer = await raw.request({"op": "list", "queue": "cur", "cursor": cursor})
            assert answer["op"] == "result", answer
            assert answer["result"] == {"tasks": [], "cursor": None}
        await assert_alive(raw, server_errors)


async def test_unknown_task_ids(server: wsq.Server, server_errors: Any) -> None:
    async with RawClient(server.url) as raw:
        for n, op in enumerate(["get", "remove", "retry"], start=20):
            answer = await send_bad(raw, {"op": op, "id": n, "task": "ghost"}, "not_found", n)
            assert "ghost" in answer["message"]
        await assert_alive(raw, server_errors)


# -- fuzz ------------------------------------------------------------------------------

TEMPLATES: list[dict[str, Any]] = [
    {"op": "queues", "id": 1},
    {"op": "list", "id": 1, "queue": "fz", "state": "waiting", "limit": 10, "cursor": "5"},
    {"op": "add", "id": 1, "queue": "fz", "data": {"a": [1, {"b": None}]}, "task": "t1"},
    {"op": "add", "id": 1, "queue": "fz", "options": {"timeout": 5, "retries": 1}},
    {"op": "add", "id": 1, "queue": "fz", "data": {"f": None}, "streams": [{"path": ["f"]}]},
    {"op": "get", "id": 1, "task": "t1"},
    {"op": "remove", "id": 1, "task": "t1"},
    {"op": "retry", "id": 1, "task": "t1"},
    {"op": "subscribe", "id": 1, "queue": "fz"},
    {"op": "unsubscribe", "id": 1, "queue": "fz"},
    {"op": "work", "id": 1, "queue": "fz-work", "concurrency": 2, "worker": "w1"},
    {"op": "stop", "id": 1, "worker": "w1"},
    {"op": "ack", "id": 1, "runs": [["t1", 1]]},
    {"op": "progress", "id": 1, "task": "t1", "run": 1, "progress": 0.5},
    {"op": "touch", "id": 1, "task": "t1", "run": 1},
    {"op": "complete", "id": 1, "task": "t1", "run": 1},
    {"op": "fail", "id": 1, "task": "t1", "run": 1, "error": "x"},
    {"op": "upload", "stream": 5},
    {"op": "upload_end", "stream": 5},
    {"op": "upload_abort", "stream": 5, "error": "x"},
    {"op": "download", "stream": 6, "task": "t1", "index": 0, "offset": 0},
    {"op": "credit", "stream": 6, "bytes": 100},
    {"op": "cancel", "stream": 6},
    {"op": "hello", "protocol": 1, "client": "x"},
]
_DEEP = "__deep__"


def _dicts(value: Any) -> list[dict[str, Any]]:
    """Every object inside ``value``, itself included."""
    found = [value] if isinstance(value, dict) else []
    children = value.values() if isinstance(value, dict) else value
    if isinstance(value, dict | list):
        for child in children:
            found += _dicts(child)
    return found


class Fuzzer:
    """Random mutations of valid messages, from a fixed seed."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.long_strings = 0

    def value(self) -> Any:
        rng = self.rng
        choices: list[Callable[[], Any]] = [
            lambda: None,
            lambda: rng.choice([True, False]),
            lambda: rng.choice([0, -1, 1, 2**31, 2**53 + 1, 2**63, 2**64, 10**30, -(10**30)]),
            lambda: rng.choice([0.5, -0.0, 1e308, -1e308, 1.5, 5e-324]),
            lambda: rng.choice(["", "x", "../x", "\x00", "é", "\ud800", "💥", "9" * 19]),
            lambda: self.text(rng.choice([100, 10_000])),
            lambda: rng.choice([[], {}, [[]], {"a": {}}, [1] * 1000, {"op": "queues"}]),
            lambda: _DEEP,
            lambda: self.message(depth=1),
        ]
        return rng.choice(choices)()

    def text(self, n: int) -> str:
        alphabet = 'ab\x00\n"\\é😀\u202e{}[],:'
        return "".join(self.rng.choice(alphabet) for _ in range(n))

    def message(self, depth: int = 0) -> Any:
        rng = self.rng
        message = json.loads(json.dumps(rng.choice(TEMPLATES)))
        if "id" in message:
            message["id"] = rng.randrange(1, 10**6)
        for _ in range(rng.randint(1, 3)):
            kind = rng.randrange(7)
            keys = list(message)
            if kind == 0 and keys:
                del message[rng.choice(keys)]
            elif kind in (1, 2) and keys and depth == 0:
                message[rng.choice(keys)] = self.value()
            elif kind == 3:
                message[rng.choice(["extra", "ID", "op ", "x" * 300])] = self.value()
            elif kind == 4:
                message["op"] = rng.choice([*(t["op"] for t in TEMPLATES), "", "bogus", 5])
            elif kind == 5 and "queue" in message:
                message["queue"] = rng.choice(["", "x" * 200, "a\x00b", "../../etc", "😀"])
            elif kind == 6 and depth == 0:
                inner = rng.choice(_dicts(message))
                inner[rng.choice([*inner, "extra"])] = self.value()
        return message

    def encode(self, message: Any) -> str:
        text = json.dumps(message)
        while f'"{_DEEP}"' in text:
            depth = self.rng.choice([10, 500, 10_000])
            text = text.replace(f'"{_DEEP}"', nested(depth), 1)
        return text

    def frame(self) -> str | bytes:
        rng = self.rng
        kind = rng.randrange(100)
        if kind < 45:
            return self.encode(self.message())
        if kind < 55:
            text = self.encode(self.message())
            return text[: rng.randrange(len(text) + 1)]
        if kind < 65:
            text = self.encode(self.message())
            cut = rng.randrange(len(text) + 1)
            return text[:cut] + rng.choice(["{", "]", '"', "\\", ",", "\x00", "é"]) + text[cut:]
        if kind < 75:
            return self.encode([self.message() for _ in range(rng.randint(1, 5))])
        if kind < 82:
            data = rng.randbytes(rng.randrange(0, 200))
            return data.decode("utf-8", "replace")
        if kind < 90:
            stream = rng.choice([5, 6, 0, 2**32 - 1])
            return rng.randbytes(rng.randrange(0, 8)) + (
                protocol.pack_chunk(stream, rng.randbytes(100)) if rng.random() < 0.5 else b""
            )
        if kind < 95:
            return nested(rng.choice([100, 1000, 10_000]))
        if self.long_strings < 10:
            self.long_strings += 1
            return json.dumps({"op": "queues", "id": 77, "pad": "y" * (protocol.MAX_MESSAGE + 10)})
        return json.dumps({"op": "add", "id": 78, "queue": "fz", "data": "z" * 20_000})


async def test_fuzz(server: wsq.Server, server_errors: Any) -> None:
    """2,000 mutated frames over one connection, never waiting on an answer; then the
    connection, the server and a fresh client must all still work."""
    fuzzer = Fuzzer(seed=20240601)
    frames = [fuzzer.frame() for _ in range(2000)]
    received: list[dict[str, Any]] = []
    final = 10**9
    async with RawClient(server.url) as raw:
        assert raw.ws is not None
        ws = raw.ws
        answered = asyncio.Event()

        async def read() -> None:
            with contextlib.suppress(ConnectionClosed):
                async for frame in ws:
                    if isinstance(frame, str):
                        decoded = json.loads(frame)
                        batch = decoded if isinstance(decoded, list) else [decoded]
                        received.extend(batch)
                        if any(m.get("id") == final and m["op"] == "result" for m in batch):
                            answered.set()

        async def send_all() -> None:
            for frame in frames:
                await ws.send(frame)
            await ws.send(json.dumps({"op": "queues", "id": final}))
            await answered.wait()

        reader = asyncio.create_task(read())
        sender = asyncio.create_task(send_all())
        # Stop at whichever comes first: the final answer, or the connection closing.
        await asyncio.wait({reader, sender}, timeout=budget(5), return_when="FIRST_COMPLETED")
        closed = ws.close_code
        if not answered.is_set():
            ws.transport.abort()  # a connection that stopped answering: don't wait on it
        for task in (sender, reader):
            task.cancel()
        await asyncio.gather(sender, reader, return_exceptions=True)
        assert closed is None, (
            f"the server closed the fuzz connection: {closed} {ws.close_reason!r}"
        )
        assert answered.is_set(), "no answer to the request after the fuzz"
        errors = [m for m in received if m.get("op") in ("error", "stream_error")]
        assert len(errors) > 500, f"only {len(errors)} errors for 2,000 mutated frames"
        for error in errors:
            assert error["code"] in ERROR_CODES | {"upload_failed"}, error
            assert isinstance(error["message"], str) and error["message"], error
    assert_no_server_errors(server_errors)
    async with wsq.Client(server.url, backoff=lambda tries: 0.05) as good:
        queue = good.queue("after-fuzz")
        task = await queue.add({"still": "works"})
        seen: list[Any] = []
        queue.process(lambda t: seen.append(t.data))
        await eventually(lambda: seen == [{"still": "works"}], timeout=5)
        [done] = await eventually(lambda: queue.completed(), timeout=5)
        assert done.id == task.id
    assert_no_server_errors(server_errors)
