"""Event plumbing shared by Client, Queue and Task: ``on(event, handler)``."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("wsq.client")

Handler = Callable[..., Any]

SERVER_EVENTS = frozenset(
    {
        "task added",
        "task queued",
        "task started",
        "task progress",
        "task completed",
        "task failed",
        "task deleted",
        "worker added",
        "worker removed",
        "worker started",
    }
)
TASK_EVENTS = frozenset(
    {"added", "queued", "started", "progress", "completed", "failed", "deleted", "abort"}
)


@dataclass(frozen=True, slots=True)
class Event:
    """One server event as :meth:`Client.events` yields it: the name and its JSON args."""

    event: str
    args: list[Any] = field(default_factory=list)


class Emitter:
    """Handlers per event name. A handler may be sync or async; an async one runs as a task.
    A handler that raises is logged and reported as an ``'error'`` event, never re-raised."""

    def __init__(self) -> None:
        self._handlers: dict[str, list[Handler]] = {}
        self._handler_tasks: set[asyncio.Future[Any]] = set()

    def on(self, event: str, handler: Handler) -> Handler:
        """Call ``handler`` on each ``event``; returns ``handler`` (usable as a decorator
        via ``functools.partial``)."""
        self._handlers.setdefault(event, []).append(handler)
        return handler

    def off(self, event: str, handler: Handler) -> None:
        handlers = self._handlers.get(event, [])
        if handler in handlers:
            handlers.remove(handler)

    def listens(self, event: str) -> bool:
        return bool(self._handlers.get(event))

    def emit(self, event: str, *args: Any) -> None:
        for handler in list(self._handlers.get(event, ())):
            try:
                result = handler(*args)
            except Exception as exc:
                self._handler_failed(event, exc)
                continue
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                self._handler_tasks.add(task)
                task.add_done_callback(functools.partial(self._handler_done, event))

    def _handler_done(self, event: str, task: asyncio.Future[Any]) -> None:
        self._handler_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._handler_failed(event, task.exception())

    def _handler_failed(self, event: str, exc: BaseException | None) -> None:
        logger.error("handler for %r raised %r", event, exc)
        if event != "error" and isinstance(exc, Exception):
            self.emit("error", exc)
