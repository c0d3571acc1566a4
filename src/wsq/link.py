"""How far a TCP connection got, read from the kernel (Linux): whether a peer that has
not answered a ping is gone or its link is only busy (docs/decisions.md, "A slow link is
read from the kernel")."""

from __future__ import annotations

import asyncio
import fcntl
import socket
import struct
import sys
import termios
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple


class LinkState(NamedTuple):
    acked: int  # bytes the peer's TCP has acknowledged since the connection began
    received: int  # bytes received from the peer since the connection began
    unsent: int  # bytes the kernel holds that the peer has not acknowledged yet


_TCP_INFO = getattr(socket, "TCP_INFO", None) if sys.platform == "linux" else None
# tcp_info's tcpi_bytes_acked and tcpi_bytes_received (Linux 4.1 and later).
_BYTES = struct.Struct("=QQ")
_BYTES_AT = 120


def link_state(sock: socket.socket | None) -> LinkState | None:
    """How far the kernel got with ``sock``, from TCP_INFO and SIOCOUTQ (Linux); ``None``
    where that cannot be read (another system, a closed socket, a socket that is not
    TCP)."""
    if sock is None or _TCP_INFO is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 256)
        unsent = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except (OSError, ValueError):
        return None
    if len(info) < _BYTES_AT + _BYTES.size:
        return None
    acked, received = _BYTES.unpack_from(info, _BYTES_AT)
    return LinkState(acked, received, int.from_bytes(unsent, sys.byteorder, signed=True))


def delivered(before: LinkState | None, after: LinkState | None) -> bool:
    """Whether the peer acknowledged bytes between the two readings (False if unknown)."""
    return before is not None and after is not None and after.acked > before.acked


def busy(before: LinkState | None, after: LinkState | None) -> bool:
    """Whether bytes moved either way between the two readings (False if unknown)."""
    return delivered(before, after) or (
        before is not None and after is not None and after.received > before.received
    )


async def answered(
    pong: Awaitable[Any], wait: float, sock: socket.socket | None, heard: Callable[[], int]
) -> bool:
    """Wait for ``pong`` (of a heartbeat ping) ``wait`` seconds, and again as long as the
    path was busy meanwhile: ``heard()`` (frames received so far) grew, or bytes moved
    either way on ``sock``. A pong waits behind what fills a slow link. False: silence."""
    while True:
        frames, before = heard(), link_state(sock)
        try:
            async with asyncio.timeout(wait):
                await asyncio.shield(pong)
            return True
        except TimeoutError:
            if heard() <= frames and not busy(before, link_state(sock)):
                return False
