"""Unit tests of :mod:`wsq.protocol`: decoding client frames, binary stream frames.

Limits come from docs/protocol.md §3: a queue name is 1 to 199 characters with no control
characters; a chosen task id or worker id matches ``^[A-Za-z0-9_.:-]{1,64}$`` (the whole id),
and a task id naming a task may be scoped, ``<principal>/<chosen id>``;
unknown fields are an error (§2).
"""

from __future__ import annotations

import json
import typing
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsq.protocol import (
    HEADER_SIZE,
    Ack,
    Add,
    AddMany,
    Attempts,
    BadMessage,
    Cancel,
    ClientMessage,
    Complete,
    CompleteMany,
    Credit,
    Download,
    Fail,
    Get,
    Hello,
    History,
    ListTasks,
    NewTask,
    OptionsIn,
    Ping,
    Progress,
    Queues,
    Release,
    Remove,
    Retry,
    RunRef,
    Stats,
    StopWork,
    StreamIn,
    Subscribe,
    Touch,
    Unsubscribe,
    Upload,
    UploadAbort,
    UploadEnd,
    Work,
    Workers,
    decode_frame,
    error,
    join_frame,
    pack_chunk,
    result,
    unpack_chunk,
)


def frame(**fields: Any) -> str:
    return json.dumps(fields)


def decode_single(text: str | bytes) -> Any:
    """The one item ``decode_frame`` returns for a frame holding one message."""
    (item,) = decode_frame(text)
    return item


def rejected(text: str | bytes) -> BadMessage:
    item = decode_single(text)
    assert isinstance(item, BadMessage), f"accepted: {item!r}"
    return item


# -- every client message, valid -------------------------------------------------------

VALID: list[tuple[str, dict[str, Any], Any]] = [
    ("hello", {"protocol": 1}, Hello(protocol=1)),
    (
        "hello",
        {"protocol": 1, "client": "py/1.0", "token": "secret"},
        Hello(protocol=1, client="py/1.0", token="secret"),
    ),
    ("add", {"id": 1, "queue": "q"}, Add(id=1, queue="q")),
    (
        "add",
        {
            "id": 2,
            "queue": "video",
            "data": {"video": None, "args": ["-y"]},
            "streams": [
                {"path": ["video"], "upload": 7},
                {"path": ["thumbs", 0], "inline": "aGk="},
            ],
            "options": {"timeout": 5.5, "retries": -1, "autoremove": True},
            "task": "job-1",
        },
        Add(
            id=2,
            queue="video",
            data=msgspec.Raw(b'{"video": null, "args": ["-y"]}'),
            streams=[
                StreamIn(path=["video"], upload=7),
                StreamIn(path=["thumbs", 0], inline=b"hi"),
            ],
            options=OptionsIn(timeout=5.5, retries=-1, autoremove=True),
            task="job-1",
        ),
    ),
    ("list", {"id": 3}, ListTasks(id=3)),
    (
        "list",
        {"id": 3, "queue": "q", "state": "failed", "limit": 10, "cursor": "42"},
        ListTasks(id=3, queue="q", state="failed", limit=10, cursor="42"),
    ),
    ("queues", {"id": 4}, Queues(id=4)),
    ("get", {"id": 5, "task": "t1"}, Get(id=5, task="t1")),
    ("attempts", {"id": 5, "task": "t1"}, Attempts(id=5, task="t1")),
    ("remove", {"id": 6, "task": "t1"}, Remove(id=6, task="t1")),
    ("retry", {"id": 7, "task": "t1"}, Retry(id=7, task="t1")),
    ("subscribe", {"id": 8}, Subscribe(id=8)),
    ("subscribe", {"id": 8, "queue": "q"}, Subscribe(id=8, queue="q")),
    ("unsubscribe", {"id": 9, "queue": None}, Unsubscribe(id=9)),
    ("work", {"id": 10, "queue": "q"}, Work(id=10, queue="q")),
    (
        "work",
        {"id": 10, "queue": "q", "concurrency": 4, "worker": "w-1"},
        Work(id=10, queue="q", concurrency=4, worker="w-1"),
    ),
    ("stop", {"id": 11, "worker": "w-1"}, StopWork(id=11, worker="w-1")),
    ("ack", {"runs": [["t1", 1]]}, Ack(runs=[RunRef("t1", 1)])),
    (
        "ack",
        {"runs": [["t1", 1], ["t2", 3]], "id": 12},
        Ack(runs=[RunRef("t1", 1), RunRef("t2", 3)], id=12),
    ),
    (
        "progress",
        {"task": "t1", "run": 2, "progress": 0.5},
        Progress(task="t1", run=2, progress=0.5),
    ),
    ("touch", {"task": "t1", "run": 2, "id": 13}, Touch(task="t1", run=2, id=13)),
    ("complete", {"task": "t1", "run": 2}, Complete(task="t1", run=2)),
    ("fail", {"task": "t1", "run": 2, "error": "boom"}, Fail(task="t1", run=2, error="boom")),
    ("upload", {"stream": 1}, Upload(stream=1)),
    ("upload_end", {"stream": 1}, UploadEnd(stream=1)),
    ("upload_abort", {"stream": 1, "error": "gone"}, UploadAbort(stream=1, error="gone")),
    ("download", {"stream": 2, "task": "t1", "index": 0}, Download(stream=2, task="t1", index=0)),
    (
        "download",
        {"stream": 2, "task": "t1", "index": 1, "offset": 100},
        Download(stream=2, task="t1", index=1, offset=100),
    ),
    ("credit", {"stream": 2, "bytes": 65536}, Credit(stream=2, bytes=65536)),
    ("cancel", {"stream": 2}, Cancel(stream=2)),
    ("ping", {"id": 9}, Ping(id=9)),
    ("stats", {"id": 9}, Stats(id=9)),
    ("workers", {"id": 9}, Workers(id=9)),
    ("workers", {"id": 9, "queue": "q"}, Workers(id=9, queue="q")),
    ("history", {"id": 9, "queue": "q"}, History(id=9, queue="q")),
    ("history", {"id": 9, "queue": "q", "since": 1700000000}, History(9, "q", 1700000000.0)),
    (
        "add_many",
        {"id": 1, "queue": "q", "tasks": [{"task": "t1"}]},
        AddMany(id=1, queue="q", tasks=[NewTask(task="t1")]),
    ),
    (
        "complete_many",
        {"runs": [["t1", 2]]},
        CompleteMany(runs=[RunRef(task="t1", run=2)]),
    ),
    (
        "release",
        {"id": 4, "runs": [["t1", 2]]},
        Release(id=4, runs=[RunRef(task="t1", run=2)]),
    ),
]
VALID_IDS = [f"{op}-{i}" for i, (op, _, _) in enumerate(VALID)]


@pytest.mark.parametrize(("op", "fields", "expected"), VALID, ids=VALID_IDS)
def test_decode_valid_message(op: str, fields: dict[str, Any], expected: Any) -> None:
    assert decode_frame(frame(op=op, **fields)) == [expected]


@pytest.mark.parametrize(("op", "fields", "expected"), VALID, ids=VALID_IDS)
def test_encoded_message_decodes_to_itself(op: str, fields: dict[str, Any], expected: Any) -> None:
    assert decode_frame(msgspec.json.encode(expected)) == [expected]


def test_every_client_op_is_covered() -> None:
    ops = {op for op, _, _ in VALID}
    tags = {cls.__struct_config__.tag for cls in typing.get_args(ClientMessage)}
    assert ops == tags
    assert "ping" in tags and "add_many" in tags


def test_bytes_and_str_frames_decode_alike() -> None:
    text = frame(op="get", id=1, task="t1")
    assert decode_frame(text) == decode_frame(text.encode()) == [Get(id=1, task="t1")]


def test_add_defaults() -> None:
    add = decode_single(frame(op="add", id=1, queue="q"))
    assert bytes(add.data) == b"null"
    assert add.streams == [] and add.task is None
    assert add.options == OptionsIn(timeout=60.0, retries=0, autoremove=False)


def test_add_keeps_task_data_as_raw_json() -> None:
    add = decode_single(b'{"op":"add","id":1,"queue":"q","data":{"a":[1,2,{"b":null}]}}')
    assert bytes(add.data) == b'{"a":[1,2,{"b":null}]}'


def test_work_concurrency_defaults_to_one() -> None:
    assert decode_single(frame(op="work", id=1, queue="q")).concurrency == 1


def test_limits_at_their_edges_are_accepted() -> None:
    assert decode_single(frame(op="get", id=2**53, task="t")).id == 2**53
    assert decode_single(frame(op="upload", stream=2**32 - 1)).stream == 2**32 - 1
    assert decode_single(frame(op="work", id=1, queue="q", concurrency=10000)).concurrency == 10000
    assert decode_single(frame(op="list", id=1, limit=10000)).limit == 10000
    assert decode_single(frame(op="progress", task="t", run=1, progress=1.0)).progress == 1.0
    assert decode_single(frame(op="fail", task="t", run=1, error="e" * 65536)).error


# -- batches ---------------------------------------------------------------------------


def test_batch_decodes_every_message_in_order() -> None:
    text = json.dumps([{"op": "queues", "id": 1}, {"op": "get", "id": 2, "task": "t"}])
    assert decode_frame(text) == [Queues(id=1), Get(id=2, task="t")]


def test_batch_with_leading_whitespace() -> None:
    assert decode_frame(' \n\t[{"op": "queues", "id": 1}]') == [Queues(id=1)]
    assert decode_frame(b' [{"op": "queues", "id": 1}]') == [Queues(id=1)]


def test_bad_message_in_a_batch_does_not_spoil_the_others() -> None:
    messages = [
        {"op": "queues", "id": 1},
        {"op": "get", "id": 2, "task": "t", "extra": True},
        {"op": "queues", "id": 3},
    ]
    first, bad, last = decode_frame(json.dumps(messages))
    assert first == Queues(id=1) and last == Queues(id=3)
    assert isinstance(bad, BadMessage) and bad.request_id == 2


@pytest.mark.parametrize("element", [5, "queues", None, [], [{"op": "queues", "id": 9}]])
def test_non_object_in_a_batch_is_a_bad_message(element: Any) -> None:
    good, bad = decode_frame(json.dumps([{"op": "queues", "id": 1}, element]))
    assert good == Queues(id=1)
    assert isinstance(bad, BadMessage) and bad.request_id is None


def test_several_bad_messages_in_a_batch_each_keep_their_id() -> None:
    messages = [{"op": "nope", "id": 1}, {"op": "get", "id": 2}, {"op": "queues", "id": 3}]
    items = decode_frame(json.dumps(messages))
    assert [type(i).__name__ for i in items] == ["BadMessage", "BadMessage", "Queues"]
    assert [getattr(i, "request_id", None) for i in items[:2]] == [1, 2]


def test_malformed_batch_is_one_bad_message() -> None:
    (bad,) = decode_frame('[{"op": "queues", "id": 1}, {"op": "queues", "id"')
    assert isinstance(bad, BadMessage) and bad.request_id is None


# -- malformed and unknown ---------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["", "{", "not json", '{"op": "queues", "id": 1', '{"op": "queues", "id": 1} trailing'],
)
def test_malformed_json_is_a_bad_message(text: str) -> None:
    assert rejected(text).request_id is None


@pytest.mark.parametrize("text", ["null", "42", '"queues"', "true"])
def test_json_that_is_not_an_object_is_a_bad_message(text: str) -> None:
    rejected(text)


def test_invalid_utf8_is_a_bad_message() -> None:
    assert rejected(b'{"op": "get", "id": 1, "task": "\xff"}').request_id == 1


def test_invalid_utf8_in_a_batch_spoils_only_its_message() -> None:
    good, bad = decode_frame(b'[{"op": "queues", "id": 1}, {"op": "get", "id": 2, "\xc3": 1}]')
    assert good == Queues(id=1)
    assert isinstance(bad, BadMessage)


def test_deeply_nested_json_is_a_bad_message_not_a_crash() -> None:
    nested = "[" * 100_000 + "]" * 100_000
    rejected(f'{{"op": "add", "id": 1, "queue": "q", "data": {nested}}}')
    (bad,) = decode_frame("[" * 100_000)
    assert isinstance(bad, BadMessage)


def test_unknown_op_is_a_bad_message() -> None:
    assert rejected(frame(op="explode", id=4)).request_id == 4


def test_missing_op_is_a_bad_message() -> None:
    assert rejected(frame(id=4, task="t")).request_id == 4


def test_op_must_be_a_string() -> None:
    rejected(frame(op=5, id=1))


@pytest.mark.parametrize(
    "text",
    [
        frame(op="get", id=1, task="t", extra=1),
        frame(op="queues", id=1, queue="q"),
        frame(op="ack", runs=[], priority=1),
        frame(op="add", id=1, queue="q", options={"timeout": 1, "priority": 2}),
        frame(op="add", id=1, queue="q", streams=[{"path": ["a"], "upload": 1, "size": 3}]),
        frame(op="hello", protocol=1, version=2),
    ],
)
def test_unknown_field_is_rejected(text: str) -> None:
    rejected(text)


@pytest.mark.parametrize(
    "fields",
    [
        {"op": "get", "id": "1", "task": "t"},
        {"op": "get", "id": 1.5, "task": "t"},
        {"op": "get", "id": True, "task": "t"},
        {"op": "get", "id": -1, "task": "t"},
        {"op": "get", "id": 2**53 + 1, "task": "t"},
        {"op": "get", "id": 1, "task": 5},
        {"op": "get", "id": 1},
        {"op": "attempts", "id": 1},
        {"op": "attempts", "id": 1, "task": "bad id!"},
        {"op": "add", "id": 1, "queue": 5},
        {"op": "add", "id": 1, "queue": "q", "options": {"timeout": "60"}},
        {"op": "add", "id": 1, "queue": "q", "options": {"retries": -2}},
        {"op": "add", "id": 1, "queue": "q", "options": {"retries": 1.5}},
        {"op": "add", "id": 1, "queue": "q", "options": {"autoremove": "yes"}},
        {"op": "add", "id": 1, "queue": "q", "streams": [{"path": ["a", -1], "upload": 1}]},
        {"op": "add", "id": 1, "queue": "q", "streams": [{"path": "a", "upload": 1}]},
        {"op": "add", "id": 1, "queue": "q", "streams": [{"path": ["a"], "inline": "!!"}]},
        {"op": "list", "id": 1, "state": "running"},
        {"op": "list", "id": 1, "limit": 0},
        {"op": "list", "id": 1, "limit": 10001},
        {"op": "list", "id": 1, "cursor": "abc"},
        {"op": "list", "id": 1, "cursor": 42},
        {"op": "work", "id": 1, "queue": "q", "concurrency": 0},
        {"op": "work", "id": 1, "queue": "q", "concurrency": 10001},
        {"op": "work", "id": 1, "queue": "q", "concurrency": "2"},
        {"op": "ack", "runs": [["t1"]]},
        {"op": "ack", "runs": [["t1", -1]]},
        {"op": "ack", "runs": [{"task": "t1", "run": 1}]},
        {"op": "ack", "runs": "t1"},
        {"op": "progress", "task": "t", "run": 1, "progress": 1.5},
        {"op": "progress", "task": "t", "run": 1, "progress": -0.1},
        {"op": "progress", "task": "t", "run": "1", "progress": 0.5},
        {"op": "complete", "task": "t"},
        {"op": "fail", "task": "t", "run": 1, "error": "e" * 65537},
        {"op": "upload", "stream": -1},
        {"op": "upload", "stream": 2**32},
        {"op": "credit", "stream": 1, "bytes": 0},
        {"op": "credit", "stream": 1, "bytes": (1 << 30) + 1},
        {"op": "download", "stream": 1, "task": "t", "index": -1},
        {"op": "hello", "protocol": "1"},
        {"op": "hello", "protocol": 1, "client": "c" * 201},
        {"op": "history", "id": 1},
        {"op": "history", "id": 1, "queue": 5},
        {"op": "history", "id": 1, "queue": "q", "since": "1700000000"},
        {"op": "history", "id": 1, "queue": "q", "since": -1},
        {"op": "history", "id": 1, "queue": "q", "since": 1e300},
        {"op": "history", "id": 1, "queue": "q", "since": True},
        {"op": "history", "id": 1, "queue": "q", "until": 5},
    ],
)
def test_wrong_type_or_out_of_range_is_rejected(fields: dict[str, Any]) -> None:
    rejected(json.dumps(fields))


# -- queue names -------------------------------------------------------------------------

QUEUE_OPS = [
    lambda q: frame(op="add", id=1, queue=q),
    lambda q: frame(op="work", id=1, queue=q),
    lambda q: frame(op="list", id=1, queue=q),
    lambda q: frame(op="subscribe", id=1, queue=q),
    lambda q: frame(op="unsubscribe", id=1, queue=q),
    lambda q: frame(op="history", id=1, queue=q),
]
QUEUE_OP_IDS = ["add", "work", "list", "subscribe", "unsubscribe", "history"]


@pytest.mark.parametrize("make", QUEUE_OPS, ids=QUEUE_OP_IDS)
def test_queue_name_of_199_characters_is_accepted(make: Any) -> None:
    assert decode_single(make("q" * 199)).queue == "q" * 199


@pytest.mark.parametrize("make", QUEUE_OPS, ids=QUEUE_OP_IDS)
def test_queue_name_of_200_characters_is_rejected(make: Any) -> None:
    rejected(make("q" * 200))


@pytest.mark.parametrize("make", QUEUE_OPS, ids=QUEUE_OP_IDS)
def test_empty_queue_name_is_rejected(make: Any) -> None:
    rejected(make(""))


def test_queue_name_length_counts_characters_not_bytes() -> None:
    name = "é" * 199  # 398 bytes in UTF-8
    assert decode_single(frame(op="add", id=1, queue=name)).queue == name


@pytest.mark.parametrize("name", ["video encoding", "ffmpeg-results", "café ✓", "a/b", "日本"])
def test_printable_queue_names_are_accepted(name: str) -> None:
    assert decode_single(frame(op="add", id=1, queue=name)).queue == name


@pytest.mark.parametrize("char", ["\x00", "\x01", "\t", "\n", "\r", "\x1b", "\x1f", "\x7f"])
@pytest.mark.parametrize("make", QUEUE_OPS, ids=QUEUE_OP_IDS)
def test_queue_name_with_a_control_character_is_rejected(make: Any, char: str) -> None:
    rejected(make(f"a{char}b"))


@pytest.mark.parametrize("name", ["q\n", "\nq", "\x00", "q\x7f"])
def test_queue_name_with_control_character_at_an_end_is_rejected(name: str) -> None:
    rejected(frame(op="add", id=1, queue=name))


# -- task and worker ids -----------------------------------------------------------------

HOSTILE_IDS = [
    "../x",
    "/etc/passwd",
    "a" * 65,
    "",
    "a b",
    "a\\b",
    "C:x\\y",
    "t%2f",
    "é",
    "t\x00",
    "t\n",
    "\nt",
]
# A task's wire id may be scoped, ``<principal>/<id>`` (§3): one ``/``, a principal name
# that starts with a letter or digit, then a chosen id; nothing else with a ``/`` passes.
HOSTILE_REFS = [
    *HOSTILE_IDS,
    "a/b/c",
    "a//b",
    "a/",
    "/a",
    "./x",
    ".@/x",
    "-x/y",
    "a/../b",
    "a/b\n",
    "a b/c",
    "a" * 101 + "/x",
    "a/" + "b" * 65,
    "a/b@c",
]
SCOPED_IDS = ["alice/t1", "a" * 100 + "/" + "b" * 64, "ops@example.com/job:1", "7/.."]
CHOSEN_ID_FIELDS = [
    lambda t: frame(op="add", id=1, queue="q", task=t),
    lambda t: frame(op="add_many", id=1, queue="q", tasks=[{"task": t}]),
    lambda t: frame(op="work", id=1, queue="q", worker=t),
    lambda t: frame(op="stop", id=1, worker=t),
]
CHOSEN_ID_FIELD_IDS = ["add.task", "add_many.task", "work.worker", "stop.worker"]
TASK_REF_FIELDS = [
    lambda t: frame(op="get", id=1, task=t),
    lambda t: frame(op="remove", id=1, task=t),
    lambda t: frame(op="retry", id=1, task=t),
    lambda t: frame(op="ack", runs=[[t, 1]]),
    lambda t: frame(op="progress", task=t, run=1, progress=0.5),
    lambda t: frame(op="touch", task=t, run=1),
    lambda t: frame(op="complete", task=t, run=1),
    lambda t: frame(op="complete_many", runs=[[t, 1]]),
    lambda t: frame(op="release", runs=[[t, 1]]),
    lambda t: frame(op="fail", task=t, run=1),
    lambda t: frame(op="download", stream=1, task=t, index=0),
]
TASK_REF_FIELD_IDS = [
    "get",
    "remove",
    "retry",
    "ack",
    "progress",
    "touch",
    "complete",
    "complete_many",
    "release",
    "fail",
    "download",
]


@pytest.mark.parametrize("task_id", [*HOSTILE_IDS, "a/b", "alice/t1"], ids=repr)
@pytest.mark.parametrize("make", CHOSEN_ID_FIELDS, ids=CHOSEN_ID_FIELD_IDS)
def test_hostile_or_scoped_chosen_id_is_rejected(make: Any, task_id: str) -> None:
    """A client chooses only the part after the scope: a ``/`` in it is refused."""
    rejected(make(task_id))


@pytest.mark.parametrize("task_id", HOSTILE_REFS, ids=repr)
@pytest.mark.parametrize("make", TASK_REF_FIELDS, ids=TASK_REF_FIELD_IDS)
def test_hostile_task_id_is_rejected(make: Any, task_id: str) -> None:
    rejected(make(task_id))


@pytest.mark.parametrize("task_id", ["a" * 64, "t1", "job:2024-01-01_x.y", "A-Z_0-9"])
@pytest.mark.parametrize(
    "make", CHOSEN_ID_FIELDS + TASK_REF_FIELDS, ids=CHOSEN_ID_FIELD_IDS + TASK_REF_FIELD_IDS
)
def test_well_formed_task_or_worker_id_is_accepted(make: Any, task_id: str) -> None:
    assert not isinstance(decode_single(make(task_id)), BadMessage)


@pytest.mark.parametrize("task_id", SCOPED_IDS)
@pytest.mark.parametrize("make", TASK_REF_FIELDS, ids=TASK_REF_FIELD_IDS)
def test_scoped_task_id_is_accepted_where_a_task_is_named(make: Any, task_id: str) -> None:
    assert not isinstance(decode_single(make(task_id)), BadMessage)


def test_list_cursor_with_trailing_newline_is_rejected() -> None:
    rejected(frame(op="list", id=1, cursor="42\n"))


# -- BadMessage.request_id ---------------------------------------------------------------


def test_request_id_of_an_invalid_message_is_kept() -> None:
    bad = rejected(frame(op="get", id=17, task="../x"))
    assert bad.request_id == 17
    assert str(bad)  # says what is wrong


def test_request_id_is_read_whatever_its_position() -> None:
    assert rejected('{"task": "../x", "op": "get", "id": 23}').request_id == 23


@pytest.mark.parametrize("request_id", ["7", 1.5, True, None, [1], {"id": 1}])
def test_request_id_that_is_not_an_integer_is_not_reported(request_id: Any) -> None:
    assert rejected(json.dumps({"op": "get", "id": request_id, "task": "../x"})).request_id is None


def test_request_id_is_none_for_malformed_json() -> None:
    assert rejected('{"op": "get", "id": 5, ').request_id is None


def test_bad_message_is_returned_not_raised() -> None:
    (item,) = decode_frame("{")
    assert isinstance(item, BadMessage) and isinstance(item, Exception)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.binary(max_size=200))
def test_decode_frame_never_raises_on_bytes(data: bytes) -> None:
    items = decode_frame(data)
    assert items and all(isinstance(i, BadMessage | msgspec.Struct) for i in items)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(
    st.dictionaries(
        st.sampled_from(["op", "id", "task", "queue", "run", "runs", "stream", "x"]), JSON
    )
    | st.lists(JSON, max_size=4)
)
def test_decode_frame_never_raises_on_json(value: Any) -> None:
    items = decode_frame(json.dumps(value))
    assert all(isinstance(i, BadMessage | msgspec.Struct) for i in items)


# -- binary stream frames (§8) -----------------------------------------------------------


@pytest.mark.parametrize("stream", [0, 1, 0x01020304, 2**32 - 1])
@pytest.mark.parametrize("payload", [b"", b"x", bytes(range(256)) * 4])
def test_chunk_round_trip(stream: int, payload: bytes) -> None:
    packed = pack_chunk(stream, payload)
    assert len(packed) == HEADER_SIZE + len(payload)
    got_stream, got_payload = unpack_chunk(packed)
    assert got_stream == stream
    assert bytes(got_payload) == payload


def test_chunk_header_is_big_endian_stream_id() -> None:
    assert pack_chunk(0x01020304, b"ab") == b"\x01\x02\x03\x04ab"
    assert HEADER_SIZE == 4


def test_pack_chunk_takes_a_memoryview() -> None:
    assert pack_chunk(5, memoryview(b"hello")[1:3]) == b"\x00\x00\x00\x05el"


def test_unpack_chunk_returns_a_view_without_copying() -> None:
    _, payload = unpack_chunk(b"\x00\x00\x00\x01data")
    assert isinstance(payload, memoryview)
    assert payload.tobytes() == b"data"


@pytest.mark.parametrize("short", [b"", b"\x00", b"\x00\x00", b"\x00\x00\x00"])
def test_unpack_chunk_rejects_a_frame_shorter_than_its_header(short: bytes) -> None:
    with pytest.raises(ValueError):
        unpack_chunk(short)


def test_unpack_chunk_of_a_bare_header_has_an_empty_payload() -> None:
    assert unpack_chunk(b"\x00\x00\x00\x09") == (9, memoryview(b""))


# -- server messages (the few helpers) ---------------------------------------------------


def test_join_frame_of_one_part_is_that_part() -> None:
    assert join_frame([b'{"op":"result"}']) == b'{"op":"result"}'


def test_join_frame_of_several_parts_is_a_json_array() -> None:
    parts = [result(1, {"a": 1}), error(None, "bad_message", "no")]
    assert json.loads(join_frame(parts)) == [
        {"op": "result", "id": 1, "result": {"a": 1}},
        {"op": "error", "id": None, "code": "bad_message", "message": "no"},
    ]
