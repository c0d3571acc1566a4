"""Answers remembered for requests a client may send again (docs/protocol.md §4.2).

A client that lost its connection cannot know whether its requests in flight took effect;
it sends them again on its next connection. For requests that change state, doing them
twice is wrong (a second ``remove`` finds no task, a second ``complete`` a stale run), so
the server remembers each one's answer under the client's principal, its ``session``
(§4.1) and the request id, and answers a request it has seen with that answer instead of
doing it again. A request seen while its first copy is still being handled waits for that
copy's answer; if the first copy was dropped before it acted, the new one is handled
afresh. Memory is bounded, in answers and in bytes: the oldest answers are forgotten
first, never a request still in flight.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

REMEMBERED = 65_536
"""Answers kept, over all sessions (each is one encoded answer message, most under 1 KiB)."""

REMEMBERED_BYTES = 64 << 20
"""Bytes of answers kept, over all sessions: an ``add_many`` of 1,000 is answered with
its 1,000 ids (23 KB with the Python client's ids, more with longer ones), so a bulk
producer's answers alone would fill 65,536 entries with 1.5 GB and more. 64 MiB keeps
about 2,800 of those, minutes of history at the rates a server sustains; a client sends
its requests again within seconds of reconnecting."""

Key = tuple[str | None, str, int]
"""(principal name, session, request id)."""


class Entry:
    """One request's answer: pending until :meth:`settle` or :meth:`abandon`."""

    __slots__ = ("_key", "_replay", "answer", "waiters")

    def __init__(self, replay: Replay, key: Key) -> None:
        self.answer: bytes | None = None
        # Called with the answer, or with None if the first copy never acted.
        self.waiters: list[Callable[[bytes | None], None]] = []
        self._replay = replay
        self._key = key

    def settle(self, answer: bytes) -> None:
        self.answer = answer
        self._replay._settled(self._key, self)
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

    def __init__(self, limit: int = REMEMBERED, max_bytes: int = REMEMBERED_BYTES) -> None:
        self._limit = limit
        self._max_bytes = max_bytes
        self._bytes = 0  # of the answers of the entries held
        self._entries: OrderedDict[Key, Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def seen(self, key: Key) -> Entry | None:
        """The entry of a request already seen, if it is still remembered."""
        return self._entries.get(key)

    @property
    def bytes(self) -> int:
        """Bytes of the answers remembered."""
        return self._bytes

    def begin(self, key: Key) -> Entry:
        """Start remembering a request seen for the first time."""
        old = self._entries.pop(key, None)
        if old is not None:
            self._drop(old)
        entry = self._entries[key] = Entry(self, key)
        if len(self._entries) > self._limit:
            self._forget_oldest_answer()
        return entry

    def _forget_oldest_answer(self) -> None:
        """Forget the oldest answered request. Requests still in flight are passed over
        (and counted as new): forgetting one would let its copy sent again act twice."""
        for _ in range(len(self._entries)):
            old_key, old = next(iter(self._entries.items()))
            if old.answer is None:
                self._entries.move_to_end(old_key)
                continue
            del self._entries[old_key]
            self._drop(old)
            return

    def forget(self, key: Key, entry: Entry) -> None:
        """Drop an abandoned entry, so that the request may be handled afresh."""
        if self._entries.get(key) is entry:
            del self._entries[key]
            self._drop(entry)

    def _settled(self, key: Key, entry: Entry) -> None:
        """``entry`` has its answer: count it (unless it was forgotten meanwhile), then
        forget the oldest answers while they pass ``max_bytes`` (requests still in flight,
        and this answer, however large, stay)."""
        if self._entries.get(key) is not entry or entry.answer is None:
            return
        self._bytes += len(entry.answer)
        for _ in range(len(self._entries)):
            if self._bytes <= self._max_bytes:
                break
            old_key, old = next(iter(self._entries.items()))
            if old.answer is None or old is entry:  # in flight, or this one: kept
                self._entries.move_to_end(old_key)
                continue
            del self._entries[old_key]
            self._bytes -= len(old.answer)

    def _drop(self, entry: Entry) -> None:
        """Uncount an entry no longer held."""
        if entry.answer is not None:
            self._bytes -= len(entry.answer)
