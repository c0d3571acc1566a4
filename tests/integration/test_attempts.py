"""A task's attempts (docs/protocol.md §4.3 ``attempts``) through a real server and the
Python client: each run with its worker, client, node, times, outcome and progress, the
run in progress last, kept in the store across a restart."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

import wsq
from tests.conftest import completed_count_is, eventually


async def test_a_task_that_fails_once_then_completes_has_two_attempts(data_dir: Path) -> None:
    async with (
        wsq.Server(data_dir=data_dir, port=0, node_name="node-a") as server,
        wsq.Client(server.url, backoff=lambda tries: 0.05) as client,
    ):
        queue = client.queue("att")
        task = await queue.add({"n": 1}, retries=1)
        second_run = asyncio.Event()
        finish = asyncio.Event()

        async def handler(running: wsq.Task) -> None:
            if running.run == 1:
                await running.update_progress(0.25)
                raise ValueError("first try")
            second_run.set()
            await finish.wait()

        worker = queue.process(handler)
        await second_run.wait()
        failed, current = await eventually(lambda: _runs(task, 2))
        assert failed["outcome"] == "failed" and "first try" in failed["error"]
        assert (failed["run"], failed["progress"], failed["node"]) == (1, 0.25, "node-a")
        assert failed["worker"] == worker.id and failed["client"] == "wsq-python"
        assert failed["offered"] <= failed["started"] <= failed["ended"]
        # The run in progress: no end yet.
        assert (current["run"], current["ended"], current["outcome"]) == (2, None, None)
        finish.set()
        await eventually(lambda: completed_count_is(queue, 1))
        await worker.stop()
        attempts = await client.attempts(task.id)
        assert [(a["run"], a["outcome"], a["error"]) for a in attempts] == [
            (1, "failed", failed["error"]),
            (2, "completed", None),
        ]
        assert attempts[0] == failed
        assert attempts[1]["started"] == current["started"]
    # They are stored: a restarted server has them.
    async with (
        wsq.Server(data_dir=data_dir, port=0) as server,
        wsq.Client(server.url) as client,
    ):
        assert await client.attempts(task.id) == attempts
        await (await client.queue("att").completed())[0].remove()
        with pytest.raises(wsq.TaskNotFound):  # gone with the task
            await client.attempts(task.id)


async def _runs(task: wsq.Task, count: int) -> list[dict[str, Any]] | None:
    attempts = await task.attempts()
    return attempts if len(attempts) == count else None
