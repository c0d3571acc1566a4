"""Clients given a cluster's addresses, and node names (issue 11 §1): each reconnection
moves to the next address, backoff is waited once per round of failed addresses, and the
node a client greeted is named in the welcome, in stats and in the logs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import wsq
from tests.conftest import budget, eventually
from tests.integration.procs import ServerProcess


class Slammer:
    """A TCP port that accepts and at once closes every connection, counting them."""

    def __init__(self) -> None:
        self.accepts = 0

    async def __aenter__(self) -> Slammer:
        async def slam(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.accepts += 1
            writer.close()

        self.server = await asyncio.start_server(slam, "127.0.0.1", 0)
        self.url = f"ws://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()


@pytest.fixture
async def two(tmp_path: Path) -> AsyncIterator[tuple[wsq.Server, wsq.Server]]:
    a = wsq.Server(data_dir=tmp_path / "a", port=0, node_name="node-a")
    b = wsq.Server(data_dir=tmp_path / "b", port=0, node_name="node-b")
    async with a, b:
        yield a, b


async def test_a_dead_address_is_skipped_and_a_lost_node_left_for_the_next(
    two: tuple[wsq.Server, wsq.Server],
) -> None:
    a, b = two
    async with Slammer() as dead:
        client = wsq.Client([dead.url, a.url, b.url], backoff=lambda tries: 0.05)
        async with client:
            await asyncio.wait_for(client.connect(), budget(10))
            assert (client.address, client.node) == (a.url, "node-a")
            await a.close()
            await eventually(lambda: client.connected and client.node == "node-b")
            assert client.address == b.url
            task = await client.queue("moved").add({"n": 1})
            assert [t.id for t in await client.queue("moved").waiting()] == [task.id]


async def test_backoff_is_waited_once_per_round_of_failed_addresses() -> None:
    async with Slammer() as one, Slammer() as two:
        waits: list[tuple[int, int, int]] = []

        def backoff(tries: int) -> float:
            waits.append((tries, one.accepts, two.accepts))
            return 0.02

        client = wsq.Client([one.url, two.url], backoff=backoff)
        client.on("error", lambda exc: None)
        client._ensure_running()
        await eventually(lambda: len(waits) >= 3)
        await client.close()
    assert waits[:3] == [(1, 1, 1), (2, 2, 2), (3, 3, 3)]


@pytest.mark.parametrize("address", [[], ["ws://127.0.0.1:1", 42]])
def test_the_address_list_must_hold_urls(address: list[object]) -> None:
    with pytest.raises((TypeError, ValueError)):
        wsq.Client(address)  # type: ignore[arg-type]


async def test_stats_name_each_workers_node(two: tuple[wsq.Server, wsq.Server]) -> None:
    a, _ = two
    async with wsq.Client(a.url) as client:
        client.queue("jobs").process(lambda task: None)
        await eventually(lambda: a.core.stats() != [])
        (queue,) = await client.stats()
        assert [w["node"] for w in queue["workers"]] == ["node-a"]


async def test_the_node_is_named_in_json_logs_and_in_text_logs_when_given(
    tmp_path: Path,
) -> None:
    named = ServerProcess(tmp_path / "named", None, "--node-name", "edge-1")
    unnamed = ServerProcess(tmp_path / "json", None, "--log-format", "json")
    for server in (named, unnamed):
        await server.start()
        async with wsq.Client(server.url) as client:
            await client.queue("q").add({})
            assert client.node is not None
        server.stop()
    text = named.log.read_text().splitlines()
    assert any("listening" in line and "edge-1" in line for line in text)
    assert all(" node=edge-1" in line for line in text if " connect " in line)
    records = [json.loads(line) for line in unnamed.log.read_text().splitlines()]
    assert records and all(r["node"].endswith(f":{unnamed.port}") for r in records)
