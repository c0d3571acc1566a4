"""The client's view of a task."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from wsq.client.events import TASK_EVENTS, Emitter, Handler
from wsq.exceptions import InvalidState

if TYPE_CHECKING:
    from wsq.client.client import Client


class Task(Emitter):
    """A task. Fields mirror the server's task record (docs/protocol.md §5.1).

    Inside a worker's handler, :attr:`data` holds the resolved data (streams as
    :class:`wsq.Stream`), and :meth:`update_progress` / :meth:`touch` report on the run.
    Elsewhere :attr:`data` is ``None``; :meth:`get_data` fetches it.
    """

    def __init__(self, client: Client, info: dict[str, Any]) -> None:
        super().__init__()
        self._client = client
        self.id: str = info["id"]
        self.queue: str = info["queue"]
        self.data: Any = None
        self.aborted = False
        self.run: int | None = None
        # For a task handed to a task listener: the task the listener is on.
        self.listened: Task | None = None
        self.update(info)

    def update(self, info: dict[str, Any]) -> None:
        """Take the fields of a task dict from the server."""
        self.queue = info.get("queue") or self.queue
        self.state: str = info.get("state", "waiting")
        self.progress: float = info.get("progress", 0.0)
        self.retries: int = info.get("retries", 0)
        self.error: str | None = info.get("error")
        self.options: dict[str, Any] = info.get("options", {})
        self.worker: str | None = info.get("worker")
        self.created: float = info.get("created", 0.0)
        self.updated: float = info.get("updated", 0.0)

    def __repr__(self) -> str:
        return f"<wsq.Task {self.id} queue={self.queue!r} state={self.state}>"

    def on(self, event: str, handler: Handler) -> Handler:
        """Listen to this task's events: added, queued, started, progress, completed,
        failed, deleted; in a worker's handler also 'abort'. Handlers get ``(task, *extra)``."""
        if event not in TASK_EVENTS:
            raise ValueError(f"Unknown task event {event!r}; one of {sorted(TASK_EVENTS)}.")
        self._client._watch_task(self)
        return super().on(event, handler)

    async def update_progress(self, fraction: float) -> None:
        """Report progress (0..1) of the run this worker holds; resets the task timeout."""
        run = self._require_run("update_progress")
        self.progress = float(fraction)
        await self._client._request(
            {"op": "progress", "task": self.id, "run": run, "progress": float(fraction)}
        )

    async def touch(self) -> None:
        """Reset the task timeout of the run this worker holds."""
        run = self._require_run("touch")
        await self._client._request({"op": "touch", "task": self.id, "run": run})

    async def remove(self) -> None:
        """Delete the task and its streams, in any state (an active run is aborted)."""
        await self._client._request({"op": "remove", "task": self.id})

    async def retry(self) -> None:
        """Move a failed task back to waiting with its failure count reset."""
        # Its listeners hear the new attempt too, from its 'queued' on: watched before
        # the request leaves, and let go again if the retry is refused.
        taken = [
            task
            for task in (self, self.listened)
            if task is not None
            and any(task.listens(event) for event in TASK_EVENTS)
            and self._client._watch_task(task)
        ]
        try:
            self.update(await self._client._request({"op": "retry", "task": self.id}))
        except BaseException:
            for task in taken:
                self._client._unwatch_task(task)
            raise

    async def get_data(self) -> Any:
        """The task's data with each stream as a :class:`wsq.Stream`."""
        from wsq.client.streams import resolve

        answer = await self._client._request({"op": "get", "task": self.id})
        self.update(answer["task"])
        return resolve(self._client, self.id, answer["data"], answer["streams"])

    async def attempts(self) -> list[dict[str, Any]]:
        """The task's runs, oldest first (:meth:`Client.attempts`)."""
        return await self._client.attempts(self.id)

    def _require_run(self, what: str) -> int:
        if self.run is None:
            raise InvalidState(f"{what}() is for the worker running the task.")
        return self.run
