"""What the PostgreSQL state store promises beyond the shared contract
(tests/contract/test_state_store.py runs that on it too): the schema its migrations make,
safe concurrent start-ups, group commit, a job PostgreSQL refuses failing alone,
``Unavailable`` while PostgreSQL is out of reach and recovery once it is back, and no
acknowledged write lost to kill -9."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest

from tests.conftest import eventually
from tests.contract.test_state_store import child_script, insert, make, run_child_until_killed
from tests.integration.procs import free_port
from tests.integration.proxy import Proxy
from tests.pg import Schema
from wsq.core.task import State, StreamRef, Task
from wsq.exceptions import ServerError, Unavailable, UploadFailed
from wsq.storage import postgres
from wsq.storage.base import (
    Attempt,
    AttemptOutcome,
    ClaimWaiting,
    Delete,
    Insert,
    LoadWaiting,
    Op,
    Publish,
    PutWorker,
    RecordAttempt,
    Recovery,
    SetProgress,
    Update,
    WorkerRow,
)
from wsq.storage.postgres import (
    ALONE_KEY,
    ALONE_LOCK,
    ASK_NOT_ALONE,
    CLAIM_WAITING,
    PostgresStateStore,
    migrate,
    migrations,
)
from wsq.storage.rows import MAX_INT


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
        ("not_before", "double precision", "NO"),
        ("node", "text", "YES"),
        ("last_client", "bytea", "YES"),
        ("last_node", "text", "YES"),
        ("last_offered", "double precision", "YES"),
        ("last_started", "double precision", "YES"),
        ("last_ended", "double precision", "YES"),
        ("last_progress", "double precision", "YES"),
    ],
    "wsq_nodes": [
        ("name", "text", "NO"),
        ("instance", "text", "NO"),
        ("expires", "timestamp with time zone", "NO"),
        ("idx", "smallint", "YES"),
        ("alone", "boolean", "YES"),
        ("ended", "boolean", "NO"),
    ],
    "wsq_blobs": [
        ("key", "text", "NO"),
        ("task", "text", "YES"),
        ("node", "text", "YES"),
        ("instance", "text", "YES"),
        ("since", "timestamp with time zone", "YES"),
        ("swept", "boolean", "NO"),
    ],
    "wsq_counts": [
        ("node", "text", "NO"),
        ("queue", "text", "NO"),
        ("state", "text", "NO"),
        ("n", "bigint", "NO"),
    ],
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
    "wsq_records": [
        ("id", "bigint", "NO"),
        ("at", "timestamp with time zone", "NO"),
        ("record", "text", "NO"),
    ],
    "wsq_workers": [
        ("node", "text", "NO"),
        ("key", "text", "NO"),
        ("holder", "text", "NO"),
        ("name", "text", "NO"),
        ("queue", "text", "NO"),
        ("concurrency", "integer", "NO"),
        ("since", "double precision", "NO"),
        ("client", "bytea", "YES"),
        ("peer", "text", "YES"),
    ],
    "wsq_schema_version": [
        ("version", "integer", "NO"),
        ("name", "text", "NO"),
        ("applied", "timestamp with time zone", "NO"),
    ],
}
EXPECTED_INDEXES = {
    ("wsq_nodes", "CREATE UNIQUE INDEX wsq_nodes_idx ON {s}.wsq_nodes USING btree (idx)"),
    ("wsq_nodes", "CREATE UNIQUE INDEX wsq_nodes_pkey ON {s}.wsq_nodes USING btree (name)"),
    (
        "wsq_tasks",
        "CREATE INDEX wsq_tasks_active_node ON {s}.wsq_tasks USING btree (node)"
        " WHERE (state = 'active'::text)",
    ),
    (
        "wsq_counts",
        "CREATE UNIQUE INDEX wsq_counts_pkey ON {s}.wsq_counts USING btree (node, queue, state)",
    ),
    ("wsq_blobs", "CREATE INDEX wsq_blobs_task ON {s}.wsq_blobs USING btree (task)"),
    ("wsq_blobs", "CREATE UNIQUE INDEX wsq_blobs_pkey ON {s}.wsq_blobs USING btree (key)"),
    (
        "wsq_blobs",
        "CREATE INDEX wsq_blobs_uploads ON {s}.wsq_blobs USING btree (node) WHERE (task IS NULL)",
    ),
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
    (
        "wsq_attempts",
        "CREATE UNIQUE INDEX wsq_attempts_pkey ON {s}.wsq_attempts USING btree (task, run)",
    ),
    (
        "wsq_workers",
        "CREATE UNIQUE INDEX wsq_workers_pkey ON {s}.wsq_workers USING btree (node, key)",
    ),
    ("wsq_workers", "CREATE INDEX wsq_workers_holder ON {s}.wsq_workers USING btree (holder)"),
    ("wsq_records", "CREATE UNIQUE INDEX wsq_records_pkey ON {s}.wsq_records USING btree (id)"),
    ("wsq_records", "CREATE INDEX wsq_records_at ON {s}.wsq_records USING btree (at)"),
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
        ("wsq_blobs", "node"): "C",
        ("wsq_blobs", "instance"): "C",
        ("wsq_meta", "key"): "C",
        ("wsq_counts", "node"): "C",
        ("wsq_counts", "queue"): "C",
        ("wsq_nodes", "name"): "C",
        ("wsq_tasks", "node"): "C",
        ("wsq_attempts", "task"): "C",
        ("wsq_workers", "node"): "C",
        ("wsq_workers", "key"): "C",
        ("wsq_workers", "holder"): "C",
        ("wsq_workers", "queue"): "C",
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
    """Four nodes start at once on a database with not even the schema yet: the schema is
    made once, and all four share it."""
    schema = Schema(postgres_dsn)  # not created: the stores create it
    stores = [PostgresStateStore(postgres_dsn, schema=schema.name) for _ in range(4)]
    try:
        outcomes = await asyncio.gather(*(s.open() for s in stores), return_exceptions=True)
        assert all(isinstance(o, Recovery) for o in outcomes), outcomes
        versions = await schema.fetch("SELECT version FROM wsq_schema_version")
        assert [v for (v,) in versions] == list(range(1, len(migrations()) + 1))
        await insert(stores[0], make("a", 1))
        assert all([await s.get("a") == make("a", 1) for s in stores])
    finally:
        for store in stores:
            await store.close()
        await schema.drop()


async def test_a_node_name_has_one_live_store_at_a_time(pg_schema: Schema) -> None:
    """Nodes hold a lease on their name: another store of that name waits out two lease
    terms, then is refused; once the holder closes (ending its lease) it opens at once.
    Stores of other names share the schema."""
    first = PostgresStateStore(pg_schema.dsn, node="a", lease=0.3, may_be_alone=False)
    await first.open()

    async def renew() -> None:  # as its server does (with no writes to wait for)
        while True:
            if (await first.heartbeat()).alone is None:
                await first.end_alone()
            await asyncio.sleep(first.heartbeat_every)

    renewing = asyncio.create_task(renew())
    other = PostgresStateStore(pg_schema.dsn, node="b", lease=0.3, may_be_alone=False)
    await other.open()
    second = PostgresStateStore(pg_schema.dsn, node="a", lease=0.3, may_be_alone=False)
    with pytest.raises(ServerError, match="Another wsq node named 'a'"):
        await second.open()
    renewing.cancel()
    await first.close()
    await second.open()
    await insert(second, make("x", 1))
    assert await other.get("x") == make("x", 1)
    await second.close()
    await other.close()


async def test_a_node_that_stops_renewing_its_lease_has_its_runs_taken_over(
    pg_schema: Schema,
) -> None:
    dying = PostgresStateStore(pg_schema.dsn, node="dying", lease=0.3, may_be_alone=False)
    await dying.open()
    _, claimed = await dying.submit([Insert(make("t", 1)), ClaimWaiting("q", ("w",), 1.0)])
    assert [t.id for t in claimed] == ["t"]
    heir = PostgresStateStore(pg_schema.dsn, node="heir", lease=0.3, may_be_alone=False)
    await heir.open()
    assert (await heir.heartbeat()).adopted == []  # dying's lease is live
    await asyncio.sleep(0.5)  # dying renews nothing (a server would, every lease / 5)
    beat = await heir.heartbeat()
    assert beat.dead == ["dying"] and [t.id for t in beat.adopted] == ["t"]
    assert (beat.adopted[0].run, beat.adopted[0].worker) == (1, "w")
    assert (await heir.heartbeat()).adopted == []  # taken once
    assert await pg_schema.fetch("SELECT node FROM wsq_tasks") == [("heir",)]
    await heir.close()
    await dying.close()


async def test_workers_of_a_dead_node_are_not_listed_and_go_with_its_takeover(
    pg_schema: Schema,
) -> None:
    """Rows of a node whose lease ran out are hidden at once; the node that takes it over
    deletes them; a node opened again under its name drops its rows of an earlier life."""
    dying = PostgresStateStore(pg_schema.dsn, node="dying", lease=0.3, may_be_alone=False)
    heir = PostgresStateStore(pg_schema.dsn, node="heir", lease=0.3, may_be_alone=False)
    await dying.open()
    await heir.open()
    await dying.submit([PutWorker(WorkerRow("k", "w", "q", 1, 1.0, "dying"))])
    await heir.submit([PutWorker(WorkerRow("h", "w", "q", 1, 1.0, "heir"))])
    assert [w.node for w in await heir.workers()] == ["dying", "heir"]
    await asyncio.sleep(0.5)  # dying renews nothing; heir's lease is made live by hand
    await pg_schema.fetch(
        "UPDATE wsq_nodes SET expires = now() + interval '1 minute' WHERE name = 'heir'"
    )
    assert [w.node for w in await heir.workers()] == ["heir"]
    assert (await heir.heartbeat()).dead == ["dying"]
    assert await pg_schema.fetch("SELECT node FROM wsq_workers") == [("heir",)]
    await dying.close()
    await heir.close()
    again = PostgresStateStore(pg_schema.dsn, node="heir", lease=0.3, may_be_alone=False)
    await again.open()
    assert await pg_schema.fetch("SELECT node FROM wsq_workers") == []
    await again.close()


async def test_a_node_is_alone_until_another_starts_which_waits_for_its_answer(
    pg_schema: Schema,
) -> None:
    """A node with no other live node turns alone at a heartbeat; a node that starts asks
    it to stop and waits (its open does not return) until the lone node answers
    (end_alone); neither is alone while the other lives; once the other's lease has run
    out, a node turns alone again, and a node that starts then waits for nobody."""
    first = PostgresStateStore(pg_schema.dsn, node="first", lease=0.5)
    assert (await first.open()).alone is True
    assert (await first.heartbeat()).alone is True
    assert (await first.heartbeat()).alone is True
    second = PostgresStateStore(pg_schema.dsn, node="second", lease=0.5)
    opening = asyncio.ensure_future(second.open())
    await asyncio.sleep(0.2)
    assert not opening.done()  # waits for first's answer
    assert (await first.heartbeat()).alone is None  # asked
    await first.end_alone()
    assert (await asyncio.wait_for(opening, 5)).alone is False
    assert (await first.heartbeat()).alone is False
    assert (await second.heartbeat()).alone is False
    await second.close()  # ends its lease
    assert (await first.heartbeat()).alone is True
    await first.close()
    third = PostgresStateStore(pg_schema.dsn, node="third", lease=0.5)
    await asyncio.wait_for(third.open(), 1)  # first's lease ended: nobody to wait for
    await third.close()


async def test_a_heartbeat_and_a_starting_node_s_ask_take_their_locks_in_one_order(
    pg_schema: Schema,
) -> None:
    """A node that starts takes the lock that orders turning alone, then marks the lone
    nodes' rows asked; a lone node's heartbeat that renews its row meanwhile must wait for
    that lock before it locks its row, or each waits for the other (PostgreSQL then
    aborts one: the start, or the heartbeat, fails with "deadlock detected")."""
    first = PostgresStateStore(pg_schema.dsn, node="first", lease=30.0)
    assert (await first.open()).alone is True
    starting = await asyncpg.connect(pg_schema.dsn)
    try:
        asking = starting.transaction()
        await asking.start()
        await starting.execute(ALONE_LOCK, ALONE_KEY)  # as a starting node does (_join)
        beat = asyncio.ensure_future(first.heartbeat())

        async def waiting() -> bool:  # the heartbeat is held up by the lock
            rows = await starting.fetch(
                "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            )
            return bool(rows)

        await eventually(waiting)
        assert [row[0] for row in await starting.fetch(ASK_NOT_ALONE, "second")] == ["first"]
        await asking.commit()
        assert (await asyncio.wait_for(beat, 10)).alone is None  # it sees it was asked
    finally:
        await starting.close()
        await first.close()


async def test_a_starting_node_does_not_wait_for_a_lone_node_that_died(pg_schema: Schema) -> None:
    lone = PostgresStateStore(pg_schema.dsn, node="lone", lease=0.5)
    await lone.open()
    assert (await lone.heartbeat()).alone is True
    other = PostgresStateStore(pg_schema.dsn, node="other", lease=0.5)
    opening = asyncio.ensure_future(other.open())
    await asyncio.sleep(0.2)
    assert not opening.done()
    await asyncio.wait_for(opening, 2)  # lone renews nothing: its lease runs out
    await other.close()
    await lone.close()


async def asked(store: PostgresStateStore) -> bool:
    return (await store.heartbeat()).alone is None


async def test_no_node_turns_alone_while_one_that_died_may_come_back(
    pg_schema: Schema, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node whose lease ran out (it did not end it) may be alive, cut off from
    PostgreSQL: while the records it missed are kept, the others keep publishing them.
    Back, it asks lone nodes to publish again."""
    monkeypatch.setattr(postgres, "RECORDS_KEPT", 1.0)
    first = PostgresStateStore(pg_schema.dsn, node="first", lease=0.3)
    assert (await first.open()).alone is True
    cut_off = PostgresStateStore(pg_schema.dsn, node="cut", lease=0.3, may_be_alone=False)
    opening = asyncio.ensure_future(cut_off.open())
    await eventually(lambda: asked(first))
    await first.end_alone()
    await opening
    await asyncio.sleep(0.4)  # cut renews nothing
    beat = await first.heartbeat()
    assert beat.dead == ["cut"] and beat.alone is False
    assert (await first.heartbeat()).alone is False
    await asyncio.sleep(1.0)
    assert (await first.heartbeat()).alone is True
    assert (await cut_off.heartbeat()).lost  # back, and it asks first to publish again
    assert (await first.heartbeat()).alone is None
    await cut_off.close()
    await first.close()


def with_blob(task_id: str, seq: int, key: str) -> Task:
    return make(task_id, seq, streams=(StreamRef(path=("b",), size=1, blob=key),))


async def test_uploads_of_a_node_that_died_are_swept_and_fence_their_inserts(
    pg_schema: Schema,
) -> None:
    """A reserved key counts as referenced; an insert takes its reservation over. Once
    the node's lease ran out, its reservations (and only those no insert took) are swept,
    once; an insert naming a swept one fails with UploadFailed, alone, and leaves no
    task; a released reservation is gone. Swept keys no longer count as referenced."""
    dying = PostgresStateStore(pg_schema.dsn, node="dying", lease=0.3, may_be_alone=False)
    heir = PostgresStateStore(pg_schema.dsn, node="heir", lease=0.3, may_be_alone=False)
    await dying.open()
    await heir.open()
    kept, lost, freed = "a" * 32, "b" * 32, "c" * 32
    for key in (kept, lost, freed):
        await dying.reserve_blob(key)
    assert await heir.blob_keys() == {kept, lost, freed}
    assert await dying.submit([Insert(with_blob("t1", 1, kept))]) == [True]
    await dying.release_blobs([freed, kept])  # kept belongs to t1 now: left alone
    assert await heir.sweep_uploads() == []  # dying's lease is live
    await asyncio.sleep(0.5)  # dying renews nothing
    await pg_schema.fetch(
        "UPDATE wsq_nodes SET expires = now() + interval '1 minute' WHERE name = 'heir'"
    )
    assert await heir.sweep_uploads() == [lost]
    assert await heir.sweep_uploads() == []  # swept once
    assert await heir.blob_keys() == {kept}
    late = dying.submit([Insert(with_blob("t2", 2, lost))])
    after = dying.submit([Insert(make("t3", 3))])
    with pytest.raises(UploadFailed, match="discarded"):
        await late
    assert await after == [True]
    assert await heir.get("t2") is None
    assert await heir.get("t1") is not None
    assert sorted(await pg_schema.fetch("SELECT key, task, swept FROM wsq_blobs")) == [
        (kept, "t1", False),
        (lost, None, True),
    ]
    await dying.close()
    await heir.close()


async def test_uploads_of_a_node_s_earlier_life_are_swept(pg_schema: Schema) -> None:
    first = PostgresStateStore(pg_schema.dsn, node="n", lease=0.3, may_be_alone=False)
    await first.open()
    await first.reserve_blob("d" * 32)
    await first.close()  # ends its lease: as after a crash, once the lease ran out
    again = PostgresStateStore(pg_schema.dsn, node="n", lease=0.3, may_be_alone=False)
    await again.open()
    await again.reserve_blob("e" * 32)
    assert await again.sweep_uploads() == ["d" * 32]
    assert await again.blob_keys() == {"e" * 32}
    await again.close()


async def test_records_missed_while_the_listener_was_away_are_delivered_once_it_is_back(
    pg_schema: Schema, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listening node's connections break (PostgreSQL out of its reach) while another
    node publishes; once it listens again it gets the records it missed, in commit order,
    before the live ones, none twice; then None (it may look at every queue again). Old
    records are deleted by heartbeats."""
    proxy = await Proxy(*pg_schema.address).start()
    publisher = PostgresStateStore(pg_schema.dsn, node="pub", may_be_alone=False)
    listener = PostgresStateStore(
        pg_schema.dsn_at("127.0.0.1", proxy.port), node="sub", may_be_alone=False
    )
    got: list[str | None] = []
    listener.listen(got.append)
    try:
        await listener.open()
        await publisher.open()
        await publisher.submit([records("r1")])
        await eventually(lambda: got == ["r1"])
        proxy.refuse()
        await publisher.submit([records("r2")])
        await publisher.submit([records("r3", "r4")])
        await asyncio.sleep(0.2)
        assert got == ["r1"]
        proxy.restore()
        await eventually(lambda: got == ["r1", "r2", "r3", "r4", None])
        await publisher.submit([records("r5")])
        await eventually(lambda: got == ["r1", "r2", "r3", "r4", None, "r5"])
        # A record of a node of a wsq before migration 9 has no id: delivered as it is.
        await pg_schema.execute(f"SELECT pg_notify('{listener.channel}', '[\"old\",[]]')")
        await eventually(lambda: got[-1] == '["old",[]]')
        assert len(await pg_schema.fetch("SELECT id FROM wsq_records")) == 5
        monkeypatch.setattr(postgres, "RECORDS_KEPT", 0.0)
        await publisher.heartbeat()
        assert await pg_schema.fetch("SELECT id FROM wsq_records") == []
    finally:
        await listener.close()
        await publisher.close()
        await proxy.close()


async def test_events_tied_to_writes_that_did_not_apply_are_not_published(
    pg_schema: Schema,
) -> None:
    """An event tied to a write (Publish.events) is published only if the write applied,
    whether that write is in the statement that publishes, in an earlier one of the same
    transaction (a second write to a task), or in another submit of the same commit; a
    record none of whose events is left is not sent."""
    publisher = PostgresStateStore(pg_schema.dsn, node="pub", may_be_alone=False)
    listener = PostgresStateStore(pg_schema.dsn, node="sub", may_be_alone=False)
    got: list[str | None] = []
    listener.listen(got.append)
    try:
        await listener.open()
        await publisher.open()
        await insert(publisher, make("a", 1), make("b", 2, state=State.ACTIVE, run=1, worker="w"))
        done_a = make("a", 1, state=State.COMPLETED, run=1)  # a waits: does not apply
        done_b = make("b", 2, state=State.COMPLETED, run=1, worker="w")  # applies
        publish = Publish(
            events=(("1", 0, 0), ("2", 0, 1), ("3", 1, 0), ("4", 1, None), ("5", 2, 0)),
            head="[",
            tail="]",
        )
        ops = [Update(done_a, expected=State.ACTIVE), Update(done_b, expected=State.ACTIVE)]
        assert await publisher.submit([*ops, publish]) == [False, True, None]
        await eventually(lambda: got == ["[2]", "[4]"])
        # The tied writes in an earlier statement: each task written to twice.
        got.clear()
        again = Publish(events=(("x", 0, 0), ("y", 0, 1), ("z", 1, 2)), head="<", tail=">")
        progress_a = SetProgress("a", 0.5, 1.0)  # a is not active: does not apply
        progress_b = SetProgress("b", 0.5, 1.0)  # b is completed now: does not apply
        ops2 = [progress_a, Delete("b"), progress_b, Delete("a")]
        results = await publisher.submit([*ops2, again])
        assert results == [False, True, False, True, None]
        await eventually(lambda: got == ["<y>"])
        # Two submits in one commit: each one's ties are into its own ops.
        got.clear()
        await insert(publisher, make("c", 3), make("d", 4))
        commits = publisher.commits
        first = publisher.submit([Delete("c"), Publish(events=(("c", 0, 0),), head="(", tail=")")])
        second = publisher.submit(
            [Delete("nothing"), Publish(events=(("n", 0, 0),), head="(", tail=")")]
        )
        third = publisher.submit([Delete("d"), Publish(events=(("d", 0, 0),), head="(", tail=")")])
        assert await asyncio.gather(first, second, third) == [
            [True, None],
            [False, None],
            [True, None],
        ]
        assert publisher.commits == commits + 1
        await eventually(lambda: got == ["(c)", "(d)"])
        await asyncio.sleep(0.1)
        assert got == ["(c)", "(d)"]
    finally:
        await listener.close()
        await publisher.close()


async def test_each_live_node_has_its_own_index_for_seqs(pg_schema: Schema) -> None:
    """Seqs end in the node's index (Core.allocate_seq): nodes opening at once get
    different ones, a node opened again under its name keeps its own, and a dead node's
    index is free again once another has taken it over."""
    stores = [
        PostgresStateStore(pg_schema.dsn, node=f"n{i}", lease=0.3, may_be_alone=False)
        for i in range(6)
    ]
    recoveries = await asyncio.gather(*(s.open() for s in stores))
    indexes = [r.node_index for r in recoveries]
    assert sorted(indexes) == list(range(1, 7))
    await stores[2].close()  # ends its lease; it may come back under its name
    again = PostgresStateStore(pg_schema.dsn, node="n2", lease=0.3, may_be_alone=False)
    assert (await again.open()).node_index == indexes[2]
    for store in stores[:2] + stores[3:]:
        await store.close()
    beat = await again.heartbeat()  # takes the closed nodes over: their rows go
    assert sorted(beat.dead) == ["n0", "n1", "n3", "n4", "n5"]
    newcomer = PostgresStateStore(pg_schema.dsn, node="new", lease=0.3, may_be_alone=False)
    expected = 1 if indexes[2] != 1 else 2
    assert (await newcomer.open()).node_index == expected
    await newcomer.close()
    await again.close()


async def test_a_node_whose_lease_ran_out_takes_an_index_again(pg_schema: Schema) -> None:
    late = PostgresStateStore(pg_schema.dsn, node="late", lease=0.3, may_be_alone=False)
    index = (await late.open()).node_index
    await asyncio.sleep(0.5)
    other = PostgresStateStore(pg_schema.dsn, node="other", lease=0.3, may_be_alone=False)
    assert (await other.open()).node_index not in (0, index)
    assert (await other.heartbeat()).dead == ["late"]  # its row, and index, are gone
    beat = await late.heartbeat()
    assert beat.lost and beat.node_index is not None
    assert (
        beat.node_index
        != (await pg_schema.fetch("SELECT idx FROM wsq_nodes WHERE name = 'other'"))[0][0]
    )
    await other.close()
    await late.close()


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


async def test_claims_in_open_transactions_skip_each_others_rows(
    pg_store: PostgresStateStore, pg_schema: Schema
) -> None:
    """Two nodes' claims at once: the second neither waits for the first's row locks nor
    takes its tasks (FOR UPDATE SKIP LOCKED), and both commit."""
    await insert(pg_store, *(make(f"t{n}", n) for n in range(1, 7)))
    first, second = [await asyncpg.connect(pg_schema.dsn) for _ in range(2)]
    try:
        one, two = first.transaction(), second.transaction()
        await one.start()
        await two.start()
        taken = await first.fetch(CLAIM_WAITING, MAX_INT, "q", 1.0, ["a"] * 4, "node-a")
        others = await asyncio.wait_for(
            second.fetch(CLAIM_WAITING, MAX_INT, "q", 1.0, ["b"] * 4, "node-b"), timeout=10
        )
        assert sorted(row["id"] for row in taken) == ["t1", "t2", "t3", "t4"]
        assert sorted(row["id"] for row in others) == ["t5", "t6"]
        await one.commit()
        await two.commit()
    finally:
        await first.close()
        await second.close()
    workers = {task.id: task.worker for task in await pg_store.list(queue="q")}
    assert workers == {"t1": "a", "t2": "a", "t3": "a", "t4": "a", "t5": "b", "t6": "b"}
    # Each node moved the counts in rows of its own; their sums are the cluster's.
    assert await pg_store.counts() == {("q", State.ACTIVE): 6}


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


# -- plans ---------------------------------------------------------------------------------


def _failures(n: int) -> list[Op]:
    task = make(f"a{n}", n, state=State.FAILED, run=2, worker="w")
    attempt = Attempt(f"a{n}", 2, "w", ended=1.0, outcome=AttemptOutcome.FAILED)
    return [Update(task, expected=State.ACTIVE), RecordAttempt(attempt)]


def _completions(n: int) -> list[Op]:
    task = make(f"a{n}", n, state=State.COMPLETED, run=2, worker="w")
    attempt = Attempt(f"a{n}", 2, "w", ended=1.0, outcome=AttemptOutcome.COMPLETED)
    return [Update(task, expected=State.ACTIVE, attempt=attempt)]


# Each kind of write statement, as the writer sends it for 100 tasks: of the tasks of
# test_writes_probe_by_key_however_stale_the_statistics, "a<n>" are active, "w<n>" waiting.
WRITES: dict[str, Callable[[int], list[Op]]] = {
    "insert": lambda n: [Insert(make(f"new{n}", 100_000 + n))],
    "start": lambda n: [
        Update(make(f"w{n}", n, state=State.ACTIVE, run=1, worker="w"), State.WAITING)
    ],
    "failure and attempt": _failures,
    "completion": _completions,
    "requeue": lambda n: [Update(make(f"a{n}", 50_000 + n, run=1), State.ACTIVE)],
    "progress": lambda n: [SetProgress(f"a{n}", 0.5, 1.0)],
    "delete": lambda n: [Delete(f"w{n}", State.WAITING)],
}


async def test_writes_probe_by_key_however_stale_the_statistics(
    pg_store: PostgresStateStore, pg_schema: Schema
) -> None:
    """Each kind of write reads the rows it names by their keys, never by scanning a whole
    table or index, whether the statistics are those of the empty tables, stale, or
    fresh: a scan's cost grows with the tables (or, for the partial index of active runs,
    with every claim since the last vacuum), so every batch would slow down as they do.
    Seen: plans made while the tables were empty scanned them whole per row; with fresh
    statistics, ``state = 'active'`` read every entry of that partial index, joined to
    the batch."""
    # A plan made while the tables are empty is kept (one generic plan per statement and
    # connection) until PostgreSQL analyzes them again.
    plans = {f"{kind}, empty": plan for kind, plan in (await _write_plans(pg_store)).items()}
    await pg_schema.execute(
        "ALTER TABLE wsq_tasks SET (autovacuum_enabled = false);"
        " ALTER TABLE wsq_attempts SET (autovacuum_enabled = false);"
        " ANALYZE wsq_tasks; ANALYZE wsq_attempts;"  # analyzed empty: stale from here on
        " INSERT INTO wsq_tasks (id, queue, state, seq, data, opt_timeout, opt_retries,"
        " opt_autoremove, progress, retries, run, created, updated)"
        " SELECT CASE WHEN n <= 10000 THEN 'a' ELSE 'w' END || n, 'q', 'waiting', n,"
        " '\\x7b7d', -1, 0, false, 0, 0, 0, 0, 0 FROM generate_series(1, 20000) AS n;"
        " INSERT INTO wsq_attempts (task, run, ended, outcome)"
        " SELECT 'a' || n, 1, 0, 'completed' FROM generate_series(1, 10000) AS n"
    )
    # As a server runs them: claimed 100 at a time, then finished, but for the last 100.
    for first in range(1, 10_001, 100):
        await pg_schema.execute(
            "UPDATE wsq_tasks SET state = 'active', run = 1, worker = 'w', node = 'n'"
            f" WHERE seq BETWEEN {first} AND {first + 99}"
        )
        if first < 9_901:
            await pg_schema.execute(
                "UPDATE wsq_tasks SET state = 'completed'"
                f" WHERE seq BETWEEN {first} AND {first + 99}"
            )
    plans |= await _write_plans(pg_store)  # with the statistics of the empty tables
    await pg_schema.execute("ANALYZE wsq_tasks; ANALYZE wsq_attempts")
    plans |= {f"{kind}, analyzed": plan for kind, plan in (await _write_plans(pg_store)).items()}
    scanning = {
        kind: plan
        for kind, plan in plans.items()
        if "Seq Scan" in plan
        or not set(re.findall(r"Index (?:Only )?Scan (?:using|on) (\w+)", plan)) <= KEY_INDEXES
    }
    assert not scanning, "\n\n".join(f"{kind}:\n{plan}" for kind, plan in scanning.items())


async def test_listings_across_queues_and_the_next_seq_read_ranges_of_state_and_seq(
    pg_schema: Schema, pg_store: PostgresStateStore
) -> None:
    """No index on seq alone (migration 13: every write would keep it up to date): a
    listing of every queue and state merges four range scans of (state, seq), and the
    next seq at start-up reads the end of each, however many tasks there are."""
    await pg_schema.execute(
        "INSERT INTO wsq_tasks (id, queue, state, seq, data, opt_timeout, opt_retries,"
        " opt_autoremove, progress, retries, run, created, updated)"
        " SELECT 't' || n, 'q' || (n % 50), (ARRAY['waiting', 'active', 'completed',"
        " 'failed'])[n % 4 + 1], n, '\\x7b7d', -1, 0, false, 0, 0, 0, 0, 0"
        " FROM generate_series(1, 20000) AS n; ANALYZE wsq_tasks"
    )
    conn = await pg_store._connect()
    try:
        for sql, params in (
            (postgres.LIST_TASKS, "(-1, 100)"),
            (postgres.LIST_TASKS, "(19000, 100)"),
            (postgres.LIST_TASKS, "(-1, 100000)"),
            (postgres.GET_NEXT_SEQ, ""),
        ):
            await conn.execute(f"PREPARE q AS {sql}")
            plan = "\n".join(row[0] for row in await conn.fetch(f"EXPLAIN EXECUTE q{params}"))
            await conn.execute("DEALLOCATE q")
            assert "Seq Scan" not in plan and "Sort  (" not in plan, plan  # no Sort node
            assert "wsq_tasks_state_seq" in plan, plan
        assert await conn.fetchval(postgres.GET_NEXT_SEQ) == 20001
        listed = await conn.fetch(postgres.LIST_TASKS, 19990, 100)
        assert [row["seq"] for row in listed] == list(range(19991, 20001))
    finally:
        await conn.close()


async def _write_plans(pg_store: PostgresStateStore) -> dict[str, str]:
    """The plan of each of WRITES, as the store's writer would run it."""
    conn = await pg_store._connect()  # as the store's writer connects
    plans = {}
    try:
        for kind, make_ops in WRITES.items():
            [step] = postgres.plan([op for n in range(10_000, 9_900, -1) for op in make_ops(n)])
            assert isinstance(step, postgres.Writes)
            sql, params = step.statement("n")
            await conn.execute(f"PREPARE write AS {sql}")
            args = ", ".join(map(literal, params))  # EXPLAIN EXECUTE takes no parameters
            explained = await conn.fetch(f"EXPLAIN EXECUTE write({args})")
            await conn.execute("DEALLOCATE write")
            plans[kind] = "\n".join(row[0] for row in explained)
    finally:
        await conn.close()
    return plans


# The indexes by which a write finds the rows it names.
KEY_INDEXES = {"wsq_tasks_pkey", "wsq_attempts_pkey", "wsq_blobs_pkey", "wsq_blobs_task"}


def literal(value: object) -> str:
    """``value`` (a parameter of a write statement) as an SQL literal of unknown type."""
    if isinstance(value, list | tuple):
        return literal("{" + ",".join(_element(item) for item in value) + "}")
    if value is None:
        return "NULL"
    if isinstance(value, bytes):
        return literal("\\x" + value.hex())
    return "'" + str(value).replace("'", "''") + "'"


def _element(item: object) -> str:
    if item is None:
        return "NULL"
    text = "\\x" + item.hex() if isinstance(item, bytes) else str(item)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def records(*texts: str) -> Publish:
    """A Publish of these records as they are, tied to no write."""
    return Publish(events=tuple((text, chunk, None) for chunk, text in enumerate(texts)))
