"""The synchronous client: wsq from plain threads (Django or Flask views, scripts, REPLs).

:class:`Client` runs a :class:`wsq.Client` on an event loop of its own, in one background
thread, and every method hands a coroutine to that loop and blocks until it is answered.
So the API is the asyncio client's without ``await``, and it is safe to call from any
number of threads at once (the loop serialises them). Streams come back as read-only
binary file objects (:class:`Stream`); a worker's handler runs in a thread of a pool, one
per running task, so it may block and may call the client.

``close()`` (or leaving ``with``) stops the loop and joins its thread: nothing is left
running. Calling the client from inside one of its own event handlers is fine (they run
on a thread of their own); calling it from the client's loop thread raises
:class:`RuntimeError` instead of deadlocking.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import io
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator, Sequence
from ssl import SSLContext
from types import TracebackType
from typing import Any, TypeVar

from wsq.client.client import Client as AsyncClient
from wsq.client.queue import Queue as AsyncQueue
from wsq.client.queue import TaskList as AsyncTaskList
from wsq.client.queue import Worker as AsyncWorker
from wsq.client.streams import Stream as AsyncStream
from wsq.client.task import Task as AsyncTask
from wsq.exceptions import WsqError

__all__ = ["Client", "Queue", "Stream", "Task", "TaskList", "Worker", "task_in_thread"]

T = TypeVar("T")
SyncHandler = Callable[..., Any]


class _Bridge:
    """Calls from threads into an event loop that runs a :class:`wsq.Client`."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._closed = False
        # Event handlers run here, one at a time and in order, so they may call the client.
        self._handlers = concurrent.futures.ThreadPoolExecutor(1, "wsq-sync-events")

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coroutine`` on the client's loop and return its result (its exception is
        raised here). For the async API this class does not wrap."""
        if self._on_loop_thread():
            coroutine.close()
            raise RuntimeError("wsq.sync: called from the client's own event loop thread")
        if self._closed:
            coroutine.close()
            raise WsqError("This client is closed.")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def _on_loop_thread(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    def _relay(self, handler: SyncHandler) -> Callable[..., None]:
        """An async-side handler that hands the event to the event thread."""

        def relay(*args: Any) -> None:
            wrapped = [Task(self, a) if isinstance(a, AsyncTask) else a for a in args]
            self._handlers.submit(handler, *wrapped)

        return relay


def task_in_thread(task: AsyncTask, loop: asyncio.AbstractEventLoop) -> Task:
    """A :class:`Task` view of ``task`` for code running in a thread while ``loop`` runs
    the task's client: blocking ``update_progress()`` and ``touch()``, streams as files.
    ``wsq worker`` hands this to synchronous handlers."""
    return Task(_Bridge(loop), task)


class Client(_Bridge):
    """A connection to a wsq server, for synchronous code. See the module docstring.

    Takes the arguments of :class:`wsq.Client`. ``with wsq.sync.Client(url) as client:``
    connects and closes; otherwise the first call connects (waiting as the async client
    does) and :meth:`close` must be called at the end.
    """

    def __init__(
        self,
        address: str | Sequence[str],
        backoff: Callable[[int], float] | None = None,
        *,
        token: str | None = None,
        ssl: SSLContext | None = None,
        ca_file: str | None = None,
    ) -> None:
        super().__init__(asyncio.new_event_loop())
        # Named, so that what the client runs in threads (file reads) is recognisably its.
        self._loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(None, "wsq-sync-io"))
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="wsq-sync-loop", daemon=True
        )
        self._thread.start()
        self._lock = threading.Lock()

        async def make() -> AsyncClient:
            return AsyncClient(address, backoff, token=token, ssl=ssl, ca_file=ca_file)

        self._client = self.call(make())
        self._queues: dict[str, Queue] = {}
        self._workers: list[Worker] = []

    @property
    def address(self) -> Any:
        return self._client.address

    @property
    def connected(self) -> bool:
        return self._client.connected

    def connect(self) -> None:
        """Connect, retrying with the backoff until the server answers."""
        self.call(self._client.connect())

    def close(self) -> None:
        """Disconnect for good, stop the loop and join its thread. Idempotent."""
        with self._lock:
            if self._closed:
                return
            asyncio.run_coroutine_threadsafe(self._client.close(), self._loop).result()
            self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        self._loop.run_until_complete(self._loop.shutdown_default_executor())
        self._loop.close()
        self._handlers.shutdown(wait=True)
        for worker in self._workers:  # their handlers were cancelled with the client
            worker._threads.shutdown(wait=False, cancel_futures=True)
        # Idle handler threads end as soon as they see the shutdown: wait for them, but not
        # past a second for a handler that is still running (it cannot be interrupted).
        deadline = time.monotonic() + 1.0
        for worker in self._workers:
            for thread in list(worker._threads._threads):
                thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> Client:
        self.connect()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def queue(self, name: str) -> Queue:
        queue = self._queues.get(name)
        if queue is None:
            queue = self._queues[name] = Queue(self, self._client.queue(name))
        return queue

    def list_queues(self) -> list[Queue]:
        return [self.queue(q.name) for q in self.call(self._client.list_queues())]

    def stats(self) -> list[dict[str, Any]]:
        """Per queue: counts by state and workers, as the dashboard shows them."""
        return self.call(self._client.stats())

    def workers(self, queue: str | None = None) -> list[dict[str, Any]]:
        """The workers connected now, with the runs each holds (``wsq.Client.workers``)."""
        return self.call(self._client.workers(queue))

    def attempts(self, task_id: str) -> list[dict[str, Any]]:
        """The runs of a task, oldest first (:meth:`wsq.Client.attempts`)."""
        return self.call(self._client.attempts(task_id))

    def history(self, queue: str, since: float | None = None) -> dict[str, Any]:
        """The last hour of ``queue``, second by second (:meth:`wsq.Client.history`)."""
        return self.call(self._client.history(queue, since))

    def on(self, event: str, handler: SyncHandler) -> SyncHandler:
        """Listen to a server event (or 'connect', 'disconnect', 'error'). The handler runs
        on the client's event thread, in order; task events pass a :class:`Task`."""
        self.call(_on(self._client, event, self._relay(handler)))
        return handler

    # -- internals -------------------------------------------------------------------------

    def _sync_iterables(self, data: Any) -> Any:
        """``data`` with each generator of bytes made an async iterable (read in a thread)
        and each :class:`Stream` given back as the async stream it wraps."""
        if isinstance(data, dict):
            return {k: self._sync_iterables(v) for k, v in data.items()}
        if isinstance(data, list | tuple):
            return [self._sync_iterables(v) for v in data]
        if isinstance(data, Stream):
            return data._stream
        if inspect.isgenerator(data):
            return _threaded(data)  # a generator of bytes, by the documented contract
        return data


async def _on(target: AsyncClient | AsyncQueue | AsyncTask, event: str, handler: Any) -> None:
    """Subscribe on the loop's thread (subscribing may send a message)."""
    target.on(event, handler)


async def _threaded(chunks: Iterator[Any]) -> AsyncIterator[bytes]:
    """A generator of bytes, each ``next()`` in a thread so it may block."""
    done = object()
    while (chunk := await asyncio.to_thread(next, chunks, done)) is not done:
        yield chunk  # type: ignore[misc]


class TaskList(list["Task"]):
    """A list of tasks; :attr:`cursor` continues the listing (``None`` at the end)."""

    cursor: str | None = None


class Queue:
    """A named queue. Made by :meth:`Client.queue`."""

    def __init__(self, client: Client, queue: AsyncQueue) -> None:
        self._client = client
        self._queue = queue
        self.name = queue.name

    def __repr__(self) -> str:
        return f"<wsq.sync.Queue {self.name!r}>"

    def add(
        self,
        data: Any,
        timeout: float = 60.0,
        retries: int = 0,
        autoremove: bool = False,
        *,
        id: str | None = None,
    ) -> Task:
        """Add a task; returns once it and its streams are durable. Streams: bytes, binary
        files, generators of bytes, :class:`Stream`s (see :meth:`wsq.Queue.add`)."""
        data = self._client._sync_iterables(data)
        added = self._client.call(self._queue.add(data, timeout, retries, autoremove, id=id))
        return Task(self._client, added)

    def add_many(
        self,
        items: Iterable[Any],
        timeout: float = 60.0,
        retries: int = 0,
        autoremove: bool = False,
    ) -> list[Task]:
        tasks = self._client.call(self._queue.add_many(list(items), timeout, retries, autoremove))
        return [Task(self._client, task) for task in tasks]

    def process(self, handler: SyncHandler, concurrency: int = 1) -> Worker:
        """Run ``handler(task)`` in a thread for each task of this queue, at most
        ``concurrency`` at once; returning is success, raising is failure."""
        client = self._client
        threads = concurrent.futures.ThreadPoolExecutor(concurrency, f"wsq-sync-{self.name}")

        async def run(task: AsyncTask) -> Any:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(threads, handler, Task(client, task))

        async def start() -> AsyncWorker:
            return self._queue.process(run, concurrency)

        worker = Worker(client, client.call(start()), threads)
        client._workers.append(worker)
        return worker

    def on(self, event: str, handler: SyncHandler) -> SyncHandler:
        """Like :meth:`Client.on`, for this queue's events only."""
        self._client.call(_on(self._queue, event, self._client._relay(handler)))
        return handler

    def all(self, limit: int | None = None, cursor: str | None = None) -> TaskList:
        return self._list(self._queue.all(limit, cursor))

    def waiting(self, limit: int | None = None, cursor: str | None = None) -> TaskList:
        return self._list(self._queue.waiting(limit, cursor))

    def active(self, limit: int | None = None, cursor: str | None = None) -> TaskList:
        return self._list(self._queue.active(limit, cursor))

    def completed(self, limit: int | None = None, cursor: str | None = None) -> TaskList:
        return self._list(self._queue.completed(limit, cursor))

    def failed(self, limit: int | None = None, cursor: str | None = None) -> TaskList:
        return self._list(self._queue.failed(limit, cursor))

    def _list(self, listing: Coroutine[Any, Any, AsyncTaskList]) -> TaskList:
        page = self._client.call(listing)
        tasks = TaskList(Task(self._client, task) for task in page)
        tasks.cursor = page.cursor
        return tasks


class Worker:
    """A worker made by :meth:`Queue.process`."""

    def __init__(
        self, client: Client, worker: AsyncWorker, threads: concurrent.futures.ThreadPoolExecutor
    ) -> None:
        self._client = client
        self._worker = worker
        self._threads = threads
        self.id = worker.id
        self.queue = worker.queue
        self.concurrency = worker.concurrency

    def stop(self) -> None:
        """Take no more tasks; return once the running ones have finished."""
        self._client.call(self._worker.stop())
        self._threads.shutdown(wait=True)


class Task:
    """A task (see :class:`wsq.Task`); its fields are read through to the async task."""

    def __init__(self, client: _Bridge, task: AsyncTask) -> None:
        self._client = client
        self._task = task
        self._data: Any = None
        if task.data is not None:
            self._data = _sync_streams(client, task.data)

    def __repr__(self) -> str:
        return f"<wsq.sync.Task {self.id} queue={self.queue!r} state={self.state}>"

    @property
    def id(self) -> str:
        return self._task.id

    @property
    def queue(self) -> str:
        return self._task.queue

    @property
    def state(self) -> str:
        return self._task.state

    @property
    def progress(self) -> float:
        return self._task.progress

    @property
    def retries(self) -> int:
        return self._task.retries

    @property
    def error(self) -> str | None:
        return self._task.error

    @property
    def options(self) -> dict[str, Any]:
        return self._task.options

    @property
    def aborted(self) -> bool:
        """True once the server ended this run (timeout, removal); stop working on it."""
        return self._task.aborted

    @property
    def data(self) -> Any:
        """The data, streams as :class:`Stream`; in a handler only (else ``None``)."""
        return self._data

    def update_progress(self, fraction: float) -> None:
        self._client.call(self._task.update_progress(fraction))

    def touch(self) -> None:
        self._client.call(self._task.touch())

    def remove(self) -> None:
        self._client.call(self._task.remove())

    def retry(self) -> None:
        self._client.call(self._task.retry())

    def get_data(self) -> Any:
        """The task's data, each stream as a :class:`Stream`."""
        return _sync_streams(self._client, self._client.call(self._task.get_data()))

    def attempts(self) -> list[dict[str, Any]]:
        """The task's runs, oldest first (:meth:`wsq.Client.attempts`)."""
        return self._client.call(self._task.attempts())

    def on(self, event: str, handler: SyncHandler) -> SyncHandler:
        """Listen to this task's events (see :meth:`wsq.Task.on`), on the event thread."""
        self._client.call(_on(self._task, event, self._client._relay(handler)))
        return handler


def _sync_streams(client: _Bridge, data: Any) -> Any:
    if isinstance(data, AsyncStream):
        return Stream(client, data)
    if isinstance(data, dict):
        return {k: _sync_streams(client, v) for k, v in data.items()}
    if isinstance(data, list):
        return [_sync_streams(client, v) for v in data]
    return data


class Stream(io.RawIOBase):
    """A stream of a task's data as a read-only binary file: ``read()``, ``readinto()``,
    ``shutil.copyfileobj(stream, file)``. :attr:`size` is its length in bytes. Bytes are
    fetched as they are read, one flow-control window at most; a lost connection raises
    :class:`wsq.ConnectionLost`. Closing it stops the download."""

    def __init__(self, client: _Bridge, stream: AsyncStream) -> None:
        super().__init__()
        self._client = client
        self._stream = stream
        self.size = stream.size
        self._chunks: AsyncIterator[bytes] | None = None
        self._pending = memoryview(b"")

    def __repr__(self) -> str:
        return f"<wsq.sync.Stream task={self._stream.task_id} size={self.size}>"

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not self._pending:
            chunk = self._next_chunk()
            if chunk is None:
                return 0
            self._pending = memoryview(chunk)
        count = min(len(buffer), len(self._pending))
        buffer[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count

    def iter_chunks(self) -> Iterator[bytes]:
        """The rest of the stream, chunk by chunk as they arrive."""
        if self._pending:
            yield bytes(self._pending)
            self._pending = memoryview(b"")
        while (chunk := self._next_chunk()) is not None:
            yield chunk

    def close(self) -> None:
        """Stop the download (without waiting: this also runs when it is collected)."""
        chunks, self._chunks = self._chunks, None
        loop = self._client._loop
        if chunks is not None and not loop.is_closed() and hasattr(chunks, "aclose"):
            asyncio.run_coroutine_threadsafe(chunks.aclose(), loop)
        super().close()

    def _next_chunk(self) -> bytes | None:
        if self.closed:
            raise ValueError("read of a closed wsq.sync.Stream")
        if self._chunks is None:
            self._chunks = self._stream.__aiter__()
        return self._client.call(_next(self._chunks))


async def _next(chunks: AsyncIterator[bytes]) -> bytes | None:
    return await anext(chunks, None)
