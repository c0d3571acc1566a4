"""Every peer task queue on the wsq throughput and latency workloads, one after another.

    python -m bench.peers.all [--quick] [--json PATH] [--only bullmq,celery]

Run it with the project's own Python: it runs ``bench/setup_peers.sh`` (the peers' own
virtualenv, BullMQ's node_modules, Redis), then each peer's script with its interpreter
(``bench/.venv-peers/bin/python`` or ``node``), each with a timeout, and collects their
results into ``{"peers": {"bullmq": {...}, ...}}``. A peer that fails or times out is
reported as ``{"error": "..."}``; the others still run. The PostgreSQL peers (pgqueuer,
procrastinate) use :func:`bench.common.postgres_dsn` (``WSQ_TEST_DATABASE``, else
127.0.0.1:5432); when nothing answers there they are reported as ``{"skipped": "..."}``.
Prints the results as ONE JSON line, the last on stdout (and writes them to PATH with
``--json``); exits 0 whenever it produced them, errors included, so a caller reads the
errors from the results.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, arguments, postgres_dsn, postgres_problem

BENCH = ROOT / "bench"
PEERS_PYTHON = BENCH / ".venv-peers" / "bin" / "python"
PEERS = ("bullmq", "dramatiq", "celery", "arq", "rq", "pgqueuer", "procrastinate")
POSTGRES_PEERS = ("pgqueuer", "procrastinate")
SETUP_TIMEOUT = 900.0
PEER_TIMEOUT = {False: 420.0, True: 90.0}  # full, quick
STOP_GRACE = 30.0


def command(peer: str, quick: bool) -> list[str]:
    if peer == "bullmq":
        args = ["node", str(BENCH / "peers" / "bullmq_bench.mjs")]
    else:
        args = [str(PEERS_PYTHON), "-m", f"bench.peers.{peer}_bench"]
    return args + (["--quick"] if quick else [])


def run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a child in its own session; on timeout SIGTERM it (so it stops its own workers),
    then SIGKILL its group. Raises RuntimeError on a timeout."""
    proc = subprocess.Popen(
        args,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.communicate(timeout=STOP_GRACE)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        raise RuntimeError(f"timed out after {timeout:.0f} s") from None
    except BaseException:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(STOP_GRACE)
        raise
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def run_peer(peer: str, quick: bool) -> dict[str, Any]:
    try:
        done = run(command(peer, quick), PEER_TIMEOUT[quick])
    except (OSError, RuntimeError) as exc:
        return {"error": f"{peer}: {exc}"}
    if done.returncode != 0:
        return {"error": f"{peer} failed ({done.returncode}): {done.stderr.strip()[-2000:]}"}
    try:
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"error": f"{peer} printed no JSON result: {done.stdout.strip()[-500:]}"}
    return result


def summary(peer: str, result: dict[str, Any], seconds: float) -> str:
    if "skipped" in result:
        return f"{peer:9} skipped: {result['skipped']}"
    if "error" in result:
        return f"{peer:9} ERROR after {seconds:.0f} s: {result['error'][:300]}"
    latency = result["latency"]
    return (
        f"{peer:9} {result['version']:8} N={result['tasks']:<6} enqueue "
        f"{result['enqueue_per_s']:8.0f}/s  e2e {result['e2e_per_s']:7.0f}/s  latency p50 "
        f"{latency['p50_ms']:6.2f} p99 {latency['p99_ms']:6.2f} max {latency['max_ms']:7.2f} ms"
        f"  ({seconds:.0f} s)"
    )


def main() -> None:
    parser = arguments(__doc__ or "")
    parser.add_argument("--only", help="comma-separated peers (default: all)")
    args = parser.parse_args()
    peers = PEERS if not args.only else tuple(p.strip() for p in args.only.split(","))
    unknown = set(peers) - set(PEERS)
    if unknown:
        parser.error(f"unknown peers: {', '.join(sorted(unknown))}")
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(f"stopped by signal {signum}"))
    started = time.monotonic()
    results: dict[str, Any] = {}
    try:
        setup = run(["bash", str(BENCH / "setup_peers.sh")], SETUP_TIMEOUT)
        setup_error = None if setup.returncode == 0 else setup.stderr.strip()[-2000:]
        print(setup.stdout.strip(), file=sys.stderr)
    except RuntimeError as exc:
        setup_error = str(exc)
    dsn = postgres_dsn()
    no_postgres = postgres_problem(dsn) if set(peers) & set(POSTGRES_PEERS) else None
    for peer in peers:
        begin = time.monotonic()
        if peer in POSTGRES_PEERS and no_postgres is not None:
            results[peer] = {"skipped": f"no PostgreSQL at {dsn} ({no_postgres})"}
        elif setup_error is not None:
            results[peer] = {"error": f"bench/setup_peers.sh failed: {setup_error}"}
        else:
            results[peer] = run_peer(peer, args.quick)
        print(summary(peer, results[peer], time.monotonic() - begin), file=sys.stderr, flush=True)
    print(f"peers done in {time.monotonic() - started:.0f} s", file=sys.stderr)
    document = {"peers": results}
    if args.json is not None:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps(document), flush=True)


if __name__ == "__main__":
    main()
