"""Log setup for the server: text or one JSON object per line.

Every record the server writes carries a stable ``action`` key (``connect``,
``task completed``, ...) and, where one applies, ``connection``, ``queue``, ``task`` and
``worker``; the text format appends them as ``key=value``. JSON records carry ``node``,
the server's node name (``--node-name``); text lines carry it when it was given.

Much of what is logged comes from clients (client names, queue names, error texts). In
the text format every record is one line that no client can forge: characters that are
not printable (newlines, line separators, escapes) are written as ``\n``, ``\u2028``,
..., a field value with a space, ``=`` or ``"`` is quoted, and long values are cut. The
JSON format escapes by construction.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from pythonjsonlogger.json import JsonFormatter

logger = logging.getLogger("wsq.server")

_FIELDS = ("action", "node", "connection", "queue", "task", "worker", "error", "will_retry")


MESSAGE_MAX = 2000
"""Characters of a message kept in the text format (the rest is counted)."""
FIELD_MAX = 200
"""Characters of a field value kept in the text format."""


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        clean = logging.makeLogRecord(record.__dict__)
        clean.msg, clean.args = escape(record.getMessage(), MESSAGE_MAX), None
        clean.exc_info, clean.exc_text, clean.stack_info = None, None, None
        line = super().format(clean)
        extras = [
            f"{key}={field_value(getattr(record, key))}"
            for key in _FIELDS[1:]
            if getattr(record, key, None) is not None
        ]
        return " ".join([line, *extras]) + self._trace(record)

    def _trace(self, record: logging.LogRecord) -> str:
        """A traceback, each of its lines indented (no record line starts with a space)."""
        text = self.formatException(record.exc_info) if record.exc_info else ""
        if record.stack_info:
            text += "\n" + self.formatStack(record.stack_info)
        return "".join(f"\n    {escape(part, MESSAGE_MAX)}" for part in text.splitlines())


def escape(text: str, limit: int) -> str:
    """``text`` on one line: characters that are not printable escaped, cut at ``limit``."""
    if len(text) > limit:
        text = f"{text[:limit]}...({len(text) - limit} more)"
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escaped(c) for c in text)


def field_value(value: Any) -> str:
    """A ``key=value`` value that cannot pass for more fields: as is when it is plain
    printable text, else quoted as a JSON string (which decodes back to the value)."""
    text = str(value)
    if len(text) > FIELD_MAX:
        text = f"{text[:FIELD_MAX]}...({len(text) - FIELD_MAX} more)"
    if text and text.isprintable() and not any(c in text for c in ' ="\\'):
        return text
    return json.dumps(text)


def _escaped(char: str) -> str:
    """A character as a Python string literal writes it: ``\\n``, ``\\x1b``, ``\\u2028``."""
    return repr(char)[1:-1] if repr(char)[1:-1] != char else f"\\u{ord(char):04x}"


class _Node(logging.Filter):
    """Adds ``node`` (this server's node name) to every record: JSON records always carry
    it, text lines only when the name was given (``--node-name``), so a single server's
    lines stay short."""

    def __init__(self, json: bool) -> None:
        super().__init__()
        self.json = json
        self.node: str | None = None  # what records get: None adds nothing

    def named(self, name: str, *, shown: bool) -> None:
        self.node = name if shown or self.json else None

    def filter(self, record: logging.LogRecord) -> bool:
        if self.node is not None and not hasattr(record, "node"):
            record.node = self.node
        return True


_node_filters: list[_Node] = []


def name_node(name: str, *, shown: bool) -> None:
    """Name the node in the records of the handlers :func:`configure` installed."""
    for node in _node_filters:
        node.named(name, shown=shown)


def configure(level: str = "info", fmt: str = "text") -> None:
    """Send wsq's logs to stderr at ``level`` in ``fmt`` (``text`` or ``json``)."""
    handler = logging.StreamHandler(sys.stderr)
    node = _Node(json=fmt == "json")
    handler.addFilter(node)
    _node_filters[:] = [node]
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
