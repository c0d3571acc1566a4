"""The sorted name index the core answers ``queues`` and ``stats`` from (core/names.py)."""

from __future__ import annotations

import fnmatch

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import count_pattern_matches
from wsq.core.names import NameIndex, literal_head


@pytest.mark.parametrize(
    ("pattern", "head"),
    [("videos", "videos"), ("thumbs-*", "thumbs-"), ("a?c", "a"), ("x[ab]*", "x"), ("*", "")],
)
def test_the_literal_head_is_the_text_before_the_first_wildcard(pattern: str, head: str) -> None:
    assert literal_head(pattern) == head


def test_a_name_stays_while_any_holder_holds_it() -> None:
    index = NameIndex()
    index.hold("q")
    index.hold("q")
    index.drop("q")
    assert index.matching(None) == ["q"]
    index.drop("q")
    assert index.matching(None) == []
    index.drop("q")  # dropping an absent name is harmless
    assert "q" not in index


def test_matching_reads_only_the_range_of_a_patterns_head(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    index = NameIndex()
    for n in range(10_000):
        index.hold(f"other-{n:05}")
    for name in ("thumbs-a", "thumbs-b", "videos"):
        index.hold(name)
    calls = count_pattern_matches(monkeypatch)
    assert index.matching(["videos", "thumbs-*", "absent"]) == ["thumbs-a", "thumbs-b", "videos"]
    assert calls() == 2  # the two names under "thumbs-"; "videos" and "absent" are lookups


names = st.text(alphabet="ab-*?[]", min_size=0, max_size=5)


@given(st.sets(st.text(alphabet="ab-[]", min_size=1, max_size=5)), st.lists(names, max_size=4))
def test_matching_agrees_with_fnmatch(held: set[str], patterns: list[str]) -> None:
    index = NameIndex()
    for name in held:
        index.hold(name)
    expected = sorted(n for n in held if any(fnmatch.fnmatchcase(n, p) for p in patterns))
    assert index.matching(patterns) == expected


@given(
    st.sets(st.text(alphabet="ab-[]", min_size=1, max_size=5)),
    st.none() | st.lists(names, max_size=4),
    st.none() | st.text(alphabet="ab-[]", min_size=1, max_size=5),
)
def test_a_page_after_a_name_agrees_with_fnmatch(
    held: set[str], patterns: list[str] | None, after: str | None
) -> None:
    index = NameIndex()
    for name in held:
        index.hold(name)
    expected = sorted(
        n
        for n in held
        if (patterns is None or any(fnmatch.fnmatchcase(n, p) for p in patterns))
        and (after is None or n > after)
    )
    assert list(index.iter_matching(patterns, after)) == expected


def test_a_page_after_a_name_reads_from_that_name_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pages of ``queues`` and ``stats`` start at their cursor: the names before it in a
    pattern's range cost no pattern match."""
    index = NameIndex()
    for n in range(10_000):
        index.hold(f"q-{n:05}")
    calls = count_pattern_matches(monkeypatch)
    names = index.iter_matching(["q-*"], "q-09000")
    assert [next(names) for _ in range(3)] == ["q-09001", "q-09002", "q-09003"]
    assert calls() == 3
