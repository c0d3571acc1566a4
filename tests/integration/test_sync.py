"""wsq.sync.Client from plain threads, against a real server running in a thread of its own
(the tests themselves have no event loop in sight)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import queue
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import wsq
import wsq.sync
from tests.conftest import budget


@contextlib.contextmanager
def _serving(data_dir: Path, **options: Any) -> Iterator[str]:
    """A real wsq.Server on port 0, run by asyncio in a background thread."""
    ready: queue.Queue[str] = queue.Queue()
    stopping: list[asyncio.AbstractEventLoop | asyncio.Event] = []

    async def serve() -> None:
        stop = asyncio.Event()
        stopping.extend([asyncio.get_running_loop(), stop])
        async with wsq.Server(data_dir=data_dir, port=0, **options) as server:
            ready.put(server.url)
            await stop.wait()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), name="test-server")
    thread.start()
    yield ready.get(timeout=budget(30))
    loop, stop = stopping
    assert isinstance(loop, asyncio.AbstractEventLoop) and isinstance(stop, asyncio.Event)
    loop.call_soon_threadsafe(stop.set)
    thread.join(budget(30))


@pytest.fixture
def url(tmp_path: Path) -> Iterator[str]:
    with _serving(tmp_path / "data") as address:
        yield address


def test_add_list_process_and_stats_without_an_event_loop(url: str) -> None:
    with wsq.sync.Client(url) as client:
        assert client.connected
        queue = client.queue("sync")
        task = queue.add({"n": 1}, retries=1)
        assert task.state == "waiting" and task.options["retries"] == 1
        queue.add_many([{"n": 2}, {"n": 3}])
        assert queue.waiting()[0].id == task.id
        assert len(queue.all(limit=2)) == 2
        done = threading.Event()
        seen: list[int] = []

        def handler(task: wsq.sync.Task) -> None:
            task.update_progress(0.5)  # a blocking call from the handler's thread
            seen.append(task.data["n"])
            if len(seen) == 3:
                done.set()

        worker = queue.process(handler)
        assert done.wait(budget(10))
        (listed,) = client.workers("sync")
        assert listed["id"] == worker.id and listed["client"] == "wsq-python"
        worker.stop()
        assert sorted(seen) == [1, 2, 3]
        _eventually(lambda: len(queue.completed()) == 3)
        (stats,) = [s for s in client.stats() if s["name"] == "sync"]
        assert stats["completed"] == 3
        assert [q.name for q in client.list_queues()] == ["sync"]
        history = client.history("sync")
        assert sum(history["added"]) == 3 and sum(history["completed"]) == 3
        assert client.history("sync", since=history["end"] + 10)["added"] == []


def test_streams_are_file_objects_both_ways(url: str, tmp_path: Path) -> None:
    source = tmp_path / "big.bin"
    source.write_bytes(bytes(range(256)) * 20_000)  # 5 MiB: several chunks
    digest = hashlib.sha256(source.read_bytes()).hexdigest()

    def generated() -> Iterator[bytes]:
        yield b"abc"
        yield b"def"

    with wsq.sync.Client(url) as client:
        queue = client.queue("files")
        with source.open("rb") as file:
            task = queue.add({"file": file, "gen": generated(), "small": b"x" * 10})
        data = task.get_data()
        assert isinstance(data["file"], wsq.sync.Stream)
        assert data["file"].size == source.stat().st_size
        copy = io.BytesIO()
        shutil.copyfileobj(data["file"], copy)
        assert hashlib.sha256(copy.getvalue()).hexdigest() == digest
        assert data["gen"].read() == b"abcdef"
        assert data["small"].read() == b"x" * 10
        head = task.get_data()["file"]
        assert head.read(10) == bytes(range(10))
        head.close()  # stops the download part-way
        # A stream read in a handler can be added again as another task's stream.
        results = client.queue("results")
        done = threading.Event()

        def forward(task: wsq.sync.Task) -> None:
            results.add({"copy": task.data["file"]})
            done.set()

        worker = queue.process(forward)
        assert done.wait(budget(20))
        worker.stop()
        (result,) = results.all()
        copied = result.get_data()["copy"]
        assert hashlib.sha256(b"".join(copied.iter_chunks())).hexdigest() == digest


def test_safe_from_many_threads_and_events_may_call_back(url: str) -> None:
    with wsq.sync.Client(url) as client:
        queue = client.queue("threads")
        added: list[str] = []
        states: list[str] = []
        heard = threading.Event()

        def on_added(task: wsq.sync.Task) -> None:
            # Runs on the event thread, which may call the client.
            states.append(task.get_data()["n"] and task.state)
            if len(states) == 40:
                heard.set()

        queue.on("task added", on_added)

        def produce(n: int) -> None:
            for i in range(10):
                added.append(queue.add({"n": n * 10 + i + 1}).id)

        threads = [threading.Thread(target=produce, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(budget(30))
        assert len(set(added)) == 40
        assert heard.wait(budget(10))
        assert len(queue.waiting(limit=100)) == 40


def test_failures_retry_and_remove(url: str) -> None:
    with wsq.sync.Client(url) as client:
        queue = client.queue("fails")
        task = queue.add({"n": 1})
        failed = threading.Event()
        queue.on("task failed", lambda task, will_retry: failed.set())

        def handler(task: wsq.sync.Task) -> None:
            raise ValueError("no good")

        worker = queue.process(handler)
        assert failed.wait(budget(10))
        worker.stop()
        (stored,) = queue.failed()
        assert stored.error == "no good"
        (attempt,) = stored.attempts()
        assert (attempt["outcome"], attempt["error"]) == ("failed", "no good")
        assert client.attempts(task.id) == [attempt]
        stored.retry()
        assert stored.state == "waiting" and stored.retries == 0
        stored.remove()
        assert queue.all() == []
        with pytest.raises(wsq.TaskNotFound):
            task.get_data()


def test_close_leaves_no_thread_or_loop_behind(url: str) -> None:
    client = wsq.sync.Client(url)
    queue = client.queue("q")
    queue.add({"file": io.BytesIO(b"x" * 100_000)})  # read in a thread of the loop's pool
    queue.process(lambda task: None)
    assert any(t.name.startswith("wsq-sync") for t in threading.enumerate())
    loop = client._loop
    client.close()
    client.close()  # idempotent
    assert loop.is_closed()
    # The server runs in this process too: only the client's threads must be gone.
    assert [t.name for t in threading.enumerate() if t.name.startswith("wsq-sync")] == []
    with pytest.raises(wsq.WsqError):
        client.queue("q").add(2)


def test_calling_from_the_clients_own_loop_raises_instead_of_hanging(url: str) -> None:
    with wsq.sync.Client(url) as client:

        async def inside() -> None:
            client.stats()

        with pytest.raises(RuntimeError, match="own event loop"):
            client.call(inside())


def _eventually(check: object, timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + budget(timeout)
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_a_chosen_id_is_the_servers_scoped_id_from_the_add_on(tmp_path: Path) -> None:
    """With an auth file the server keeps a chosen id as ``<principal>/<id>``: the sync
    client's tasks carry that id, and everything after the add (events, data, streams,
    removal) goes by it."""
    auth = tmp_path / "auth.toml"
    auth.write_text('[tokens.alice]\ntoken = "sync-alice-token-0123"\nadmin = ["*"]\n')
    with (
        _serving(tmp_path / "data", auth=auth) as address,
        wsq.sync.Client(address, token="sync-alice-token-0123") as client,
    ):
        queue = client.queue("scoped")
        task = queue.add({"n": 1, "blob": b"b" * 100_000}, id="job-1")
        assert task.id == "alice/job-1"
        (many,) = queue.add_many([{"n": 2}])
        assert many.id.startswith("alice/")
        assert queue.add({"n": 3}, id="job-1").id == "alice/job-1"  # the same task again
        done = threading.Event()
        task.on("completed", lambda task: done.set())
        seen: list[tuple[str, bytes]] = []

        def handler(running: wsq.sync.Task) -> None:
            if running.id == task.id:
                seen.append((running.id, running.data["blob"].read()))

        queue.process(handler)
        assert done.wait(budget(10))
        assert seen == [("alice/job-1", b"b" * 100_000)]
        assert task.get_data()["blob"].read() == b"b" * 100_000
        task.remove()
        assert task.id not in [t.id for t in queue.all()]
