"""Shared pieces of the benchmark suite (docs/performance.md).

Every workload is a script that takes ``--quick`` (tiny sizes, for CI) and ``--json PATH``
(where to write its results: one JSON object), prints a short human summary, and starts
the processes it needs itself: a wsq server in its own process, producers and workers in
theirs. :mod:`bench.run` runs them all and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def arguments(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CI smoke run)")
    parser.add_argument("--json", type=Path, help="write results here")
    return parser


def add_role_arguments(parser: argparse.ArgumentParser, roles: dict[str, Any]) -> None:
    """``--role NAME --url URL --count N``: how a workload runs one of its child processes."""
    parser.add_argument("--role", choices=sorted(roles))
    parser.add_argument("--url")
    parser.add_argument("--count", type=int, default=0)


def run_role(args: argparse.Namespace, roles: dict[str, Any]) -> bool:
    """If ``--role`` was given, run that role on uvloop, print its JSON, and return True."""
    if not args.role:
        return False
    print(json.dumps(run_loop(roles[args.role](args.url, args.count))))
    return True


def write_results(path: Path | None, results: dict[str, Any]) -> None:
    print(json.dumps(results, indent=2))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2))


def run_loop(main: Any) -> Any:
    """Run a client coroutine the way a user after speed would: on uvloop (the wsq server
    runs on it too)."""
    import uvloop

    return uvloop.run(main)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listens on port {port}")


@contextlib.contextmanager
def wsq_server(
    data_dir: Path | None = None, *extra: str, port: int | None = None
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A ``wsq server`` process (logs at warning) for the block; yields (url, process)."""
    port = port or free_port()
    owned = data_dir is None
    folder = Path(tempfile.mkdtemp(prefix="wsq-bench-")) if data_dir is None else data_dir
    args = [PYTHON, "-m", "wsq", "server", "--port", str(port), "--data-dir", str(folder)]
    args += ["--log-level", "warning", *extra]
    proc = subprocess.Popen(args)
    try:
        wait_port(port)
        yield f"ws://127.0.0.1:{port}", proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if owned:
            shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def postgres_schema(dsn: str) -> Iterator[str]:
    """A schema of its own in the database at ``dsn`` for the block (dropped after);
    yields a URL whose connections use it, for ``wsq server --database``."""
    import asyncio
    from urllib.parse import quote

    import asyncpg

    from wsq.storage.postgres import quote_ident

    name = f"wsq_bench_{os.urandom(6).hex()}"

    async def execute(sql: str) -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(execute(f"CREATE SCHEMA {quote_ident(name)}"))
    try:
        separator = "&" if "?" in dsn else "?"
        # Its sessions are named after the schema: postgres_cpu_seconds finds them.
        options = quote(f"-csearch_path={name}")
        yield f"{dsn}{separator}options={options}&application_name={name}"
    finally:
        asyncio.run(execute(f"DROP SCHEMA {quote_ident(name)} CASCADE"))


def postgres_cpu_seconds(url: str) -> float | None:
    """CPU seconds used so far by the PostgreSQL sessions of the schema of ``url`` (a URL
    from :func:`postgres_schema`), from /proc: ``None`` if PostgreSQL runs elsewhere. A
    session that ended is no longer counted."""
    import asyncio
    from urllib.parse import parse_qs, urlsplit

    import asyncpg

    name = parse_qs(urlsplit(url).query)["application_name"][0]

    async def pids() -> list[int]:
        conn = await asyncpg.connect(postgres_dsn())
        try:
            query = "SELECT pid FROM pg_stat_activity WHERE application_name = $1"
            return [pid for (pid,) in await conn.fetch(query, name)]
        finally:
            await conn.close()

    total = 0.0
    for pid in asyncio.run(pids()):
        try:
            total += cpu_seconds(pid)
        except (FileNotFoundError, PermissionError):
            return None
    return total


def postgres_dsn() -> str:
    """The PostgreSQL the benchmarks use: ``WSQ_TEST_DATABASE`` (as the tests), else the
    server on 127.0.0.1:5432 (user postgres, database test)."""
    return os.environ.get("WSQ_TEST_DATABASE") or "postgresql://postgres@127.0.0.1:5432/test"


def postgres_problem(dsn: str) -> str | None:
    """Why nothing usable answers at ``dsn`` (None when a connection succeeds). Needs
    asyncpg, which both wsq's and the peers' environments have."""
    import asyncio

    import asyncpg

    async def probe() -> None:
        conn = await asyncpg.connect(dsn, timeout=3)
        await conn.close()

    try:
        asyncio.run(probe())
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def run_json(args: list[str], timeout: float = 600) -> Any:
    """Run a child that prints one JSON document as its last stdout line; return it."""
    done = subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, check=False, cwd=ROOT
    )
    if done.returncode != 0:
        raise RuntimeError(f"{args} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def median(values: list[float]) -> float:
    return statistics.median(values)


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc (Linux)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used, from /proc (Linux)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks
