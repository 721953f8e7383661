"""Hyperparameter declarations and the one parser that turns a JSON spec into typed values.

Every optimizer and scheduler declares its arguments as a tuple of `HParam`; the parser fills torch's
defaults, checks types and rejects unknown names. Range checks with torch's own messages live in each
class's `validate`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["float", "int", "bool", "str", "tuple", "int_list", "float_list", "spec_list"]


@dataclass(frozen=True)
class FieldError:
    """One problem with one field of a spec: `field` is a dotted path such as `optimizer.lr`."""

    field: str
    message: str


class SpecError(ValueError):
    """A spec (optimizer, scheduler, session options) is invalid; `errors` names every bad field."""

    def __init__(self, errors: Sequence[FieldError]) -> None:
        self.errors = list(errors)
        super().__init__("; ".join(f"{e.field}: {e.message}" for e in self.errors))

    @classmethod
    def one(cls, field: str, message: str) -> SpecError:
        return cls([FieldError(field, message)])


@dataclass(frozen=True)
class HParam:
    """A constructor argument: its JSON type, torch's default and a one-line description.

    `kind="tuple"` is a fixed-length list of floats (`length`), whose items may be null when
    `nullable_items` (Adafactor's `eps`). `choices` limits a `str`; `nullable` admits JSON null.
    `required` arguments have no default (`default` is then ignored).
    """

    name: str
    kind: Kind
    default: Any
    description: str
    length: int = 0
    nullable: bool = False
    nullable_items: bool = False
    choices: tuple[str, ...] = ()
    required: bool = False

    def type_name(self) -> str:
        """The type as the catalogue shows it, e.g. `number`, `array[number, 2]`."""
        base = {
            "float": "number",
            "int": "integer",
            "bool": "boolean",
            "str": "string",
            "tuple": f"array[number{' | null' if self.nullable_items else ''}, {self.length}]",
            "int_list": "array[integer]",
            "float_list": "array[number]",
            "spec_list": "array[scheduler]",
        }[self.kind]
        return f"{base} | null" if self.nullable else base

    def catalogue(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "name": self.name,
            "type": self.type_name(),
            "description": self.description,
        }
        if self.required:
            entry["required"] = True
        else:
            entry["default"] = list(self.default) if isinstance(self.default, tuple) else self.default
        if self.choices:
            entry["choices"] = list(self.choices)
        return entry


# Bounds on every spec value, checked where it is parsed, so that nothing accepted can overflow later (an
# integer beyond what JSON readers and SQLite keep exactly, a schedule whose arithmetic costs per item).
MAX_INT = 2**53
MAX_LIST = 10_000
MAX_SPECS = 32


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _coerce(p: HParam, value: Any, path: str) -> Any:
    """Returns the typed value or raises SpecError naming the field, the value and the expected type."""

    def bad(expected: str) -> SpecError:
        return SpecError.one(path, f"expected {expected}, got {value!r}")

    if value is None:
        if p.nullable:
            return None
        raise bad(p.type_name())
    if p.kind == "float":
        if not _is_number(value):
            raise bad("a number")
        result = float(value)
        if result != result or result in (float("inf"), float("-inf")):
            raise bad("a finite number")
        return result
    if p.kind == "int":
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad("an integer")
        if abs(value) > MAX_INT:
            raise bad(f"an integer between -2**53 and 2**53 ({MAX_INT})")
        return value
    if p.kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if p.kind == "str":
        if not isinstance(value, str):
            raise bad("a string")
        if p.choices and value not in p.choices:
            raise SpecError.one(path, f"{value!r} is not one of {', '.join(map(repr, p.choices))}")
        return value
    if p.kind == "tuple":
        if not isinstance(value, (list, tuple)) or len(value) != p.length:
            raise bad(f"an array of {p.length} numbers")
        items: list[float | None] = []
        for item in value:
            if item is None and p.nullable_items:
                items.append(None)
            elif _is_number(item):
                items.append(float(item))
            else:
                raise bad(f"an array of {p.length} numbers")
        return tuple(items)
    if p.kind in ("int_list", "float_list"):
        want_int = p.kind == "int_list"
        if not isinstance(value, (list, tuple)):
            raise bad("an array of integers" if want_int else "an array of numbers")
        if len(value) > MAX_LIST:
            raise SpecError.one(path, f"at most {MAX_LIST} items, got {len(value)}")
        out: list[Any] = []
        for item in value:
            if want_int and isinstance(item, float) and item.is_integer():
                item = int(item)
            ok = isinstance(item, int) if want_int else _is_number(item)
            if not ok or isinstance(item, bool):
                raise bad("an array of integers" if want_int else "an array of numbers")
            if (want_int and abs(item) > MAX_INT) or (not want_int and not math.isfinite(item)):
                raise bad("an array of integers within 2**53" if want_int else "an array of finite numbers")
            out.append(item if want_int else float(item))
        return out
    if p.kind == "spec_list":
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, Mapping) for v in value):
            raise bad("an array of scheduler specs")
        if len(value) > MAX_SPECS:
            raise SpecError.one(path, f"at most {MAX_SPECS} schedulers, got {len(value)}")
        return [dict(v) for v in value]
    raise AssertionError(f"unknown kind {p.kind}")


def parse(
    declared: Sequence[HParam],
    raw: Mapping[str, Any],
    prefix: str,
    *,
    ignore: Sequence[str] = ("name",),
    defaults: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Fills defaults, coerces types and rejects unknown names; collects every error before raising.

    `defaults` overrides the declared defaults (a param group inherits the optimizer's values).
    """
    by_name = {p.name: p for p in declared}
    errors: list[FieldError] = []
    for key in raw:
        if key not in by_name and key not in ignore:
            allowed = ", ".join(p.name for p in declared) or "none"
            errors.append(FieldError(f"{prefix}.{key}", f"unknown argument; allowed: {allowed}"))
    out: dict[str, Any] = {}
    for p in declared:
        path = f"{prefix}.{p.name}"
        if p.name in raw:
            try:
                out[p.name] = _coerce(p, raw[p.name], path)
            except SpecError as exc:
                errors.extend(exc.errors)
        elif defaults is not None and p.name in defaults:
            out[p.name] = defaults[p.name]
        elif p.required:
            errors.append(FieldError(path, "is required"))
        else:
            out[p.name] = p.default
    if errors:
        raise SpecError(errors)
    return out


def to_json(values: Mapping[str, Any]) -> dict[str, Any]:
    """Typed values back to JSON-ready data (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


@dataclass
class Check:
    """Collects torch-style range checks for one spec, so a user sees every bad field at once."""

    prefix: str
    errors: list[FieldError] = field(default_factory=list)

    def require(self, ok: bool, name: str, message: str) -> None:
        if not ok:
            self.errors.append(FieldError(f"{self.prefix}.{name}", message))

    def non_negative(self, hp: Mapping[str, Any], name: str, what: str) -> None:
        """torch's most common constructor check: `hp[name] >= 0`, else `Invalid {what}: {value}`."""
        self.require(hp[name] >= 0.0, name, f"Invalid {what}: {hp[name]}")

    def done(self) -> None:
        if self.errors:
            raise SpecError(self.errors)
