"""The Python side's encoders and decoders, checked against the conformance vectors.

- The server's decoder (wsq.protocol.decode_frame) accepts every message the vectors send,
  except exactly those the vectors expect a ``bad_message`` for.
- The server's encoders (wsq.protocol.welcome/error/stream_error/pack_chunk) produce
  what the vectors expect.
- The Python client's decoder takes every message the vectors receive.
- The Python client's messages, recorded from a real session through a relay, have the
  shapes the vectors send (same ops, known fields, same JSON types) and decode on the
  server side.
- Together the vectors cover every op of docs/protocol.md and every error code the server
  can be made to send.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

import wsq
from tests.conftest import completed_count_is, eventually
from tests.vectors import runner
from wsq import protocol

VECTORS = runner.all_vectors()
PROTOCOL_MD = Path(__file__).parents[2] / "docs" / "protocol.md"
SERVER_OPS = {"welcome", "result", "error", "event", "offer", "abort", "credit", "end"}
SERVER_OPS |= {"stream_error"}
UNPROVOKABLE = {"internal", "upload_failed", "unavailable"}  # a server fault; a blob store failing
# to store; a blob store (S3) that cannot be reached (tests/integration/test_s3_storage.py)


def sends(vector: runner.Vector) -> list[tuple[int, str, Any]]:
    """(step index, connection, message) for every message the vector sends as JSON."""
    out = []
    for index, step in enumerate(vector.steps):
        if "send" in step:
            sent = step["send"]
            for message in sent if isinstance(sent, list) else [sent]:
                out.append((index, step.get("c", "a"), message))
    return out


def receives(vector: runner.Vector) -> list[Any]:
    out: list[Any] = []
    for step in vector.steps:
        if "recv" in step:
            out.append(step["recv"])
        out.extend(step.get("recv_unordered", []))
    return out


def sample(value: Any) -> Any:
    """A concrete message for a pattern: each placeholder replaced by a value of its kind."""
    if isinstance(value, str):
        kinds = {"$string": "x", "$int": 1, "$number": 1.5, "$any": None}
        if value in kinds:
            return kinds[value]
        # Names stand for ids; a cursor is a queue position, written as a number.
        return re.sub(r"\$\{([A-Za-z_0-9]+)\}", _sample_name, value)
    if isinstance(value, list):
        return [sample(v) for v in value]
    if isinstance(value, dict):
        return {k: sample(v) for k, v in value.items()}
    return value


def _sample_name(found: re.Match[str]) -> str:
    return "1" if found.group(1).startswith("cursor") else f"{found.group(1)}-sample"


def bad_answers(vector: runner.Vector) -> list[tuple[str, Any]]:
    """(connection, id) of every bad_message error the vector expects."""
    found = []
    for step in vector.steps:
        for message in [step.get("recv"), *step.get("recv_unordered", [])]:
            if isinstance(message, dict) and message.get("code") == "bad_message":
                found.append((step.get("c", "a"), message["id"]))
    return found


# -- the server's decoder ------------------------------------------------------------------


def test_the_server_decoder_refuses_exactly_what_the_vectors_call_bad() -> None:
    for vector in VECTORS:
        expected = bad_answers(vector)
        explained: list[tuple[str, Any]] = []
        greeted: set[str] = set()
        for _, connection, message in sends(vector):
            if connection not in greeted and message.get("op") != "hello":
                explained.append((connection, message.get("id")))  # §4.1: hello first
            greeted.add(connection)
            decoded = protocol.decode_frame(json.dumps(sample(message)))
            if any(isinstance(d, protocol.BadMessage) for d in decoded):
                key = (connection, message.get("id"))
                assert key in expected, f"{vector.name}: {message} decodes as bad"
                explained.append(key)
            elif message.get("op") == "hello" and "id" in message:
                explained.append((connection, message["id"]))  # refused: not first
        for step in vector.steps:
            connection = step.get("c", "a")
            if "send_raw" in step:
                decoded = protocol.decode_frame(step["send_raw"])
                assert any(isinstance(d, protocol.BadMessage) for d in decoded), step
                explained.append((connection, None))
            if "hex" in step.get("send_binary", {}):
                explained.append((connection, None))
        unexplained = [item for item in expected if item not in explained]
        assert not unexplained, f"{vector.name}: bad_message for {unexplained} unexplained"


def test_every_client_op_of_the_protocol_is_in_a_vector() -> None:
    documented = set(re.findall(r'"op": "([a-z_]+)"', PROTOCOL_MD.read_text()))
    documented |= set(re.findall(r"\*\*`([a-z_]+)`\*\*", PROTOCOL_MD.read_text()))
    decoder_ops = {
        cls.__struct_config__.tag
        for cls in protocol.ClientMessage.__args__  # type: ignore[attr-defined]
    }
    sent = {m["op"] for v in VECTORS for _, _, m in sends(v) if isinstance(m, dict)}
    assert decoder_ops <= sent, decoder_ops - sent
    received = {m["op"] for v in VECTORS for m in receives(v)}
    assert received == SERVER_OPS, SERVER_OPS ^ received
    assert (documented - SERVER_OPS) <= decoder_ops, documented - SERVER_OPS - decoder_ops


def test_every_error_code_the_server_can_send_is_in_a_vector() -> None:
    section = PROTOCOL_MD.read_text().split("## 7. Errors")[1].split("## 8.")[0]
    codes = set(re.findall(r"^\| `([a-z_]+)` \|", section, re.MULTILINE))
    seen = {m["code"] for v in VECTORS for m in receives(v) if m["op"] in ("error", "stream_error")}
    assert codes - UNPROVOKABLE <= seen, codes - UNPROVOKABLE - seen
    assert seen <= codes, seen - codes


# -- the server's encoders -----------------------------------------------------------------


def test_the_server_encoders_make_what_the_vectors_expect() -> None:
    for vector in VECTORS:
        for expected in receives(vector):
            concrete = sample(expected)
            made: bytes | None = None
            if expected["op"] == "error":
                made = protocol.error(concrete["id"], concrete["code"], concrete["message"])
            elif expected["op"] == "stream_error":
                made = protocol.stream_error(
                    concrete["stream"], concrete["code"], concrete["message"]
                )
            elif expected["op"] == "result":
                made = protocol.result(concrete["id"], concrete["result"])
            elif expected["op"] == "welcome":
                limits = concrete["limits"]
                made = protocol.welcome(
                    "c1",
                    "wsq/x",
                    5.0,
                    limits["max_message"],
                    node="n1",
                    scope=concrete.get("scope"),
                )
            if made is not None:
                runner.match(expected, json.loads(made), {})


def test_binary_frames_pack_and_unpack_as_the_vectors_write_them() -> None:
    frames = [
        s.get("send_binary") or s.get("recv_binary")
        for v in VECTORS
        for s in v.steps
        if "send_binary" in s or "recv_binary" in s
    ]
    assert frames
    for spec in frames:
        frame = runner.binary_frame(spec)
        if "hex" in spec:
            try:
                protocol.unpack_chunk(frame)
            except ValueError:
                continue
            raise AssertionError(f"{spec} should not unpack")
        payload = base64.b64decode(spec["base64"])
        assert protocol.pack_chunk(spec["stream"], payload) == frame
        stream, view = protocol.unpack_chunk(frame)
        assert (stream, bytes(view)) == (spec["stream"], payload)


# -- the Python client's decoder -----------------------------------------------------------


async def test_the_python_client_takes_every_message_the_vectors_receive() -> None:
    client = wsq.Client("ws://127.0.0.1:1")  # never connected: messages are fed in
    heard: list[tuple[str, str]] = []
    errors: list[BaseException] = []
    client.on("error", errors.append)
    for name in ("task added", "task queued", "task started", "task progress"):
        client.on(name, lambda task, *extra, name=name: heard.append((name, task.id)))
    for name in ("task completed", "task failed", "task deleted"):
        client.on(name, lambda task, *extra, name=name: heard.append((name, task.id)))
    for name in ("worker added", "worker removed", "worker started"):
        client.on(name, lambda worker, *extra, name=name: heard.append((name, worker["id"])))
    events = 0
    for vector in VECTORS:
        for expected in receives(vector):
            message = sample(expected)
            if message["op"] == "welcome":
                continue  # read by the handshake, not the receive loop
            assert message["op"] in client._receivers, message["op"]
            client._receive(message)
            if message["op"] == "event":
                events += 1
                first = message["args"][0]
                assert heard[-1] == (message["event"], first["id"])
    assert events == len(heard) > 0
    await asyncio.sleep(0)


# -- the Python client's encoders ----------------------------------------------------------


async def relay(target: str, record: list[str]) -> AsyncIterator[str]:
    """A WebSocket relay (the websockets package) that records client text frames."""

    async def handle(downstream: ServerConnection) -> None:
        async with connect(target, max_size=None, compression=None) as upstream:

            async def up() -> None:
                async for frame in downstream:
                    if isinstance(frame, str):
                        record.append(frame)
                    await upstream.send(frame)

            async def down() -> None:
                async for frame in upstream:
                    await downstream.send(frame)

            tasks = [asyncio.ensure_future(up()), asyncio.ensure_future(down())]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async with serve(handle, "127.0.0.1", 0, max_size=None, compression=None) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}"


def shapes() -> dict[str, dict[str, set[str]]]:
    """op -> field -> JSON kinds, over every message the vectors send (good ones)."""
    out: dict[str, dict[str, set[str]]] = {}
    for vector in VECTORS:
        bad = bad_answers(vector)
        for _, connection, message in sends(vector):
            if (connection, message.get("id")) in bad:
                continue
            fields = out.setdefault(message["op"], {})
            for key, value in message.items():
                fields.setdefault(key, set()).add(_kind(value))
    return out


def _kind(value: Any) -> str:
    if isinstance(value, str) and value.startswith("$"):
        return "any"
    if isinstance(value, bool) or value is None:
        return type(value).__name__
    if isinstance(value, int | float):
        return "number"
    return type(value).__name__


async def test_the_python_client_sends_what_the_vectors_send(server: wsq.Server) -> None:
    record: list[str] = []
    async for url in relay(server.url, record):
        await python_client_session(url)
        break
    messages = [m for frame in record for m in _messages(frame)]
    known = shapes()
    ops = set()
    for message in messages:
        op = message["op"]
        ops.add(op)
        assert op in known, f"the vectors never send {op}"
        for key, value in message.items():
            assert key in known[op], f"{op}.{key} is in no vector"
            kinds = known[op][key]
            assert "any" in kinds or _kind(value) in kinds, (op, key, value, kinds)
        decoded = protocol.decode_frame(json.dumps(message))
        assert not isinstance(decoded[0], protocol.BadMessage), (message, decoded)
    expected = {"hello", "add", "add_many", "list", "queues", "stats", "workers", "history"}
    expected |= {"get", "remove", "retry", "subscribe", "work", "stop", "ack", "progress", "touch"}
    expected |= {"complete_many", "fail", "upload", "upload_end", "download", "credit"}
    expected |= {"attempts"}
    assert expected <= ops, expected - ops


def _messages(frame: str) -> list[dict[str, Any]]:
    decoded = msgspec.json.decode(frame)
    return decoded if isinstance(decoded, list) else [decoded]


async def python_client_session(url: str) -> None:
    """Every kind of call the Python client makes, once."""
    async with wsq.Client(url, backoff=lambda tries: 0.05) as client:
        queue = client.queue("codec")
        big = b"z" * (5 << 20)  # over half a window: the reader grants credit
        task = await queue.add({"big": big, "small": b"s", "n": 1}, timeout=5, retries=1)
        await queue.add_many([{"n": 2}, {"n": 3}])
        assert len(await queue.all()) == 3
        await client.list_queues()
        await client.stats()
        await client.workers()
        await client.workers("codec")
        await client.history("codec")
        await client.history("codec", since=1)
        data = await task.get_data()
        assert await data["big"].read() == big
        assert await task.attempts() == []
        seen: list[str] = []
        task.on("completed", lambda t: seen.append(t.id))

        async def handler(t: wsq.Task) -> None:
            await t.update_progress(0.5)
            await t.touch()

        worker = queue.process(handler, concurrency=2)
        await eventually(lambda: completed_count_is(queue, 3))
        await worker.stop()
        failing = await queue.add({"n": 4})
        stubborn = queue.process(lambda t: (_ for _ in ()).throw(RuntimeError("no")))
        await eventually(lambda: queue.failed())
        await stubborn.stop()
        await failing.retry()
        await failing.remove()
