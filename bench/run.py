"""The benchmark suite: every workload, then one table (docs/performance.md).

    python -m bench.run [--quick] [--only NAME ...] [--no-peers] [--json PATH]

Runs each workload script in its own process (each starts its own server, producers and
workers), collects their JSON, prints a table with the targets, and writes everything to
``bench/results/<UTC time>.json`` (or ``--json``). ``--quick`` uses tiny sizes: it checks
that every workload still runs, and its numbers mean nothing.

``tasks-pg`` is the tasks workload with the server's state in PostgreSQL (a fresh schema of
:func:`bench.common.postgres_dsn`: ``WSQ_TEST_DATABASE``, else 127.0.0.1:5432), reported
next to the PostgreSQL peers (pgqueuer, procrastinate). Without a PostgreSQL there, it and
those peers are skipped with a message, not failed.
"""

from __future__ import annotations

import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import PYTHON, ROOT, arguments, postgres_dsn, postgres_problem
from bench.peers.all import POSTGRES_PEERS

WORKLOADS = {
    "tasks": "bench.wsq_tasks",
    "tasks-pg": "bench.wsq_tasks",  # with --database
    "streams": "bench.wsq_streams",
    "backlog": "bench.wsq_backlog",
    "connections": "bench.wsq_connections",
}


def run_workload(module: str, quick: bool, out: Path, *extra: str) -> dict[str, Any]:
    args = [PYTHON, "-m", module, "--json", str(out), *extra] + (["--quick"] if quick else [])
    started = time.monotonic()
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=False)
    elapsed = time.monotonic() - started
    if done.returncode != 0 or not out.exists():
        return {"error": done.stderr[-3000:] or f"exit {done.returncode}", "seconds": elapsed}
    result: dict[str, Any] = json.loads(out.read_text())
    result["seconds"] = round(elapsed, 1)
    return result


def machine() -> dict[str, Any]:
    import os

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
    }


def fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float | int):
        return f"{value:,.{digits}f}"
    return str(value)


def best(peers: dict[str, Any], key: str, lower: bool = False) -> tuple[str, float] | None:
    values = [(name, _get(p, key)) for name, p in peers.items() if _get(p, key) is not None]
    if not values:
        return None
    return (min if lower else max)(values, key=lambda item: item[1])


def _get(result: dict[str, Any], key: str) -> float | None:
    value: Any = result
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return float(value) if isinstance(value, int | float) else None


def table(results: dict[str, Any]) -> str:
    lines = [
        _task_rows(results),
        _postgres_rows(results),
        _peer_rows(results),
        _other_rows(results),
    ]
    return "\n".join(line for line in lines if line)


def _peers(results: dict[str, Any], backend: str) -> dict[str, Any]:
    """The peers that produced results, on one backend (the Redis ones report none)."""
    return {
        k: v
        for k, v in results.get("peers", {}).items()
        if isinstance(v, dict) and "error" not in v and "skipped" not in v
        if v.get("backend", "redis") == backend
    }


def _task_rows(results: dict[str, Any]) -> str:
    rows = [
        ("enqueue tasks/s (bulk)", "enqueue_bulk_per_s", False, ">= 2x best peer"),
        ("enqueue tasks/s (one by one)", "enqueue_per_s", False, ""),
        ("end-to-end tasks/s", "e2e_per_s", False, ">= 1.5x best peer"),
        ("enqueue->start p50 ms", "latency.p50_ms", True, "<= 1 ms"),
        ("enqueue->start p99 ms", "latency.p99_ms", True, "<= 4 ms"),
    ]
    return _compare("wsq", results.get("tasks", {}), _peers(results, "redis"), rows)


def _postgres_rows(results: dict[str, Any]) -> str:
    mine = results.get("tasks-pg", {})
    if "skipped" in mine or not mine:
        return f"\nPostgreSQL: {mine['skipped']}" if "skipped" in mine else ""
    rows = [
        ("enqueue tasks/s (bulk)", "enqueue_bulk_per_s", False, ">= 2x best PostgreSQL peer"),
        ("enqueue tasks/s (one by one)", "enqueue_per_s", False, ""),
        ("end-to-end tasks/s", "e2e_per_s", False, ">= 2x best PostgreSQL peer"),
        ("enqueue->start p50 ms", "latency.p50_ms", True, "<= 2 ms"),
        ("enqueue->start p99 ms", "latency.p99_ms", True, ""),
    ]
    return "\n" + _compare("wsq on pg", mine, _peers(results, "postgresql"), rows)


def _compare(
    name: str, tasks: dict[str, Any], peers: dict[str, Any], rows: list[tuple[str, str, bool, str]]
) -> str:
    out = [f"{'':28} {name:>10} {'best peer':>22} {'wsq/peer':>9}  target"]
    for label, key, lower, target in rows:
        mine = _get(tasks, key)
        # Peers report their fastest enqueue path (bulk where they have one) as enqueue_per_s.
        top = best(peers, "enqueue_per_s" if key == "enqueue_bulk_per_s" else key, lower)
        peer = f"{fmt(top[1], 2 if lower else 0)} ({top[0]})" if top else "-"
        ratio = fmt(mine / top[1], 2) if top and mine and top[1] else "-"
        out.append(f"{label:28} {fmt(mine, 2 if lower else 0):>10} {peer:>22} {ratio:>9}  {target}")
    return "\n".join(out)


def _peer_rows(results: dict[str, Any]) -> str:
    peers = results.get("peers", {})
    if not peers:
        return ""
    out = ["", f"{'peer':13} {'enqueue/s':>10} {'e2e/s':>10} {'p50 ms':>8} {'p99 ms':>8}  how"]
    if "error" in peers:
        return f"\npeers failed: {str(peers['error']).strip()[-300:]}"
    on_redis = [(n, p) for n, p in peers.items() if n not in POSTGRES_PEERS]
    on_postgres = [(n, p) for n, p in peers.items() if n in POSTGRES_PEERS]
    wsq = [("wsq", results["tasks"])] if "tasks" in results else []
    wsq_pg = [("wsq on pg", results["tasks-pg"])] if "tasks-pg" in results else []
    for name, result in [*wsq, *on_redis, *wsq_pg, *on_postgres]:
        if "skipped" in result:
            out.append(f"{name:13} skipped: {result['skipped'][:80]}")
            continue
        if "error" in result:
            out.append(f"{name:13} failed: {result['error'].strip().splitlines()[-1][:80]}")
            continue
        enqueue, e2e = fmt(_get(result, "enqueue_per_s")), fmt(_get(result, "e2e_per_s"))
        p50 = fmt(_get(result, "latency.p50_ms"), 2)
        p99 = fmt(_get(result, "latency.p99_ms"), 2)
        how = result.get("config", "")[:70]
        out.append(f"{name:13} {enqueue:>10} {e2e:>10} {p50:>8} {p99:>8}  {how}")
    return "\n".join(out)


def _other_rows(results: dict[str, Any]) -> str:
    s, b, c = (results.get(k, {}) for k in ("streams", "backlog", "connections"))
    rss = s.get("peak_rss_mb", {})
    out = [
        "",
        f"streams ({fmt(_get(s, 'bytes') and _get(s, 'bytes') / 2**20)} MiB): upload"
        f" {fmt(_get(s, 'upload_mb_s'))} MB/s ({fmt(_get(s, 'upload_ratio'), 2)} of raw),"
        f" download {fmt(_get(s, 'download_mb_s'))} MB/s ({fmt(_get(s, 'download_ratio'), 2)}),"
        f" raw copy {fmt(_get(s, 'raw_copy_mb_s'))} MB/s; peak RSS server"
        f" {fmt(rss.get('server'))} MB   [target >= 0.5 each way, server < 150 MB]",
        f"backlog ({fmt(_get(b, 'depth'))} waiting): start-up {fmt(_get(b, 'startup_s'), 2)} s,"
        f" RSS {fmt(_get(b, 'startup_rss_mb'))} MB, add at depth {fmt(_get(b, 'add_ratio'), 2)}x,"
        f" dispatch {fmt(_get(b, 'dispatch_ratio'), 2)}x of empty"
        "   [target < 2 s, < 150 MB, >= 0.9x]",
        f"connections ({fmt(_get(c, 'connections'))} idle): {fmt(_get(c, 'kb_per_connection'), 1)}"
        f" KB each, idle CPU {fmt(_get(c, 'idle_cpu_percent'), 1)}% of a core"
        "   [target <= 64 KB]",
    ]
    for name in ("tasks", "tasks-pg", "streams", "backlog", "connections"):
        if "error" in results.get(name, {}):
            out.append(f"{name} FAILED: {results[name]['error'][-500:]}")
    return "\n".join(out)


def main() -> None:
    parser = arguments(__doc__ or "")
    parser.add_argument("--only", nargs="*", choices=[*WORKLOADS, "peers"])
    parser.add_argument("--no-peers", action="store_true")
    args = parser.parse_args()
    chosen = args.only or [*WORKLOADS, *([] if args.no_peers else ["peers"])]
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    folder = ROOT / "bench" / "results" / stamp
    folder.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": machine(), "quick": args.quick, "time": stamp}
    for name in chosen:
        print(f"== {name}", file=sys.stderr, flush=True)
        module = "bench.peers.all" if name == "peers" else WORKLOADS[name]
        extra = ["--database", postgres_dsn()] if name == "tasks-pg" else []
        problem = postgres_problem(postgres_dsn()) if name == "tasks-pg" else None
        if problem is not None:
            results[name] = {"skipped": f"no PostgreSQL at {postgres_dsn()} ({problem})"}
            print(f"{name}: skipped, {results[name]['skipped']}", file=sys.stderr)
            continue
        outcome = run_workload(module, args.quick, folder / f"{name}.json", *extra)
        results[name] = outcome.get("peers", outcome) if name == "peers" else outcome
    path = args.json or folder / "results.json"
    path.write_text(json.dumps(results, indent=2))
    print(table(results))
    print(f"\nresults: {path}")
    failed = [n for n in chosen if n != "peers" and "error" in results.get(n, {})]
    peers = results.get("peers", {})
    peers_failed = [f"peers.{n}" for n, r in peers.items() if isinstance(r, dict) and "error" in r]
    if peers_failed:
        # Loud, but a peer's hiccup (its broker, its own timeouts) does not fail wsq's CI.
        print(f"PEER BENCHMARKS FAILED: {', '.join(peers_failed)}", file=sys.stderr)
    if "error" in results.get("peers", {}):
        print(f"PEER SUITE FAILED: {results['peers']['error'][-500:]}", file=sys.stderr)
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
