"""The PostgreSQL the tests use, and a fresh schema per test.

``WSQ_TEST_DATABASE`` names it (``scripts/test`` sets it when it had to start a throwaway
cluster); else the one on 127.0.0.1:5432 (user postgres, database test).
"""

from __future__ import annotations

import os
import uuid
from urllib.parse import quote, urlsplit

import asyncpg

from wsq.storage.postgres import quote_ident

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"


def base_dsn() -> str:
    return os.environ.get("WSQ_TEST_DATABASE") or DEFAULT_DSN


async def check_reachable(dsn: str) -> None:
    """Raise RuntimeError, saying what to do, if nothing answers at ``dsn``."""
    try:
        conn = await asyncpg.connect(dsn, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        raise RuntimeError(
            f"No PostgreSQL for the tests at {dsn} ({exc}). Run ./scripts/test, which starts"
            " one, or set WSQ_TEST_DATABASE to a database the tests may create schemas in."
        ) from exc
    await conn.close()


class Schema:
    """A schema of its own in the test database: :attr:`dsn` selects it (as a server's
    ``--database`` would, with ``options=-csearch_path=...``); :attr:`name` can be given
    to :class:`~wsq.storage.postgres.PostgresStateStore` as ``schema``."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.name = f"wsq_test_{uuid.uuid4().hex[:16]}"
        separator = "&" if "?" in base else "?"
        self.dsn = f"{base}{separator}options={quote(f'-csearch_path={self.name}')}"

    @property
    def address(self) -> tuple[str, int]:
        """Host and port of the server (to put a proxy in front of it)."""
        parts = urlsplit(self.base)
        return parts.hostname or "127.0.0.1", parts.port or 5432

    def dsn_at(self, host: str, port: int) -> str:
        """:attr:`dsn` with another address (a proxy's, a closed port)."""
        parts = urlsplit(self.dsn)
        auth = parts.netloc.rpartition("@")[0]
        netloc = f"{auth}@{host}:{port}" if auth else f"{host}:{port}"
        return parts._replace(netloc=netloc).geturl()

    async def execute(self, sql: str) -> None:
        """Run ``sql`` in this schema (a fresh connection)."""
        conn = await asyncpg.connect(self.dsn, timeout=10)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    async def fetch(self, sql: str, *args: object) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.dsn, timeout=10)
        try:
            return await conn.fetch(sql, *args)
        finally:
            await conn.close()

    async def create(self) -> Schema:
        await self.execute(f"CREATE SCHEMA {quote_ident(self.name)}")
        return self

    async def drop(self) -> None:
        await self.execute(f"DROP SCHEMA IF EXISTS {quote_ident(self.name)} CASCADE")
