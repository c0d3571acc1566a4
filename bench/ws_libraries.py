"""The WebSocket libraries wsq could run on, measured bare (no wsq): the numbers behind the
choice of picows in docs/decisions.md.

    python -m bench.ws_libraries [--quick]

For websockets and for picows (through ``picows.websockets``, the API wsq uses), a server
process and a client process on loopback, both on uvloop, with compression off:

- echo: the client sends 70-byte text messages, never more than 1,000 unanswered, and
  counts echoes per second; then 2,000 round trips one at a time (p50 and p99 in µs);
- up and down: 1 MiB binary messages from client to server and back (MiB/s, the receiver
  counts the bytes).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from typing import Any

from bench.common import PYTHON, ROOT, arguments, free_port, write_results

LIBRARIES = ("websockets", "picows")
MESSAGE = b'{"op":"add","id":12345,"queue":"bench","data":{"n":1},"options":{}}'
CHUNK = 1 << 20


def _api(library: str) -> tuple[Any, Any]:
    if library == "picows":
        from picows.websockets import connect, serve
    else:
        from websockets.asyncio.client import connect
        from websockets.asyncio.server import serve
    return serve, connect


async def _serve(library: str, port: int) -> None:
    serve, _ = _api(library)

    async def handler(ws: Any) -> None:
        mode = await ws.recv()
        if mode == "echo":
            async for message in ws:
                await ws.send(message)
        elif mode == "up":
            total, received = int(await ws.recv()), 0
            while received < total:
                received += len(await ws.recv())
            await ws.send("done")
        else:
            payload = os.urandom(CHUNK)
            for _ in range(int(await ws.recv()) // CHUNK):
                await ws.send(payload)
            await ws.send("done")

    async with serve(handler, "127.0.0.1", port, max_size=None, compression=None):
        print("ready", flush=True)
        await asyncio.Event().wait()


async def _client(library: str, port: int, messages: int, mib: int) -> dict[str, float]:
    _, connect = _api(library)
    url = f"ws://127.0.0.1:{port}"
    out: dict[str, float] = {}
    async with connect(url, max_size=None, compression=None) as ws:
        await ws.send("echo")
        window = asyncio.Semaphore(1000)

        async def receive() -> None:
            for _ in range(messages):
                await ws.recv()
                window.release()

        start = time.perf_counter()
        receiver = asyncio.ensure_future(receive())
        for _ in range(messages):
            await window.acquire()
            await ws.send(MESSAGE)
        await receiver
        out["echo_per_s"] = messages / (time.perf_counter() - start)
        trips = []
        for _ in range(2000):
            start = time.perf_counter()
            await ws.send(MESSAGE)
            await ws.recv()
            trips.append(time.perf_counter() - start)
        trips.sort()
        out["rtt_p50_us"] = trips[len(trips) // 2] * 1e6
        out["rtt_p99_us"] = trips[int(len(trips) * 0.99)] * 1e6
    total = mib * CHUNK
    payload = os.urandom(CHUNK)
    for mode in ("up", "down"):
        async with connect(url, max_size=None, compression=None) as ws:
            await ws.send(mode)
            await ws.send(str(total))
            start = time.perf_counter()
            if mode == "up":
                for _ in range(mib):
                    await ws.send(payload)
                assert await ws.recv() == "done"
            else:
                received = 0
                while (message := await ws.recv()) != "done":
                    received += len(message)
                assert received == total
            out[f"{mode}_mib_s"] = mib / (time.perf_counter() - start)
    return out


def measure(library: str, messages: int, mib: int) -> dict[str, float]:
    port = free_port()
    server = subprocess.Popen(
        [PYTHON, "-m", "bench.ws_libraries", "--role", "serve", "--library", library,
         "--port", str(port)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        done = subprocess.run(
            [PYTHON, "-m", "bench.ws_libraries", "--role", "client", "--library", library,
             "--port", str(port), "--messages", str(messages), "--mib", str(mib)],
            cwd=ROOT, capture_output=True, text=True, timeout=300, check=True,
        )  # fmt: skip
        result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
        return result
    finally:
        server.terminate()
        server.wait(10)


def main() -> None:
    parser = arguments(__doc__ or "")
    parser.add_argument("--role", choices=["serve", "client"])
    parser.add_argument("--library", choices=LIBRARIES)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--mib", type=int, default=1024)
    args = parser.parse_args()
    import uvloop

    if args.role == "serve":
        uvloop.run(_serve(args.library, args.port))
        return
    if args.role == "client":
        print(json.dumps(uvloop.run(_client(args.library, args.port, args.messages, args.mib))))
        return
    messages, mib = (5_000, 16) if args.quick else (args.messages, args.mib)
    results = {library: measure(library, messages, mib) for library in LIBRARIES}
    print(f"{'':14}" + "".join(f"{library:>14}" for library in LIBRARIES))
    for key in ("echo_per_s", "rtt_p50_us", "rtt_p99_us", "up_mib_s", "down_mib_s"):
        print(f"{key:14}" + "".join(f"{results[lib][key]:>14,.0f}" for lib in LIBRARIES))
    write_results(args.json, results)


if __name__ == "__main__":
    main()
