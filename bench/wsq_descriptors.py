"""What sockets that never finish their handshake cost a server short of file descriptors:
the numbers behind "wsq owns its listening sockets" in docs/decisions.md.

    python -m bench.wsq_descriptors [--quick] [--json PATH]

Each scenario starts ``wsq server`` (log level info, text) in its own process under
``RLIMIT_NOFILE`` 256 (soft and hard) and measures, over a window, the server's CPU
seconds and the bytes its log grew by; then checks that a client still gets served.

- idle: 300 TCP connections that never send a byte (more than the server has
  descriptors), watched for 10 s (quick: 3 s);
- exhausted: three clients hold the descriptors with open uploads (a file each), then 100
  new TCP connections arrive; watched for 5 s (quick: 3 s);
- tls: a TLS server gets 30 connections that close at once, send plain HTTP, or send a
  malformed ClientHello; the log growth is what they cost.

Run it on an older commit to see the "before" numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import PYTHON, arguments, cpu_seconds, free_port, wait_port, write_results

FILES = 256


def _limit_files() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FILES, FILES))


@contextlib.contextmanager
def _server(folder: Path, *extra: str) -> Any:
    port = free_port()
    log = folder / "server.log"
    args = [PYTHON, "-m", "wsq", "server", "--port", str(port), "--data-dir", str(folder / "d")]
    with log.open("wb") as out:
        proc = subprocess.Popen([*args, *extra], stdout=out, stderr=out, preexec_fn=_limit_files)
    try:
        wait_port(port)
        yield port, proc, log
    finally:
        proc.terminate()
        proc.wait(30)


def _idle_sockets(port: int, count: int) -> list[socket.socket]:
    sockets = []
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            sock.connect(("127.0.0.1", port))
        sockets.append(sock)
    return sockets


def _watch(proc: subprocess.Popen[bytes], log: Path, seconds: float) -> dict[str, float]:
    cpu, size = cpu_seconds(proc.pid), log.stat().st_size
    time.sleep(seconds)
    return {
        "seconds": seconds,
        "cpu_seconds": round(cpu_seconds(proc.pid) - cpu, 2),
        "log_bytes": log.stat().st_size - size,
    }


async def _served(url: str) -> bool:
    import wsq

    try:
        async with wsq.Client(url) as client:
            await asyncio.wait_for(client.queue("q").add({"ok": True}), 10)
    except (OSError, TimeoutError, wsq.WsqError):
        return False
    return True


def idle(folder: Path, seconds: float) -> dict[str, Any]:
    with _server(folder) as (port, proc, log):
        sockets = _idle_sockets(port, FILES + 44)
        result = _watch(proc, log, seconds)
        result["served_during"] = asyncio.run(_served(f"ws://127.0.0.1:{port}"))
        for sock in sockets:
            sock.close()
    return result


async def _hold_descriptors(url: str, then: Any) -> Any:
    from tests.integration.rawclient import RawClient

    from wsq import protocol

    holders = [RawClient(url) for _ in range(3)]
    for raw in holders:
        await raw.__aenter__()
        for stream in range(1, 91):
            await raw.send({"op": "upload", "stream": stream})
            await raw.send(protocol.pack_chunk(stream, b"x"))
    await asyncio.sleep(1)
    result = await asyncio.to_thread(then)
    for raw in holders:
        await raw.__aexit__(None, None, None)
    return result


def exhausted(folder: Path, seconds: float) -> dict[str, Any]:
    with _server(folder) as (port, proc, log):

        def flood() -> dict[str, Any]:
            sockets = _idle_sockets(port, 100)
            result = _watch(proc, log, seconds)
            for sock in sockets:
                sock.close()
            return result

        result: dict[str, Any] = asyncio.run(_hold_descriptors(f"ws://127.0.0.1:{port}", flood))
        result["served_after"] = asyncio.run(_served(f"ws://127.0.0.1:{port}"))
    return result


def tls(folder: Path) -> dict[str, Any]:
    import trustme

    cert = trustme.CA().issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(folder / "cert.pem"))
    cert.private_key_pem.write_to_path(str(folder / "key.pem"))
    options = ("--tls-cert", str(folder / "cert.pem"), "--tls-key", str(folder / "key.pem"))
    with _server(folder, *options) as (port, _, log):
        size = log.stat().st_size
        for hello in (b"", b"GET / HTTP/1.1\r\n\r\n", b"\x16\x03\x01\x00\x05hello"):
            for _ in range(10):
                with socket.create_connection(("127.0.0.1", port)) as sock:
                    if hello:
                        sock.sendall(hello)
                        sock.settimeout(5)
                        with contextlib.suppress(OSError):
                            sock.recv(100)
        time.sleep(1)
        return {"connections": 30, "log_bytes": log.stat().st_size - size}


def main() -> None:
    args = arguments(__doc__ or "").parse_args()
    with tempfile.TemporaryDirectory(prefix="wsq-bench-") as tmp:
        folders = [Path(tmp) / name for name in ("idle", "exhausted", "tls")]
        for folder in folders:
            folder.mkdir()
        results = {
            "idle": idle(folders[0], 3 if args.quick else 10),
            "exhausted": exhausted(folders[1], 3 if args.quick else 5),
            "tls": tls(folders[2]),
            "cpus": os.cpu_count(),
        }
    write_results(args.json, results)


if __name__ == "__main__":
    main()
