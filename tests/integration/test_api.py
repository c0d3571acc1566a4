"""The rest of the Python API end to end: touch, abort on remove, stop, listeners."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

import wsq
from tests.conftest import budget, completed_count_is, eventually
from tests.integration.rawclient import RawClient
from wsq.blobs.memory import MemoryBlobStore


async def test_touch_resets_the_timeout(client: wsq.Client) -> None:
    queue = client.queue("touch")

    async def handler(task: wsq.Task) -> None:
        for _ in range(5):
            await asyncio.sleep(0.15)
            await task.touch()

    await queue.add(None, timeout=0.6)  # 5 x 0.15 s outlasts it only if touch resets it
    queue.process(handler)
    await eventually(lambda: queue.completed())
    assert await queue.failed() == []


async def test_touch_outside_a_worker_is_refused(client: wsq.Client) -> None:
    task = await client.queue("q").add(1)
    with pytest.raises(wsq.InvalidState):
        await task.touch()
    with pytest.raises(wsq.InvalidState):
        await task.update_progress(0.5)


async def test_remove_aborts_a_running_handler(client: wsq.Client) -> None:
    queue = client.queue("rm-active")
    started = asyncio.Event()
    reasons: list[str] = []

    async def handler(task: wsq.Task) -> None:
        task.on("abort", lambda t, reason: reasons.append(reason))
        started.set()
        await asyncio.sleep(30)

    task = await queue.add(None)
    queue.process(handler)
    await asyncio.wait_for(started.wait(), budget(10))
    await task.remove()
    await eventually(lambda: reasons == ["Removed."])
    assert await queue.all() == []


async def test_worker_stop_waits_for_running_handlers(client: wsq.Client) -> None:
    queue = client.queue("stop")
    started = asyncio.Event()
    finished = False

    async def handler(task: wsq.Task) -> None:
        nonlocal finished
        started.set()
        await asyncio.sleep(0.3)
        finished = True

    await queue.add(1)
    await queue.add(2)
    worker = queue.process(handler)
    await asyncio.wait_for(started.wait(), budget(10))
    await worker.stop()
    assert finished
    assert len(await queue.completed()) == 1
    [waiting] = await queue.waiting()
    assert waiting.data is None  # listings carry no data


async def test_sync_handlers_and_listeners(client: wsq.Client) -> None:
    queue = client.queue("sync")
    seen: list[str] = []
    client.on("task completed", lambda task: seen.append(f"client:{task.queue}"))
    queue.on("task completed", lambda task: seen.append("queue"))

    async def async_listener(task: wsq.Task) -> None:
        seen.append("async")

    queue.on("task completed", async_listener)
    await queue.add(1)
    queue.process(lambda task: None)
    await eventually(lambda: len(seen) == 3)
    assert sorted(seen) == ["async", "client:sync", "queue"]


async def test_task_listeners_see_each_step(client: wsq.Client) -> None:
    queue = client.queue("steps")
    task = await queue.add(1, retries=1)
    steps: list[Any] = []
    for name in ("queued", "started", "progress", "failed", "completed"):
        task.on(name, lambda t, *extra, name=name: steps.append((name, *extra)))
    attempts = 0

    async def handler(t: wsq.Task) -> None:
        nonlocal attempts
        attempts += 1
        await t.update_progress(0.5)
        if attempts == 1:
            raise RuntimeError("first try")

    queue.process(handler)
    await eventually(lambda: ("completed",) in steps)
    assert steps == [
        ("started",),
        ("progress", 0.5),
        ("failed", True),
        ("queued",),
        ("started",),
        ("progress", 0.5),
        ("completed",),
    ]
    assert task.state == "completed"
    assert task.retries == 1


async def test_worker_events_carry_the_worker(client: wsq.Client) -> None:
    events: list[tuple[str, Any]] = []
    for name in ("worker added", "worker removed"):
        client.on(name, lambda worker, name=name: events.append((name, worker)))
    worker = client.queue("w").process(lambda t: None, concurrency=4)
    await eventually(lambda: len(events) == 1)
    await worker.stop()
    await eventually(lambda: len(events) == 2)
    expected = {"id": worker.id, "queue": "w", "concurrency": 4}
    assert events == [("worker added", expected), ("worker removed", expected)]


async def test_connect_and_disconnect_events(server: wsq.Server) -> None:
    c = wsq.Client(server.url, backoff=lambda tries: 0.05)
    seen: list[str] = []
    c.on("connect", lambda: seen.append("connect"))
    c.on("disconnect", lambda: seen.append("disconnect"))
    await c.connect()
    assert c.connected
    for connection in list(server.connections.values()):
        await connection.ws.close()
    await eventually(lambda: seen == ["connect", "disconnect", "connect"])
    await c.close()
    assert not c.connected


async def test_connect_to_a_bad_address_raises() -> None:
    c = wsq.Client("http://127.0.0.1:1")
    with pytest.raises(wsq.WsqError):
        await asyncio.wait_for(c.connect(), budget(5))
    await c.close()


async def test_offers_batch_tasks_and_answers_batch_frames(client: wsq.Client) -> None:
    """Five waiting tasks reach a worker with five free slots in one offer."""
    queue = client.queue("batch")
    for n in range(5):
        await queue.add(n)
    async with RawClient(client.address) as raw:
        offer = await _raw_worker(raw, "batch", 5)
        assert [t["data"] for t in offer["tasks"]] == [0, 1, 2, 3, 4]
        runs = [[t["task"]["id"], t["run"]] for t in offer["tasks"]]
        assert raw.ws is not None
        await raw.send(
            [{"op": "ack", "runs": runs}]
            + [{"op": "complete", "task": t, "run": r, "id": n} for n, (t, r) in enumerate(runs)]
        )
        answers = [await raw.expect("result") for _ in runs]
        assert sorted(a["id"] for a in answers) == [0, 1, 2, 3, 4]
    assert len(await queue.completed()) == 5


async def test_stale_report_is_refused(client: wsq.Client) -> None:
    queue = client.queue("stale")
    task = await queue.add(1, timeout=0.2)
    async with RawClient(client.address) as raw:
        offer = await _raw_worker(raw, "stale", 1)
        run = offer["tasks"][0]["run"]
        await raw.send({"op": "ack", "runs": [[task.id, run]]})
        abort = await raw.expect("abort")
        assert abort["reason"] == "Timed out."
        answer = await raw.request({"op": "complete", "task": task.id, "run": run})
        assert answer["code"] == "stale_run"
    [failed] = await queue.failed()
    assert failed.error == "Timed out."


async def test_many_queued_adds_keep_their_order(client: wsq.Client) -> None:
    """Adds issued together (pipelined on one connection) are queued in call order."""
    queue = client.queue("pipelined")
    await asyncio.gather(*(queue.add(n) for n in range(200)))
    assert [t.data for t in await queue.waiting()] == [None] * 200
    order: list[int] = []
    queue.process(lambda t: order.append(t.data))
    await eventually(lambda: len(order) == 200)
    assert order == list(range(200))


async def test_add_many_keeps_order_and_is_one_answer_per_batch(client: wsq.Client) -> None:
    queue = client.queue("bulk")
    added: list[str] = []
    queue.on("task added", lambda task: added.append(task.id))
    tasks = await queue.add_many([{"n": n, "blob": b"x" * (n % 3)} for n in range(2500)], retries=2)
    assert len(tasks) == 2500
    assert all(t.options["retries"] == 2 and t.state == "waiting" for t in tasks)
    assert all(t.created > 0 and t.queue == "bulk" for t in tasks)
    waiting = await queue.waiting()
    assert [t.id for t in waiting] == [t.id for t in tasks]
    # Created and updated at the "created" of their message's answer (protocol §4.3).
    assert [(t.created, t.updated) for t in waiting] == [(t.created, t.created) for t in tasks]
    await eventually(lambda: len(added) == 2500)
    order: list[int] = []
    blobs: list[bytes] = []

    async def handler(task: wsq.Task) -> None:
        order.append(task.data["n"])
        blobs.append(await task.data["blob"].read())

    queue.process(handler, concurrency=10)
    await eventually(lambda: len(order) == 2500)
    assert sorted(order) == list(range(2500))
    assert blobs.count(b"xx") == 833


async def test_add_many_edge_cases(client: wsq.Client) -> None:
    queue = client.queue("bulk-edges")
    assert await queue.add_many([]) == []
    with pytest.raises(ValueError):
        await queue.add_many([{"big": b"x" * (1 << 20)}])
    big = [{"text": "y" * 20_000} for _ in range(120)]  # 2.4 MB: split by size
    assert len(await queue.add_many(big)) == 120
    assert len(await queue.all()) == 120


async def test_add_many_resent_creates_no_duplicates(client: wsq.Client) -> None:
    async with RawClient(client.address) as raw:
        message = {
            "op": "add_many",
            "queue": "resend",
            "tasks": [{"data": n, "task": f"job-{n}"} for n in range(5)],
        }
        first = await raw.request(message)
        again = await raw.request(message)
        assert first["result"]["tasks"] == [f"job-{n}" for n in range(5)]  # new: ids only
        existing = again["result"]["tasks"]  # already there: their records
        assert [t["id"] for t in existing] == [f"job-{n}" for n in range(5)]
        assert {t["state"] for t in existing} == {"waiting"}
        refused = await raw.request(
            {
                "op": "add_many",
                "queue": "resend",
                "tasks": [{"streams": [{"path": [], "upload": 1}]}],
            }
        )
        assert refused["code"] == "invalid_argument"
    assert len(await client.queue("resend").all()) == 5


async def test_complete_many_answers_the_stale_runs(client: wsq.Client) -> None:
    queue = client.queue("many-done")
    for n in range(3):
        await queue.add(n)
    async with RawClient(client.address) as raw:
        offer = await _raw_worker(raw, "many-done", 3)
        runs = [[t["task"]["id"], t["run"]] for t in offer["tasks"]]
        await raw.send({"op": "ack", "runs": runs})
        stale = [runs[0][0], runs[0][1] + 7]
        answer = await raw.request({"op": "complete_many", "runs": [*runs[1:], stale]})
        assert answer["result"] == {"stale": [stale]}
    assert len(await queue.completed()) == 2


async def test_a_worker_completing_more_than_a_batch_in_one_turn(client: wsq.Client) -> None:
    queue = client.queue("wide")
    await queue.add_many(range(1500))
    queue.process(lambda task: None, concurrency=1500)
    await eventually(lambda: completed_count_is(queue, 1500), timeout=30)


async def _raw_worker(raw: RawClient, queue: str, concurrency: int) -> dict[str, Any]:
    """Register a worker on a raw connection and return the first offer it gets."""
    message = {"op": "work", "queue": queue, "concurrency": concurrency, "worker": f"w-{queue}"}
    await raw.request(message)
    return await raw.expect("offer")


async def test_ping_is_answered_at_once(server: wsq.Server) -> None:
    async with RawClient(server.url) as raw:
        assert await raw.request({"op": "ping"}) == {"op": "result", "id": 1000, "result": None}


async def test_stats_count_tasks_by_state_and_list_workers(data_dir: Any) -> None:
    async with wsq.Server(data_dir=data_dir, port=0) as server:  # noqa: SIM117 (url first)
        async with wsq.Client(server.url) as client, RawClient(server.url) as raw:
            queue = client.queue("s")
            await queue.add_many([{"n": i} for i in range(5)])
            release = asyncio.Event()
            done = 0

            async def handler(task: wsq.Task) -> None:
                nonlocal done
                if task.data["n"] == 4:
                    raise ValueError("bad")
                if task.data["n"] >= 2:
                    await release.wait()
                done += 1

            worker = queue.process(handler, concurrency=2)
            await eventually(lambda: done == 2)
            stats = await raw.request({"op": "stats"})
            assert stats["result"]["queues"] == await client.stats()
            assert stats["result"] == {
                "queues": [
                    {"name": "s", "waiting": 1, "active": 2, "completed": 2, "failed": 0,
                     "workers": [{"id": worker.id, "queue": "s", "concurrency": 2,
                                  "running": 2, "node": server.node_name}]}
                ],
                "cursor": None,
            }  # fmt: skip
            release.set()
            await eventually(lambda: queue.failed())
            await worker.stop()
            await (await queue.completed())[0].remove()
    # The counts come back from the store after a restart.
    async with wsq.Server(data_dir=data_dir, port=0) as server, RawClient(server.url) as raw:
        stats = await raw.request({"op": "stats"})
        assert stats["result"]["queues"] == [
            {"name": "s", "waiting": 0, "active": 0, "completed": 3, "failed": 1, "workers": []}
        ]


async def test_a_stopped_worker_releases_an_offer_in_flight(client: wsq.Client) -> None:
    queue = client.queue("declined")
    added = await queue.add({"n": 1})
    async with RawClient(client.address) as raw:
        offer = await _raw_worker(raw, "declined", 1)
        (item,) = offer["tasks"]
        await raw.request({"op": "stop", "worker": "w-declined"})
        run = [item["task"]["id"], item["run"]]
        answer = await raw.request({"op": "release", "runs": [run, [run[0], run[1] + 1]]})
        assert answer["result"] == {"stale": [[run[0], run[1] + 1]]}
    (waiting,) = await queue.waiting()
    assert waiting.id == added.id and waiting.retries == 0 and waiting.error is None
    # Another worker takes it; nothing ever said "didn't respond".
    done = asyncio.Event()
    queue.process(lambda task: done.set())
    await asyncio.wait_for(done.wait(), budget(5))
    await eventually(lambda: completed_count_is(queue, 1))
    (completed,) = await queue.completed()
    assert completed.retries == 0 and completed.error is None


async def test_a_started_run_cannot_be_released(client: wsq.Client) -> None:
    queue = client.queue("started")
    await queue.add(1)
    async with RawClient(client.address) as raw:
        offer = await _raw_worker(raw, "started", 1)
        run = [offer["tasks"][0]["task"]["id"], offer["tasks"][0]["run"]]
        await raw.send({"op": "ack", "runs": [run]})
        answer = await raw.request({"op": "release", "runs": [run]})
        assert answer["result"] == {"stale": [run]}
        (active,) = await queue.active()
        assert active.id == run[0]


class _BlobsThatCannotDelete(MemoryBlobStore):
    """A blob store whose deletes fail, as an unreachable S3's do."""

    async def delete(self, keys: Iterable[str]) -> None:
        raise wsq.Unavailable("the blob store is unreachable")


async def test_a_failed_background_delete_is_one_log_line(
    data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    blobs = _BlobsThatCannotDelete()
    async with wsq.Server(data_dir=data_dir, port=0, blob_store=blobs) as server:  # noqa: SIM117
        async with wsq.Client(server.url) as client:
            task = await client.queue("undeletable").add({"file": b"x" * 100_000})
            await task.remove()  # the record goes; its blob cannot
            assert await client.queue("undeletable").all() == []
            await eventually(lambda: "wsq-delete-blobs failed" in caplog.text)
    assert "never retrieved" not in caplog.text
    (record,) = [r for r in caplog.records if "wsq-delete-blobs failed" in r.getMessage()]
    assert "unreachable" in record.getMessage() and record.levelno == logging.ERROR


async def test_an_offer_of_a_run_running_or_reporting_is_not_run_twice(
    client: wsq.Client,
) -> None:
    """A server that lost a run's start (a crash, a full disk) may offer the run again:
    the worker acknowledges it and runs nothing, whether the run is still running here
    or its report is on its way (that report ends it)."""
    runs: list[int | None] = []
    go = asyncio.Event()

    async def handler(task: wsq.Task) -> None:
        runs.append(task.run)
        await go.wait()

    queue = client.queue("offered-twice")
    worker = queue.process(handler)
    offers: list[list[dict[str, Any]]] = []
    offer, send_completed = worker.offer, worker._send_completed

    def offered(tasks: list[dict[str, Any]]) -> None:
        offers.append(tasks)
        offer(tasks)

    def sending_completed() -> None:
        send_completed()
        offer(offers[0])  # while its report is on its way (the handler is done)

    worker.offer = offered  # type: ignore[method-assign]
    worker._send_completed = sending_completed  # type: ignore[method-assign]
    task = await queue.add(None)
    await eventually(lambda: runs)
    offer(offers[0])  # while it runs
    await asyncio.sleep(0.1)
    assert runs == [1]
    go.set()
    await eventually(lambda: completed_count_is(queue, 1))
    await asyncio.sleep(0.1)
    [done] = await queue.completed()
    assert runs == [1] and done.id == task.id
