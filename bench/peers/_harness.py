"""The orchestration shared by the Python peers (run inside ``bench/.venv-peers``).

Each peer's ``<peer>_bench.py`` gives a :class:`Peer`: how to start its worker (a separate
process, the peer's own worker with the workload's settings) and its two producer roles.
This module runs the same two workloads as :mod:`bench.wsq_tasks`, against Redis DB 15,
flushed before every run:

* throughput: a producer process enqueues N no-op tasks (``enqueue_per_s``); then a worker
  process drains them (``e2e_per_s`` = N / time from the worker's start until the last task
  finished). The worker reports through Redis keys it writes itself: ``bench:ready`` (its
  ready hook), ``bench:first`` (the first task's start) and ``bench:end`` (the moment the
  N-th task finished); the window starts at the earlier of the first two, so neither
  interpreter start-up nor a late ready hook counts.
* latency: a worker waits idle (after ``bench:ready`` and a 0.5 s settle); a producer adds
  tasks one at a time, 5 ms apart, each carrying ``time.monotonic()`` taken just before
  the enqueue call; the task takes ``time.monotonic()`` on entry and RPUSHes the delay to
  ``bench:lat`` (after stamping, so the push is not measured).

The board (those keys) is Redis for every peer, the PostgreSQL ones included: it is the
bench's instrumentation, not the queue under test, so it does not load their database.
A peer with ``fresh`` (the PostgreSQL ones) also gets a fresh place of its own for each
run: ``fresh()`` is a context manager that makes it (a new schema with the peer's tables),
yields the environment that points the worker and the producers at it, and drops it after.

Every child gets a timeout; workers run in their own session (so the whole tree can be
killed) with a parent-death signal, and are stopped in ``finally`` blocks, also on SIGTERM.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from bench.common import ROOT, arguments, median, percentile

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/15")
PYTHON = sys.executable  # the peers' virtualenv
READY, FIRST, END, LAT = "bench:ready", "bench:first", "bench:end", "bench:lat"
SPACING = 0.005  # latency workload: seconds between two adds
SETTLE = 0.5  # latency workload: let an idle worker reach its waiting state
PRODUCE_TIMEOUT = 180.0
BOOT_TIMEOUT = 60.0
DRAIN_TIMEOUT = 180.0
STOP_TIMEOUT = 15.0


class BenchError(RuntimeError):
    pass


@dataclass
class Peer:
    name: str
    version: str
    config: str
    module: str  # e.g. "bench.peers.celery_bench": runs the producer roles
    worker: list[str]  # argv of the peer's worker process (run from the repository root)
    produce: Callable[[int], float]  # N -> enqueue tasks/s
    latency_produce: Callable[[int], None]  # count -> adds count stamped tasks, 5 ms apart
    tasks: int = 20_000  # full-size N (smaller for a slow peer, so one run stays ~30 s)
    # A fresh place per run for the peer's state, yielding the children's environment.
    fresh: Callable[[], AbstractContextManager[dict[str, str]]] = lambda: nullcontext({})
    backend: str = "redis"


def connect() -> redis.Redis:
    return redis.Redis.from_url(REDIS_URL, socket_timeout=10, socket_connect_timeout=5)


def monotonic_key(client: redis.Redis, key: str) -> float | None:
    value = client.get(key)
    return None if value is None else float(value)


# -- worker-side helpers (imported by the *_app modules) -------------------------------------


class Counter:
    """Counts finished no-op tasks in one worker process; marks ``bench:first``/``bench:end``."""

    def __init__(self) -> None:
        self.total = int(os.environ.get("BENCH_TASKS", "0"))
        self.done = 0
        self.started = False

    def start(self, client: redis.Redis) -> None:
        if not self.started:
            self.started = True
            client.set(FIRST, time.monotonic(), nx=True)

    def finish(self, client: redis.Redis, done: int | None = None) -> None:
        """One task finished; ``done`` is the shared total when the count lives elsewhere."""
        if done is None:
            self.done += 1
            done = self.done
        if done == self.total:
            client.set(END, time.monotonic())


def mark_ready(client: redis.Redis) -> None:
    client.set(READY, time.monotonic())


# -- orchestration ---------------------------------------------------------------------------


def flush() -> None:
    with connect() as client:
        client.flushdb()


def _deathsig() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: the worker ends if we die


def _kill_group(proc: subprocess.Popen[Any], sig: int) -> None:
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def stop(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left of it."""
    if proc.poll() is None:
        _kill_group(proc, signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(STOP_TIMEOUT)
    _kill_group(proc, signal.SIGKILL)  # forked children (prefork pools) included
    if proc.poll() is None:
        proc.wait(5)


def _tail(path: Path, limit: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


@contextmanager
def worker(argv: list[str], env: dict[str, str]) -> Iterator[tuple[subprocess.Popen[Any], Path]]:
    """A worker process (own session, output to a log file) for the block."""
    handle, name = tempfile.mkstemp(prefix="wsq-peer-", suffix=".log")
    os.close(handle)
    log = Path(name)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_deathsig,
        )
    try:
        yield proc, log
    finally:
        stop(proc)
        log.unlink(missing_ok=True)


def wait_for(
    what: str,
    check: Callable[[], bool],
    timeout: float,
    proc: subprocess.Popen[Any],
    log: Path,
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if proc.poll() is not None:
            raise BenchError(f"worker exited ({proc.returncode}) before {what}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}:\n{_tail(log)}")
        time.sleep(0.01)


def run_role(
    peer: Peer, role: str, count: int, timeout: float, env: dict[str, str]
) -> dict[str, Any]:
    """Run ``python -m <peer module> --role ROLE --count N``; return its last-line JSON."""
    argv = [PYTHON, "-m", peer.module, "--role", role, "--count", str(count)]
    proc = subprocess.Popen(
        argv,
        cwd=ROOT,
        env={**os.environ, **env},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=_deathsig,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{role} timed out after {timeout:.0f} s") from None
    finally:
        stop(proc)
    if proc.returncode != 0:
        raise BenchError(f"{role} failed ({proc.returncode}):\n{err[-3000:]}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def throughput_run(peer: Peer, count: int) -> dict[str, float]:
    flush()
    with peer.fresh() as place:
        return _throughput(peer, count, place)


def _throughput(peer: Peer, count: int, place: dict[str, str]) -> dict[str, float]:
    produced = run_role(peer, "produce", count, PRODUCE_TIMEOUT, place)
    env = {**place, "BENCH_TASKS": str(count)}
    with connect() as client, worker(peer.worker, env) as (proc, log):
        wait_for(
            f"{count} tasks to finish", lambda: bool(client.exists(END)), DRAIN_TIMEOUT, proc, log
        )
        end = monotonic_key(client, END)
        starts = [t for t in (monotonic_key(client, READY), monotonic_key(client, FIRST)) if t]
    if end is None or not starts:
        raise BenchError("the worker did not report its start and end times")
    return {"enqueue_per_s": produced["enqueue_per_s"], "e2e_per_s": count / (end - min(starts))}


def latency_run(peer: Peer, count: int) -> dict[str, float]:
    flush()
    with peer.fresh() as place:
        return _latency(peer, count, place)


def _latency(peer: Peer, count: int, place: dict[str, str]) -> dict[str, float]:
    with connect() as client, worker(peer.worker, {**place, "BENCH_TASKS": "0"}) as (proc, log):
        wait_for(
            "the worker to be ready", lambda: client.exists(READY) == 1, BOOT_TIMEOUT, proc, log
        )
        time.sleep(SETTLE)
        run_role(peer, "latency", count, count * SPACING * 3 + 60, place)
        wait_for(
            f"{count} latency tasks",
            lambda: client.llen(LAT) >= count,
            60,
            proc,
            log,
        )
        delays = [float(d) * 1000 for d in client.lrange(LAT, 0, -1)]
    return {
        "p50_ms": percentile(delays, 50),
        "p99_ms": percentile(delays, 99),
        "max_ms": max(delays),
    }


def paced(count: int, add: Callable[[int, float], None]) -> None:
    """Call ``add(n, stamp)`` ``count`` times, 5 ms apart, stamping just before each call."""
    next_at = time.monotonic()
    for n in range(count):
        time.sleep(max(0.0, next_at - time.monotonic()))
        add(n, time.monotonic())
        next_at += SPACING


def _terminate(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough: let the cleanup finish
    raise SystemExit(f"stopped by signal {signum}")


def main(peer: Peer) -> None:
    parser = arguments(f"{peer.name} on the wsq throughput and latency workloads")
    parser.add_argument("--tasks", type=int, default=None)
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--role", choices=["produce", "latency"])
    parser.add_argument("--count", type=int, default=0)
    args = parser.parse_args()
    if args.role == "produce":
        print(json.dumps({"enqueue_per_s": peer.produce(args.count)}))
        return
    if args.role == "latency":
        peer.latency_produce(args.count)
        print(json.dumps({}))
        return
    signal.signal(signal.SIGTERM, _terminate)  # so the finally blocks stop the workers
    tasks = args.tasks or (300 if args.quick else peer.tasks)
    runs = args.runs or (1 if args.quick else 3)
    latency_tasks = 50 if args.quick else 1000
    rounds = [throughput_run(peer, tasks) for _ in range(runs)]
    print(f"{peer.name} throughput rounds: {rounds}", file=sys.stderr)
    results = {
        "peer": peer.name,
        "version": peer.version,
        "backend": peer.backend,
        "tasks": tasks,
        "runs": runs,
        "enqueue_per_s": median([r["enqueue_per_s"] for r in rounds]),
        "e2e_per_s": median([r["e2e_per_s"] for r in rounds]),
        "latency": {"tasks": latency_tasks, **latency_run(peer, latency_tasks)},
        "config": peer.config,
    }
    emit(args.json, results)


def emit(path: Path | None, results: dict[str, Any]) -> None:
    """Write the results file (if asked) and print them as ONE line, the last on stdout."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results), flush=True)
