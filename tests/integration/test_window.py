"""The in-memory window keeps ids and order, not large payloads (issue 10): tasks whose
data the server did not keep in memory still reach workers, readers and retries whole."""

from __future__ import annotations

import hashlib
from typing import Any

import wsq
from tests.conftest import eventually
from wsq.core.engine import PAYLOAD_CAP


def _payload(n: int) -> dict[str, Any]:
    return {"n": n, "pad": hashlib.sha256(str(n).encode()).hexdigest() * (PAYLOAD_CAP // 32)}


async def test_large_payloads_are_not_held_but_reach_workers_whole(
    server: wsq.Server, client: wsq.Client
) -> None:
    queue = client.queue("big")
    tasks = [
        await queue.add({**_payload(n), "note": b"inline-%d" % n}, retries=1) for n in range(12)
    ]
    held = [server.core.lookup(task.id) for task in tasks]
    assert all(task is not None and task.data is None for task in held)  # ids and order
    assert server.core._held_bytes == 0
    got = await tasks[3].get_data()  # read from the store
    assert got["pad"] == _payload(3)["pad"]
    assert await got["note"].read() == b"inline-3"
    seen: dict[int, str] = {}
    failed_once: set[int] = set()

    async def handler(task: wsq.Task) -> None:
        n = task.data["n"]
        assert task.data["pad"] == _payload(n)["pad"]
        assert await task.data["note"].read() == b"inline-%d" % n
        if n % 3 == 0 and n not in failed_once:
            failed_once.add(n)
            raise RuntimeError("once more")  # the retry is offered from a stripped run
        seen[n] = task.id

    worker = queue.process(handler, concurrency=4)
    await eventually(lambda: len(seen) == 12)
    await worker.stop()
    assert sorted(seen) == list(range(12))


async def test_small_payloads_stay_in_memory(server: wsq.Server, client: wsq.Client) -> None:
    task = await client.queue("small").add({"n": 1})
    held = server.core.lookup(task.id)
    assert held is not None and held.data is not None
