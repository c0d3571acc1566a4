"""The server-wide memory budget (``max_buffered``, docs/security.md).

Per-connection limits alone let many connections add up to gigabytes. Two kinds of
buffers share this budget:

- outgoing messages not yet written to a connection's socket (each connection also has
  its own ``max_outgoing``): when the total passes the budget, the connection with the
  largest backlog is dropped, as a slow consumer would be;
- what a connection that has not said ``hello`` may make the WebSocket library buffer
  (a partial frame, up to the frame limit): each such connection reserves one frame
  until its ``hello`` or its end. When a new one does not fit, the oldest ones still
  waiting for ``hello`` are closed to make room, so a crowd of silent connections can
  delay a real client by one round trip but never lock it out.
"""

from __future__ import annotations

from typing import Protocol


class Holder(Protocol):
    """A connection, as the budget sees it."""

    id: str

    @property
    def backlog(self) -> int:
        """Bytes queued to send."""
        ...

    def drop(self, code: int, reason: str) -> None:
        """Close the connection and give back what it holds from the budget."""
        ...


class Budget:
    def __init__(self, limit: int, frame_reserve: int) -> None:
        self.limit = limit
        self.frame_reserve = frame_reserve
        self.used = 0
        self._greeting: dict[str, Holder] = {}  # oldest first

    @property
    def over(self) -> bool:
        return self.used > self.limit

    def start_greeting(self, holder: Holder) -> bool:
        """Reserve a frame for a connection that has not said hello, closing the oldest
        such connections if needed. False: even alone it does not fit (refuse it)."""
        while self.used + self.frame_reserve > self.limit and self._greeting:
            oldest = next(iter(self._greeting.values()))
            self.end_greeting(oldest)
            oldest.drop(1013, "Too many connections waiting for hello; try again.")
        if self.used + self.frame_reserve > self.limit:
            return False
        self._greeting[holder.id] = holder
        self.used += self.frame_reserve
        return True

    def end_greeting(self, holder: Holder) -> None:
        """The connection said hello or ended: its reserve goes back."""
        if self._greeting.pop(holder.id, None) is not None:
            self.used -= self.frame_reserve

    def pick_largest(self, holders: list[Holder]) -> Holder | None:
        """The connection holding the most outgoing bytes, to drop when over budget."""
        return max(holders, key=lambda holder: holder.backlog, default=None)
