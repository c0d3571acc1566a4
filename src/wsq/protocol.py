"""The wire protocol as types: every message either side may send (docs/protocol.md).

Pure: no sockets, no clock. The server decodes client messages with :func:`decode_frame`
and encodes its own with :func:`encode`; the Python client does the reverse. Section
numbers (§) refer to docs/protocol.md, which is normative.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import msgspec

PROTOCOL_VERSION = 1

# §3 Limits, the defaults a server announces in its welcome.
MAX_MESSAGE = 1 << 20
WINDOW = 8 << 20
CHUNK = 1 << 20
INLINE_MAX = 64 << 10
MAX_BATCH = 1000

QUEUE_NAME_MAX = 199
_NO_CONTROL = r"^[^\x00-\x1f\x7f]+\Z"
QueueName = Annotated[
    str, msgspec.Meta(min_length=1, max_length=QUEUE_NAME_MAX, pattern=_NO_CONTROL)
]
TaskId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.:-]{1,64}\Z")]
"""An id a client chooses (``add``'s ``task``, a worker's id): never holds ``/``."""
WorkerId = TaskId
TaskRef = Annotated[
    str,
    msgspec.Meta(pattern=r"^(?:[A-Za-z0-9][A-Za-z0-9_.@:-]{0,99}/)?[A-Za-z0-9_.:-]{1,64}\Z"),
]
"""The id of an existing task, as the server answered it (§3): with an auth file, an id a
client chose is scoped to its principal, ``<principal>/<id>`` (a principal name as
docs/security.md allows it, then the chosen id); ids the server made, and every id on a
server without an auth file, are a bare :data:`TaskId`. Never resolved from a bare id."""
RequestId = Annotated[int, msgspec.Meta(ge=0, le=2**53)]
StreamId = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]
Fraction = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
PathItem = Annotated[str, msgspec.Meta(max_length=1024)] | Annotated[int, msgspec.Meta(ge=0)]
Path = Annotated[list[PathItem], msgspec.Meta(max_length=64)]
ErrorText = Annotated[str, msgspec.Meta(max_length=65536)]

StateName = Literal["waiting", "active", "completed", "failed"]


class _Msg(msgspec.Struct, tag_field="op", forbid_unknown_fields=True, omit_defaults=True):
    pass


# §4 Client -> server ------------------------------------------------------------------


class Hello(_Msg, tag="hello"):
    protocol: int
    client: Annotated[str, msgspec.Meta(max_length=200)] = ""
    token: Annotated[str, msgspec.Meta(max_length=4096)] | None = None
    session: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.:-]{16,64}\Z")] | None = None


class OptionsIn(msgspec.Struct, forbid_unknown_fields=True):
    timeout: float = 60.0
    retries: Annotated[int, msgspec.Meta(ge=-1, le=2**31 - 1)] = 0
    autoremove: bool = False


class StreamIn(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """A stream in the data of an ``add``: uploaded (``upload``) or ``inline`` bytes."""

    path: Path
    upload: StreamId | None = None
    inline: Annotated[bytes, msgspec.Meta(max_length=INLINE_MAX)] | None = None


class Add(_Msg, tag="add"):
    id: RequestId
    queue: QueueName
    data: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"null"))
    streams: Annotated[list[StreamIn], msgspec.Meta(max_length=1024)] = []
    options: OptionsIn = msgspec.field(default_factory=OptionsIn)
    task: TaskId | None = None


class NewTask(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """One task of an ``add_many``: like ``add``, with inline streams only."""

    data: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"null"))
    streams: Annotated[list[StreamIn], msgspec.Meta(max_length=1024)] = []
    options: OptionsIn = msgspec.field(default_factory=OptionsIn)
    task: TaskId | None = None


class AddMany(_Msg, tag="add_many"):
    id: RequestId
    queue: QueueName
    tasks: Annotated[list[NewTask], msgspec.Meta(min_length=1, max_length=MAX_BATCH)]


PageLimit = Annotated[int, msgspec.Meta(ge=1, le=10000)]


class ListTasks(_Msg, tag="list"):
    id: RequestId
    queue: QueueName | None = None
    state: StateName | None = None
    limit: PageLimit = 1000
    cursor: Annotated[str, msgspec.Meta(pattern=r"^[0-9]{1,19}\Z")] | None = None


class Queues(_Msg, tag="queues"):
    """Queue names in order, a page at a time (docs/protocol.md, ``queues``)."""

    id: RequestId
    limit: PageLimit = 1000
    cursor: QueueName | None = None  # the last name of the previous page


class Get(_Msg, tag="get"):
    id: RequestId
    task: TaskRef


class Attempts(_Msg, tag="attempts"):
    """A task's runs, with who held each, when, and how it ended (docs/protocol.md §4.3)."""

    id: RequestId
    task: TaskRef


class Remove(_Msg, tag="remove"):
    id: RequestId
    task: TaskRef


class Retry(_Msg, tag="retry"):
    id: RequestId
    task: TaskRef


class Subscribe(_Msg, tag="subscribe"):
    id: RequestId
    queue: QueueName | None = None


class Unsubscribe(_Msg, tag="unsubscribe"):
    id: RequestId
    queue: QueueName | None = None


class Work(_Msg, tag="work"):
    id: RequestId
    queue: QueueName
    concurrency: Annotated[int, msgspec.Meta(ge=1, le=10000)] = 1
    worker: WorkerId | None = None


class StopWork(_Msg, tag="stop"):
    id: RequestId
    worker: WorkerId


class RunRef(msgspec.Struct, array_like=True):
    task: TaskRef
    run: Annotated[int, msgspec.Meta(ge=0)]


class Ack(_Msg, tag="ack"):
    runs: Annotated[list[RunRef], msgspec.Meta(max_length=10000)]
    id: RequestId | None = None


class Progress(_Msg, tag="progress"):
    task: TaskRef
    run: int
    progress: Fraction
    id: RequestId | None = None


class Touch(_Msg, tag="touch"):
    task: TaskRef
    run: int
    id: RequestId | None = None


class Complete(_Msg, tag="complete"):
    task: TaskRef
    run: int
    id: RequestId | None = None


class CompleteMany(_Msg, tag="complete_many"):
    runs: Annotated[list[RunRef], msgspec.Meta(min_length=1, max_length=MAX_BATCH)]
    id: RequestId | None = None


class Release(_Msg, tag="release"):
    runs: Annotated[list[RunRef], msgspec.Meta(min_length=1, max_length=MAX_BATCH)]
    id: RequestId | None = None


class Fail(_Msg, tag="fail"):
    task: TaskRef
    run: int
    error: ErrorText = ""
    id: RequestId | None = None


class Upload(_Msg, tag="upload"):
    stream: StreamId


class UploadEnd(_Msg, tag="upload_end"):
    stream: StreamId


class UploadAbort(_Msg, tag="upload_abort"):
    stream: StreamId
    error: ErrorText = ""


class Download(_Msg, tag="download"):
    stream: StreamId
    task: TaskRef
    index: Annotated[int, msgspec.Meta(ge=0)]
    offset: Annotated[int, msgspec.Meta(ge=0)] = 0


class Credit(_Msg, tag="credit"):
    stream: StreamId
    bytes: Annotated[int, msgspec.Meta(ge=1, le=1 << 30)]


class Cancel(_Msg, tag="cancel"):
    stream: StreamId


class Stats(_Msg, tag="stats"):
    """Queues' counts and workers in name order, a page at a time (docs/protocol.md)."""

    id: RequestId
    limit: PageLimit = 1000
    cursor: QueueName | None = None  # the last name of the previous page


class Workers(_Msg, tag="workers"):
    """Workers in (node, id) order, a page at a time (docs/protocol.md, ``workers``)."""

    id: RequestId
    queue: QueueName | None = None
    limit: PageLimit = 1000
    cursor: Annotated[str, msgspec.Meta(max_length=1024)] | None = None


class History(_Msg, tag="history"):
    """The last hour of one queue, second by second (docs/protocol.md §4.6)."""

    id: RequestId
    queue: QueueName
    since: Annotated[float, msgspec.Meta(ge=0, le=2**53)] | None = None


class Ping(_Msg, tag="ping"):
    """An application-level heartbeat, for clients that cannot send WebSocket pings."""

    id: RequestId


ClientMessage = (
    Hello
    | Add
    | AddMany
    | ListTasks
    | Queues
    | Get
    | Attempts
    | Remove
    | Retry
    | Subscribe
    | Unsubscribe
    | Work
    | StopWork
    | Ack
    | Progress
    | Touch
    | Complete
    | CompleteMany
    | Release
    | Fail
    | Upload
    | UploadEnd
    | UploadAbort
    | Download
    | Credit
    | Cancel
    | Ping
    | Stats
    | Workers
    | History
)

_client_decoder = msgspec.json.Decoder(ClientMessage)
_raw_list_decoder = msgspec.json.Decoder(list[msgspec.Raw])
_batch_decoder = msgspec.json.Decoder(list[ClientMessage])


class _IdProbe(msgspec.Struct):
    id: Any = None


_id_probe = msgspec.json.Decoder(_IdProbe)


class BadMessage(Exception):
    """A client message that could not be decoded; ``id`` is its request id if readable."""

    def __init__(self, message: str, request_id: int | None) -> None:
        super().__init__(message)
        self.request_id = request_id


_DECODE_ERRORS = (
    msgspec.DecodeError,
    msgspec.ValidationError,
    RecursionError,
    UnicodeDecodeError,
)


def _describe(exc: Exception) -> str:
    if isinstance(exc, RecursionError):
        return "JSON nested too deeply."
    return str(exc)


def probe_id(raw: bytes | str) -> int | None:
    """The request id of a message that failed to decode, if it can be read."""
    try:
        value = _id_probe.decode(raw).id
    except _DECODE_ERRORS:
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def decode_one(raw: bytes | str) -> ClientMessage:
    """Decode one client message; raise :class:`BadMessage` naming what is wrong."""
    try:
        message: ClientMessage = _client_decoder.decode(raw)
        return message
    except _DECODE_ERRORS as exc:
        raise BadMessage(_describe(exc), probe_id(raw)) from None


def decode_frame(frame: bytes | str) -> Sequence[ClientMessage | BadMessage]:
    """Decode a text frame: one message object, or an array of them (§2). A message that
    fails is returned as a :class:`BadMessage` in its place so the rest still apply."""
    head = frame.lstrip()[:1]
    if head not in ("[", b"["):
        try:
            return [decode_one(frame)]
        except BadMessage as exc:
            return [exc]
    try:  # the common case, a batch of good messages, in one pass
        messages: list[ClientMessage] = _batch_decoder.decode(frame)
    except _DECODE_ERRORS:
        pass
    else:
        if 0 < len(messages) <= MAX_BATCH:
            return messages
    try:
        parts = _raw_list_decoder.decode(frame)
    except _DECODE_ERRORS as exc:
        return [BadMessage(_describe(exc), None)]
    if not parts:
        return [BadMessage("An empty batch holds no message.", None)]
    if len(parts) > MAX_BATCH:
        return [BadMessage(f"A batch holds at most {MAX_BATCH} messages, not {len(parts)}.", None)]
    out: list[ClientMessage | BadMessage] = []
    for part in parts:
        try:
            out.append(decode_one(bytes(part)))
        except BadMessage as exc:
            out.append(exc)
    return out


# §5 Server -> client ------------------------------------------------------------------

_encoder = msgspec.json.Encoder()


def encode(message: dict[str, Any]) -> bytes:
    """Encode one server message (a dict with ``op``) as JSON bytes."""
    return _encoder.encode(message)


def join_frame(parts: list[bytes]) -> bytes:
    """One text frame holding the encoded messages ``parts``, batched as an array (§2)."""
    if len(parts) == 1:
        return parts[0]
    return b"[" + b",".join(parts) + b"]"


def welcome(
    connection: str,
    server: str,
    heartbeat: float,
    max_message: int = MAX_MESSAGE,
    node: str | None = None,
    scope: str | None = None,
) -> bytes:
    """``scope``: with an auth file, the prefix (``<principal>/``) the server puts before
    the task ids this connection chooses (§4.1), so a client can tell a task's id before
    its add is answered; omitted without one."""
    return encode(
        {
            "op": "welcome",
            "protocol": PROTOCOL_VERSION,
            "server": server,
            **({"node": node} if node is not None else {}),
            **({"scope": scope} if scope is not None else {}),
            "connection": connection,
            "heartbeat": heartbeat,
            "limits": {
                "max_message": max_message,
                "window": WINDOW,
                "chunk": CHUNK,
                "inline": INLINE_MAX,
                "batch": MAX_BATCH,
            },
        }
    )


def result(request_id: int, value: Any = None) -> bytes:
    return encode({"op": "result", "id": request_id, "result": value})


def error(request_id: int | None, code: str, message: str) -> bytes:
    return encode({"op": "error", "id": request_id, "code": code, "message": message})


def stream_error(stream: int, code: str, message: str) -> bytes:
    """An upload or download stopped (§8.2, §8.4)."""
    return encode({"op": "stream_error", "stream": stream, "code": code, "message": message})


# §8 Stream frames ---------------------------------------------------------------------

_HEADER = struct.Struct(">I")
HEADER_SIZE = _HEADER.size


def pack_chunk(stream: int, payload: bytes | memoryview) -> bytes:
    """A binary frame: the 4-byte big-endian stream id, then the payload."""
    return _HEADER.pack(stream) + payload


def unpack_chunk(frame: bytes) -> tuple[int, memoryview]:
    """Split a binary frame into its stream id and payload; raise ValueError if short."""
    if len(frame) < HEADER_SIZE:
        raise ValueError("Binary frame shorter than its 4-byte stream id.")
    (stream,) = _HEADER.unpack_from(frame)
    return stream, memoryview(frame)[HEADER_SIZE:]
