"""Shared fixtures: real servers on loopback port 0, real clients, and one time factor.

``WSQ_TEST_TIME_FACTOR`` (default 1) scales every time budget in the tests, for slow
machines; no test asserts on speed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fnmatch
import gc
import os
import sys
import threading
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import wsq
from tests.pg import Schema, base_dsn, check_reachable
from tests.s3emulator import MotoServer

TIME_FACTOR = float(os.environ.get("WSQ_TEST_TIME_FACTOR", "1"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Shortly before pytest-timeout ends a test, print every asyncio task's stack: its
    own report shows only the event loop waiting, which does not say what hung."""
    marker = item.get_closest_marker("timeout")
    if marker and marker.args:
        limit = float(marker.args[0])
    else:
        limit = float(item.config.getini("timeout"))
    timer = threading.Timer(limit * 0.9, _dump_tasks, args=(item.nodeid,))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _dump_tasks(nodeid: str) -> None:
    """From the timer's thread: ask every running event loop to print its tasks."""
    loops = [o for o in gc.get_objects() if isinstance(o, asyncio.AbstractEventLoop)]
    for loop in loops:
        if loop.is_running() and not loop.is_closed():
            loop.call_soon_threadsafe(_print_tasks, nodeid)


def _print_tasks(nodeid: str) -> None:
    lines = [f"== {nodeid} is about to time out; its asyncio tasks:"]
    for task in asyncio.all_tasks():
        lines.append(f"-- {task.get_name()}")
        awaited: Any = task.get_coro()
        while awaited is not None:  # the chain of awaits, outermost first
            frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
            if frame is not None:
                lines.extend(traceback.format_stack(frame, limit=1))
            awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
    print("\n".join(lines), file=sys.stderr, flush=True)


def budget(seconds: float) -> float:
    """A time budget for waiting on something that should happen, scaled."""
    return seconds * TIME_FACTOR


async def eventually(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Poll ``check`` (sync or async) until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + budget(timeout)
    while True:
        result = check()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {budget(timeout)} s")
        await asyncio.sleep(0.02)


async def completed_count_is(queue: wsq.Queue, n: int) -> bool:
    """For ``eventually``: whether exactly ``n`` tasks of ``queue`` have completed."""
    return len(await queue.completed()) == n


def count_pattern_matches(monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """Count the calls of ``fnmatch.fnmatchcase`` from now on (the queue-name matches a
    listing costs); the function returned gives the count so far."""
    calls = 0
    real = fnmatch.fnmatchcase

    def counting(name: str, pattern: str) -> bool:
        nonlocal calls
        calls += 1
        return real(name, pattern)

    monkeypatch.setattr(fnmatch, "fnmatchcase", counting)
    return lambda: calls


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "wsq-data"


SERVER_STORE = os.environ.get("WSQ_TEST_SERVER_STORE", "sqlite")
"""The state store of the ``server`` fixture: ``sqlite`` (the default), or ``postgres``
(a fresh schema of the test PostgreSQL per test: the shared store's claim path), as
``scripts/test`` runs a second pass of the integration suites."""


@pytest.fixture
async def server(data_dir: Path, request: pytest.FixtureRequest) -> AsyncIterator[wsq.Server]:
    if SERVER_STORE == "postgres":
        schema = await Schema(request.getfixturevalue("postgres_dsn")).create()
        try:
            async with wsq.Server(
                data_dir=data_dir, port=0, heartbeat_interval=1.0, database=schema.dsn
            ) as srv:
                yield srv
        finally:
            await schema.drop()
        return
    async with wsq.Server(data_dir=data_dir, port=0, heartbeat_interval=1.0) as srv:
        yield srv


@pytest.fixture
async def client(server: wsq.Server) -> AsyncIterator[wsq.Client]:
    async with wsq.Client(server.url, backoff=lambda tries: 0.05) as c:
        yield c


@pytest.fixture
async def make_client(server: wsq.Server) -> AsyncIterator[Callable[..., Awaitable[wsq.Client]]]:
    clients: list[wsq.Client] = []

    async def make(url: str | None = None) -> wsq.Client:
        c = wsq.Client(url or server.url, backoff=lambda tries: 0.05)
        await c.connect()
        clients.append(c)
        return c

    yield make
    for c in clients:
        await c.close()


@pytest.fixture(scope="session")
def postgres_dsn() -> str:
    """The test PostgreSQL (tests/pg.py); the session fails at once if none answers."""
    dsn = base_dsn()
    # In a thread of its own: an async test may be running its loop in this one.
    with concurrent.futures.ThreadPoolExecutor(1) as thread:
        thread.submit(asyncio.run, check_reachable(dsn)).result()
    return dsn


@pytest.fixture
async def pg_schema(postgres_dsn: str) -> AsyncIterator[Schema]:
    """An empty schema of the test PostgreSQL, dropped after the test (tests/pg.py)."""
    schema = await Schema(postgres_dsn).create()
    yield schema
    await schema.drop()


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    """One moto server (an S3 emulator) for the session."""
    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture
def s3(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> MotoServer:
    """The moto server, with the standard AWS variables (AWS_ENDPOINT_URL and dummy
    credentials) pointing at it for this test."""
    for name, value in moto_server.environ().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return moto_server


@pytest.fixture
def bucket(s3: MotoServer) -> str:
    """A new bucket on moto, the AWS variables pointing there for this test (:func:`s3`)."""
    return s3.bucket()
