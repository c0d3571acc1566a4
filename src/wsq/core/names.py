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
        if patterns is None:
            return list(self._sorted)
        found: set[str] = set()
        for pattern in patterns:
            head = literal_head(pattern)
            if head == pattern:
                if pattern in self._holders:
                    found.add(pattern)
                continue
            found.update(n for n in self._starting(head) if fnmatch.fnmatchcase(n, pattern))
        return sorted(found)

    def _starting(self, head: str) -> Iterator[str]:
        if not head:
            yield from self._sorted
            return
        for name in self._sorted.irange(minimum=head):
            if not name.startswith(head):
                return
            yield name
