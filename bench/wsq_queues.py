"""Many queues: what ``stats`` and ``queues`` cost the server when there are many of them.

    python -m bench.wsq_queues [--quick] [--json PATH] [--queues Q]

A server (a ``wsq server`` process on a fresh folder) gets Q queues (default 100,000;
quick: 2,000) of one waiting task each, added by one client with many adds in flight.
Then one request of each kind is timed, 20 times (the median is reported), from a second
connection, as a dashboard sends them: a bare ``stats`` and a bare ``queues`` (no
``limit``: the first page, 1,000 queues, or the whole listing from a server without
pages), with the size of the answer; then the whole listing page by page
(``Client.stats()``). While a request is answered the server's event loop does nothing
else, so the time of the bare request bounds how long every other client waits on it.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

from bench.common import arguments, run_loop, write_results, wsq_server

IN_FLIGHT = 1000
TRIES = 20


async def fill(url: str, queues: int) -> float:
    import wsq

    start = time.perf_counter()
    async with wsq.Client(url) as client:
        slots = asyncio.Semaphore(IN_FLIGHT)

        async def one(n: int) -> None:
            async with slots:
                await client.queue(f"tenant-{n:07}").add(n)

        await asyncio.gather(*(one(n) for n in range(queues)))
    return time.perf_counter() - start


async def measure(url: str) -> dict[str, Any]:
    import msgspec

    import wsq

    out: dict[str, Any] = {}
    async with wsq.Client(url) as client:
        for op in ("stats", "queues"):
            times, size, listed = [], 0, 0
            for _ in range(TRIES):
                start = time.perf_counter()
                answer = await client._request({"op": op})
                times.append((time.perf_counter() - start) * 1000)
                size = len(msgspec.json.encode(answer))
                listed = len(answer["queues"])
            out[f"{op}_request_ms"] = round(statistics.median(times), 2)
            out[f"{op}_answer_bytes"] = size
            out[f"{op}_answer_queues"] = listed
        start = time.perf_counter()
        every = await client.stats()
        out["stats_all_pages_ms"] = round((time.perf_counter() - start) * 1000, 1)
        out["stats_all_queues"] = len(every)
    return out


def run(queues: int) -> dict[str, Any]:
    with wsq_server() as (url, _):
        seconds = run_loop(fill(url, queues))
        result = run_loop(measure(url))
    return {"queues": queues, "fill_s": round(seconds, 1), **result}


def main() -> None:
    parser = arguments(__doc__ or "")
    parser.add_argument("--queues", type=int, default=None)
    args = parser.parse_args()
    queues = args.queues or (2_000 if args.quick else 100_000)
    write_results(args.json, run(queues))


if __name__ == "__main__":
    main()
