"""The logger handed to the WebSocket library (picows) by the server and the client."""

from __future__ import annotations

import logging
from typing import Any


class TransportLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Logs the WebSocket library's records under ``name`` at levels that fit wsq.

    picows reports a peer's protocol violation (a malformed or oversized frame) at ERROR, and
    every write-buffer pause at WARNING. For wsq those are the other side's fault or normal
    backpressure, not errors of this process: they go out at INFO and DEBUG. Records that
    carry a traceback (a fault inside the library or in wsq's handler) keep their level.
    """

    def __init__(self, name: str) -> None:
        super().__init__(logging.getLogger(name), {})

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if not kwargs.get("exc_info"):
            level = logging.INFO if level >= logging.ERROR else logging.DEBUG
        if self.logger.isEnabledFor(level):
            self.logger.log(level, msg, *args, **kwargs)
