"""A queue as the client sees it, and the workers that process it."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

from wsq.client.events import Emitter, Handler, logger
from wsq.client.task import Task
from wsq.exceptions import StaleRun, Unavailable, WsqError
from wsq.protocol import MAX_BATCH

REPORT_RETRIES = 10
"""How often a worker sends again a report the server could not store (``unavailable``):
after 0.25 s, doubling up to 5 s, about 33 s in all, then it gives up (the run times out
on the server and is offered again)."""
REPORT_BACKOFF = 0.25
REPORT_BACKOFF_MAX = 5.0

if TYPE_CHECKING:
    from wsq.client.client import Client

TaskHandler = Callable[[Task], Awaitable[Any] | Any]
_PAGE = 1000


class TaskList(list[Task]):
    """A list of tasks; :attr:`cursor` continues the listing (``None`` at the end)."""

    cursor: str | None = None


class Queue(Emitter):
    """A named queue. Made by :meth:`Client.queue`; exists on the server once it holds a
    task or a worker."""

    def __init__(self, client: Client, name: str) -> None:
        super().__init__()
        self._client = client
        self.name = name

    def __repr__(self) -> str:
        return f"<wsq.Queue {self.name!r}>"

    def on(self, event: str, handler: Handler) -> Handler:
        """Like :meth:`Client.on`, for this queue's events only."""
        self._client._subscribe(self.name)
        return super().on(event, handler)

    async def add(
        self,
        data: Any,
        timeout: float = 60.0,
        retries: int = 0,
        autoremove: bool = False,
        *,
        id: str | None = None,
    ) -> Task:
        """Add a task; returns once it and all its streams are durable on the server.

        Streams in ``data`` (bytes, binary files, async iterables of bytes, wsq.Stream) are
        uploaded first; if one raises, that error propagates and no task is created.
        ``id`` (letters, digits, ``_.:-``, at most 64) makes the add idempotent.
        """
        options = {"timeout": float(timeout), "retries": int(retries), "autoremove": autoremove}
        info = await self._client._add(self.name, data, options, id or self._client.new_task_id())
        return Task(self._client, info)

    async def add_many(
        self,
        items: Iterable[Any],
        timeout: float = 60.0,
        retries: int = 0,
        autoremove: bool = False,
    ) -> list[Task]:
        """Add many tasks, each item being one task's data, with the same options; returns
        the tasks in order once all are durable. Sent as a few large messages with one
        answer each, so it is the fastest way to enqueue. Data may hold only small bytes
        (up to 64 KiB each) as streams; use :meth:`add` for anything to upload. Each task
        gets its own id, so a re-send after a reconnect creates no duplicates."""
        options = {"timeout": float(timeout), "retries": int(retries), "autoremove": autoremove}
        infos = await self._client._add_many(self.name, items, options)
        return [Task(self._client, info) for info in infos]

    def process(self, handler: TaskHandler, concurrency: int = 1) -> Worker:
        """Run ``handler(task)`` for each task of this queue, at most ``concurrency`` at
        once. Returning is success; raising is failure (``task.error = str(exc)``)."""
        worker = Worker(self._client, self.name, handler, concurrency)
        self._client._start_worker(worker)
        return worker

    async def all(self, limit: int | None = None, cursor: str | None = None) -> TaskList:
        return await self._list(None, limit, cursor)

    async def waiting(self, limit: int | None = None, cursor: str | None = None) -> TaskList:
        return await self._list("waiting", limit, cursor)

    async def active(self, limit: int | None = None, cursor: str | None = None) -> TaskList:
        return await self._list("active", limit, cursor)

    async def completed(self, limit: int | None = None, cursor: str | None = None) -> TaskList:
        return await self._list("completed", limit, cursor)

    async def failed(self, limit: int | None = None, cursor: str | None = None) -> TaskList:
        return await self._list("failed", limit, cursor)

    async def _list(self, state: str | None, limit: int | None, cursor: str | None) -> TaskList:
        """One page of ``limit`` tasks after ``cursor``, or every task when ``limit`` is None."""
        out = TaskList()
        while True:
            page = _PAGE if limit is None else min(limit - len(out), 10000)
            message: dict[str, Any] = {"op": "list", "queue": self.name, "limit": page}
            if state is not None:
                message["state"] = state
            if cursor is not None:
                message["cursor"] = cursor
            answer = await self._client._request(message)
            out.extend(Task(self._client, info) for info in answer["tasks"])
            cursor = answer["cursor"]
            if cursor is None or (limit is not None and len(out) >= limit):
                out.cursor = cursor
                return out


class Worker:
    """Runs a handler for the tasks the server offers to it. Made by :meth:`Queue.process`."""

    def __init__(self, client: Client, queue: str, handler: TaskHandler, concurrency: int) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._client = client
        self.id = uuid.uuid4().hex
        self.queue = queue
        self.concurrency = concurrency
        self._handler = handler
        # Keyed by (task id, run): an old run's clean-up never touches a newer run.
        self._running: dict[tuple[str, int], tuple[Task, asyncio.Future[None]]] = {}
        self._reports: set[asyncio.Future[Any]] = set()
        # Runs whose report is on its way or sent again (not yet answered for good).
        self._reporting: set[tuple[str, int]] = set()
        self._completed: list[list[Any]] = []
        self._idle = asyncio.Event()
        self._idle.set()
        self.stopped = False

    def __repr__(self) -> str:
        return f"<wsq.Worker {self.id} queue={self.queue!r} concurrency={self.concurrency}>"

    def register_message(self) -> dict[str, Any]:
        return {
            "op": "work",
            "queue": self.queue,
            "concurrency": self.concurrency,
            "worker": self.id,
        }

    async def stop(self) -> None:
        """Take no more tasks, and return when the running ones have finished."""
        if not self.stopped:
            self.stopped = True
            with contextlib.suppress(WsqError):
                await self._client._stop_worker(self)
        await self._idle.wait()

    def cancel(self) -> None:
        """Stop at once: cancel running handlers without reporting (they time out)."""
        self.stopped = True
        self.cancel_runs()

    def cancel_runs(self) -> None:
        """Cancel running handlers without reporting (the client is closing; the server
        times the runs out). The worker registers again on the next connect."""
        for _, runner in self._running.values():
            runner.cancel()

    def offer(self, tasks: list[dict[str, Any]]) -> None:
        """Tasks offered by the server: acknowledge them in one message, then start each.
        A sync handler runs right here and an async one as a task of its own."""
        from wsq.client.streams import resolve

        self._client._send({"op": "ack", "runs": [[t["task"]["id"], t["run"]] for t in tasks]})
        for item in tasks:
            run = (item["task"]["id"], item["run"])
            if run in self._running or run in self._reporting:
                # A server that lost the run's start (a crash, a full disk) may offer it
                # again: it is running here, or its report is on its way, which ends it.
                logger.info("run %s of task %s offered again: it is not run twice", run[1], run[0])
                continue
            task = Task(self._client, item["task"])
            task.run = item["run"]
            try:
                task.data = resolve(self._client, task.id, item["data"], item["streams"])
            except Exception as exc:
                self._report(task, f"Could not read the task data: {exc!r}")
                continue
            self._start(task)

    def abort(self, task_id: str, run: int, reason: str) -> None:
        """The server ended this run (timeout, removal): cancel the handler."""
        entry = self._running.get((task_id, run))
        if entry is None:
            return
        task, runner = entry
        task.aborted = True
        task.error = reason
        task.emit("abort", task, reason)
        runner.cancel()

    def _start(self, task: Task) -> None:
        try:
            result = self._handler(task)
        except Exception as exc:
            self._report(task, _error_text(exc))
            return
        if not inspect.isawaitable(result):
            self._report(task, None)
            return
        runner = asyncio.ensure_future(self._finish(task, result))
        self._running[task.id, task.run or 0] = (task, runner)
        self._idle.clear()

    async def _finish(self, task: Task, running: Awaitable[Any]) -> None:
        try:
            error = await _outcome(task, running)
            if not task.aborted:
                self._report(task, error)
        finally:
            self._running.pop((task.id, task.run or 0), None)
            self._check_idle()

    def _report(self, task: Task, error: str | None) -> None:
        """Tell the server how the run ended, without waiting for its answer (a refused
        report is logged and emitted as an 'error' event). Completions made in one turn
        of the event loop leave together, as one ``complete_many``."""
        self._idle.clear()
        self._reporting.add((task.id, task.run or 0))
        if error is None:
            if not self._completed:
                asyncio.get_running_loop().call_soon(self._send_completed)
            self._completed.append([task.id, task.run])
            return
        task.error = error
        message = {"op": "fail", "task": task.id, "run": task.run, "error": error[:65536]}
        self._send_report(message)

    def _send_completed(self) -> None:
        runs, self._completed = self._completed, []
        for first in range(0, len(runs), MAX_BATCH):
            self._send_report({"op": "complete_many", "runs": runs[first : first + MAX_BATCH]})

    def _send_report(self, message: dict[str, Any], tries: int = 0) -> None:
        future = self._client._request_nowait(message)
        if message["op"] == "complete_many":
            future.add_done_callback(self._stale)
        self._reports.add(future)
        future.add_done_callback(lambda done: self._reported(done, message, tries))

    def _stale(self, future: asyncio.Future[Any]) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        for task_id, run in future.result().get("stale", []):
            error = StaleRun(f"Run {run} of task {task_id} was no longer active.")
            logger.warning("a worker report was refused: %s", error)
            self._client.emit("error", error)

    def _reported(self, future: asyncio.Future[Any], message: dict[str, Any], tries: int) -> None:
        self._reports.discard(future)
        exc = None if future.cancelled() else future.exception()
        if isinstance(exc, Unavailable) and tries < REPORT_RETRIES:
            # The server could not store it (its database was away): it holds the run
            # again once the database is back, so the report is sent again until then.
            logger.info("a worker report could not be stored yet, sending it again: %s", exc)
            delay = min(REPORT_BACKOFF * 2**tries, REPORT_BACKOFF_MAX)
            again = asyncio.ensure_future(self._report_later(message, tries + 1, delay))
            self._reports.add(again)
            again.add_done_callback(self._reports.discard)
            return
        if message["op"] == "fail":
            self._reporting.discard((message["task"], message["run"]))
        else:
            self._reporting.difference_update((task_id, run) for task_id, run in message["runs"])
        self._check_idle()
        if isinstance(exc, WsqError):
            logger.warning("a worker report was refused: %s", exc)
            self._client.emit("error", exc)

    async def _report_later(self, message: dict[str, Any], tries: int, delay: float) -> None:
        await asyncio.sleep(delay)
        self._send_report(message, tries)

    def _check_idle(self) -> None:
        if not self._running and not self._reports and not self._completed:
            self._idle.set()


async def _outcome(task: Task, running: Awaitable[Any]) -> str | None:
    """Await a handler; ``None`` on success, else the error text."""
    try:
        await running
    except asyncio.CancelledError:
        if task.aborted:
            return None
        raise
    except Exception as exc:
        return _error_text(exc)
    return None


def _error_text(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
