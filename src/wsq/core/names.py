"""Queue names in order, so that the names a principal's patterns match are found without
reading every other name (docs/security.md, "no message costs time in all queues").

A pattern is shell-style (``fnmatch``: ``*``, ``?``, ``[...]``). Its literal head, the text
before the first wildcard, bounds the sorted range that can match: ``thumbs-*`` reads only
names starting with ``thumbs-``, and a pattern with no wildcard is one lookup. Only ``*``
alone (or a pattern starting with a wildcard) reads them all, and a principal holding it
may see them all anyway.
"""

from __future__ import annotations

import fnmatch
import heapq
from collections.abc import Iterable, Iterator

from sortedcontainers import SortedSet

_WILDCARDS = "*?["


def literal_head(pattern: str) -> str:
    """The text of ``pattern`` before its first wildcard character."""
    cut = min((i for i in (pattern.find(c) for c in _WILDCARDS) if i >= 0), default=len(pattern))
    return pattern[:cut]


class NameIndex:
    """A sorted set of names, each held by one or more owners (the core's counts table and
    its windows hold queue names independently); a name leaves when its last owner drops
    it. Inserting and dropping cost O(log n)."""

    __slots__ = ("_holders", "_sorted")

    def __init__(self) -> None:
        self._sorted: SortedSet[str] = SortedSet()
        self._holders: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._sorted)

    def __contains__(self, name: object) -> bool:
        return name in self._holders

    def hold(self, name: str) -> None:
        held = self._holders.get(name, 0)
        if not held:
            self._sorted.add(name)
        self._holders[name] = held + 1

    def drop(self, name: str) -> None:
        held = self._holders.get(name, 0)
        if held <= 1:
            self._holders.pop(name, None)
            self._sorted.discard(name)
        else:
            self._holders[name] = held - 1

    def matching(self, patterns: Iterable[str] | None) -> list[str]:
        """The sorted names any of ``patterns`` matches (every name for ``None``)."""
        return list(self.iter_matching(patterns))

    def iter_matching(
        self, patterns: Iterable[str] | None, after: str | None = None
    ) -> Iterator[str]:
        """The names any of ``patterns`` matches (every name for ``None``) that sort after
        ``after``, lazily and in order: a page of them costs its own names (and the
        names that share a pattern's literal head but do not match), not every one."""
        if patterns is None:
            yield from self._from("", after)
            return
        ranges: list[Iterator[str]] = []
        for pattern in dict.fromkeys(patterns):
            head = literal_head(pattern)
            if head == pattern:
                if pattern in self._holders and (after is None or pattern > after):
                    ranges.append(iter((pattern,)))
                continue
            ranges.append(self._matching(pattern, head, after))
        last = None
        for name in heapq.merge(*ranges):
            if name != last:  # matched by more than one pattern
                yield name
                last = name

    def _matching(self, pattern: str, head: str, after: str | None) -> Iterator[str]:
        return (n for n in self._from(head, after) if fnmatch.fnmatchcase(n, pattern))

    def _from(self, head: str, after: str | None) -> Iterator[str]:
        """The names starting with ``head`` that sort after ``after``, in order."""
        if after is not None and after >= head:
            names = self._sorted.irange(minimum=after, inclusive=(False, True))
        else:
            names = self._sorted.irange(minimum=head)
        for name in names:
            if not name.startswith(head):
                return
            yield name
