"""Listening sockets that bound what the server holds before a client says ``hello``.

The WebSocket library's server (picows, on aiofastnet) accepts every connection it can and
gives each ten seconds to finish its handshake. Two things are not bounded there, and
:class:`GuardedSocket` bounds them where every accepted connection passes, its
``accept()``:

- **How many** sockets wait for their TCP, TLS, HTTP or WebSocket handshake or for
  ``hello``: past ``max_pending``, or past what the descriptor limit leaves room for, the
  oldest waiting socket is shut down to make room for the new one (a crowd of idle
  sockets delays a real client by a round trip, never locks it out).
- **Running out of descriptors.** When ``accept()`` fails with EMFILE the socket stays
  readable; aiofastnet 1.2.0's back-off then raises (it calls ``remove_reader`` on the
  socket instead of the loop) and the loop retries at once: a core spins and the log
  fills with tracebacks. Here ``accept()`` never lets EMFILE out: it closes a spare
  descriptor kept for this, accepts the waiting connection and closes it at once (the
  client sees its connection closed), and repeats until the backlog is empty; one log
  line says how many were refused (docs/decisions.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import socket
import time
from typing import Any

from wsq.server.logs import log

_EXHAUSTED = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
RESERVED_DESCRIPTORS = 64
"""Descriptors kept free of connections for the stores' files, the log and the spare."""
BURST = 100
"""Connections one readiness of the listening socket may refuse before the loop moves on
(the rest wait for its next turn), so a flood cannot hold the event loop."""
REPORT_EVERY = 10.0
"""Seconds between log lines about refused or evicted connections."""


class Gate:
    """Counts the accepted sockets of a server and the ones still waiting for hello."""

    def __init__(self, max_pending: int) -> None:
        self.max_pending = max_pending
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.capacity = None if soft == resource.RLIM_INFINITY else soft - RESERVED_DESCRIPTORS
        self.open = 0
        self._waiting: dict[Any, _Accepted] = {}  # oldest first
        self._spare: int | None = _reserve()
        self._refused = 0
        self._evicted = 0
        self._reported = -REPORT_EVERY
        self._flush: asyncio.TimerHandle | None = None

    @property
    def pending(self) -> int:
        """Sockets accepted that have not said hello yet."""
        return len(self._waiting)

    def greeted(self, peer: Any) -> socket.socket | None:
        """The connection from ``peer`` said hello: it no longer waits. Returns its socket
        (for :func:`wsq.link.link_state`), if it was waiting here."""
        if peer is None:
            return None
        return self._waiting.pop(_key(peer), None)

    def drop_waiting(self) -> None:
        """The server is closing: shut down every socket that has not said hello. One in
        the middle of its TCP, TLS or HTTP handshake would otherwise keep the close
        waiting until its handshake timed out (ten seconds a socket that sends nothing);
        greeted connections are closed politely by the WebSocket library."""
        for sock in list(self._waiting.values()):
            self._waiting.pop(sock.peer_key, None)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None

    def _admit(self, sock: _Accepted, peer: Any) -> bool:
        """Count a new socket, making room by shutting down the oldest waiting one."""
        self.open += 1
        self._waiting[_key(peer)] = sock
        while self._waiting and (
            len(self._waiting) > self.max_pending
            or (self.capacity is not None and self.open > self.capacity)
        ):
            self._evict(next(iter(self._waiting.values())))
        if self.capacity is not None and self.open > self.capacity:
            sock.close()  # every place is held by a greeted connection
            self._count_refused(1)
            return False
        return True

    def _evict(self, sock: _Accepted) -> None:
        self._waiting.pop(sock.peer_key, None)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # its transport sees the end and closes it
        self._evicted += 1
        self._report()

    def _closed(self, sock: _Accepted) -> None:
        self.open -= 1
        if self._waiting.get(sock.peer_key) is sock:
            del self._waiting[sock.peer_key]

    def _shed(self, listener: socket.socket) -> None:
        """Out of descriptors: accept each waiting connection on the spare descriptor
        and close it, so the listening socket stops being readable."""
        refused = 0
        while refused < BURST:
            if self._spare is None:
                self._spare = _reserve()
                if self._spare is None:
                    break  # nothing to accept with; retried on the next readiness
            os.close(self._spare)
            self._spare = None
            try:
                fd, _ = listener._accept()  # type: ignore[attr-defined]
            except OSError:
                break
            finally:
                self._spare = _reserve()
            os.close(fd)
            refused += 1
        self._count_refused(refused)

    def _count_refused(self, count: int) -> None:
        self._refused += count
        self._report()

    def _report(self) -> None:
        """Log what was refused or evicted: at once, then at most every REPORT_EVERY s
        (what happens in between is counted and reported when that time is up)."""
        now = time.monotonic()
        if not (self._refused or self._evicted) or self._flush is not None:
            return
        wait = self._reported + REPORT_EVERY - now
        if wait > 0:
            self._flush = asyncio.get_running_loop().call_later(wait, self._flushed)
            return
        self._reported = now
        if self._refused:
            log(
                logging.WARNING,
                "connections refused",
                f"refused {self._refused} connections: out of file descriptors"
                f" ({self.open} sockets open)",
            )
        if self._evicted:
            log(
                logging.WARNING,
                "connections evicted",
                f"closed {self._evicted} connections that had not said hello,"
                f" to make room ({self.open} sockets open)",
            )
        self._refused = self._evicted = 0

    def _flushed(self) -> None:
        self._flush = None
        self._report()


class GuardedSocket(socket.socket):
    """A listening socket whose ``accept()`` reports to a :class:`Gate`."""

    def __init__(self, family: int, gate: Gate) -> None:
        super().__init__(family, socket.SOCK_STREAM)
        self.gate = gate

    def accept(self) -> tuple[socket.socket, Any]:
        for _ in range(BURST):
            try:
                fd, peer = self._accept()  # type: ignore[attr-defined]
            except OSError as exc:
                if exc.errno not in _EXHAUSTED:
                    raise
                self.gate._shed(self)
                raise BlockingIOError(errno.EAGAIN, "no descriptors; connections refused") from None
            sock = _Accepted(self.family, self.type, self.proto, fileno=fd)
            sock.gate, sock.peer_key = self.gate, _key(peer)
            if self.gate._admit(sock, peer):
                return sock, peer
        raise BlockingIOError(errno.EAGAIN, "connections refused; more on the next turn")


class _Accepted(socket.socket):
    """An accepted socket that tells its gate when it is closed."""

    gate: Gate | None = None
    peer_key: Any = None

    def close(self) -> None:
        gate, self.gate = self.gate, None
        super().close()
        if gate is not None:
            gate._closed(self)


def listening_sockets(host: str, port: int, gate: Gate) -> list[GuardedSocket]:
    """Bind ``host`` (every address it resolves to; ``""`` for all interfaces) at
    ``port``; with port 0 the first address picks a free port and the others share it.
    Raise OSError if an address cannot be bound (nothing stays open)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[GuardedSocket] = []
    seen = set()
    try:
        for family, _, _, _, address in infos:
            if (family, address[0]) in seen:
                continue
            seen.add((family, address[0]))
            sock = GuardedSocket(family, gate)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _key(peer: Any) -> Any:
    return tuple(peer[:2]) if isinstance(peer, tuple) else peer


def _reserve() -> int | None:
    """A spare descriptor, to be closed when an accept needs one."""
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
