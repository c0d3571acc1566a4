"""Behaviours where wsq differed from the original wsq (issue 9, section 1), Python side."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from pathlib import Path
from typing import Any

import pytest

import wsq
from tests.conftest import budget, completed_count_is, eventually
from tests.integration.proxy import proxy_to
from tests.integration.rawclient import RawClient
from wsq.core.task import State


def fast(url: str) -> wsq.Client:
    return wsq.Client(url, backoff=lambda tries: 0.05)


# -- connect again after close -------------------------------------------------------------


async def test_a_closed_client_connects_again_and_works_as_before(server: wsq.Server) -> None:
    client = fast(server.url)
    await client.connect()
    queue = client.queue("again")
    seen: list[str] = []
    client.on("task completed", lambda task: seen.append(task.id))
    done: list[Any] = []
    queue.process(lambda task: done.append(task.data))
    disconnected = asyncio.Event()
    client.on("disconnect", lambda: disconnected.set())
    await client.close()
    await asyncio.wait_for(disconnected.wait(), budget(5))  # as the original's 'closes'
    assert not client.connected

    await client.connect()
    assert client.connected
    task = await queue.add("after")  # requests, the worker and the listener all work again
    await eventually(lambda: done == ["after"] and seen == [task.id])
    assert [t.id for t in await queue.completed()] == [task.id]
    await client.close()


async def test_a_call_made_while_closed_waits_for_the_next_connect(server: wsq.Server) -> None:
    """The original's 'adds task after reconnecting': add after close, then connect."""
    client = fast(server.url)
    await client.connect()
    await client.close()
    adding = asyncio.ensure_future(client.queue("later").add(1))
    await asyncio.sleep(0.1)
    assert not adding.done()
    await client.connect()
    task = await asyncio.wait_for(adding, budget(10))
    assert task.state == "waiting"
    await client.close()


# -- a stream whose connection is gone fails at once ---------------------------------------


async def test_a_stream_read_after_the_drop_fails_at_once(server: wsq.Server) -> None:
    async with proxy_to(server.url) as proxy, fast(proxy.url) as client:
        task = await client.queue("s").add({"blob": b"x" * 200_000})
        data = await task.get_data()
        disconnected = asyncio.Event()
        client.on("disconnect", lambda: disconnected.set())
        proxy.drop()
        await asyncio.wait_for(disconnected.wait(), budget(5))
        with pytest.raises(wsq.ConnectionLost):  # not waiting for the reconnection
            await asyncio.wait_for(data["blob"].read(), budget(5))
        await eventually(lambda: client.connected)
        with pytest.raises(wsq.ConnectionLost):  # nor reading on the new connection
            await asyncio.wait_for(data["blob"].read(), budget(5))


async def test_a_handler_s_stream_read_started_before_the_drop_fails(
    data_dir: Path,
) -> None:
    async with wsq.Server(data_dir=data_dir, port=0) as server:
        producer = fast(server.url)
        await producer.connect()
        await producer.queue("s").add({"blob": b"y" * 30_000_000})
        await producer.close()
        errors: list[BaseException] = []
        ended = asyncio.Event()

        async with proxy_to(server.url) as proxy, fast(proxy.url) as worker_client:

            async def handler(task: wsq.Task) -> None:
                stream = task.data["blob"]
                try:
                    async for _ in stream:
                        await asyncio.sleep(0.05)
                        proxy.drop()
                except wsq.ConnectionLost as exc:
                    errors.append(exc)
                finally:
                    ended.set()

            worker_client.queue("s").process(handler)
            await asyncio.wait_for(ended.wait(), budget(10))
            assert len(errors) == 1


# -- a retried task that later succeeds has no error ---------------------------------------


async def test_an_automatic_retry_that_succeeds_clears_the_error(client: wsq.Client) -> None:
    queue = client.queue("retry-clears")
    attempts: list[str | None] = []

    def handler(task: wsq.Task) -> None:
        attempts.append(task.error)
        if len(attempts) == 1:
            raise RuntimeError("first attempt fails")

    task = await queue.add(None, retries=1)
    completed = asyncio.Event()
    task.on("completed", lambda t: completed.set())
    queue.process(handler)
    await asyncio.wait_for(completed.wait(), budget(10))
    assert attempts == [None, None]  # the second run is offered without the old error
    assert task.error is None
    [listed] = await queue.completed()
    assert listed.error is None


async def test_a_manual_retry_that_succeeds_has_no_error(client: wsq.Client) -> None:
    queue = client.queue("retry-manual")
    attempts: list[str | None] = []

    def handler(task: wsq.Task) -> None:
        attempts.append(task.error)
        if len(attempts) == 1:
            raise RuntimeError("fails once")

    task = await queue.add(None)
    queue.process(handler)
    await eventually(lambda: queue.failed())
    await task.retry()
    assert task.error is None
    await eventually(lambda: completed_count_is(queue, 1))
    [listed] = await queue.completed()
    assert listed.error is None
    assert attempts == [None, None]


# -- task listeners are never dropped silently ---------------------------------------------


async def test_a_listener_on_a_task_nobody_keeps_still_fires(client: wsq.Client) -> None:
    queue = client.queue("unkept")
    seen: list[str] = []
    (await queue.add(1)).on("completed", lambda task: seen.append(task.id))
    gc.collect()
    queue.process(lambda task: None)
    await eventually(lambda: len(seen) == 1)


async def test_task_listeners_are_released_when_the_task_is_final(client: wsq.Client) -> None:
    queue = client.queue("released")
    done = asyncio.Event()
    task = await queue.add(1)
    task.on("completed", lambda t: done.set())
    queue.process(lambda task: None)
    await asyncio.wait_for(done.wait(), budget(10))
    assert task.id not in client._watched


async def test_a_listener_attached_after_add_sees_every_later_event(
    server: wsq.Server, make_client: Any
) -> None:
    """A worker on another client takes the task at once; the producer's listener, attached
    right after add() returns, still sees 'started' (the subscription predates the add)."""
    worker = await make_client()
    release = asyncio.Event()

    async def handler(task: wsq.Task) -> None:
        await release.wait()

    worker.queue("race").process(handler, concurrency=20)
    producer = await make_client()
    seen: dict[str, list[str]] = {}
    tasks = []
    for _ in range(20):
        task = await producer.queue("race").add(None)
        names = seen.setdefault(task.id, [])
        for event in ("started", "completed"):
            task.on(event, lambda t, *_, names=names, event=event: names.append(event))
        tasks.append(task)
    await eventually(lambda: all(names == ["started"] for names in seen.values()))
    release.set()
    await eventually(lambda: all(names == ["started", "completed"] for names in seen.values()))


# -- a worker's runs are keyed by run ------------------------------------------------------


async def test_an_old_run_s_cleanup_never_removes_a_newer_run(client: wsq.Client) -> None:
    queue = client.queue("runs")
    runs: list[int] = []
    second_started = asyncio.Event()
    first_done = asyncio.Event()
    reasons: list[str] = []

    async def handler(task: wsq.Task) -> None:
        assert task.run is not None
        runs.append(task.run)
        if len(runs) == 1:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(30)
            # A slow clean-up: it outlives the abort and the next offer.
            await second_started.wait()
            first_done.set()
            return
        task.on("abort", lambda t, reason: reasons.append(reason))
        second_started.set()
        await asyncio.sleep(30)

    task = await queue.add(None, timeout=0.3, retries=1)
    worker = queue.process(handler, concurrency=2)
    await asyncio.wait_for(first_done.wait(), budget(10))
    await asyncio.sleep(0.05)
    await task.remove()  # aborts the second run, which the worker must still know
    await eventually(lambda: reasons == ["Removed."])
    await asyncio.wait_for(worker.stop(), budget(10))


# -- listings agree with events ------------------------------------------------------------


async def test_a_running_handler_sees_its_task_in_every_listing(client: wsq.Client) -> None:
    queue = client.queue("listed")
    views: list[tuple[list[str], list[str], list[str], int]] = []

    async def handler(task: wsq.Task) -> None:
        active = [t.id for t in await queue.active()]
        everything = [t.id for t in await queue.all() if t.state == "active"]
        waiting = [t.id for t in await queue.waiting()]
        [stats] = [s for s in await client.stats() if s["name"] == "listed"]
        views.append((active, everything, waiting, stats["active"]))
        assert (await task.get_data()) == task.data

    tasks = [await queue.add(n) for n in range(10)]
    queue.process(handler)
    await eventually(lambda: completed_count_is(queue, 10))
    for task, (active, everything, waiting, active_count) in zip(tasks, views, strict=True):
        assert active == [task.id]
        assert everything == [task.id]
        assert task.id not in waiting
        assert active_count == 1


async def test_an_event_listener_sees_the_transition_in_listings(
    client: wsq.Client, make_client: Any
) -> None:
    queue = client.queue("evlist")
    observer = await make_client()
    checks: list[bool] = []

    async def on_completed(task: wsq.Task) -> None:
        done = [t.id for t in await observer.queue("evlist").completed()]
        checks.append(task.id in done)

    observer.on("task completed", on_completed)
    await asyncio.sleep(0.05)
    queue.process(lambda task: None, concurrency=4)
    for n in range(20):
        await queue.add(n)
    await eventually(lambda: len(checks) == 20)
    assert all(checks)


# -- requests re-sent after a reconnect are idempotent -------------------------------------

SESSION = "replay-session-0123456789"


async def resend_after_drop(
    server: wsq.Server, message: dict[str, Any], acted: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Send ``message`` through a proxy that delivers it but drops the answer; once the
    server ``acted()``, cut the connection, then send the same request (same session, same
    id) on a new connection. Returns (the answer to it, the answer a third copy gets)."""
    async with proxy_to(server.url) as proxy:
        first = RawClient(proxy.url, session=SESSION)
        async with first:
            proxy.hold_answers()
            await first.send({**message, "id": 777_000 + len(message)})
            await eventually(acted)
            proxy.drop()
        async with RawClient(server.url, session=SESSION) as again:
            await again.send({**message, "id": 777_000 + len(message)})
            answer = await again.expect_answer(777_000 + len(message))
            await again.send({**message, "id": 777_000 + len(message)})
            third = await again.expect_answer(777_000 + len(message))
    return answer, third


async def stored_in(server: wsq.Server, task_id: str, state: Any = None) -> bool:
    """Whether the server's store has the task in ``state`` (``None``: has no such task)."""
    stored = await server.store.get(task_id)
    return stored is None if state is None else stored is not None and stored.state == state


async def test_a_remove_sent_again_after_the_drop_is_answered_as_the_first(
    server: wsq.Server, client: wsq.Client
) -> None:
    task = await client.queue("resend").add(1)
    message = {"op": "remove", "task": task.id}
    answer, third = await resend_after_drop(server, message, lambda: stored_in(server, task.id))
    assert answer["op"] == "result" and answer["result"] is None, answer
    assert third == answer
    assert await client.queue("resend").all() == []


async def test_a_retry_sent_again_after_the_drop_is_answered_as_the_first(
    server: wsq.Server, client: wsq.Client
) -> None:
    queue = client.queue("resend-retry")
    task = await queue.add(1)
    worker = queue.process(lambda t: (_ for _ in ()).throw(RuntimeError("no")))
    await eventually(lambda: queue.failed())
    await worker.stop()
    message = {"op": "retry", "task": task.id}
    answer, _ = await resend_after_drop(
        server, message, lambda: stored_in(server, task.id, State.WAITING)
    )
    assert answer["op"] == "result" and answer["result"]["state"] == "waiting", answer
    [waiting] = await queue.waiting()
    assert waiting.id == task.id


async def test_a_report_sent_again_after_the_drop_is_not_stale(
    server: wsq.Server, client: wsq.Client
) -> None:
    queue = client.queue("resend-report")
    task = await queue.add(1)
    async with RawClient(server.url) as worker:
        await worker.request({"op": "work", "queue": "resend-report", "worker": "rw"})
        offer = await worker.expect("offer")
        run = offer["tasks"][0]["run"]
        await worker.send({"op": "ack", "runs": [[task.id, run]]})
        message = {"op": "complete", "task": task.id, "run": run}
        answer, _ = await resend_after_drop(
            server, message, lambda: server.core.lookup(task.id) is None
        )
    assert answer["op"] == "result", answer
    assert [t.id for t in await queue.completed()] == [task.id]


async def test_the_python_client_re_sends_a_remove_without_an_error(server: wsq.Server) -> None:
    async with proxy_to(server.url) as proxy, fast(proxy.url) as client:
        task = await client.queue("resend-py").add(1)
        proxy.hold_answers()
        removing = asyncio.ensure_future(task.remove())

        async def deleted() -> bool:
            return await server.store.get(task.id) is None

        await eventually(deleted)  # on disk: the answer is on its way, and dropped
        proxy.drop()
        proxy.restore()
        await asyncio.wait_for(removing, budget(10))  # no TaskNotFound
        assert await client.queue("resend-py").all() == []


async def test_without_a_session_a_request_is_done_again(server: wsq.Server) -> None:
    """Remembering answers needs the hello's session; a client without one gets what it
    always got (here: the second remove finds no task)."""
    async with fast(server.url) as client, RawClient(server.url) as raw:
        task = await client.queue("nosession").add(1)
        message = {"op": "remove", "task": task.id, "id": 5}
        await raw.send(message)
        assert (await raw.expect_answer(5))["op"] == "result"
        await raw.send(message)
        assert (await raw.expect_answer(5))["code"] == "not_found"


async def test_a_refused_retry_leaves_no_listener_behind(client: wsq.Client) -> None:
    queue = client.queue("refused-retry")
    task = await queue.add(1)
    done = asyncio.Event()
    task.on("completed", lambda t: done.set())
    queue.process(lambda t: None)
    await asyncio.wait_for(done.wait(), budget(10))
    with pytest.raises(wsq.InvalidState):
        await task.retry()
    assert task.id not in client._watched


async def test_a_task_listener_gets_the_task_as_its_event_told_it(client: wsq.Client) -> None:
    """An async listener that runs after a newer event arrived still sees its own event's
    fields (the original hands listeners the event's task)."""
    queue = client.queue("snapshots")
    task = await queue.add(None, retries=2)
    seen: list[int] = []

    async def on_failed(failed: wsq.Task, will_retry: bool) -> None:
        await asyncio.sleep(0.2)
        seen.append(failed.retries)

    task.on("failed", on_failed)
    queue.process(fail_always)
    await eventually(lambda: len(seen) == 3)
    assert seen == [1, 2, 3]
    assert task.retries == 3 and task.state == "failed"


def fail_always(task: wsq.Task) -> None:
    raise RuntimeError("no")


async def test_stopping_a_worker_of_a_closed_client_returns(server: wsq.Server) -> None:
    client = fast(server.url)
    await client.connect()
    worker = client.queue("closed-stop").process(lambda t: None)
    await client.close()
    await asyncio.wait_for(worker.stop(), budget(5))
    await client.connect()  # the stopped worker does not come back
    await eventually(lambda: client.connected)
    assert server.core.workers_of(next(iter(server.connections))) == []
    await client.close()


async def test_more_requests_in_one_turn_than_a_batch_holds(client: wsq.Client) -> None:
    """Frames hold at most `batch` messages (§2): 2,500 adds issued at once all land."""
    queue = client.queue("many-at-once")
    tasks = await asyncio.wait_for(asyncio.gather(*(queue.add(n) for n in range(2500))), budget(60))
    assert len(tasks) == 2500
    assert len(await queue.waiting()) == 2500


async def test_a_handler_s_stream_read_after_the_drop_fails(server: wsq.Server) -> None:
    async with fast(server.url) as producer:
        await producer.queue("s-after").add({"blob": b"z" * 200_000})
    outcome: list[str] = []
    async with proxy_to(server.url) as proxy, fast(proxy.url) as worker_client:
        dropped = asyncio.Event()
        worker_client.on("disconnect", lambda: dropped.set())

        async def handler(task: wsq.Task) -> None:
            proxy.drop()
            await dropped.wait()
            await eventually(lambda: worker_client.connected)  # even once back
            try:
                await task.data["blob"].read()
                outcome.append("read")
            except wsq.ConnectionLost:
                outcome.append("lost")

        worker_client.queue("s-after").process(handler)
        await eventually(lambda: outcome)
        assert outcome == ["lost"]
