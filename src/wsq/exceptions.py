"""wsq's exceptions, one tree under :class:`WsqError`.

::

    WsqError                      code
     ├── ConnectionLost           connection_lost   (also a ConnectionError)
     ├── ProtocolError            bad_message, unsupported_protocol
     ├── InvalidArgument          invalid_argument
     ├── TooLarge                 too_large
     ├── TaskNotFound             not_found
     ├── InvalidState             invalid_state
     │    └── StaleRun            stale_run
     ├── UploadFailed             upload_failed
     ├── Unavailable              unavailable       (a backing service: S3, PostgreSQL)
     └── ServerError              internal, shutting_down

An error that crosses the wire carries its ``code`` (docs/protocol.md §7); the client
raises the class registered for that code, and :class:`WsqError` itself for a code it
does not know.
"""

from __future__ import annotations


class WsqError(Exception):
    """Base of every wsq error. ``code`` is the stable wire code."""

    code = "error"

    def __init__(self, message: str = "", *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


class ConnectionLost(WsqError, ConnectionError):
    """The connection to the server dropped while this call needed it."""

    code = "connection_lost"


class ProtocolError(WsqError):
    """A message broke the protocol: malformed, unknown, or of the wrong shape."""

    code = "bad_message"


class InvalidArgument(WsqError):
    """A well-formed message carried a value out of range (a queue name, an option)."""

    code = "invalid_argument"


class TooLarge(WsqError):
    """A message or value exceeded a size limit."""

    code = "too_large"


class TaskNotFound(WsqError):
    """No task has that id."""

    code = "not_found"


class InvalidState(WsqError):
    """The task's state does not allow the operation."""

    code = "invalid_state"


class StaleRun(InvalidState):
    """A worker reported on an attempt that already ended (timed out, removed, retried)."""

    code = "stale_run"


class UploadFailed(WsqError):
    """A stream of the task data could not be stored, so the task was not created."""

    code = "upload_failed"


class StorageFull(UploadFailed):
    """The server's blob storage is full: its ``max_blob_bytes`` quota, or the disk."""

    code = "storage_full"


class LimitExceeded(WsqError):
    """A per-connection count limit: requests in flight, or open uploads."""

    code = "too_many"


class Unavailable(WsqError):
    """A service the server relies on (the S3 blob store, the PostgreSQL state store) is
    unreachable or refuses; nothing was done. Retrying later may succeed."""

    code = "unavailable"


class ServerError(WsqError):
    """The server failed, or is shutting down."""

    code = "internal"


class Unauthorized(WsqError):
    """The server has an auth file and the hello carried no token, or an unknown one."""

    code = "unauthorized"


class Forbidden(WsqError):
    """The connection's token does not grant the role this request needs on its queue."""

    code = "forbidden"


_BY_CODE: dict[str, type[WsqError]] = {
    cls.code: cls
    for cls in (
        ConnectionLost,
        ProtocolError,
        InvalidArgument,
        TooLarge,
        TaskNotFound,
        InvalidState,
        StaleRun,
        UploadFailed,
        StorageFull,
        LimitExceeded,
        Unavailable,
        ServerError,
        Unauthorized,
        Forbidden,
    )
}
_BY_CODE["unsupported_protocol"] = ProtocolError
_BY_CODE["shutting_down"] = ServerError


def error_from_wire(code: str, message: str) -> WsqError:
    """The exception to raise for an error answer with this ``code``."""
    cls = _BY_CODE.get(code, WsqError)
    return cls(message, code=code)
