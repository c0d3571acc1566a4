"""The queue core alone: its CPU per task, with no server, store or network around it.

    python -m bench.core_ops [--quick] [--tasks N] [--rounds R] [--json PATH]

One :class:`wsq.core.engine.Core` and one worker of concurrency 100 on one queue. Each
task goes through what the server asks of the core for it: ``admit`` and ``add`` (the
insert is made, then durable), the offer made at the end of a loop turn (``flush``),
``ack`` and ``complete`` (each as a worker's batched report would be applied, one call
per run), and the end of the turn after the completions; the writes are declared durable
once per turn (``writes_durable``), as the server does per batch, and the core is asked
for its next deadline (``next_deadline``), as the server does at the end of a turn.
Tasks are added a window's worth at a time (1,000: no load from a store is needed), the
worker drains them, and so on, N tasks in all. Two modes: a store of one server (SQLite's, ``own``)
and a shared store (PostgreSQL's, ``shared``: each turn's offers come from a
``ClaimWaiting`` that this bench answers as the store would). Reported:
``time.process_time()`` per task, the median of R rounds, each on a fresh core, after
one untimed round that warms it up. Every queue counts as observed (events are made, as
in ``bench.wsq_tasks``, whose producer listens to the tasks it adds).

What it shows is the core's share of the server's CPU per task (``bench.wsq_tasks``'
``server_cpu_us_per_task`` is the whole server's), and what a change to the core costs,
without the noise of three processes on two cores: compare two commits by running both
alternately (``PYTHONPATH=<their src>``).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from bench.common import arguments, write_results
from wsq.core.effects import Claim, Effect, Offer
from wsq.core.engine import Core
from wsq.core.task import Options, State, Task

WINDOW = 1000
CONCURRENCY = 100
OPTIONS = Options(timeout=60.0, retries=0, autoremove=False)


def _claimed(core: Core, claim: Claim, waiting: list[Task], now: float) -> list[Effect]:
    """Answer a claim as a shared store does: the oldest waiting tasks, active now."""
    taken, waiting[:] = waiting[: len(claim.op.workers)], waiting[len(claim.op.workers) :]
    active = []
    for task, worker in zip(taken, claim.op.workers, strict=False):
        task.state, task.run, task.worker = State.ACTIVE, task.run + 1, worker
        active.append(task)
    return core.claimed(claim.op, active, now)


def one_round(count: int, shared: bool) -> float:
    """CPU seconds per task for ``count`` tasks through a fresh core."""
    core = Core(worker_timeout=30.0, window=WINDOW, shared=shared)
    if shared:
        core.alone = True  # a node alone: no holds and releases (bench.wsq_tasks' case)
    now = time.time()
    core.defer_dispatch = True  # as the server: offers at the end of a loop turn
    waiting: list[Task] = []  # a shared store's waiting tasks, oldest first
    effects: list[Effect] = core.add_worker("c1", "w1", "q", CONCURRENCY, now)
    done = 0
    started = time.process_time()
    while done < count:
        chunk = min(WINDOW, count - done)
        for n in range(done, done + chunk):
            seq = core.allocate_seq(now)
            task = Task(f"t{n}", "q", State.WAITING, seq, b"{}", (), OPTIONS, created=now)
            stored = core.admit(task, now)  # as the server builds the insert
            if shared and stored.state is State.WAITING:
                waiting.append(stored.copy())
            effects += core.add(stored, now)
        left = chunk
        while left:
            effects += core.flush(now)
            for effect in effects:  # grows as claims are answered
                if isinstance(effect, Claim):
                    effects += _claimed(core, effect, waiting, now)
            runs = [(t.id, t.run) for e in effects if isinstance(e, Offer) for t in e.tasks]
            effects = []
            for task_id, run in runs:
                effects += core.ack(task_id, run, now)
            for task_id, run in runs:
                effects += core.complete(task_id, run, now)
            core.writes_durable(core.ends_made())
            core.next_deadline()  # as the server asks at the end of each turn
            left -= len(runs)
            assert runs, "the worker got nothing to do"
        done += chunk
    return (time.process_time() - started) / count


def main() -> None:
    parser = arguments(__doc__ or "")
    parser.add_argument("--tasks", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    count = args.tasks or (2_000 if args.quick else 50_000)
    rounds = args.rounds or (1 if args.quick else 5)
    results: dict[str, Any] = {"tasks": count, "rounds": rounds}
    for mode, shared in (("own", False), ("shared", True)):
        one_round(count, shared)  # warm-up
        times = [one_round(count, shared) for _ in range(rounds)]
        results[f"{mode}_cpu_us_per_task"] = statistics.median(times) * 1e6
        print(f"{mode:>7}: {results[f'{mode}_cpu_us_per_task']:.1f} us of CPU per task", flush=True)
    write_results(args.json, results)


if __name__ == "__main__":
    main()
