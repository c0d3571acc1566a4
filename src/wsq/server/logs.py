"""Log setup for the server: text or one JSON object per line.

Every record the server writes carries a stable ``action`` key (``connect``,
``task completed``, ...) and, where one applies, ``connection``, ``queue``, ``task`` and
``worker``; the text format appends them as ``key=value``.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from pythonjsonlogger.json import JsonFormatter

logger = logging.getLogger("wsq.server")

_FIELDS = ("action", "connection", "queue", "task", "worker", "error", "will_retry")


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = [
            f"{key}={getattr(record, key)}"
            for key in _FIELDS[1:]
            if getattr(record, key, None) is not None
        ]
        return " ".join([line, *extras]) if extras else line


def configure(level: str = "info", fmt: str = "text") -> None:
    """Send wsq's logs to stderr at ``level`` in ``fmt`` (``text`` or ``json``)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)-7s %(message)s"))
    root = logging.getLogger("wsq")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def log(level: int, action: str, message: str | None = None, **fields: Any) -> None:
    """Log ``message`` (default: ``action``) with ``action`` and ``fields`` attached."""
    if logger.isEnabledFor(level):
        logger.log(level, message or action, extra={"action": action, **fields})
