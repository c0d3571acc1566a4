"""A loopback TCP proxy for fault tests: forwards bytes both ways until told to blackhole
them, after which it keeps every connection open but delivers nothing in either direction
(a network path that died without a FIN or RST)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class Proxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
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
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
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
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        if self._drops != drops:  # cut (or refused) while it connected
            writer.transport.abort()
            up_writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        for source, sink, gate in ((reader, up_writer, None), (up_reader, writer, self._down)):
            task = asyncio.create_task(self._pipe(source, sink, gate))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        gate: asyncio.Event | None,
    ) -> None:
        try:
            while data := await source.read(1 << 16):
                if self._open.is_set() and (gate is None or gate.is_set()):
                    sink.write(data)
                    await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            sink.transport.abort()


@contextlib.asynccontextmanager
async def proxy_to(url: str) -> AsyncIterator[Proxy]:
    """A proxy in front of the ``ws://host:port`` server at ``url``."""
    host, _, port = url.removeprefix("ws://").rpartition(":")
    proxy = await Proxy(host.strip("[]"), int(port)).start()
    try:
        yield proxy
    finally:
        await proxy.close()
