"""The fault tests' proxy (tests/integration/proxy.py) does what they rely on."""

from __future__ import annotations

import asyncio

import pytest

from tests.integration import proxy as proxy_module
from tests.integration.proxy import Proxy


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(1 << 16):
        writer.write(data)
        await writer.drain()
    writer.close()


async def test_a_connection_cut_while_the_proxy_connects_upstream_stays_cut(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """refuse() (a server that is down) cuts a connection whose upstream connect was
    still under way: it used to be let through once that connect completed."""
    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    connecting = asyncio.Event()
    go_on = asyncio.Event()
    open_connection = asyncio.open_connection

    async def slow_open_connection(
        host: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        connecting.set()
        await go_on.wait()
        return await open_connection(host, port)

    monkeypatch.setattr(proxy_module.asyncio, "open_connection", slow_open_connection)
    proxy = await Proxy("127.0.0.1", port).start()
    try:
        reader, writer = await open_connection("127.0.0.1", proxy.port)
        await asyncio.wait_for(connecting.wait(), 5)
        proxy.refuse()
        go_on.set()
        writer.write(b"ping")
        try:
            answer = await asyncio.wait_for(reader.read(4), 5)
        except ConnectionError:
            answer = b""
        assert answer == b""  # cut: nothing echoed
        writer.transport.abort()
    finally:
        await proxy.close()
        server.close()
        await server.wait_closed()


async def test_a_connection_through_the_proxy_echoes() -> None:
    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    proxy = await Proxy("127.0.0.1", server.sockets[0].getsockname()[1]).start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
        writer.transport.abort()
    finally:
        await proxy.close()
        server.close()
        await server.wait_closed()
