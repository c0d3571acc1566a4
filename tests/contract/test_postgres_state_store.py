"""What the PostgreSQL state store promises beyond the shared contract
(tests/contract/test_state_store.py runs that on it too): the schema its migrations make,
safe concurrent start-ups, group commit, a job PostgreSQL refuses failing alone,
``Unavailable`` while PostgreSQL is out of reach and recovery once it is back, and no
acknowledged write lost to kill -9."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from tests.contract.test_state_store import child_script, insert, make, run_child_until_killed
from tests.integration.procs import free_port
from tests.integration.proxy import Proxy
from tests.pg import Schema
from wsq.exceptions import ServerError, Unavailable
from wsq.storage.base import Delete, Insert, LoadWaiting, Recovery
from wsq.storage.postgres import OWNER_KEY, PostgresStateStore, migrate, migrations


@pytest.fixture
async def pg_store(pg_schema: Schema) -> AsyncIterator[PostgresStateStore]:
    store = PostgresStateStore(pg_schema.dsn)
    await store.open()
    yield store
    await store.close()


# -- migrations -----------------------------------------------------------------------------

EXPECTED_COLUMNS = {
    "wsq_tasks": [
        ("id", "text", "NO"),
        ("queue", "text", "NO"),
        ("state", "text", "NO"),
        ("seq", "bigint", "NO"),
        ("data", "bytea", "NO"),
        ("streams", "text", "YES"),
        ("blob_streams", "text", "YES"),
        ("opt_timeout", "double precision", "NO"),
        ("opt_retries", "bigint", "NO"),
        ("opt_autoremove", "boolean", "NO"),
        ("progress", "double precision", "NO"),
        ("retries", "bigint", "NO"),
        ("error", "bytea", "YES"),
        ("run", "bigint", "NO"),
        ("worker", "text", "YES"),
        ("created", "double precision", "NO"),
        ("updated", "double precision", "NO"),
        ("owner", "text", "YES"),
    ],
    "wsq_blobs": [("key", "text", "NO"), ("task", "text", "NO")],
    "wsq_attempts": [
        ("task", "text", "NO"),
        ("run", "bigint", "NO"),
        ("worker", "text", "YES"),
        ("client", "bytea", "YES"),
        ("node", "text", "YES"),
        ("offered", "double precision", "YES"),
        ("started", "double precision", "YES"),
        ("ended", "double precision", "NO"),
        ("outcome", "text", "NO"),
        ("error", "bytea", "YES"),
        ("progress", "double precision", "YES"),
    ],
    "wsq_meta": [("key", "text", "NO"), ("value", "text", "NO")],
    "wsq_schema_version": [
        ("version", "integer", "NO"),
        ("name", "text", "NO"),
        ("applied", "timestamp with time zone", "NO"),
    ],
}
EXPECTED_INDEXES = {
    ("wsq_blobs", "CREATE INDEX wsq_blobs_task ON {s}.wsq_blobs USING btree (task)"),
    ("wsq_blobs", "CREATE UNIQUE INDEX wsq_blobs_pkey ON {s}.wsq_blobs USING btree (key)"),
    (
        "wsq_schema_version",
        "CREATE UNIQUE INDEX wsq_schema_version_pkey"
        " ON {s}.wsq_schema_version USING btree (version)",
    ),
    ("wsq_tasks", "CREATE UNIQUE INDEX wsq_tasks_pkey ON {s}.wsq_tasks USING btree (id)"),
    ("wsq_meta", "CREATE UNIQUE INDEX wsq_meta_pkey ON {s}.wsq_meta USING btree (key)"),
    (
        "wsq_tasks",
        "CREATE INDEX wsq_tasks_queue_state_seq ON {s}.wsq_tasks USING btree (queue, state, seq)",
    ),
    ("wsq_tasks", "CREATE INDEX wsq_tasks_state_seq ON {s}.wsq_tasks USING btree (state, seq)"),
    ("wsq_tasks", "CREATE INDEX wsq_tasks_seq ON {s}.wsq_tasks USING btree (seq)"),
    (
        "wsq_attempts",
        "CREATE UNIQUE INDEX wsq_attempts_pkey ON {s}.wsq_attempts USING btree (task, run)",
    ),
}


async def test_migrations_make_the_expected_schema(pg_schema: Schema) -> None:
    assert await migrate(pg_schema.dsn) == (0, len(migrations()))
    columns = await pg_schema.fetch(
        "SELECT table_name, column_name, data_type, is_nullable, collation_name"
        " FROM information_schema.columns WHERE table_schema = $1"
        " ORDER BY table_name, ordinal_position",
        pg_schema.name,
    )
    found: dict[str, list[tuple[str, str, str]]] = {}
    for table, column, type_, nullable, _ in columns:
        found.setdefault(table, []).append((column, type_, nullable))
    assert found == EXPECTED_COLUMNS
    # Ids and queue names compare byte-wise, as in SQLite, whatever the database's locale.
    collations = {(row[0], row[1]): row[4] for row in columns if row[4] is not None}
    assert collations == {("wsq_tasks", "id"): "C", ("wsq_tasks", "queue"): "C"} | {
        ("wsq_blobs", "key"): "C",
        ("wsq_blobs", "task"): "C",
        ("wsq_meta", "key"): "C",
        ("wsq_attempts", "task"): "C",
    }
    indexes = await pg_schema.fetch(
        "SELECT tablename, indexdef FROM pg_indexes WHERE schemaname = $1", pg_schema.name
    )
    assert {(t, d) for t, d in indexes} == {
        (t, d.format(s=pg_schema.name)) for t, d in EXPECTED_INDEXES
    }
    versions = await pg_schema.fetch("SELECT version, name FROM wsq_schema_version")
    assert [tuple(row) for row in versions] == [(v, name) for v, name, _ in migrations()]
    assert await migrate(pg_schema.dsn) == (len(migrations()), len(migrations()))


async def test_concurrent_opens_of_an_empty_database_migrate_once(postgres_dsn: str) -> None:
    """Four servers start at once on a database with not even the schema yet: the schema
    is made once, and one of them owns it (the others are refused, see below)."""
    schema = Schema(postgres_dsn)  # not created: the stores create it
    stores = [PostgresStateStore(postgres_dsn, schema=schema.name) for _ in range(4)]
    try:
        outcomes = await asyncio.gather(*(s.open() for s in stores), return_exceptions=True)
        opened = [s for s, o in zip(stores, outcomes, strict=True) if isinstance(o, Recovery)]
        refused = [o for o in outcomes if isinstance(o, ServerError)]
        assert (len(opened), len(refused)) == (1, 3), outcomes
        assert all("Another wsq server" in str(error) for error in refused)
        versions = await schema.fetch("SELECT version FROM wsq_schema_version")
        assert [v for (v,) in versions] == list(range(1, len(migrations()) + 1))
        await insert(opened[0], make("a", 1))
        assert await opened[0].get("a") == make("a", 1)
    finally:
        for store in stores:
            await store.close()
        await schema.drop()


async def test_one_server_owns_a_schema_until_it_closes(pg_schema: Schema) -> None:
    """Two servers on one schema would each offer every task: the second is refused at
    open, and may open once the first has closed (or its connection is gone)."""
    first = PostgresStateStore(pg_schema.dsn)
    await first.open()
    second = PostgresStateStore(pg_schema.dsn)
    with pytest.raises(ServerError, match="Another wsq server"):
        await second.open()
    await first.close()
    await second.open()
    await insert(second, make("a", 1))
    await second.close()
    third = PostgresStateStore(pg_schema.dsn)
    await third.open()
    await pg_schema.execute(  # end the session that holds this schema's owner lock
        "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory'"
        f" AND classid = {OWNER_KEY} AND objsubid = 2 AND objid::bigint ="
        " (hashtext(current_setting('search_path'))::bigint + 4294967296) % 4294967296"
    )
    fourth = PostgresStateStore(pg_schema.dsn)
    await fourth.open()  # the owner's session ended: its lock went with it
    with pytest.raises((Unavailable, ServerError)):
        await insert(third, make("b", 2))  # and the old owner cannot take it back
    assert await fourth.get("a") == make("a", 1)
    await third.close()
    await fourth.close()


async def test_a_schema_from_a_newer_wsq_is_refused(pg_schema: Schema) -> None:
    await migrate(pg_schema.dsn)
    await pg_schema.execute("INSERT INTO wsq_schema_version (version, name) VALUES (999, 'x')")
    store = PostgresStateStore(pg_schema.dsn)
    with pytest.raises(ServerError, match="version 999"):
        await store.open()
    await store.close()  # never opened: nothing to do


async def test_a_search_path_without_a_schema_is_a_clear_error(postgres_dsn: str) -> None:
    dsn = Schema(postgres_dsn).dsn  # its schema does not exist
    with pytest.raises(ServerError, match="CREATE SCHEMA"):
        await PostgresStateStore(dsn).open()


# -- group commit and failures ----------------------------------------------------------------


async def test_groups_concurrent_submits_into_few_commits(pg_store: PostgresStateStore) -> None:
    submits = 2000
    before = pg_store.commits
    futures = [pg_store.submit([Insert(make(f"t{i}", i))]) for i in range(submits)]
    assert await asyncio.gather(*futures) == [[True]] * submits
    assert 1 <= pg_store.commits - before < submits / 5
    assert len(await pg_store.list(limit=submits + 1)) == submits


async def test_batch_max_bounds_a_batch(pg_schema: Schema) -> None:
    store = PostgresStateStore(pg_schema.dsn, batch_max=3)
    await store.open()
    try:
        futures = [store.submit([Insert(make(f"t{i}", i))]) for i in range(30)]
        big = store.submit([Insert(make(f"u{i}", 100 + i)) for i in range(10)])  # not split
        await asyncio.gather(*futures, big)
        assert store.commits >= 11
    finally:
        await store.close()


async def test_a_value_postgres_refuses_fails_its_submit_only(
    pg_store: PostgresStateStore,
) -> None:
    """PostgreSQL text holds no NUL: that insert fails (ServerError), alone."""
    await insert(pg_store, make("a", 1))
    before = pg_store.submit([Insert(make("b", 2))])
    refused = pg_store.submit([Insert(make("c", 3)), Delete("a"), Insert(make("d", 4, queue="\0"))])
    after = pg_store.submit([Insert(make("e", 5)), LoadWaiting("q", 10)])
    assert await before == [True]
    with pytest.raises(ServerError, match="0x00"):
        await refused
    inserted, loaded = await after
    assert inserted is True
    assert [t.id for t in loaded] == ["a", "b", "e"]
    assert await pg_store.submit([Insert(make("c", 3))]) == [True]


async def test_reads_do_not_see_uncommitted_writes(pg_store: PostgresStateStore) -> None:
    future = pg_store.submit([Insert(make(f"t{i}", i)) for i in range(500)])
    assert len(await pg_store.list(limit=1000)) in (0, 500)
    await future
    assert len(await pg_store.list(limit=1000)) == 500


# -- PostgreSQL out of reach -----------------------------------------------------------------


async def test_open_of_an_unreachable_database_raises_unavailable(pg_schema: Schema) -> None:
    store = PostgresStateStore(pg_schema.dsn_at("127.0.0.1", free_port()))
    with pytest.raises(Unavailable, match="PostgreSQL is unavailable"):
        await store.open()


async def test_unavailable_while_out_of_reach_then_recovers(pg_schema: Schema) -> None:
    """The network path dies silently (no FIN, no RST): writes and reads fail with
    Unavailable within the timeout; once the path is back, the store carries on by
    itself with the data committed before."""
    proxy = await Proxy(*pg_schema.address).start()
    store = PostgresStateStore(
        pg_schema.dsn_at("127.0.0.1", proxy.port), timeout=1.0, connect_timeout=1.0
    )
    try:
        await store.open()
        await insert(store, make("a", 1))
        assert await store.get("a") == make("a", 1)
        proxy.blackhole()
        with pytest.raises(Unavailable):
            await store.submit([Insert(make("b", 2))])
        with pytest.raises(Unavailable):  # a new connection cannot get through either
            await store.submit([Insert(make("b", 2))])
        with pytest.raises(Unavailable):
            await store.get("a")
        proxy.restore()
        proxy.drop()  # the connections that timed out while held
        assert await store.submit([Insert(make("c", 3))]) == [True]
        assert [t.id for t in await store.list()] == ["a", "c"]
    finally:
        await store.close()
        await proxy.close()


async def test_postgres_restarting_under_the_store_is_unavailable_then_recovers(
    pg_schema: Schema,
) -> None:
    """PostgreSQL ends the store's connections (as a restart does): the batch in flight
    fails with Unavailable or applies, and the next one reconnects."""
    store = PostgresStateStore(f"{pg_schema.dsn}&application_name={pg_schema.name}")
    await store.open()
    try:
        await insert(store, make("a", 1))
        await store.get("a")  # a read connection too
        ended = await pg_schema.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            pg_schema.name,
        )
        assert len(ended) == 2
        outcome = await asyncio.gather(store.submit([Insert(make("b", 2))]), return_exceptions=True)
        assert outcome == [[True]] or isinstance(outcome[0], Unavailable)
        assert await store.submit([Insert(make("c", 3))]) == [True]
        assert {t.id for t in await store.list()} >= {"a", "c"}
    finally:
        await store.close()


# -- crash safety ------------------------------------------------------------------------------

CHILD = child_script("wsq.storage.postgres:PostgresStateStore")


async def test_kill_9_loses_no_acknowledged_write(pg_schema: Schema) -> None:
    acked: list[str] = []
    for _ in range(3):  # each run recovers from the previous kill, then is killed too
        acked += await run_child_until_killed(pg_schema.dsn, acks=600, child=CHILD)
    store = PostgresStateStore(pg_schema.dsn)
    recovery = await store.open()
    try:
        stored = {t.id for t in await store.list(limit=10**6)}
    finally:
        await store.close()
    assert len(set(acked)) == len(acked) >= 1800
    assert set(acked) <= stored
    assert recovery.next_seq > max(int(task_id[1:]) for task_id in acked)
