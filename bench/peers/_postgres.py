"""What the PostgreSQL peers (pgqueuer, procrastinate) share: where their database is, and a
fresh schema for each run.

The database is :func:`bench.common.postgres_dsn` (``WSQ_TEST_DATABASE``, else
postgresql://postgres@127.0.0.1:5432/test). Each run gets a schema of its own,
``bench_<peer>_<random>``, with the peer's tables installed by the peer's own installer; the
worker and the producers find it in ``BENCH_PG_SCHEMA`` and put it first on their
connections' ``search_path``. The schema is dropped (CASCADE) after the run, once its
worker is stopped.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

from bench.common import postgres_dsn

DSN = postgres_dsn()
SCHEMA = "BENCH_PG_SCHEMA"


def schema() -> str:
    """The run's schema (in the worker and producer processes)."""
    return os.environ.get(SCHEMA, "public")


async def _execute(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(DSN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextmanager
def fresh_schema(peer: str, install: Callable[[str], Awaitable[None]]) -> Iterator[dict[str, str]]:
    """A new schema with ``install(name)`` run in it, for the block; yields the children's
    environment (``BENCH_PG_SCHEMA``). Names are generated here, so they need no quoting."""
    name = f"bench_{peer}_{os.urandom(5).hex()}"
    asyncio.run(_execute(f"CREATE SCHEMA {name}"))
    try:
        asyncio.run(install(name))
        yield {SCHEMA: name}
    finally:
        asyncio.run(_execute(f"DROP SCHEMA {name} CASCADE"))
