"""A loopback TCP proxy for fault tests: forwards bytes both ways until told to blackhole
them, after which it keeps every connection open but delivers nothing in either direction
(a network path that died without a FIN or RST)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator


class Proxy:
    def __init__(
        self,
        target_host: str,
        target_port: int,
        down_rate: float | None = None,
        up_rate: float | None = None,
    ) -> None:
        self._target = (target_host, target_port)
        # Bytes per second delivered from the server to the client and from the client to
        # the server (a slow link), or as fast as they come.
        self.down_rate = down_rate
        self.up_rate = up_rate
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._open = asyncio.Event()
        self._open.set()
        self._down = asyncio.Event()  # delivering from the server to the client
        self._down.set()
        self._refusing = False
        self._drops = 0  # how many times drop() ran
        self.port = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def blackhole(self) -> None:
        """Stop delivering; bytes read from now on are dropped."""
        self._open.clear()

    def restore(self) -> None:
        self._open.set()
        self._down.set()
        self._refusing = False

    def refuse(self) -> None:
        """Cut every connection open now and each new one at once (a server that is
        down: connections fail fast), until :meth:`restore`."""
        self._refusing = True
        self.drop()

    def hold_answers(self) -> None:
        """Keep delivering what clients send, but drop what the server sends back."""
        self._down.clear()

    def drop(self) -> None:
        """Cut every connection open now (an RST both ways), also one still connecting to
        the server; new ones are still accepted."""
        self._drops += 1
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    async def start(self) -> Proxy:
        if self.up_rate is None:
            self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        else:  # a small receive buffer, as in _connect_upstream
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
            sock.bind(("127.0.0.1", 0))
            self._server = await asyncio.start_server(self._accept, sock=sock, limit=1 << 14)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refusing:
            writer.transport.abort()
            return
        drops = self._drops
        try:
            up_reader, up_writer = await self._connect_upstream()
        except OSError:
            writer.transport.abort()
            return
        if self._drops != drops:  # cut (or refused) while it connected
            writer.transport.abort()
            up_writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        pipes = (
            (reader, up_writer, None, self.up_rate),
            (up_reader, writer, self._down, self.down_rate),
        )
        for source, sink, gate, rate in pipes:
            task = asyncio.create_task(self._pipe(source, sink, gate, rate))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _connect_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.down_rate is None:
            return await asyncio.open_connection(*self._target)
        # A slow link holds little: a small receive buffer here, so that what the link has
        # not carried yet stays in the server's socket, as on a real one (not in a buffer
        # of megabytes that loopback would grant and acknowledge at once).
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, self._target)
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock, limit=1 << 14)

    async def _pipe(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        gate: asyncio.Event | None,
        rate: float | None = None,
    ) -> None:
        try:
            while data := await source.read(1 << 14 if rate else 1 << 16):
                if self._open.is_set() and (gate is None or gate.is_set()):
                    sink.write(data)
                    await sink.drain()
                    if rate:
                        await asyncio.sleep(len(data) / rate)
        except (ConnectionError, OSError):
            pass
        finally:
            sink.transport.abort()


@contextlib.asynccontextmanager
async def proxy_to(
    url: str, down_rate: float | None = None, up_rate: float | None = None
) -> AsyncIterator[Proxy]:
    """A proxy in front of the ``ws://host:port`` server at ``url`` (see :class:`Proxy`)."""
    host, _, port = url.removeprefix("ws://").rpartition(":")
    proxy = await Proxy(host.strip("[]"), int(port), down_rate, up_rate).start()
    try:
        yield proxy
    finally:
        await proxy.close()
