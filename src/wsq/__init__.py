"""wsq: a WebSocket task queue whose tasks can carry streaming data."""

from wsq._version import VERSION
from wsq.client.client import Client
from wsq.client.events import Event
from wsq.client.queue import Queue, TaskList, Worker
from wsq.client.streams import Stream
from wsq.client.task import Task
from wsq.exceptions import (
    ConnectionLost,
    Forbidden,
    InvalidArgument,
    InvalidState,
    LimitExceeded,
    ProtocolError,
    ServerError,
    StaleRun,
    StorageFull,
    TaskNotFound,
    TooLarge,
    Unauthorized,
    Unavailable,
    UploadFailed,
    WsqError,
)
from wsq.server.app import Server

__version__ = VERSION

__all__ = [
    "Client",
    "ConnectionLost",
    "Event",
    "Forbidden",
    "InvalidArgument",
    "InvalidState",
    "LimitExceeded",
    "ProtocolError",
    "Queue",
    "Server",
    "ServerError",
    "StaleRun",
    "StorageFull",
    "Stream",
    "Task",
    "TaskList",
    "TaskNotFound",
    "TooLarge",
    "Unauthorized",
    "Unavailable",
    "UploadFailed",
    "Worker",
    "WsqError",
    "__version__",
]
