"""A run held open by its worker until the test says, with the ends an observer hears:
for the tests of a report the state store could not take (PostgreSQL away, a full disk)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import wsq
from tests.conftest import eventually


@dataclass
class HeldRun:
    """``go`` lets the worker report (``failed``: a failure, else a completion); ``runs``
    are the runs its handler was given, ``ends`` the ("task completed" / "task failed",
    id) events the observer heard."""

    task: wsq.Task
    go: asyncio.Event
    runs: list[int | None]
    ends: list[tuple[str, str]]


async def held_run(
    client: wsq.Client, observer: wsq.Client, queue: str, *, failed: bool = False
) -> HeldRun:
    """Add a task on ``queue`` and have a worker on ``client`` start it and wait."""
    go = asyncio.Event()
    runs: list[int | None] = []
    ends: list[tuple[str, str]] = []
    for name in ("task completed", "task failed"):
        observer.queue(queue).on(name, lambda t, *_, name=name: ends.append((name, t.id)))
    await observer.stats()  # the subscription (sent before it) is in place

    async def handler(task: wsq.Task) -> str:
        runs.append(task.run)
        await go.wait()
        if failed:
            raise RuntimeError("no luck")
        return "ok"

    client.queue(queue).process(handler)
    task = await client.queue(queue).add(None, timeout=30.0, retries=0)
    await eventually(lambda: runs)
    return HeldRun(task, go, runs, ends)
