"""Servers in subprocesses, for tests that kill, stop or measure them."""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import budget


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ServerProcess:
    """``python -m wsq server`` on a fixed port; :meth:`start` waits until it listens."""

    def __init__(
        self, data_dir: Path, port: int | None = None, *extra: str, max_files: int | None = None
    ) -> None:
        self.data_dir = data_dir
        self.max_files = max_files  # RLIMIT_NOFILE, soft and hard
        self.port = port or free_port()
        self.extra = list(extra)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data_dir.parent / f"server-{self.port}.log"

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def start(self, env: dict[str, str] | None = None) -> ServerProcess:
        """Start it with ``--port`` and ``--data-dir``; or, given ``env``, with no options
        at all and ``env`` added to the environment (where port and data dir then come
        from)."""
        args = [sys.executable, "-m", "wsq", "server"]
        if env is None:
            args += ["--port", str(self.port), "--data-dir", str(self.data_dir), *self.extra]
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                args,
                stdout=log,
                stderr=log,
                env={**os.environ, **(env or {})},
                preexec_fn=self._limit_files if self.max_files else None,
            )
        await self._wait_listening()
        return self

    def _limit_files(self) -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.max_files, self.max_files))

    async def _wait_listening(self) -> None:
        deadline = asyncio.get_running_loop().time() + budget(20)
        while asyncio.get_running_loop().time() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                await writer.wait_closed()
                return
            except OSError:
                await asyncio.sleep(0.05)
        raise RuntimeError("server did not start listening")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        """kill -9, and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait for a clean exit; returns the exit code. A server that has not
        exited by ``timeout`` is killed (so it cannot outlive its test) and the wait fails."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(budget(timeout))
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid
