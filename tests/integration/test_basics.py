"""End to end against a real server: the seed's semantics, task by task."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import wsq
from tests.conftest import budget, completed_count_is, eventually


async def test_add_then_process_completes(client: wsq.Client) -> None:
    queue = client.queue("q")
    task = await queue.add({"n": 1})
    assert task.state == "waiting"
    assert task.queue == "q"
    assert task.options == {"timeout": 60.0, "retries": 0, "autoremove": False}
    seen: list[Any] = []

    async def handler(t: wsq.Task) -> None:
        seen.append(t.data)

    queue.process(handler)
    await eventually(lambda: queue.completed())
    assert seen == [{"n": 1}]
    [done] = await queue.completed()
    assert done.id == task.id
    assert await queue.waiting() == []


async def test_fifo_order_with_one_worker(client: wsq.Client) -> None:
    queue = client.queue("fifo")
    for n in range(50):
        await queue.add(n)
    order: list[int] = []
    queue.process(lambda t: order.append(t.data))
    await eventually(lambda: len(order) == 50)
    assert order == list(range(50))


async def test_concurrency_is_respected(client: wsq.Client) -> None:
    queue = client.queue("conc")
    running = 0
    peak = 0

    async def handler(task: wsq.Task) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.02)
        running -= 1

    await asyncio.gather(*(queue.add(n) for n in range(20)))
    queue.process(handler, concurrency=3)
    await eventually(lambda: completed_count_is(queue, 20))
    assert peak == 3


async def test_failure_sets_error_and_retries(client: wsq.Client) -> None:
    queue = client.queue("retry")
    failed: list[tuple[str, bool]] = []
    queue.on("task failed", lambda task, will_retry: failed.append((task.error, will_retry)))
    task = await queue.add("x", retries=2)
    attempts = 0

    async def handler(t: wsq.Task) -> None:
        nonlocal attempts
        attempts += 1
        raise ValueError(f"boom {attempts}")

    queue.process(handler)
    await eventually(lambda: queue.failed())
    [final] = await queue.failed()
    assert final.id == task.id
    assert final.retries == 3
    assert final.error == "boom 3"
    assert failed == [("boom 1", True), ("boom 2", True), ("boom 3", False)]


async def test_retry_and_remove(client: wsq.Client) -> None:
    queue = client.queue("manual")
    task = await queue.add({"k": "v"})
    worker = queue.process(lambda t: 1 / 0)
    await eventually(lambda: queue.failed())
    await worker.stop()
    [failed] = await queue.failed()
    assert failed.error == "division by zero"
    await failed.retry()
    assert failed.state == "waiting"
    assert failed.retries == 0
    [waiting] = await queue.waiting()
    assert waiting.id == task.id
    await task.remove()
    assert await queue.all() == []
    with pytest.raises(wsq.TaskNotFound):
        await task.remove()


async def test_retry_of_completed_task_is_refused(client: wsq.Client) -> None:
    queue = client.queue("done")
    task = await queue.add(1)
    queue.process(lambda t: None)
    await eventually(lambda: queue.completed())
    with pytest.raises(wsq.InvalidState):
        await task.retry()


async def test_autoremove_deletes_on_completion(client: wsq.Client) -> None:
    queue = client.queue("auto")
    deleted = asyncio.Event()
    queue.on("task deleted", lambda task: deleted.set())
    await queue.add(b"x" * 200_000, autoremove=True)
    queue.process(lambda t: None)
    await asyncio.wait_for(deleted.wait(), budget(10))
    assert await queue.all() == []


async def test_timeout_aborts_handler(client: wsq.Client) -> None:
    queue = client.queue("slow")
    aborted = asyncio.Event()
    cancelled = asyncio.Event()

    async def handler(task: wsq.Task) -> None:
        task.on("abort", lambda t, reason: aborted.set())
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            assert task.aborted
            cancelled.set()
            raise

    await queue.add(None, timeout=0.3)
    queue.process(handler)
    await asyncio.wait_for(cancelled.wait(), budget(10))
    assert aborted.is_set()
    [failed] = await eventually(lambda: queue.failed())
    assert failed.error == "Timed out."


async def test_progress_resets_timeout(client: wsq.Client) -> None:
    queue = client.queue("progress")
    seen: list[float] = []
    queue.on("task progress", lambda task, fraction: seen.append(fraction))

    async def handler(task: wsq.Task) -> None:
        for step in range(1, 6):
            await asyncio.sleep(0.15)
            await task.update_progress(step / 5)

    await queue.add(None, timeout=0.6)  # 5 x 0.15 s outlasts it only if progress resets it
    queue.process(handler)
    [done] = await eventually(lambda: queue.completed())
    assert done.progress == 1.0
    assert seen == [0.2, 0.4, 0.6, 0.8, 1.0]


async def test_worker_that_does_not_ack_fails_the_attempt(server: wsq.Server) -> None:
    """A raw client registers a worker and never acknowledges its offer."""
    from tests.integration.rawclient import RawClient

    async with RawClient(server.url) as raw, wsq.Client(server.url) as observer:
        queue = observer.queue("silent")
        await raw.request({"op": "work", "queue": "silent", "worker": "w1"})
        await queue.add("x")
        offer = await raw.expect("offer")
        assert offer["worker"] == "w1"
        [failed] = await eventually(lambda: queue.failed())
        assert failed.error == "Worker w1 didn't respond."


async def test_events_stream_and_task_listeners(client: wsq.Client) -> None:
    events = client.events()
    queue = client.queue("ev")
    task = await queue.add({"a": 1})
    states: list[str] = []
    task.on("completed", lambda t: states.append(t.state))
    queue.process(lambda t: None)
    names = []
    async for event in events:
        names.append(event.event)
        if event.event == "task completed":
            assert event.args[0]["id"] == task.id
            break
    assert names[:2] == ["task added", "task queued"]
    assert "worker added" in names
    assert "task started" in names
    assert "worker started" in names
    await eventually(lambda: states == ["completed"])


async def test_events_only_to_listeners(make_client: Any) -> None:
    listener = await make_client()
    silent = await make_client()
    got: list[str] = []
    listener.queue("a").on("task added", lambda t: got.append(t.queue))
    await silent.queue("b").add(1)
    await silent.queue("a").add(1)
    await eventually(lambda: got == ["a"])
    # A producer listens to the queues it adds to, so that a listener attached to a task
    # right after add() misses none of its events (issue 9); nobody else's.
    assert set(silent._subscriptions) == {"a", "b"}


async def test_list_queues_and_paging(client: wsq.Client) -> None:
    queue = client.queue("paged")
    ids = [(await queue.add(n)).id for n in range(25)]
    await client.queue("other").add(0)
    names = [q.name for q in await client.list_queues()]
    assert names == ["other", "paged"]
    page = await queue.all(limit=10)
    assert [t.id for t in page] == ids[:10]
    assert page.cursor is not None
    page2 = await queue.waiting(limit=10, cursor=page.cursor)
    assert [t.id for t in page2] == ids[10:20]
    rest = await queue.all(limit=100, cursor=page2.cursor)
    assert [t.id for t in rest] == ids[20:]
    assert rest.cursor is None
    assert len(await queue.all()) == 25
    last = await queue.all(limit=5, cursor=page2.cursor)  # exactly the rest: no next page
    assert ([t.id for t in last], last.cursor) == (ids[20:], None)


async def test_add_is_idempotent_by_id(client: wsq.Client) -> None:
    queue = client.queue("idem")
    first = await queue.add(1, id="job-1")
    again = await queue.add(2, id="job-1")
    assert again.id == first.id
    assert len(await queue.all()) == 1
    with pytest.raises(wsq.InvalidArgument):
        await client.queue("elsewhere").add(1, id="job-1")


async def test_invalid_names_and_options_are_refused(client: wsq.Client) -> None:
    with pytest.raises(wsq.ProtocolError):
        await client.queue("").add(1)
    with pytest.raises(wsq.ProtocolError):
        await client.queue("x" * 200).add(1)
    await client.queue("x" * 199).add(1)
    with pytest.raises(wsq.InvalidArgument):
        await client.queue("q").add(1, timeout=-5)
    with pytest.raises(wsq.ProtocolError):
        await client.queue("q").add(1, retries=-2)
    with pytest.raises(wsq.TaskNotFound):
        await wsq.Task(client, {"id": "nope", "queue": "q"}).get_data()
    with pytest.raises(wsq.TooLarge):
        await client.queue("q").add({"text": "y" * 2_000_000})
    assert client.connected
