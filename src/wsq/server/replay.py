"""Answers remembered for requests a client may send again (docs/protocol.md §4.2).

A client that lost its connection cannot know whether its requests in flight took effect;
it sends them again on its next connection. For requests that change state, doing them
twice is wrong (a second ``remove`` finds no task, a second ``complete`` a stale run), so
the server remembers each one's answer under the client's principal, its ``session``
(§4.1) and the request id, and answers a request it has seen with that answer instead of
doing it again. A request seen while its first copy is still being handled waits for that
copy's answer; if the first copy was dropped before it acted, the new one is handled
afresh. Memory is bounded: the oldest answers are forgotten first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

REMEMBERED = 65_536
"""Answers kept, over all sessions (each is one encoded answer message, most under 1 KiB)."""

Key = tuple[str | None, str, int]
"""(principal name, session, request id)."""


class Entry:
    """One request's answer: pending until :meth:`settle` or :meth:`abandon`."""

    __slots__ = ("answer", "waiters")

    def __init__(self) -> None:
        self.answer: bytes | None = None
        # Called with the answer, or with None if the first copy never acted.
        self.waiters: list[Callable[[bytes | None], None]] = []

    def settle(self, answer: bytes) -> None:
        self.answer = answer
        self._wake(answer)

    def abandon(self) -> None:
        """The first copy was dropped before it acted: waiters handle it afresh."""
        self._wake(None)

    def _wake(self, answer: bytes | None) -> None:
        waiters, self.waiters = self.waiters, []
        for wake in waiters:
            wake(answer)


class Replay:
    """The remembered answers, oldest first."""

    def __init__(self, limit: int = REMEMBERED) -> None:
        self._limit = limit
        self._entries: OrderedDict[Key, Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def seen(self, key: Key) -> Entry | None:
        """The entry of a request already seen, if it is still remembered."""
        return self._entries.get(key)

    def begin(self, key: Key) -> Entry:
        """Start remembering a request seen for the first time."""
        entry = self._entries[key] = Entry()
        if len(self._entries) > self._limit:
            self._entries.popitem(last=False)
        return entry

    def forget(self, key: Key, entry: Entry) -> None:
        """Drop an abandoned entry, so that the request may be handled afresh."""
        if self._entries.get(key) is entry:
            del self._entries[key]
