"""``@value``: the core's immutable records (ops, effects, options), quick to make.

A frozen dataclass sets each field through ``object.__setattr__`` when it is made, which
costs several times what a plain one does, and the core makes several per task (an
Update and its Attempt, Writes, Emits, Options): ``python -m bench.core_ops`` measures
what that is worth (docs/decisions.md). A ``@value`` class is frozen for the type
checker (PEP 681's ``frozen_default``: mypy refuses an assignment to a field) and, at
run time, a plain slots dataclass, hashable by its fields as a frozen one is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

T = TypeVar("T")

if TYPE_CHECKING:
    from typing_extensions import dataclass_transform

    @dataclass_transform(frozen_default=True)
    def value(cls: type[T]) -> type[T]:
        return dataclass(frozen=True, slots=True)(cls)

else:

    def value(cls):
        return dataclass(slots=True, unsafe_hash=True)(cls)
