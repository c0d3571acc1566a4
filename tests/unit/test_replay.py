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
