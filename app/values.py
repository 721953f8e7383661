"""`immutable`: the decorator of the records a step makes several of (its outcome, its history row, its
logged input, the stored record...), which nothing changes once made.

To mypy an `@immutable` class is a frozen dataclass: assigning to a field is an error that the strict type
check in CI reports. At run time it is a plain dataclass with slots and a hash over its fields, because a
frozen dataclass' `__init__` sets each field through `object.__setattr__`: 740 against 200 ns for six
fields, and a step makes nine such records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

T = TypeVar("T")

if TYPE_CHECKING:
    from typing_extensions import dataclass_transform

    @dataclass_transform(frozen_default=True)
    def immutable(cls: type[T]) -> type[T]: ...

else:

    def immutable(cls):
        return dataclass(cls, unsafe_hash=True, slots=True)
