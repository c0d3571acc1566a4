"""The server's remembered answers (wsq.server.replay): bounded, oldest forgotten first."""

from __future__ import annotations

from wsq.server.replay import Replay


def test_an_answer_is_remembered_and_waiters_get_it() -> None:
    replay = Replay(limit=4)
    key = ("alice", "session-0123456789", 7)
    assert replay.seen(key) is None
    entry = replay.begin(key)
    got: list[bytes | None] = []
    entry.waiters.append(got.append)
    entry.settle(b"answer")
    assert got == [b"answer"]
    assert replay.seen(key) is entry and entry.answer == b"answer"


def test_the_oldest_answers_are_forgotten_past_the_limit() -> None:
    replay = Replay(limit=3)
    keys = [(None, "s" * 16, n) for n in range(5)]
    for key in keys:
        replay.begin(key).settle(b"x")
    assert len(replay) == 3
    assert [replay.seen(k) is not None for k in keys] == [False, False, True, True, True]


def test_an_abandoned_request_is_forgotten_and_its_waiters_woken_with_none() -> None:
    replay = Replay()
    key = (None, "s" * 16, 1)
    entry = replay.begin(key)
    got: list[bytes | None] = []
    entry.waiters.append(got.append)
    replay.forget(key, entry)
    entry.abandon()
    assert got == [None]
    assert replay.seen(key) is None


def test_the_oldest_answers_are_forgotten_past_the_byte_bound() -> None:
    """A bulk producer's answers (1,000 ids each) must not hold gigabytes: past
    ``max_bytes`` the oldest answers go, whatever their number; requests still in flight
    stay (they count nothing until answered), and a forgotten entry uncounts its answer."""
    replay = Replay(limit=100, max_bytes=250)
    keys = [(None, "s" * 16, n) for n in range(6)]
    pending = replay.begin(keys[0])
    for key in keys[1:4]:
        replay.begin(key).settle(b"x" * 100)
    assert replay.bytes == 200  # a third answer would pass 250: the oldest answered went
    assert [replay.seen(k) is not None for k in keys[:4]] == [True, False, True, True]
    pending.settle(b"late")  # still held: counted
    assert replay.bytes == 204
    entry = replay.begin(keys[4])
    replay.forget(keys[4], entry)
    entry.settle(b"y" * 100)  # an abandoned first copy answers after all: not counted
    assert replay.bytes == 204
    replay.begin(keys[5]).settle(b"z" * 1000)  # larger than the bound alone: kept
    assert replay.bytes == 1000 and replay.seen(keys[5]) is not None
    assert [replay.seen(k) is not None for k in keys[:4]] == [False] * 4


def test_a_request_still_in_flight_is_not_forgotten_for_newer_ones() -> None:
    """Past ``limit``, answered requests are forgotten, not those still being handled:
    forgetting one would let its copy sent again after a reconnect act a second time
    (a flood of requests on another connection must not bring that about)."""
    replay = Replay(limit=3)
    flying = (None, "a" * 16, 1)
    entry = replay.begin(flying)
    for n in range(10):  # another client's requests, answered at once
        replay.begin((None, "b" * 16, n)).settle(b"x")
    assert replay.seen(flying) is entry
    assert len(replay) == 3
    entry.settle(b"done")
    for n in range(10, 13):
        replay.begin((None, "b" * 16, n)).settle(b"x")
    assert replay.seen(flying) is None  # answered: the oldest, forgotten in its turn
