"""Per-task serialisation of requests that read a task and then act on it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field


@dataclass(slots=True)
class _Entry:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


class TaskLocks:
    """One lock per task id, held by ``remove`` and ``retry`` from their read of the
    task to the durable end of their act, so that such requests about one task run one
    after the other, in the order they arrived (asyncio locks are fair). Entries exist
    only while someone holds or waits for them."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    @contextlib.asynccontextmanager
    async def hold(self, task_id: str) -> AsyncIterator[None]:
        entry = self._entries.get(task_id)
        if entry is None:
            entry = self._entries[task_id] = _Entry()
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if not entry.users:
                del self._entries[task_id]

    def __len__(self) -> int:
        return len(self._entries)
