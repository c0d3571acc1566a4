"""``wsq.core.values.value``: records frozen for the type checker, plain at run time."""

from __future__ import annotations

import textwrap
from pathlib import Path

from mypy import api

from wsq.core.ops import Update
from wsq.core.task import Options, State, Task


def test_values_hash_and_compare_by_their_fields() -> None:
    assert Options(5.0) == Options(5.0) and hash(Options(5.0)) == hash(Options(5.0))
    assert len({Options(5.0), Options(5.0), Options(6.0)}) == 2
    task = Task("a", "q", State.WAITING, 1, b"{}")
    assert Update(task, State.ACTIVE) == Update(task.copy(), State.ACTIVE)


def test_mypy_refuses_an_assignment_to_a_field_of_a_value(tmp_path: Path) -> None:
    snippet = tmp_path / "snippet.py"
    snippet.write_text(
        textwrap.dedent(
            """
            from wsq.core.ops import Update
            from wsq.core.task import Options, State

            def f(update: Update, options: Options) -> None:
                update.expected = State.WAITING
                options.timeout = 1.0
            """
        )
    )
    out, _, status = api.run([str(snippet), "--no-incremental", "--follow-imports=silent"])
    assert status == 1, out
    assert 'Property "expected" defined in "Update" is read-only' in out
    assert 'Property "timeout" defined in "Options" is read-only' in out
