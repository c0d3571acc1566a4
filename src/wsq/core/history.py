"""The last hour of each busy queue, second by second, for the dashboard's charts.

For each queue, a ring of ``seconds`` slots (one per second of the wall clock, slot
``second % seconds``) counts the tasks added, completed and failed in that second, the
waiting depth sampled in it, and the sum and number of enqueue-to-start waits of the
tasks started in it. A slot remembers which second it holds, so a slot last written an
hour ago reads as empty without anything sweeping it: recording is O(1) and nothing runs
for quiet queues. Pure: no clock, no I/O; callers pass ``now`` (Unix seconds).

Memory is bounded: at most ``max_queues`` rings of 32 bytes per slot each (115 KB per
queue for an hour). A queue gets a ring on its first observation, or when a sample finds
tasks waiting in it, while there is room; a ring whose queue has had no task added,
started or ended for ``seconds`` and has none waiting is dropped at the next sample,
which makes room. A queue that finds no room is not charted until then.

Contract with the caller: feed :meth:`History.observe` what the core observed
(:mod:`wsq.core.observations`) as it happens, call :meth:`History.sample` with the
waiting count of every queue that has tasks waiting about once a second, and read with
:meth:`History.series`.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Mapping
from typing import Any

from wsq.core import observations as seen
from wsq.core.observations import Observation

SECONDS = 3600
MAX_QUEUES = 100
_NO_SAMPLE = 0xFFFFFFFF  # a slot's waiting depth when no sample was taken in its second
_MAX_DEPTH = _NO_SAMPLE - 1


class _Ring:
    __slots__ = (
        "added",
        "completed",
        "failed",
        "last_active",
        "size",
        "stamps",
        "wait_count",
        "wait_sum",
        "waiting",
    )

    def __init__(self, size: int, now: int) -> None:
        self.size = size
        self.stamps = array("I", bytes(4 * size))  # the second each slot holds (0: none)
        self.added = array("I", bytes(4 * size))
        self.completed = array("I", bytes(4 * size))
        self.failed = array("I", bytes(4 * size))
        self.waiting = array("I", [_NO_SAMPLE]) * size
        self.wait_sum = array("d", bytes(8 * size))
        self.wait_count = array("I", bytes(4 * size))
        self.last_active = now

    def slot(self, second: int) -> int:
        """The index of ``second``'s slot, emptied first if it held an older second."""
        index = second % self.size
        if self.stamps[index] != second:
            self.stamps[index] = second
            self.added[index] = self.completed[index] = self.failed[index] = 0
            self.wait_count[index] = 0
            self.wait_sum[index] = 0.0
            self.waiting[index] = _NO_SAMPLE
        return index


class History:
    """Per-second counters of the last ``seconds`` for at most ``max_queues`` queues."""

    def __init__(self, *, seconds: int = SECONDS, max_queues: int = MAX_QUEUES) -> None:
        if seconds < 1:
            raise ValueError(f"seconds must be at least 1, not {seconds!r}")
        if max_queues < 0:
            raise ValueError(f"max_queues must be 0 or more, not {max_queues!r}")
        self.seconds = seconds
        self.max_queues = max_queues
        self._rings: dict[str, _Ring] = {}

    def queues(self) -> list[str]:
        """The queues that have a ring now."""
        return list(self._rings)

    def observe(self, observations: Iterable[Observation], now: float) -> None:
        """Count what the core observed, as having happened in ``now``'s second."""
        second = int(now)
        # Every observation lands in the same second: find each queue's slot once.
        places: dict[str, tuple[_Ring, int] | None] = {}
        for kind, queue, value in observations:
            try:
                place = places[queue]
            except KeyError:
                place = places[queue] = self._place(queue, second)
            if place is None:
                continue
            ring, index = place
            if kind == seen.ADDED:
                ring.added[index] += 1
            elif kind == seen.STARTED:
                ring.wait_sum[index] += value
                ring.wait_count[index] += 1
            elif kind == seen.COMPLETED:
                ring.completed[index] += 1
            elif kind == seen.FAILED:
                ring.failed[index] += 1

    def sample(self, waiting: Mapping[str, int], now: float) -> None:
        """Record each queue's waiting depth in ``now``'s second (``waiting`` names every
        queue that has tasks waiting; the others have none), and drop the rings of
        queues quiet for ``seconds``."""
        second = int(now)
        quiet_since = second - self.seconds
        for name, ring in list(self._rings.items()):
            depth = waiting.get(name, 0)
            if depth == 0 and ring.last_active <= quiet_since:
                del self._rings[name]
                continue
            ring.waiting[ring.slot(second)] = min(depth, _MAX_DEPTH)
        for name, depth in waiting.items():
            if depth > 0 and name not in self._rings:
                admitted = self._admit(name, second)
                if admitted is None:
                    break
                admitted.waiting[admitted.slot(second)] = min(depth, _MAX_DEPTH)

    def series(self, queue: str, since: float | None, now: float) -> dict[str, Any]:
        """The seconds from ``since`` (default, and at the earliest: ``seconds - 1``
        before ``now``'s) to ``now``'s, the last one still in progress: ``start`` and
        ``end`` (Unix seconds, inclusive; ``start > end`` when ``since`` is later than
        ``now``) and one list per counter, one entry per second. ``waiting`` is ``None``
        for a second with no sample, ``latency`` (the mean enqueue-to-start wait, in
        seconds, of the tasks started in that second) for one that started none. A queue
        without a ring reads as all zeros."""
        end = int(now)
        first = end - self.seconds + 1
        start = first if since is None else max(first, min(int(since), end + 1))
        ring = self._rings.get(queue)
        added: list[int] = []
        completed: list[int] = []
        failed: list[int] = []
        waiting: list[int | None] = []
        latency: list[float | None] = []
        for second in range(start, end + 1):
            index = second % self.seconds
            if ring is None or ring.stamps[index] != second:
                added.append(0)
                completed.append(0)
                failed.append(0)
                waiting.append(None)
                latency.append(None)
                continue
            added.append(ring.added[index])
            completed.append(ring.completed[index])
            failed.append(ring.failed[index])
            depth = ring.waiting[index]
            waiting.append(None if depth == _NO_SAMPLE else depth)
            count = ring.wait_count[index]
            latency.append(ring.wait_sum[index] / count if count else None)
        return {
            "queue": queue,
            "start": start,
            "end": end,
            "added": added,
            "completed": completed,
            "failed": failed,
            "waiting": waiting,
            "latency": latency,
        }

    def _place(self, queue: str, second: int) -> tuple[_Ring, int] | None:
        """``queue``'s ring and its slot for ``second``, marked active, if it has a ring."""
        ring = self._rings.get(queue) or self._admit(queue, second)
        if ring is None:
            return None
        ring.last_active = second
        return ring, ring.slot(second)

    def _admit(self, queue: str, second: int) -> _Ring | None:
        if len(self._rings) >= self.max_queues:
            return None  # until a sample drops a quiet ring
        ring = self._rings[queue] = _Ring(self.seconds, second)
        return ring
