"""Property-based fuzzing of a live server: Hypothesis makes protocol traffic, valid and
broken, and a real server must answer it the way docs/protocol.md says.

Each example opens a fresh connection, sends a few generated frames (messages of every
client op, broken variants of them, batches mixing both, invalid JSON, binary stream
frames) and then ``{"op": "queues"}``, and checks:

* no hang: that last request, and every request the server owes an answer, is answered
  within a bounded time, on the same connection (it was not dropped);
* every message with a readable, well-formed request id gets exactly one answer with that
  id: a result, or an error with a code the op may give (a broken message: an error,
  ``bad_message`` unless stated otherwise);
* messages without a readable id get their error with ``"id": null``: at least one for
  each that is surely bad, and no more than could be due;
* every error code is one of docs/protocol.md §7 (and never ``internal``);
* the few inputs the protocol answers by closing the connection (a frame over the
  WebSocket limit, text that is not UTF-8) close it with the documented code;
* a bystander connection, open for the whole run, still answers after every example;
* the server logs no ERROR.

After the run, nothing of the closed connections is left on the server (connections,
subscribers, workers, Connection objects, asyncio tasks, open files, blobs no task
holds), objects of the server's kinds did not pile up, the process RSS grew less than a
bound, and the bystander still gets a task offered, completes it, and sees its event.

One server (started like the ``server`` fixture's) and the bystander live for the whole
run, on an event loop the test drives itself: each example runs to its end on it, and
Hypothesis draws the next one while the loop is idle. (Hypothesis must not draw while
other code uses the ``random`` module, as the server's heartbeat pings do.)

Server bugs this fuzzing found (all fixed) have their own regression tests below.

In CI it runs a fixed set of examples (``derandomize``). ``scripts/fuzz`` runs a longer
fuzz with fresh random examples: it sets ``WSQ_FUZZ_EXAMPLES`` to the number wanted.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

import wsq
from tests.conftest import budget, eventually
from tests.integration.rawclient import RawClient
from tests.integration.test_bad_input import (
    assert_no_server_errors,
    server_errors,  # noqa: F401  (autouse fixture: collects the server's ERROR records)
)
from wsq import protocol
from wsq.blobs.base import OWNER_MARK
from wsq.server.connection import Connection

# -- what the protocol document says ---------------------------------------------------------

_DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def _documented_error_codes() -> frozenset[str]:
    """The codes in the table of docs/protocol.md §7."""
    text = _DOC.read_text(encoding="utf-8")
    section = text.split("## 7. Errors", 1)[1].split("\n## ", 1)[0]
    codes = frozenset(re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.MULTILINE))
    assert {"bad_message", "not_found", "stale_run"} <= codes, "§7 table not found"
    return codes


DOCUMENTED_CODES = _documented_error_codes()
# `internal` is a server fault; without an auth file nobody is unauthorized or forbidden.
ALLOWED_CODES = DOCUMENTED_CODES - {"internal", "unauthorized", "forbidden"}
# The WebSocket hard limit the server sets (§3): a larger frame closes with 1009.
HARD_LIMIT = protocol.MAX_MESSAGE * 4 + protocol.CHUNK

# -- settings --------------------------------------------------------------------------------

_LONG_RUN = os.environ.get("WSQ_FUZZ_EXAMPLES")
FUZZ_SETTINGS = settings(
    max_examples=int(_LONG_RUN) if _LONG_RUN else 300,
    derandomize=not _LONG_RUN,  # CI: the same examples every time
    deadline=None,
    database=None,
    print_blob=True,
    report_multiple_bugs=False,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)
EXAMPLE_TIMEOUT = 30.0  # seconds one example may take, all included (scaled by budget)
ANSWER_TIMEOUT = 5.0  # seconds for the answers owed after the last frame (scaled)
# Memory, from the end of the warm-up (WARM_UP examples) to the end of the run: objects
# of the server's kinds (its own, the WebSocket layers', asyncio's, sqlite3's...) may grow
# by this many at most; the process RSS by the fixed part plus the part per example that
# Hypothesis keeps for itself (about 90 objects of bookkeeping per example run).
WARM_UP = 20
SERVER_OBJECT_GROWTH = 300
RSS_GROWTH = 64 << 20
RSS_GROWTH_PER_EXAMPLE = 48 << 10
SERVER_MODULES = ("wsq", "picows", "websockets", "asyncio", "_asyncio", "sqlite3", "socket")
CORE_STATE = ("wsq.core.task.",)  # the tasks the core holds: state, not leftovers

# -- the small worlds messages are drawn from ------------------------------------------------

QUEUES = ["fz", "fz-work", "队列 😀", "a b", "../x"]
# Each pooled task id lives in one queue (an add of it elsewhere is an invalid_argument).
TASK_HOMES = {"t0": "fz", "t1": "fz", "t2": "fz-work", "t.3": "队列 😀", "ghost": "a b"}
TASK_IDS = list(TASK_HOMES)
WORKER_IDS = ["w0", "w1", "w2"]
UPLOAD_STREAMS = [1, 2, 3]
DOWNLOAD_STREAMS = [1, 2, 3, 7]  # sharing ids with uploads on purpose
STRAY_STREAMS = [0, 99, 12345, 2**32 - 1]
BYSTANDER_QUEUE = "bystander"
BYSTANDER_WORKER = "bystander-w"
FINAL_ID = 10**9
SYNC_ID = FINAL_ID + 1

queue_names = st.sampled_from(QUEUES)
task_ids = st.sampled_from(TASK_IDS)
worker_ids = st.sampled_from(WORKER_IDS)
runs = st.integers(0, 3)
small_text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=6)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | small_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(small_text, inner, max_size=3),
    max_leaves=6,
)
options = st.fixed_dictionaries(
    {},
    optional={
        "timeout": st.sampled_from([0.1, 0.5, 5, 60, -1]),
        "retries": st.sampled_from([-1, 0, 1, 2]),
        "autoremove": st.booleans(),
    },
)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# -- what the server owes --------------------------------------------------------------------


class Owed:
    """What the server owes for one message (or one frame that is not a message).

    ``rid``: the request id to be answered, if the message carries a readable, valid one;
    its answer may be a result if ``result``, or an error with one of ``codes``. ``must``
    is False for an answer that may legitimately never come while the connection lives.
    ``anon``: how many errors without a request id (``"id": null``) it owes, at least and
    at most.
    """

    __slots__ = ("anon", "codes", "message", "must", "result", "rid", "valid")

    def __init__(
        self,
        message: Any,
        rid: int | None = None,
        *,
        result: bool = False,
        codes: frozenset[str] = frozenset(),
        anon: tuple[int, int] = (0, 0),
        must: bool = True,
        valid: bool = False,
    ) -> None:
        self.message = message
        self.valid = valid
        self.rid = rid
        self.result = result
        self.codes = codes
        self.anon = anon
        self.must = must


BAD = frozenset({"bad_message"})


class Wait:
    """Not a frame: the sender pauses until request ``rid`` is answered, or until task
    ``task`` was offered on the connection, for at most ``seconds``, so that what
    follows can meet a task or a run that exists. Never a failure by itself."""

    def __init__(
        self, rid: int | None = None, *, task: str | None = None, seconds: float = 0.3
    ) -> None:
        self.rid = rid
        self.task = task
        self.seconds = seconds

    def __repr__(self) -> str:
        return f"Wait(offer of {self.task})" if self.rid is None else f"Wait(answer to {self.rid})"


Frame = str | bytes | Wait


class Builder:
    """Draws the frames of one example, numbering request ids and following which upload
    streams are open, so that it knows what every message is owed."""

    def __init__(self, draw: Callable[[Any], Any]) -> None:
        self.draw = draw
        self.frames: list[Frame] = []
        self.owed: list[Owed] = []
        self.echo_ids: set[int] = set()  # ids out of range: an error may echo them
        self._next_id = 1
        self.uploads: dict[int, str] = {}  # stream -> "open" | "ended", as far as we know

    def rid(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def text(self, value: Any, owed: list[Owed]) -> None:
        self.frames.append(value if isinstance(value, str) else json.dumps(value))
        self.owed += owed

    # -- the model of upload streams (§8.2) --

    def follow(self, message: dict[str, Any]) -> None:
        """Update the upload model for a valid message the server will apply."""
        op, stream = message["op"], message.get("stream")
        if op == "upload" and stream not in self.uploads:
            self.uploads[stream] = "open"
        elif op == "upload_end" and self.uploads.get(stream) == "open":
            self.uploads[stream] = "ended"
        elif op == "upload_abort":
            self.uploads.pop(stream, None)
        elif op == "add":
            for ref in message.get("streams", []):
                if "upload" in ref:
                    self.uploads.pop(ref["upload"], None)

    def upload_refs_ended(self, message: dict[str, Any]) -> bool:
        refs = [ref["upload"] for ref in message.get("streams", []) if "upload" in ref]
        return all(self.uploads.get(stream) == "ended" for stream in refs)


# -- valid messages of every client op (hello excluded: the connection greeted already) ------


def _stream_refs(b: Builder, paths: list[str], inline_only: bool) -> list[dict[str, Any]]:
    refs = []
    for path in paths:
        if inline_only or b.draw(st.booleans()):
            refs.append({"path": [path], "inline": b64(b.draw(st.binary(max_size=16)))})
        else:
            refs.append({"path": [path], "upload": b.draw(st.sampled_from(UPLOAD_STREAMS))})
    return refs


def _task_fields(b: Builder, inline_only: bool) -> dict[str, Any]:
    """The ``data``, ``streams``, ``options`` and ``task`` of an add (or add_many item)."""
    d = b.draw
    fields: dict[str, Any] = {}
    paths = d(st.lists(st.sampled_from(["f", "g"]), max_size=2, unique=True))
    if paths:
        fields["data"] = {**dict.fromkeys(paths), "n": d(st.integers(0, 9))}
        fields["streams"] = _stream_refs(b, paths, inline_only)
    elif d(st.booleans()):
        fields["data"] = d(json_values)
    if d(st.booleans()):
        fields["options"] = d(options)
    if d(st.integers(0, 4)):  # mostly ids from the pool: they repeat, and the store stays small
        fields["task"] = d(task_ids)
    return fields


def _maybe_id(b: Builder, message: dict[str, Any]) -> dict[str, Any]:
    """Reports and acks may carry an id to get an answer."""
    if b.draw(st.booleans()):
        message["id"] = b.rid()
    return message


def _report(b: Builder, op: str) -> dict[str, Any]:
    message: dict[str, Any] = {"op": op, "task": b.draw(task_ids), "run": b.draw(runs)}
    if op == "progress":
        message["progress"] = b.draw(st.floats(0, 1))
    if op == "fail" and b.draw(st.booleans()):
        message["error"] = b.draw(small_text)
    return _maybe_id(b, message)


def _run_refs(b: Builder, min_size: int) -> list[list[Any]]:
    pairs = b.draw(st.lists(st.tuples(task_ids, runs), min_size=min_size, max_size=3))
    return [list(pair) for pair in pairs]


def _optional(b: Builder, message: dict[str, Any], **fields: st.SearchStrategy[Any]) -> None:
    for name, strategy in fields.items():
        if b.draw(st.booleans()):
            message[name] = b.draw(strategy)


def _make(b: Builder, op: str) -> dict[str, Any]:  # noqa: C901  (one branch per op)
    """A valid message of ``op``; request ids are fresh."""
    d = b.draw
    m: dict[str, Any] = {"op": op}
    if op == "add":
        m |= {"id": b.rid(), "queue": d(queue_names), **_task_fields(b, inline_only=False)}
        if "task" in m and d(st.integers(0, 4)):  # mostly to the task's own queue
            m["queue"] = TASK_HOMES[m["task"]]
    elif op == "add_many":
        m |= {"id": b.rid(), "queue": d(queue_names)}
        m["tasks"] = [_task_fields(b, inline_only=True) for _ in range(d(st.integers(1, 3)))]
    elif op == "list":
        m["id"] = b.rid()
        _optional(
            b,
            m,
            queue=queue_names,
            state=st.sampled_from(["waiting", "active", "completed", "failed"]),
            limit=st.integers(1, 20),
            cursor=st.integers(0, 10**19 - 1).map(str),
        )
    elif op in ("queues", "stats", "ping", "subscribe", "unsubscribe"):
        m["id"] = b.rid()
        if op in ("subscribe", "unsubscribe") and d(st.booleans()):
            m["queue"] = d(st.none() | queue_names)
    elif op in ("get", "remove", "retry"):
        m |= {"id": b.rid(), "task": d(task_ids)}
    elif op == "work":
        m |= {"id": b.rid(), "queue": d(queue_names)}
        _optional(b, m, concurrency=st.integers(1, 3), worker=worker_ids)
    elif op == "stop":
        m |= {"id": b.rid(), "worker": d(worker_ids)}
    elif op == "ack":
        m = _maybe_id(b, {"op": op, "runs": _run_refs(b, 0)})
    elif op in ("complete_many", "release"):
        m = _maybe_id(b, {"op": op, "runs": _run_refs(b, 1)})
    elif op in ("progress", "touch", "complete", "fail"):
        m = _report(b, op)
    elif op in ("upload", "upload_end", "upload_abort"):
        m["stream"] = d(st.sampled_from(UPLOAD_STREAMS))
        if op == "upload_abort":
            _optional(b, m, error=small_text)
    elif op == "download":
        m |= {"stream": d(st.sampled_from(DOWNLOAD_STREAMS)), "task": d(task_ids)}
        m["index"] = d(st.integers(0, 1))
        _optional(b, m, offset=st.integers(0, 4))
    elif op == "credit":
        m |= {"stream": d(st.sampled_from(DOWNLOAD_STREAMS)), "bytes": d(st.integers(1, 1000))}
    elif op == "cancel":
        m["stream"] = d(st.sampled_from(DOWNLOAD_STREAMS))
    else:  # pragma: no cover
        raise AssertionError(op)
    return m


CLIENT_OPS = [
    "add",
    "add_many",
    "list",
    "queues",
    "get",
    "remove",
    "retry",
    "subscribe",
    "unsubscribe",
    "work",
    "stop",
    "ack",
    "progress",
    "touch",
    "complete",
    "complete_many",
    "fail",
    "upload",
    "upload_end",
    "upload_abort",
    "download",
    "credit",
    "cancel",
    "stats",
    "ping",
]
# Error codes a valid message of each op may get as its answer (§4, §7). Ops not listed
# must succeed.
VALID_CODES: dict[str, frozenset[str]] = {
    "add": frozenset({"invalid_argument", "upload_failed"}),
    "add_many": frozenset({"invalid_argument"}),
    "get": frozenset({"not_found"}),
    "remove": frozenset({"not_found"}),
    "retry": frozenset({"not_found", "invalid_state"}),
    "work": frozenset({"invalid_argument"}),
    "stop": frozenset({"invalid_argument"}),
    "progress": frozenset({"stale_run"}),
    "touch": frozenset({"stale_run"}),
    "complete": frozenset({"stale_run"}),
    "fail": frozenset({"stale_run"}),
}
# Valid messages without an id that may get an error with id null: a stale report, a
# stream id already in use, an upload_end for a stream that is not open.
MAY_ERR_WITHOUT_ID = {"progress", "touch", "complete", "fail", "upload", "upload_end", "download"}


def owed_for_valid(b: Builder, message: dict[str, Any]) -> Owed:
    """What a valid message is owed. Call before :meth:`Builder.follow`."""
    op = message["op"]
    codes = VALID_CODES.get(op, frozenset())
    if "id" in message:
        # An add waits for its uploads to end; one whose upload has not ended (and may
        # never, in this example) is owed an answer only if it comes.
        must = op != "add" or b.upload_refs_ended(message)
        return Owed(message, message["id"], result=True, codes=codes, must=must, valid=True)
    return Owed(message, anon=(0, 1 if op in MAY_ERR_WITHOUT_ID else 0), valid=True)


def valid(b: Builder, op: str | None = None) -> tuple[dict[str, Any], Owed]:
    message = _make(b, op or b.draw(st.sampled_from(CLIENT_OPS)))
    owed = owed_for_valid(b, message)
    b.follow(message)
    return message, owed


# -- broken variants -------------------------------------------------------------------------

FIELD_KINDS = {
    **dict.fromkeys(["queue", "task", "worker", "error", "cursor", "state"], "str"),
    **dict.fromkeys(["limit", "concurrency", "run", "stream", "index", "offset", "bytes"], "int"),
    "progress": "float",
    **dict.fromkeys(["runs", "streams", "tasks"], "list"),
    "options": "object",
}
WRONG_TYPES: dict[str, list[Any]] = {
    "str": [5, True, [1], {"a": 1}],  # not None: some string fields are nullable
    "int": ["5", 1.5, True, None, [1], {"a": 1}],
    "float": ["0.5", True, None, [0.5], {}],
    "list": ["x", 5, True, None, {"a": 1}],
    "object": ["x", 5, True, None, [1]],
}
OUT_OF_RANGE: dict[str, list[Any]] = {
    "queue": ["", "x" * 200, "a\x00b", "a\nb", "del\x7f"],
    "task": ["", "../x", "x" * 65, "a b", "é", "a/b"],
    "worker": ["", "../w", "w" * 65, "w w"],
    "cursor": ["", "abc", "1" * 20, "-1"],
    "state": ["bogus", "WAITING"],
    "error": ["e" * 65_537],
    "limit": [0, -1, 10_001],
    "concurrency": [0, -3, 10_001],
    "stream": [-1, 2**32],
    "index": [-1],
    "offset": [-1],
    "bytes": [0, 2**30 + 1],
    "progress": [-0.1, 1.5, 1e300],
    "runs": [[["t0", -1]], [["../x", 1]], [["t0"]]],
}
UNKNOWN_FIELDS = ["extra", "ID", "Op", "op ", "priority", "x" * 40]
UNKNOWN_OPS = ["bogus", "", "welcome", "result", "offer", "abort", "ADD", "queues ", 5, None, []]
BAD_IDS = ["7", 7.5, 7.0, True, None, [7], {"n": 7}, -1, 2**53 + 1, 10**30]
BREAKAGES = [
    "unknown_field",
    "wrong_type",
    "missing",
    "out_of_range",
    "unknown_op",
    "bad_id",
    "nested_unknown",
    "bad_option",
    "bad_stream",
    "hello",
]
OPTIONAL_ID = {
    "ack",
    "progress",
    "touch",
    "complete",
    "complete_many",
    "release",
    "fail",
}  # null is fine
REQUIRED: dict[str, list[str]] = {
    "add": ["id", "queue"],
    "add_many": ["id", "queue", "tasks"],
    "list": ["id"],
    "queues": ["id"],
    "get": ["id", "task"],
    "remove": ["id", "task"],
    "retry": ["id", "task"],
    "subscribe": ["id"],
    "unsubscribe": ["id"],
    "work": ["id", "queue"],
    "stop": ["id", "worker"],
    "ack": ["runs"],
    "progress": ["task", "run", "progress"],
    "touch": ["task", "run"],
    "complete": ["task", "run"],
    "complete_many": ["runs"],
    "release": ["runs"],
    "fail": ["task", "run"],
    "upload": ["stream"],
    "upload_end": ["stream"],
    "upload_abort": ["stream"],
    "download": ["stream", "task", "index"],
    "credit": ["stream", "bytes"],
    "cancel": ["stream"],
    "stats": ["id"],
    "ping": ["id"],
}


def _pick(b: Builder, choices: list[Any]) -> Any:
    return b.draw(st.sampled_from(choices))


def _nested_unknown_field(b: Builder, m: dict[str, Any]) -> bool:
    """An unknown field inside options, a stream ref or an add_many item."""
    homes = []
    if isinstance(m.get("options"), dict):
        homes.append(m["options"])
    homes += m.get("streams", [])
    homes += m.get("tasks", [])
    if not homes:
        return False
    _pick(b, homes)[_pick(b, ["delay", "blob", "key", "x"])] = b.draw(json_values)
    return True


def _bad_option(b: Builder, m: dict[str, Any]) -> frozenset[str] | None:
    """An option out of range; a negative timeout is an invalid_argument (§4.3, §7)."""
    if m["op"] not in ("add", "add_many"):
        return None
    home = m if m["op"] == "add" else _pick(b, m["tasks"])
    name, value = _pick(
        b,
        # Under the server's floor (--min-task-timeout, 0.1 s) too.
        [
            ("timeout", -5),
            ("timeout", -0.5),
            ("timeout", 0.05),
            ("retries", -2),
            ("retries", 2**31),
        ],
    )
    home["options"] = {**home.get("options", {}), name: value}
    return frozenset({"invalid_argument"}) if name == "timeout" else BAD


def _bad_stream_ref(b: Builder, m: dict[str, Any]) -> bool:
    refs = m.get("streams") or [r for t in m.get("tasks", []) for r in t.get("streams", [])]
    if not refs:
        return False
    ref = _pick(b, refs)
    ref.clear()
    ref |= _pick(
        b,
        [
            {"path": [-1], "inline": ""},
            {"path": "f", "inline": ""},
            {"path": ["f"], "inline": "!!not base64!!"},
            {"path": ["f"], "upload": -1},
            {"path": ["a"] * 65, "inline": ""},
        ],
    )
    return True


def broken(b: Builder) -> tuple[dict[str, Any], Owed]:
    """A message of a client op, broken one way. Nothing in it is applied."""
    m = _make(b, b.draw(st.sampled_from(CLIENT_OPS)))
    kind = b.draw(st.sampled_from(BREAKAGES))
    codes = BAD
    fields = [f for f in m if f in FIELD_KINDS]
    if kind == "wrong_type" and fields:
        field = _pick(b, fields)
        m[field] = _pick(b, WRONG_TYPES[FIELD_KINDS[field]])
    elif kind == "out_of_range" and any(f in OUT_OF_RANGE for f in m):
        field = _pick(b, [f for f in m if f in OUT_OF_RANGE])
        m[field] = _pick(b, OUT_OF_RANGE[field])
    elif kind == "missing":
        del m[_pick(b, ["op", *REQUIRED[m["op"]]])]
    elif kind == "unknown_op":
        m["op"] = _pick(b, UNKNOWN_OPS)
    elif kind == "bad_id":
        # For ops without an id field, also an unknown field.
        m["id"] = _pick(b, [i for i in BAD_IDS if i is not None or m["op"] not in OPTIONAL_ID])
        if isinstance(m["id"], int) and not isinstance(m["id"], bool):
            b.echo_ids.add(m["id"])
    elif kind == "nested_unknown" and _nested_unknown_field(b, m):
        pass
    elif kind == "bad_option" and (bad := _bad_option(b, m)) is not None:
        codes = bad
    elif kind == "bad_stream" and _bad_stream_ref(b, m):
        pass
    elif kind == "hello":  # a second hello (§7): bad_message, whatever it says
        m = {"op": "hello", "protocol": _pick(b, [1, 2]), "client": "again"}
    else:
        m[_pick(b, UNKNOWN_FIELDS)] = b.draw(json_values)
    rid = m.get("id")
    if isinstance(rid, int) and not isinstance(rid, bool) and rid not in b.echo_ids:
        return m, Owed(m, rid, codes=codes)
    return m, Owed(m, anon=(1, 1))


# -- frames ----------------------------------------------------------------------------------

NOT_JSON = ["{not json", "hello", "{", "[", '{"op":"queues",}', "\x00", "", "   ", "NaN", "'x'"]
NOT_MESSAGES = ["42", '"queues"', "null", "true", "-1.5e3", "[]", "{}"]


def frame_valid(b: Builder) -> None:
    message, owed = valid(b)
    b.text(message, [owed])


def frame_broken(b: Builder) -> None:
    message, owed = broken(b)
    b.text(message, [owed])


def frame_batch(b: Builder) -> None:
    """An array mixing valid messages, broken ones and values that are not messages;
    each is handled as if it came alone (§2)."""
    items: list[Any] = []
    owed: list[Owed] = []
    for kind in b.draw(st.lists(st.sampled_from(["valid", "broken", "value"]), max_size=4)):
        if kind == "valid":
            message, one = valid(b)
        elif kind == "broken":
            message, one = broken(b)
        else:
            message = _pick(b, [1, "x", None, True, [], [{"op": "queues", "id": 1}]])
            one = Owed(message, anon=(1, 1))
        items.append(message)
        owed.append(one)
    if not items:  # an empty batch is one bad_message
        owed.append(Owed([], anon=(1, 1)))
    b.text(items, owed)


def frame_not_json(b: Builder) -> None:
    """Text that is not JSON: fixed bad texts, a valid message cut short, random text."""
    kind = b.draw(st.sampled_from(["fixed", "cut", "random"]))
    if kind == "fixed":
        text = _pick(b, NOT_JSON)
    elif kind == "cut":
        message = json.dumps(_make(b, b.draw(st.sampled_from(CLIENT_OPS))))
        text = message[: b.draw(st.integers(0, len(message) - 1))]
    else:
        text = b.draw(st.text(st.sampled_from('{}[]",:0 aé\\'), max_size=12).filter(_not_json))
    b.text(text, [Owed(text, anon=(1, 1))])


def _not_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return True
    return False


def frame_not_message(b: Builder) -> None:
    text = _pick(b, NOT_MESSAGES)
    b.text(text, [Owed(text, anon=(1, 1))])


def frame_binary(b: Builder) -> None:
    """A binary frame: shorter than its 4-byte header (bad_message), for a stream that is
    not open (ignored, §8.2), or a small chunk for an upload that may be open."""
    kind = b.draw(st.sampled_from(["short", "stray", "upload"]))
    if kind == "short":
        frame = b.draw(st.binary(max_size=protocol.HEADER_SIZE - 1))
        b.frames.append(frame)
        b.owed.append(Owed(frame, anon=(1, 1)))
        return
    streams = STRAY_STREAMS if kind == "stray" else UPLOAD_STREAMS
    payload = b.draw(st.binary(max_size=64))
    b.frames.append(protocol.pack_chunk(_pick(b, streams), payload))


def frame_upload_flow(b: Builder) -> None:
    """A whole upload, as a client does it: open, chunks, end, then an add naming it."""
    stream = _pick(b, UPLOAD_STREAMS)
    for op in ("upload", "chunks", "upload_end"):
        if op == "chunks":
            for payload in b.draw(st.lists(st.binary(min_size=1, max_size=64), max_size=2)):
                b.frames.append(protocol.pack_chunk(stream, payload))
            continue
        message = {"op": op, "stream": stream}
        owed = owed_for_valid(b, message)
        b.follow(message)
        b.text(message, [owed])
    task = b.draw(task_ids)
    fresh = b.draw(st.booleans())
    if fresh:  # remove the task first, so that this add makes it anew
        _send_valid(b, {"op": "remove", "id": b.rid(), "task": task}, wait=True)
    add = {
        "op": "add",
        "id": b.rid(),
        "queue": TASK_HOMES[task],
        "data": {"f": None},
        "streams": [{"path": ["f"], "upload": stream}],
        "task": task,
    }
    _send_valid(b, add, wait=fresh)
    if fresh:  # and read it back
        _send_valid(b, {**_make(b, "download"), "task": task, "index": 0})


def _send_valid(b: Builder, message: dict[str, Any], wait: bool = False) -> None:
    """Send a valid message; with ``wait``, hold what follows until it is answered."""
    b.text(message, [owed_for_valid(b, message)])
    b.follow(message)
    if wait:
        b.frames.append(Wait(message["id"], seconds=ANSWER_TIMEOUT))


def frame_work_flow(b: Builder) -> None:
    """A worker and a task for it, then reports and requests about that task, sent once
    it was offered (so that they may name its real run)."""
    task = b.draw(task_ids)
    _send_valid(b, {"op": "remove", "id": b.rid(), "task": task}, wait=True)  # a fresh task
    # Enough slots for whatever waits in the queue before the task, so that it is offered.
    work = {**_make(b, "work"), "queue": TASK_HOMES[task], "concurrency": 100}
    _send_valid(b, work)
    add = {**_make(b, "add"), "queue": TASK_HOMES[task], "task": task}
    add.pop("streams", None)
    add.pop("data", None)
    _send_valid(b, add)
    b.frames.append(Wait(task=task))
    ops = [
        "ack",
        "progress",
        "touch",
        "complete",
        "complete_many",
        "release",
        "fail",
        "remove",
        "retry",
    ]
    for op in b.draw(st.lists(st.sampled_from([*ops, "get", "stop", "download"]), max_size=3)):
        message = _make(b, op)
        run = b.draw(st.sampled_from([1, 2]))
        for name, value in (("task", task), ("run", run), ("runs", [[task, run]])):
            if name in message:
                message[name] = value
        if op == "stop" and "worker" in work:
            message["worker"] = work["worker"]
        _send_valid(b, message)


def frame_admin_race(b: Builder) -> None:
    """A task being worked on, then one frame racing removes and retries of it against
    the worker's reports (§6.3: each acts on the task as it is when it takes effect)."""
    task = b.draw(task_ids)
    _send_valid(b, {"op": "remove", "id": b.rid(), "task": task}, wait=True)  # a fresh task
    work = {**_make(b, "work"), "queue": TASK_HOMES[task], "concurrency": 100}
    _send_valid(b, work)
    add = {**_make(b, "add"), "queue": TASK_HOMES[task], "task": task}
    add.pop("streams", None)
    _send_valid(b, add)
    b.frames.append(Wait(task=task))
    kinds = st.sampled_from(["remove", "retry", "complete", "fail", "progress"])
    items: list[Any] = []
    owed: list[Owed] = []
    for op in b.draw(st.lists(kinds, min_size=2, max_size=6)):
        message = _make(b, op)
        message["task"] = task
        if "run" in message:
            message["run"] = b.draw(st.sampled_from([1, 2]))
        items.append(message)
        owed.append(owed_for_valid(b, message))
    b.text(items, owed)


def frame_special(b: Builder) -> None:
    """Rarer, larger inputs: a text frame over max_message (too_large, §3), a batch over
    the batch limit, JSON nested 10,000 deep."""
    kind = b.draw(st.sampled_from(["deep", "big_batch", "too_large"]))
    if kind == "too_large":
        rid = b.rid()
        text = json.dumps({"op": "queues", "id": rid, "pad": "x" * protocol.MAX_MESSAGE})
        b.text(text, [Owed(text, rid, codes=frozenset({"too_large"}))])
    elif kind == "big_batch":
        text = "[" + ",".join(["1"] * (protocol.MAX_BATCH + 1)) + "]"
        b.text(text, [Owed(text, anon=(1, 1))])
    else:
        text = "[" * 10_000 + "]" * 10_000
        b.text(text, [Owed(text, anon=(1, 1))])


FRAME_KINDS: list[Callable[[Builder], None]] = [
    *[frame_valid] * 8,
    *[frame_broken] * 6,
    *[frame_batch] * 3,
    *[frame_upload_flow] * 2,
    *[frame_work_flow] * 2,
    *[frame_admin_race] * 2,
    *[frame_not_json] * 2,
    frame_not_message,
    *[frame_binary] * 3,
    frame_special,
]


class InvalidUtf8:
    """A text frame whose bytes are not UTF-8: the connection closes with 1007."""

    data = b'{"op":"queues","id":1,"x":"\xff\xfe"}'
    close_code = 1007

    def __repr__(self) -> str:
        return "InvalidUtf8()"


class OverHardLimit:
    """A frame over the WebSocket limit (§3): the connection closes with 1009."""

    close_code = 1009

    @property
    def data(self) -> str:
        return "x" * (HARD_LIMIT + 1)

    def __repr__(self) -> str:
        return f"OverHardLimit({HARD_LIMIT + 1} bytes)"


Closing = InvalidUtf8 | OverHardLimit


def _short(frame: Frame) -> str:
    if isinstance(frame, Wait) or len(frame) <= 300:
        return repr(frame)
    return f"{frame[:200]!r}...({len(frame)} {'chars' if isinstance(frame, str) else 'bytes'})"


class Example:
    """The frames of one example and what the server owes for them."""

    def __init__(
        self, b: Builder, closing: Closing | None, admin: list[dict[str, Any]] | None = None
    ) -> None:
        self.admin = admin or []  # sent at once from another connection (an admin's)
        self.frames = b.frames
        self.owed = b.owed
        self.echo_ids = b.echo_ids
        self.closing = closing
        self.downloads = Counter(
            o.message["stream"] for o in self.owed if o.valid and o.message["op"] == "download"
        )

    def __repr__(self) -> str:
        lines = [f"  {_short(frame)}," for frame in self.frames]
        if self.admin:
            lines.append(f"  admin, from another connection: {self.admin!r},")
        if self.closing is not None:
            lines.append(f"  {self.closing!r},")
        return "Example([\n" + "\n".join(lines) + "\n])"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


@st.composite
def examples(draw: Callable[[Any], Any]) -> Example:
    b = Builder(draw)
    for make in draw(st.lists(st.sampled_from(FRAME_KINDS), min_size=1, max_size=6)):
        make(b)
    closing = draw(st.sampled_from([None] * 30 + [InvalidUtf8(), OverHardLimit()]))
    admin_ops = st.fixed_dictionaries(
        {"op": st.sampled_from(["remove", "retry"]), "task": task_ids}
    )
    admin = draw(st.lists(admin_ops, max_size=4))
    return Example(b, closing, [{**m, "id": n} for n, m in enumerate(admin, 1)])


# -- running one example ---------------------------------------------------------------------


class Received:
    """Everything one connection received, and a way to wait for more."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.messages: list[dict[str, Any]] = []
        self.stream_bytes: Counter[int] = Counter()
        self.changed = asyncio.Event()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for frame in self.ws:
                if isinstance(frame, bytes):
                    stream, payload = protocol.unpack_chunk(frame)
                    self.stream_bytes[stream] += len(payload)
                else:
                    decoded = json.loads(frame)
                    self.messages.extend(decoded if isinstance(decoded, list) else [decoded])
                self.changed.set()
        self.changed.set()

    async def pause(self, wait: Wait) -> None:
        def done() -> bool:
            if wait.rid is not None:
                return self.answered(wait.rid)
            return any(
                item["task"]["id"] == wait.task
                for m in self.messages
                if m.get("op") == "offer"
                for item in m["tasks"]
            )

        with contextlib.suppress(AssertionError):
            await self.wait_for(done, wait.seconds, lambda: "pausing")

    def downloads_settled(self, downloads: int) -> bool:
        """Whether as many downloads ended, failed or were refused as were asked for."""
        settled = sum(
            m.get("op") in ("end", "stream_error")
            or (m.get("op") == "error" and "already open" in m.get("message", ""))
            for m in self.messages
        )
        return settled >= downloads

    def answered(self, request_id: int) -> bool:
        return any(
            m.get("id") == request_id and m.get("op") in ("result", "error") for m in self.messages
        )

    async def wait_for(
        self, done: Callable[[], bool], timeout: float, what: Callable[[], str]
    ) -> None:
        deadline = asyncio.get_running_loop().time() + budget(timeout)
        while not done():
            if self.task.done():
                raise AssertionError(
                    f"the server closed the connection ({self.ws.close_code} "
                    f"{self.ws.close_reason!r}) while {what()}"
                )
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise AssertionError(f"no answer within {budget(timeout)} s: {what()}")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def send_frames(raw: RawClient, example: Example) -> Received:
    assert raw.ws is not None
    received = Received(raw.ws)
    for frame in example.frames:
        if isinstance(frame, Wait):
            await received.pause(frame)
        else:
            await raw.ws.send(frame)
    # Let the downloads finish (they are small); one still running when the connection
    # closes is fine too (test_closing_with_a_download_in_flight).
    downloads = example.downloads.total()
    with contextlib.suppress(AssertionError):
        await received.wait_for(
            lambda: received.downloads_settled(downloads), 2.0, lambda: "downloading"
        )
    closing = example.closing
    if closing is None:
        await raw.send({"op": "queues", "id": FINAL_ID})
        return received
    with contextlib.suppress(ConnectionClosed):
        if isinstance(closing.data, bytes):
            await raw.ws.send(closing.data, text=True)
        else:
            await raw.ws.send(closing.data)
    return received


async def collect(raw: RawClient, example: Example) -> Received:
    """Send the example's frames; return everything the server sent back."""
    received = await send_frames(raw, example)
    try:
        if example.closing is not None:
            try:
                await asyncio.wait_for(asyncio.shield(received.task), budget(ANSWER_TIMEOUT))
            except TimeoutError:
                raise AssertionError(
                    f"the server did not close the connection after {example.closing!r}"
                ) from None
            assert received.ws.close_code == example.closing.close_code, (
                f"expected close {example.closing.close_code}, got "
                f"{received.ws.close_code} {received.ws.close_reason!r}"
            )
            return received
        owed = {o.rid for o in example.owed if o.rid is not None and o.must} | {FINAL_ID}

        def missing() -> set[int]:
            return {rid for rid in owed if not received.answered(rid)}

        await received.wait_for(
            lambda: not missing(),
            ANSWER_TIMEOUT,
            lambda: f"waiting for answers to request ids {sorted(missing())}",
        )
        # One more round trip, so that a second answer to anything would show.
        await raw.send({"op": "queues", "id": SYNC_ID})
        await received.wait_for(
            lambda: received.answered(SYNC_ID), ANSWER_TIMEOUT, lambda: "waiting for a sync"
        )
        return received
    finally:
        await received.stop()


def check_answers(example: Example, received: Received) -> None:
    messages = received.messages
    check_downloads(example, received)
    by_id: dict[int, list[dict[str, Any]]] = {}
    owed_ids = {o.rid: o for o in example.owed if o.rid is not None}
    anonymous = 0
    for m in messages:
        op = m.get("op")
        if op in ("error", "stream_error"):
            assert m.get("code") in ALLOWED_CODES, f"undocumented or internal error: {m}"
            assert isinstance(m.get("message"), str) and m["message"].strip(), m
        if op == "stream_error" and m["code"] == "bad_message":
            anonymous += 1
        if op not in ("result", "error"):
            continue  # events, offers, credit, end, stream_error
        request_id = m.get("id")
        if request_id in owed_ids or request_id in (FINAL_ID, SYNC_ID):
            by_id.setdefault(request_id, []).append(m)
        elif op == "error" and (request_id is None or request_id in example.echo_ids):
            anonymous += 1
        else:
            raise AssertionError(f"an answer to a request never sent: {m}")
    for rid in (FINAL_ID, SYNC_ID):
        for answer in by_id.get(rid, []):
            assert answer["op"] == "result", answer
            assert isinstance(answer["result"]["queues"], list), answer
    closed = example.closing is not None
    for rid, owed in owed_ids.items():
        check_owed(owed, by_id.get(rid, []), closed)
    low = sum(o.anon[0] for o in example.owed)
    high = sum(o.anon[1] for o in example.owed)
    if closed:
        low = 0  # answers still queued when the connection closed are lost
    assert low <= anonymous <= high, (
        f"{anonymous} errors without a request id; expected {low} to {high}: "
        + json.dumps([m for m in messages if m.get("op") in ("error", "stream_error")])[:3000]
    )


def check_downloads(example: Example, received: Received) -> None:
    """At most one end or stream_error per download (§8.4); when every download of a
    stream ended that way, its bytes add up to the sizes its ``end`` messages give."""
    ends: dict[int, list[dict[str, Any]]] = {}
    for m in received.messages:
        if m.get("op") in ("end", "stream_error"):
            ends.setdefault(m["stream"], []).append(m)
    for stream, finished in ends.items():
        asked = example.downloads[stream]
        assert len(finished) <= asked, f"{asked} downloads of stream {stream}, {finished}"
        if len(finished) == asked:
            size = sum(m["size"] for m in finished if m["op"] == "end")
            assert received.stream_bytes[stream] == size, (stream, finished)
    for stream in received.stream_bytes:
        assert example.downloads[stream], f"bytes for stream {stream}, never downloaded"


def check_owed(owed: Owed, answers: list[dict[str, Any]], closed: bool) -> None:
    assert len(answers) <= 1, f"several answers to {owed.message}: {answers}"
    if not answers:
        assert closed or not owed.must, f"no answer to {_short(json.dumps(owed.message))}"
        return
    [answer] = answers
    if answer["op"] == "result":
        assert owed.result, f"{_short(json.dumps(owed.message))} was accepted: {answer}"
        check_result(owed.message, answer["result"])
    else:
        assert answer["code"] in owed.codes, (
            f"{_short(json.dumps(owed.message))} got {answer}; expected "
            + (f"an error with a code in {sorted(owed.codes)}" if owed.codes else "a result")
            + (" or a result" if owed.result and owed.codes else "")
        )


def check_result(message: dict[str, Any], result: Any) -> None:
    """The shape of a result (§4)."""
    op = message["op"]
    if op == "add":
        assert result["queue"] == message["queue"] and isinstance(result["id"], str), result
        assert result["id"] == message.get("task", result["id"]), result
    elif op == "add_many":
        assert len(result["tasks"]) == len(message["tasks"]), result
    elif op == "list":
        assert isinstance(result["tasks"], list) and len(result["tasks"]) <= message.get(
            "limit", 1000
        ), result
        assert result["cursor"] is None or isinstance(result["cursor"], str), result
    elif op == "queues":
        assert isinstance(result["queues"], list), result
    elif op == "stats":
        for queue in result["queues"]:
            assert {"name", "waiting", "active", "completed", "failed", "workers"} <= set(queue)
    elif op == "get":
        assert result["task"]["id"] == message["task"], result
    elif op == "retry":
        assert result["id"] == message["task"], result
    elif op == "work":
        assert result["worker"] == message.get("worker", result["worker"]), result
    elif op in ("complete_many", "release"):
        assert isinstance(result["stale"], list), result
    else:
        assert result is None, (message, result)


# -- the bystander and the resources of the server -------------------------------------------


class Cleanups:
    """Tells when the server has finished cleaning up after a connection (so that what
    it logs doing so is blamed on the right example): wraps Connection.cleanup."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._done: dict[str, asyncio.Event] = {}
        original = Connection.cleanup

        async def cleanup(connection: Connection) -> None:
            try:
                await original(connection)
            finally:
                self._event(connection.id).set()

        monkeypatch.setattr(Connection, "cleanup", cleanup)

    def _event(self, connection_id: str) -> asyncio.Event:
        return self._done.setdefault(connection_id, asyncio.Event())

    async def wait(self, connection_id: str) -> None:
        try:
            await asyncio.wait_for(self._event(connection_id).wait(), budget(10))
        except TimeoutError:
            raise AssertionError(f"connection {connection_id} not cleaned up in time") from None
        del self._done[connection_id]


@pytest.fixture
def cleanups(monkeypatch: pytest.MonkeyPatch) -> Cleanups:
    return Cleanups(monkeypatch)


class Run:
    """One fuzz run: the server, the bystander, and what the run saw."""

    def __init__(
        self,
        server: wsq.Server,
        bystander: RawClient,
        cleanups: Cleanups,
        errors: list[logging.LogRecord],
    ) -> None:
        self.server = server
        self.bystander = bystander
        self.bystander_id: str = bystander.welcome["connection"]
        self.cleanups = cleanups
        self.errors = errors
        self.connections: list[str] = []
        self.examples = 0
        self.warm: tuple[int, Counter[str]] | None = None  # RSS and server objects
        self.start_tasks = len(asyncio.all_tasks())
        self.start_fds = _fds()

    @classmethod
    async def start(
        cls, server: wsq.Server, cleanups: Cleanups, errors: list[logging.LogRecord]
    ) -> Run:
        """Connect the bystander: subscribed to every queue, and a worker of its own."""
        bystander = await RawClient(server.url).__aenter__()
        subscribed = await bystander.request({"op": "subscribe", "queue": None})
        assert subscribed["op"] == "result", subscribed
        work = {"op": "work", "queue": BYSTANDER_QUEUE, "worker": BYSTANDER_WORKER}
        assert (await bystander.request(work))["op"] == "result"
        # Files the server opens once, lazily, must be open before the count starts: the
        # store's read connection (a listing opens it) and whatever the start-up sweep
        # of orphaned blobs holds while it runs.
        assert (await bystander.request({"op": "list", "limit": 1}))["op"] == "result"
        await eventually(lambda: server._fresh_blobs is None)
        return cls(server, bystander, cleanups, errors)

    async def finish(self) -> None:
        """After the examples: nothing left behind, the bystander works, memory bounded."""
        await check_no_leftovers(self)
        if self.warm is not None:
            check_memory(self.warm, self.examples - WARM_UP)
        await _bystander_works(self.bystander)

    async def example(self, example: Example) -> None:
        logged = len(self.errors)
        async with RawClient(self.server.url) as raw, RawClient(self.server.url) as admin:
            connection_id = raw.welcome["connection"]
            self.connections += [connection_id, admin.welcome["connection"]]
            admin_answers = asyncio.create_task(_admin_race(admin, example.admin))
            received = await collect(raw, example)
            await admin_answers
        await self.cleanups.wait(connection_id)
        await self.cleanups.wait(self.connections[-1])
        await settles(
            lambda: _stats_match_store(self.server),
            lambda: "stats differ from the store's counts (docs/reliability.md)",
        )
        # Only what this example made the server log (earlier failures stay blamed on
        # their own examples while Hypothesis shrinks).
        assert_no_server_errors(self.errors[logged:])
        check_answers(example, received)
        answer = await self.bystander.request({"op": "queues"}, timeout=ANSWER_TIMEOUT)
        assert answer["op"] == "result", f"the bystander got {answer}"
        self.examples += 1
        if self.examples == WARM_UP:
            self.warm = (_rss(), _server_objects())


async def _admin_race(admin: RawClient, messages: list[dict[str, Any]]) -> None:
    """Removes and retries from another connection, racing the example's frames; each
    is answered with a result or the errors its op may give."""
    if not messages:
        return
    await admin.send(messages)
    answers: dict[int, dict[str, Any]] = {}
    while len(answers) < len(messages):
        message = await admin.receive(timeout=ANSWER_TIMEOUT)
        if message.get("op") in ("result", "error"):
            answers[message["id"]] = message
    for message in messages:
        answer = answers[message["id"]]
        if answer["op"] == "error":
            assert answer["code"] in VALID_CODES[message["op"]], (message, answer)


STATES = ("waiting", "active", "completed", "failed")


async def _stats_match_store(server: wsq.Server) -> bool:
    """The core's counts (what stats shows) equal the store's, once writes are done."""
    stored: dict[str, dict[str, int]] = {}
    for task in await server.store.list(limit=1 << 30):
        per_state = stored.setdefault(task.queue, dict.fromkeys(STATES, 0))
        per_state[task.state.value] += 1
    return server.core.counts() == stored


def _fds() -> dict[int, str]:
    """This process's open file descriptors and what each is."""
    found = {}
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            found[int(fd)] = os.readlink(f"/proc/self/fd/{fd}")
    return found


def _rss() -> int:
    gc.collect()
    rss: int = psutil.Process().memory_info().rss
    return rss


def _server_objects() -> Counter[str]:
    """The live objects of the server's kinds, by type (the core's tasks left out)."""
    gc.collect()
    kinds: Counter[str] = Counter()
    for obj in gc.get_objects():
        module = getattr(type(obj), "__module__", None)
        if isinstance(module, str) and module.startswith(SERVER_MODULES):
            kind = f"{module}.{type(obj).__qualname__}"
            if not kind.startswith(CORE_STATE):
                kinds[kind] += 1
    return kinds


def check_memory(warm: tuple[int, Counter[str]], examples: int) -> None:
    rss, objects = warm
    now = _server_objects()
    grown = now.total() - objects.total()
    assert grown <= SERVER_OBJECT_GROWTH, (
        f"{grown} more objects of the server's kinds than after the warm-up: "
        f"{(now - objects).most_common(10)}"
    )
    grown = _rss() - rss
    limit = RSS_GROWTH + RSS_GROWTH_PER_EXAMPLE * examples
    assert grown < limit, f"RSS grew {grown >> 20} MiB over {examples} examples"


async def _bystander_works(bystander: RawClient) -> None:
    """At the end: the bystander's subscription and worker still work, end to end."""
    await bystander.send({"op": "add", "id": 1, "queue": BYSTANDER_QUEUE, "data": {"n": 1}})
    task_id, offer, event = None, None, None
    while task_id is None or offer is None or event is None:  # in any order (§5.2)
        message = await bystander.receive(timeout=5)
        if message.get("op") in ("result", "error") and message.get("id") == 1:
            assert message["op"] == "result", message
            task_id = message["result"]["id"]
        elif message.get("op") == "offer":
            offer = message
        elif message.get("op") == "event" and message["event"] == "task added":
            event = message if message["args"][0]["queue"] == BYSTANDER_QUEUE else event
    assert offer["worker"] == BYSTANDER_WORKER
    [item] = offer["tasks"]
    assert item["task"]["id"] == task_id and item["data"] == {"n": 1}
    done = await bystander.request({"op": "complete", "task": task_id, "run": item["run"]})
    assert done["op"] == "result", done
    got = await bystander.request({"op": "get", "task": task_id})
    assert got["result"]["task"]["state"] == "completed", got


async def _stray_blobs(server: wsq.Server) -> list[str]:
    """Blob files no stored task references (uploads never claimed, removed tasks), and
    files left in the store's tmp folder."""
    root = server.data_dir / "blobs"
    referenced = await server.store.blob_keys()
    files = [p for p in root.rglob("*") if p.is_file() and p.name != OWNER_MARK]
    return [
        str(p.relative_to(root))
        for p in files
        if p.relative_to(root).parts[0] == "tmp" or p.name not in referenced
    ]


def _leftover_connections() -> list[Connection]:
    gc.collect()
    return [o for o in gc.get_objects() if type(o) is Connection]


async def check_no_leftovers(run: Run) -> None:
    """Nothing of the fuzz connections is left on the server."""
    server, bystander_id = run.server, run.bystander_id
    bystander_conn = server.connections[bystander_id]
    await eventually(lambda: list(server.connections) == [bystander_id], timeout=10)
    assert server.subscribers == {None: {bystander_conn}}, server.subscribers
    for connection_id in run.connections:
        assert server.core.workers_of(connection_id) == [], connection_id
    assert server.core.workers_of(bystander_id) == [BYSTANDER_WORKER]
    for worker_id in WORKER_IDS:
        assert server.core.worker_json(worker_id) is None, worker_id
    await settles(
        lambda: _leftover_connections() == [bystander_conn],
        lambda: (
            f"{len(_leftover_connections())} Connection objects alive, not just the bystander's"
        ),
    )
    await settles(
        lambda: len(asyncio.all_tasks()) <= run.start_tasks,
        lambda: (
            f"{len(asyncio.all_tasks())} asyncio tasks, {run.start_tasks} at the start: "
            f"{sorted(t.get_name() for t in asyncio.all_tasks())}"
        ),
    )
    await settles(
        lambda: len(_fds()) <= len(run.start_fds),
        lambda: (
            f"{len(_fds())} open files, {len(run.start_fds)} at the start; new: "
            f"{sorted(set(_fds().values()) - set(run.start_fds.values()))}"
        ),
    )
    await settles(
        lambda: _no_stray_blobs(server),
        lambda: "blobs no task holds, or left in tmp (see _stray_blobs)",
    )


async def settles(check: Callable[[], Any], what: Callable[[], str]) -> None:
    """``eventually``, failing with a message saying what is wrong."""
    try:
        await eventually(check, timeout=10)
    except AssertionError:
        raise AssertionError(what()) from None


async def _no_stray_blobs(server: wsq.Server) -> bool:
    return not await _stray_blobs(server)


# -- the tests -------------------------------------------------------------------------------


def test_fuzz_live(
    data_dir: Path,
    server_errors: list[logging.LogRecord],  # noqa: F811
    cleanups: Cleanups,
) -> None:
    """Hypothesis against a live server; see the module docstring."""
    with asyncio.Runner() as runner:
        server = wsq.Server(data_dir=data_dir, port=0)
        runner.run(server.start())
        try:
            run = runner.run(Run.start(server, cleanups, server_errors))
            try:

                @FUZZ_SETTINGS
                @given(example=examples())
                def fuzz(example: Example) -> None:
                    runner.run(asyncio.wait_for(run.example(example), budget(EXAMPLE_TIMEOUT)))

                fuzz()
                runner.run(run.finish())
            finally:
                runner.run(run.bystander.__aexit__(None, None, None))
        finally:
            runner.run(server.close())
    assert_no_server_errors(server_errors)


async def test_add_naming_an_upload_before_its_end_is_answered(
    server: wsq.Server,
    server_errors: list[logging.LogRecord],  # noqa: F811
) -> None:
    async with RawClient(server.url) as raw:
        await raw.send({"op": "upload", "stream": 1})
        await raw.send(protocol.pack_chunk(1, b"abc"))
        add = {
            "op": "add",
            "id": 5,
            "queue": "q",
            "data": {"f": None},
            "streams": [{"path": ["f"], "upload": 1}],
        }
        await raw.send(add)
        await raw.send({"op": "upload_end", "stream": 1})
        await raw.send({"op": "queues", "id": 6})
        answers: dict[int | None, dict[str, Any]] = {}
        with contextlib.suppress(TimeoutError):
            while 5 not in answers:
                message = await raw.receive(timeout=2)
                if message.get("op") in ("result", "error"):
                    answers[message.get("id")] = message
        assert 6 in answers, answers
        assert 5 in answers, f"the add was never answered; other answers: {answers}"
    assert_no_server_errors(server_errors)


async def test_closing_with_a_download_in_flight(
    server: wsq.Server,
    server_errors: list[logging.LogRecord],  # noqa: F811
    cleanups: Cleanups,
) -> None:
    payload = os.urandom(protocol.WINDOW + (1 << 20))  # the download waits for credit
    async with wsq.Client(server.url, backoff=lambda tries: 0.05) as client:
        task = await client.queue("dl").add({"f": payload})
    async with RawClient(server.url) as raw:
        connection_id = raw.welcome["connection"]
        # An upload nobody claims: its blob must go when the connection closes.
        await raw.send({"op": "upload", "stream": 5})
        await raw.send(protocol.pack_chunk(5, b"unclaimed"))
        await raw.send({"op": "upload_end", "stream": 5})
        await raw.send({"op": "download", "stream": 1, "task": task.id, "index": 0})
        received = 0
        while received < protocol.WINDOW:  # the whole window; then it waits for credit
            message = await raw.receive()
            if message["op"] == "_binary":
                received += len(message["frame"]) - protocol.HEADER_SIZE
    await cleanups.wait(connection_id)
    assert_no_server_errors(server_errors)
    assert await eventually(lambda: _no_stray_blobs(server), timeout=5)


async def test_add_many_refused_creates_nothing(
    server: wsq.Server,
    server_errors: list[logging.LogRecord],  # noqa: F811
) -> None:
    async with RawClient(server.url) as raw:
        taken = await raw.request({"op": "add", "queue": "a", "task": "taken"})
        assert taken["op"] == "result", taken
        tasks = [{"task": "new1"}, {"task": "taken"}, {"data": 1}]
        refused = await raw.request({"op": "add_many", "queue": "b", "tasks": tasks})
        assert refused["op"] == "error" and refused["code"] == "invalid_argument", refused
        listed = await raw.request({"op": "list", "queue": "b"})
        assert listed["result"]["tasks"] == [], "the refused add_many created tasks"
    assert_no_server_errors(server_errors)
