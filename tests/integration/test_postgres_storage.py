"""A server whose state lives in PostgreSQL (``--database``, ``Server(database=...)``),
each test in a fresh schema of the test PostgreSQL (tests/pg.py)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import wsq
from tests.conftest import budget, eventually
from tests.integration.procs import ServerProcess, free_port
from tests.integration.proxy import Proxy
from tests.integration.reports import held_run
from tests.integration.test_durability import fast, kill_9_under_load
from tests.integration.test_s3_storage import run_server, stream_bytes
from tests.pg import Schema
from wsq.storage.postgres import migrations


async def rows(schema: Schema) -> dict[str, str]:
    """Task id -> state, as PostgreSQL has them."""
    return {row[0]: row[1] for row in await schema.fetch("SELECT id, state FROM wsq_tasks")}


async def test_add_work_complete_with_streams(pg_schema: Schema, data_dir: Path) -> None:
    blob = stream_bytes(3 << 20, seed=7)
    async with (
        wsq.Server(data_dir=data_dir, port=0, database=pg_schema.dsn) as server,
        fast(server.url) as producer,
        fast(server.url) as worker,
    ):
        task = await producer.queue("pg").add({"name": "x", "blob": blob, "small": b"inline"})
        assert await rows(pg_schema) == {task.id: "waiting"}
        seen: dict[str, bytes] = {}

        async def handler(work: wsq.Task) -> str:
            seen["blob"] = await work.data["blob"].read()
            seen["small"] = await work.data["small"].read()
            await work.update_progress(0.5)
            return "done"

        queue = worker.queue("pg")
        queue.process(handler)
        await eventually(lambda: queue.completed(), timeout=30)
        assert seen == {"blob": blob, "small": b"inline"}
        assert await rows(pg_schema) == {task.id: "completed"}
        [listed] = await producer.queue("pg").completed()
        assert (listed.id, listed.progress) == (task.id, 0.5)
        await task.remove()
        assert await rows(pg_schema) == {}
        assert await pg_schema.fetch("SELECT key FROM wsq_blobs") == []
    assert not (data_dir / "wsq.db").exists()  # the state is in PostgreSQL only


async def test_waiting_and_active_tasks_survive_a_restart(
    pg_schema: Schema, data_dir: Path
) -> None:
    """Waiting tasks come back in order; an active one stays active and its worker's
    report is accepted by the new server."""
    port = free_port()
    release = asyncio.Event()
    started = asyncio.Event()

    async def slow(task: wsq.Task) -> None:
        started.set()
        await release.wait()

    server = wsq.Server(data_dir=data_dir, port=port, database=pg_schema.dsn)
    await server.start()
    try:
        async with fast(server.url) as worker_client, fast(server.url) as producer:
            long = await producer.queue("long").add("x", timeout=30)
            worker_client.queue("long").process(slow)
            await asyncio.wait_for(started.wait(), budget(10))
            for n in range(20):
                await producer.queue("fifo").add(n)
            await server.close()
            server = wsq.Server(data_dir=data_dir, port=port, database=pg_schema.dsn)
            await server.start()
            queue = worker_client.queue("long")
            [active] = await queue.active()
            assert active.id == long.id
            release.set()
            await eventually(lambda: queue.completed())
            assert await queue.failed() == []
            order: list[int] = []
            worker_client.queue("fifo").process(lambda t: order.append(t.data))
            await eventually(lambda: len(order) == 20)
            assert order == list(range(20))
    finally:
        await server.close()


async def test_kill_9_under_load_loses_no_acknowledged_task(
    pg_schema: Schema, data_dir: Path
) -> None:
    port = free_port()
    await kill_9_under_load(
        lambda: ServerProcess(data_dir, port, "--database", pg_schema.dsn).start()
    )


async def test_postgres_unreachable_answers_unavailable_then_recovers(
    pg_schema: Schema, data_dir: Path
) -> None:
    """PostgreSQL goes away (connections cut, new ones refused): adds and listings fail
    with ``unavailable``, the server stays up, and once PostgreSQL is back it carries on
    by itself with what was stored before."""
    proxy = await Proxy(*pg_schema.address).start()
    database = pg_schema.dsn_at("127.0.0.1", proxy.port)
    try:
        async with (
            wsq.Server(data_dir=data_dir, port=0, database=database) as server,
            fast(server.url) as client,
        ):
            queue = client.queue("pg")
            before = await queue.add("before")
            assert [t.id for t in await queue.all()] == [before.id]
            proxy.refuse()
            with pytest.raises(wsq.Unavailable, match="PostgreSQL"):
                await queue.add("while down")
            with pytest.raises(wsq.Unavailable, match="PostgreSQL"):
                await queue.all()
            proxy.restore()
            after = await queue.add("after")
            done: list[str] = []
            queue.process(lambda t: done.append(t.data))
            await eventually(lambda: len(done) == 2)
            assert done == ["before", "after"]

            async def stored() -> bool:  # the last completion commits after its handler ran
                return await rows(pg_schema) == {before.id: "completed", after.id: "completed"}

            await eventually(stored)
    finally:
        await proxy.close()


async def test_a_server_whose_postgres_stopped_answering_stops_in_bounded_time(
    pg_schema: Schema, data_dir: Path
) -> None:
    """PostgreSQL stops answering (a network that drops everything): a server told to stop
    does not wait out the store's 30 s timeouts for each batch it holds. The adds that
    were waiting fail (never acknowledged), and what was acknowledged before is kept."""
    proxy = await Proxy(*pg_schema.address).start()
    database = pg_schema.dsn_at("127.0.0.1", proxy.port)
    try:
        server = wsq.Server(data_dir=data_dir, port=0, database=database)
        await server.start()
        try:
            async with fast(server.url) as client:
                queue = client.queue("pg")
                kept = await queue.add("kept")
                proxy.blackhole()
                adds = [asyncio.ensure_future(queue.add(n)) for n in range(50)]
                await asyncio.sleep(0.5)  # on their way to PostgreSQL, which does not answer
                started = time.monotonic()
                await asyncio.wait_for(server.close(), 20)
                assert time.monotonic() - started < 10
        finally:
            await server.close()
        # The client kept them to send again; none was acknowledged.
        results = await asyncio.gather(*adds, return_exceptions=True)
        assert all(isinstance(r, wsq.WsqError) for r in results)
        proxy.restore()
        assert await rows(pg_schema) == {kept.id: "waiting"}
    finally:
        await proxy.close()


@pytest.mark.parametrize("outcome", ["completed", "failed"])
async def test_a_report_postgres_could_not_store_is_sent_again_and_nothing_sticks(
    pg_schema: Schema, data_dir: Path, outcome: str
) -> None:
    """PostgreSQL goes away while a worker runs a task; its report cannot be stored: the
    server answers ``unavailable`` (not OK), tells no one the task ended, and sets its
    runs right once PostgreSQL is back; the worker sends the report again and it is
    accepted: the task ends once, in its first run, and no task stays active."""
    proxy = await Proxy(*pg_schema.address).start()
    database = pg_schema.dsn_at("127.0.0.1", proxy.port)
    try:
        async with (
            wsq.Server(data_dir=data_dir, port=0, database=database, lease=1.0) as server,
            fast(server.url) as client,
            fast(server.url) as observer,
        ):
            held = await held_run(client, observer, "pg", failed=outcome == "failed")
            proxy.refuse()
            held.go.set()
            await asyncio.sleep(0.5)  # the report is refused, and sent again, meanwhile
            assert held.ends == []  # nothing stored: nothing told
            proxy.restore()

            async def ended() -> bool:
                return await rows(pg_schema) == {held.task.id: outcome}

            await eventually(ended)
            await asyncio.sleep(0.5)
            assert held.runs == [1] and held.ends == [(f"task {outcome}", held.task.id)]
            assert server.core.lookup(held.task.id) is None
    finally:
        await proxy.close()


async def test_timers_wait_while_the_lease_is_in_doubt_and_all_run_after(
    pg_schema: Schema, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Heartbeats fail (PostgreSQL away, as far as the node can tell) until its lease is in
    doubt: a run's timeout that comes meanwhile ends nothing; once a heartbeat renews the
    lease, that run times out, and so, later, does the next one (its timer is armed again
    although the core changed while none could be)."""
    async with (
        wsq.Server(data_dir=data_dir, port=0, database=pg_schema.dsn, lease=2.0) as server,
        fast(server.url) as client,
    ):
        runs: list[str] = []

        async def hang(task: wsq.Task) -> None:
            runs.append(task.id)
            await asyncio.Event().wait()

        client.queue("t").process(hang, concurrency=2)
        first = await client.queue("t").add(None, timeout=1.0, retries=0)
        second = await client.queue("t").add(None, timeout=3.0, retries=0)
        await eventually(lambda: len(runs) == 2)
        renew = server.store.heartbeat

        async def away() -> Any:
            raise wsq.Unavailable("PostgreSQL is unavailable (the test says so)")

        monkeypatch.setattr(server.store, "heartbeat", away)
        server._renewed -= 10.0  # in doubt from now
        await asyncio.sleep(1.3)  # first's timeout passes: nothing ends it
        assert server.core.lookup(first.id) is not None
        server.apply([])  # the core is looked at meanwhile
        monkeypatch.setattr(server.store, "heartbeat", renew)

        async def failed(*tasks: wsq.Task) -> bool:
            listed = await client.queue("t").failed()
            return sorted(t.id for t in listed) == sorted(t.id for t in tasks)

        await eventually(lambda: failed(first), timeout=5)
        await eventually(lambda: failed(first, second), timeout=5)


async def test_worker_rows_lost_while_postgres_was_away_are_made_anew(
    pg_schema: Schema, data_dir: Path
) -> None:
    """A worker that registers while PostgreSQL is out of reach has no row for the other
    nodes' listings; the first heartbeat after PostgreSQL is back writes this node's rows
    anew (and drops those of workers that left meanwhile)."""
    proxy = await Proxy(*pg_schema.address).start()
    database = pg_schema.dsn_at("127.0.0.1", proxy.port)

    async def keys() -> list[str]:
        return sorted(row[0] for row in await pg_schema.fetch("SELECT name FROM wsq_workers"))

    try:
        async with (
            wsq.Server(data_dir=data_dir, port=0, database=database, lease=1.0) as server,
            fast(server.url) as client,
        ):
            gone = client.queue("pg").process(lambda t: None)

            async def written() -> bool:  # its row commits with the batch after the core
                return await keys() == [gone.id]

            await eventually(written)
            proxy.refuse()
            await gone.stop()
            stays = client.queue("pg").process(lambda t: None)
            await eventually(lambda: server.core.worker_counts().get("pg") == 1)
            await asyncio.sleep(0.3)  # the writes of both failed
            proxy.restore()

            async def synced() -> bool:
                return await keys() == [stays.id]

            await eventually(synced)
    finally:
        await proxy.close()


async def test_database_and_storage_need_no_data_dir(pg_schema: Schema, tmp_path: Path) -> None:
    data_dir = tmp_path / "unused"
    blobs = tmp_path / "blobs"
    async with (
        wsq.Server(
            data_dir=data_dir, port=0, database=pg_schema.dsn, storage=f"file://{blobs}"
        ) as server,
        fast(server.url) as client,
    ):
        task = await client.queue("q").add({"blob": b"x" * 100_000})
        assert await (await task.get_data())["blob"].read() == b"x" * 100_000
    assert not data_dir.exists()


async def test_database_and_state_store_are_exclusive(data_dir: Path) -> None:
    with pytest.raises(ValueError, match="not both"):
        wsq.Server(
            data_dir=data_dir,
            database="postgresql://localhost/db",
            state_store=object(),  # type: ignore[arg-type]
        )
    with pytest.raises(ValueError, match="postgresql://"):
        wsq.Server(data_dir=data_dir, database="mysql://localhost/db")


# -- the command line -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--database", "mysql://u:secret@h/db"], {}),
        (["--database", "postgresql://h:99999/db"], {}),
        ([], {"WSQ_DATABASE": "sqlite:///x.db"}),
    ],
)
def test_a_bad_database_url_is_one_line_and_exit_2(
    data_dir: Path, args: list[str], env: dict[str, str]
) -> None:
    done = run_server(data_dir, *args, env=env)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "--database" in lines[0] and "Traceback" not in done.stderr
    assert "secret" not in done.stderr


def test_an_unreachable_database_at_start_is_one_line_and_exit_1(data_dir: Path) -> None:
    database = f"postgresql://postgres@127.0.0.1:{free_port()}/test"
    done = run_server(data_dir, env={"WSQ_DATABASE": database})
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert "could not run: PostgreSQL is unavailable" in done.stderr.splitlines()[-1]


async def test_a_second_node_with_the_same_name_is_refused(
    pg_schema: Schema, tmp_path: Path
) -> None:
    """Nodes of one database are told apart by --node-name: a second node with a name in
    use waits out two lease terms (the first might have just died), then stops with one
    line saying why (exit code 1)."""
    async with wsq.Server(
        data_dir=tmp_path / "a", port=0, database=pg_schema.dsn, node_name="one", lease=0.5
    ):
        env = {"WSQ_DATABASE": pg_schema.dsn, "WSQ_NODE_NAME": "one", "WSQ_LEASE": "0.5"}
        done = await asyncio.to_thread(run_server, tmp_path / "b", env=env)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert "Another wsq node named 'one' is running on this database" in done.stderr


def migrate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wsq", "migrate", *args],
        capture_output=True,
        text=True,
        timeout=budget(60),
    )


async def test_wsq_migrate_runs_the_migrations_alone(pg_schema: Schema) -> None:
    first = await asyncio.to_thread(migrate, "--database", pg_schema.dsn)
    assert first.returncode == 0, first.stderr
    latest = len(migrations())
    assert (
        first.stdout == f"wsq: PostgreSQL schema at version {latest} (migrated from version 0).\n"
    )
    assert await rows(pg_schema) == {}
    again = await asyncio.to_thread(migrate, "--database", pg_schema.dsn)
    assert again.stdout == f"wsq: PostgreSQL schema at version {latest} (already up to date).\n"


def test_wsq_migrate_without_a_database_migrates_the_sqlite_file(data_dir: Path) -> None:
    done = migrate("--data-dir", str(data_dir))
    assert done.returncode == 0, done.stderr
    assert "SQLite schema at version" in done.stdout
    assert (data_dir / "wsq.db").exists()


async def test_a_claim_commits_ahead_of_the_run_end_that_freed_its_slot(
    pg_schema: Schema, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker's completion frees its slot, and the claim that fills it goes to
    PostgreSQL first, in a transaction of its own: the next task is offered while the
    completion's writes still commit (here held for a second), not after them."""
    from wsq.storage import postgres

    finished: dict[str, float] = {}
    real_step = postgres._run_step

    async def slow_ends(conn: Any, step: Any, node: str = "", channel: str = "") -> Any:
        ends = isinstance(step, postgres.Writes) and "finish" in step.rows
        if ends:
            await asyncio.sleep(1.0)
        results = await real_step(conn, step, node, channel)
        if ends:
            for kind, task_id in step.slots:
                if kind == "finish":
                    finished[task_id] = time.monotonic()
        return results

    monkeypatch.setattr(postgres, "_run_step", slow_ends)
    started: dict[str, float] = {}
    async with (
        wsq.Server(data_dir=data_dir, port=0, database=pg_schema.dsn) as server,
        fast(server.url) as client,
    ):
        first, second = await client.queue("q").add_many([{"n": 1}, {"n": 2}])

        def handler(task: wsq.Task) -> None:
            started[task.id] = time.monotonic()

        client.queue("q").process(handler, concurrency=1)
        await eventually(lambda: len(finished) == 2, timeout=10)
    assert started[second.id] < finished[first.id]  # offered while the first's end committed
