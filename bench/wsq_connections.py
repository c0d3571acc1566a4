"""Workload 5 for wsq: what idle connections cost the server, in memory and in CPU.

    python -m bench.wsq_connections [--quick] [--json PATH] [--connections N] [--idle S]

A server runs with the default heartbeat (5 s; quick: 1 s). A monitor process opens one
raw WebSocket connection first (it also warms the server up, so that one-time costs stay
out of the baseline), then the server's RSS is measured. Four client processes (each
raising its RLIMIT_NOFILE soft limit to the hard limit) then open N idle ``wsq.Client``
connections between them (default 2,000; quick: 200), each registering one subscription
(``client.queue("idle").on("task added", ...)``, confirmed by a ``list_queues()`` round
trip, which the server answers after the subscribe). Once all are connected, everything
sits idle for S seconds (default 10; quick: 3) while the parent takes the server's CPU
seconds before and after; the RSS is taken at the end.

Heartbeats are checked, not assumed: the monitor counts the pings the server sends it and
the pongs it gets for its own pings during the idle window, and each client process counts
its clients' disconnects (a client dropped by the server sees one) and how many are still
connected at the end; ``dropped`` is the sum.

kb_per_connection = (RSS with N connections - RSS before) / N, in KiB; idle_cpu_percent is
the server's CPU seconds over the window as % of one core. Memory in MiB.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import subprocess
import sys
import time
from typing import Any

from bench.common import (
    PYTHON,
    ROOT,
    arguments,
    cpu_seconds,
    rss_bytes,
    write_results,
    wsq_server,
)

MB = 1 << 20
PROCESSES = 4
CONNECTING = 16  # connects in flight per client process
CONNECT_TIMEOUT = 180.0


def raise_nofile() -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


async def read_line() -> str:
    """The next line of stdin ("" at its end), without blocking the loop."""
    line: str = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    return line.strip()


# -- children -------------------------------------------------------------------------------


async def clients(url: str, count: int, interval: float) -> dict[str, Any]:
    import wsq

    raise_nofile()
    disconnects = 0
    opened: list[wsq.Client] = []
    limit = asyncio.Semaphore(CONNECTING)

    def disconnected() -> None:
        nonlocal disconnects
        disconnects += 1

    async def one() -> None:
        async with limit:
            client = wsq.Client(url)
            opened.append(client)
            client.queue("idle").on("task added", lambda task: None)
            client.on("disconnect", disconnected)
            await client.connect()
            await client.list_queues()  # answered after the subscribe: the state is there

    start = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(one() for _ in range(count))), CONNECT_TIMEOUT)
    print(f"ready {time.perf_counter() - start:.2f}", flush=True)
    command = await read_line()  # "check" at the end of the idle window, or EOF
    result = {
        "clients": count,
        "connected": sum(client.connected for client in opened),
        "disconnects": disconnects,
        "command": command,
    }
    await asyncio.gather(*(client.close() for client in opened))
    return result


async def monitor(url: str, count: int, interval: float) -> dict[str, Any]:
    """One raw connection that counts the server's pings and the pongs to its own."""
    from websockets.asyncio.client import ClientConnection, connect
    from websockets.frames import Frame, Opcode

    class Counting(ClientConnection):
        pings = 0

        def process_event(self, event: Any) -> None:
            if isinstance(event, Frame) and event.opcode is Opcode.PING:
                self.pings += 1
            super().process_event(event)

    pongs = 0

    async def pinger(ws: Counting) -> None:
        nonlocal pongs
        while True:
            await asyncio.sleep(interval)
            waiter = await ws.ping()
            await asyncio.wait_for(waiter, interval * 3)
            pongs += 1

    async def drain(ws: Counting) -> None:
        async for _ in ws:
            pass

    hello = {"op": "hello", "protocol": 1, "client": "bench-monitor"}
    async with connect(url, create_connection=Counting, ping_interval=None) as ws:
        assert isinstance(ws, Counting)
        await ws.send(json.dumps(hello))
        welcome = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if welcome.get("op") != "welcome":
            raise RuntimeError(f"monitor: no welcome: {welcome}")
        reader = asyncio.create_task(drain(ws))
        print("ready", flush=True)
        await read_line()  # "start"
        pings_before = ws.pings
        ping_task = asyncio.create_task(pinger(ws))
        command = await read_line()  # "stop"
        server_pings = ws.pings - pings_before
        alive = not ping_task.done() and not reader.done()
        for task in (ping_task, reader):
            task.cancel()
        await asyncio.gather(ping_task, reader, return_exceptions=True)
    return {"server_pings": server_pings, "pongs": pongs, "alive": alive, "command": command}


ROLES = {"clients": clients, "monitor": monitor}


# -- the parent -----------------------------------------------------------------------------


def spawn(role: str, url: str, count: int, interval: float) -> subprocess.Popen[str]:
    args = [PYTHON, "-m", "bench.wsq_connections", "--role", role, "--url", url]
    args += ["--count", str(count), "--interval", str(interval)]
    return subprocess.Popen(
        args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT
    )


def expect_ready(proc: subprocess.Popen[str], what: str) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()  # the child times out by itself if stuck
    if not line.startswith("ready"):
        proc.kill()
        raise RuntimeError(f"{what} did not get ready (exit {proc.wait()})")
    return line


def tell(proc: subprocess.Popen[str], line: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(line + "\n")
    proc.stdin.flush()


def finish(proc: subprocess.Popen[str], what: str) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode})")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def kill_all(procs: list[subprocess.Popen[str]]) -> None:
    """Kill the children still running (only after a failure: they exit by themselves)."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def allow_fds(pid: int, needed: int) -> None:
    """Raise the server's RLIMIT_NOFILE soft limit to its hard limit if it is too low."""
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (hard, hard))
        print(f"raised the server's open-file limit from {soft} to {hard}", file=sys.stderr)
    if hard < needed:
        print(f"warning: the server may run out of files ({hard} < {needed})", file=sys.stderr)


def run(connections: int, idle_s: float, interval: float, extra: list[str]) -> dict[str, Any]:
    shares = [connections // PROCESSES + (i < connections % PROCESSES) for i in range(PROCESSES)]
    procs: list[subprocess.Popen[str]] = []
    with wsq_server(None, *extra) as (url, server), contextlib.ExitStack() as stack:
        stack.callback(kill_all, procs)
        allow_fds(server.pid, connections + 256)
        watcher = spawn("monitor", url, 1, interval)
        procs.append(watcher)
        expect_ready(watcher, "monitor")
        time.sleep(0.5)
        rss_before = rss_bytes(server.pid)
        start = time.perf_counter()
        group = [spawn("clients", url, share, interval) for share in shares]
        procs += group
        ready = [expect_ready(proc, "client process") for proc in group]
        print(
            f"{connections} connected in {time.perf_counter() - start:.1f} s ({ready})",
            file=sys.stderr,
        )
        tell(watcher, "start")
        cpu_start, idle_start = cpu_seconds(server.pid), time.perf_counter()
        time.sleep(idle_s)
        cpu_end, idle_end = cpu_seconds(server.pid), time.perf_counter()
        rss_after = rss_bytes(server.pid)
        tell(watcher, "stop")
        for proc in group:
            tell(proc, "check")
        beats = finish(watcher, "monitor")
        reports = [finish(proc, "client process") for proc in group]
    dropped = sum(r["disconnects"] + r["clients"] - r["connected"] for r in reports)
    window = idle_end - idle_start
    print(f"heartbeats over the idle window: {beats}", file=sys.stderr)
    expected = int(window / interval) - 1
    if not beats["alive"] or beats["server_pings"] < expected or beats["pongs"] < expected:
        print(f"warning: heartbeats did not flow (expected >= {expected} each)", file=sys.stderr)
    return {
        "connections": connections,
        "rss_before_mb": rss_before / MB,
        "rss_after_mb": rss_after / MB,
        "kb_per_connection": (rss_after - rss_before) / 1024 / connections,
        "idle_cpu_percent": 100 * (cpu_end - cpu_start) / window,
        "idle_s": window,
        "dropped": dropped,
    }


def main() -> None:
    parser = arguments(__doc__ or "")
    parser.add_argument("--connections", type=int, default=None)
    parser.add_argument("--idle", type=float, default=None, help="idle window, seconds")
    parser.add_argument("--role", choices=sorted(ROLES))
    parser.add_argument("--url")
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--interval", type=float, default=5.0)
    args = parser.parse_args()
    if args.role:
        print(json.dumps(asyncio.run(ROLES[args.role](args.url, args.count, args.interval))))
        return
    connections = args.connections or (200 if args.quick else 2_000)
    idle_s = args.idle or (3.0 if args.quick else 10.0)
    interval = 1.0 if args.quick else 5.0
    extra = ["--heartbeat-interval", "1"] if args.quick else []
    write_results(args.json, run(connections, idle_s, interval, extra))


if __name__ == "__main__":
    main()
