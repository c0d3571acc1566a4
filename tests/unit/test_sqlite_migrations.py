"""The SQLite store's migrations produce the schema the store's statements expect."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from wsq.core.ops import Attempt, AttemptOutcome
from wsq.exceptions import ServerError
from wsq.storage import sqlite as store
from wsq.storage.sqlite import MIGRATIONS, TASK_COLUMNS, SqliteStateStore, migrate

TASK_TABLE = [
    # (name, declared type, not null, primary key)
    ("id", "TEXT", 1, 1),
    ("queue", "TEXT", 1, 0),
    ("state", "TEXT", 1, 0),
    ("seq", "INTEGER", 1, 0),
    ("data", "BLOB", 1, 0),
    ("streams", "TEXT", 0, 0),
    ("opt_timeout", "REAL", 1, 0),
    ("opt_retries", "INTEGER", 1, 0),
    ("opt_autoremove", "INTEGER", 1, 0),
    ("progress", "REAL", 1, 0),
    ("retries", "INTEGER", 1, 0),
    ("error", "TEXT", 0, 0),
    ("run", "INTEGER", 1, 0),
    ("worker", "TEXT", 0, 0),
    ("created", "REAL", 1, 0),
    ("updated", "REAL", 1, 0),
    ("owner", "TEXT", 0, 0),
    ("not_before", "REAL", 1, 0),  # written and compared in SQL, never read back
    # A completed task's last run (Update.attempt), read by GET_ATTEMPTS only.
    ("last_client", "TEXT", 0, 0),
    ("last_node", "TEXT", 0, 0),
    ("last_offered", "REAL", 0, 0),
    ("last_started", "REAL", 0, 0),
    ("last_ended", "REAL", 0, 0),
    ("last_progress", "REAL", 0, 0),
]
SELECTED = [name for name, *_ in TASK_TABLE[: TASK_TABLE.index(("owner", "TEXT", 0, 0)) + 1]]
INDEXES = {
    "tasks_queue_state_seq": ("tasks", ["queue", "state", "seq"]),
    "tasks_state_seq": ("tasks", ["state", "seq"]),
    "tasks_seq": ("tasks", ["seq"]),
    "blobs_task": ("blobs", ["task"]),
}
ATTEMPT_TABLE = [
    ("task", "TEXT", 1, 1),
    ("run", "INTEGER", 1, 2),
    ("worker", "TEXT", 0, 0),
    ("client", "TEXT", 0, 0),
    ("node", "TEXT", 0, 0),
    ("offered", "REAL", 0, 0),
    ("started", "REAL", 0, 0),
    ("ended", "REAL", 1, 0),
    ("outcome", "TEXT", 1, 0),
    ("error", "TEXT", 0, 0),
    ("progress", "REAL", 0, 0),
]


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    with contextlib.closing(sqlite3.connect(tmp_path / "s.db", isolation_level=None)) as conn:
        yield conn


def user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def columns(conn: sqlite3.Connection, table: str) -> list[tuple[str, str, int, int]]:
    rows = conn.execute(f"PRAGMA table_info({table})").fetchall()
    return [(name, kind, notnull, pk) for _, name, kind, notnull, _, pk in rows]


def test_migrate_builds_the_schema(conn: sqlite3.Connection) -> None:
    assert migrate(conn) == 0
    assert user_version(conn) == len(MIGRATIONS)
    tables = {
        name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    }
    assert tables == {"tasks", "blobs", "meta", "attempts"}
    assert columns(conn, "tasks") == TASK_TABLE
    assert [c.strip() for c in TASK_COLUMNS.split(",")] == SELECTED
    assert columns(conn, "blobs") == [("key", "TEXT", 1, 1), ("task", "TEXT", 1, 0)]
    assert columns(conn, "meta") == [("key", "TEXT", 1, 1), ("value", "TEXT", 1, 0)]
    assert columns(conn, "attempts") == ATTEMPT_TABLE
    assert [name for name, *_ in ATTEMPT_TABLE] == [
        c.strip() for c in store.ATTEMPT_COLUMNS.split(",")
    ]
    for index, (table, indexed) in INDEXES.items():
        owner = conn.execute("SELECT tbl_name FROM sqlite_master WHERE name = ?", (index,))
        assert owner.fetchone() == (table,)
        assert [row[2] for row in conn.execute(f"PRAGMA index_info({index})")] == indexed


def test_a_version_1_store_gains_the_owner_column_and_keeps_its_rows(
    conn: sqlite3.Connection,
) -> None:
    conn.executescript(f"BEGIN; {MIGRATIONS[0]} PRAGMA user_version = 1; COMMIT;")
    conn.execute(
        "INSERT INTO tasks VALUES ('t1', 'q', 'waiting', 1, x'6e756c6c', NULL, 60, 0, 0, 0, 0,"
        " NULL, 0, NULL, 1.0, 1.0)"
    )
    assert migrate(conn) == 1
    assert conn.execute("SELECT id, owner FROM tasks").fetchall() == [("t1", None)]


def test_a_version_2_store_gains_an_identity_made_once(conn: sqlite3.Connection) -> None:
    conn.executescript(f"BEGIN; {MIGRATIONS[0]} {MIGRATIONS[1]} PRAGMA user_version = 2; COMMIT;")
    assert migrate(conn) == 2
    (store_id,) = conn.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()
    assert len(store_id) == 32 and int(store_id, 16) >= 0
    migrate(conn)
    assert conn.execute("SELECT value FROM meta").fetchall() == [(store_id,)]


def test_a_version_3_store_gains_an_empty_attempts_table_and_keeps_its_tasks(
    conn: sqlite3.Connection,
) -> None:
    conn.executescript(f"BEGIN; {''.join(MIGRATIONS[:3])} PRAGMA user_version = 3; COMMIT;")
    conn.execute(
        "INSERT INTO tasks VALUES ('t1', 'q', 'failed', 1, x'6e756c6c', NULL, 60, 0, 0, 0, 1,"
        " 'boom', 1, NULL, 1.0, 1.0, NULL)"
    )
    assert migrate(conn) == 3
    assert conn.execute("SELECT id, state FROM tasks").fetchall() == [("t1", "failed")]
    assert conn.execute("SELECT count(*) FROM attempts").fetchone() == (0,)


async def test_a_version_5_store_gains_the_last_run_columns_and_keeps_its_attempts(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.db"
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.executescript(f"BEGIN; {''.join(MIGRATIONS[:5])} PRAGMA user_version = 5; COMMIT;")
        conn.execute(
            "INSERT INTO tasks VALUES ('t1', 'q', 'completed', 1, x'6e756c6c', NULL, 60, 0, 0,"
            " 1, 0, NULL, 1, 'w', 1.0, 2.0, NULL, 0)"
        )
        conn.execute(
            "INSERT INTO attempts VALUES ('t1', 1, 'w', 'c', 'n', 1.0, 1.5, 2.0, 'completed',"
            " NULL, 0.5)"
        )
        assert migrate(conn) == 5
    backend = SqliteStateStore(path)
    await backend.open()
    try:
        # A completion recorded before the migration stays where it was, and is read.
        assert await backend.attempts("t1") == [
            Attempt("t1", 1, "w", "c", "n", 1.0, 1.5, 2.0, AttemptOutcome.COMPLETED, None, 0.5)
        ]
    finally:
        await backend.close()


def test_migrate_is_idempotent(conn: sqlite3.Connection) -> None:
    migrate(conn)
    schema = conn.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall()
    assert migrate(conn) == len(MIGRATIONS)
    assert conn.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall() == schema


def test_migrate_refuses_a_newer_schema(conn: sqlite3.Connection) -> None:
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(ServerError):
        migrate(conn)


def test_a_failed_migration_leaves_the_database_untouched(
    conn: sqlite3.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        "wsq.storage.sqlite.MIGRATIONS", [*MIGRATIONS, "CREATE TABLE x (a); nonsense;"]
    )
    with pytest.raises(sqlite3.Error):
        migrate(conn)
    assert user_version(conn) == len(MIGRATIONS)
    assert not conn.in_transaction
    assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'x'").fetchone() == (0,)


def test_the_query_planner_uses_the_indexes(conn: sqlite3.Connection) -> None:
    migrate(conn)

    def plan(sql: str, *params: object) -> str:
        return " | ".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params))

    assert "tasks_queue_state_seq" in plan(store.LOAD_WAITING, 9, 9, "q", 10)
    assert "tasks_state_seq" in plan(store.GET_ACTIVE_TASKS, -1, -1)
    assert "USING INDEX sqlite_autoindex_tasks_1" in plan(store.GET_TASKS, '["a"]')
    assert "SCAN tasks" not in plan(store.GET_WAITING_QUEUES).replace("SCAN names", "")
    assert "SCAN tasks" not in plan(store.GET_NEXT_SEQ)
    # A task's attempts, recording, pruning and deleting them: one range of the key.
    key = "USING PRIMARY KEY (task=?"
    assert key in plan(store.GET_ATTEMPTS, "a", "a")
    assert "USING INDEX sqlite_autoindex_tasks_1 (id=?)" in plan(store.GET_ATTEMPTS, "a", "a")
    assert key in plan(store.PRUNE_ATTEMPTS, "a", 1)
    assert key in plan(store.DELETE_ATTEMPTS, "a")


async def test_opening_a_store_migrates_its_file_in_wal_mode(tmp_path: Path) -> None:
    backend = SqliteStateStore(tmp_path / "new" / "s.db")
    await backend.open()
    await backend.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "new" / "s.db")) as conn:
        assert user_version(conn) == len(MIGRATIONS)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
