"""Tensors in JSON: `{"shape", "dtype", "data": [flat row-major numbers]}` or a bare (nested) list of numbers,
and the orjson wrappers that read and write request and response bodies."""

from __future__ import annotations

import math
from collections.abc import Collection
from itertools import chain
from typing import Any, NoReturn

import numpy as np
import numpy.typing as npt
import orjson

from app.wire.common import FLOAT_DTYPES, MAX_NDIM, describe, shape_error, show
from app.wire.errors import WireError

Array = npt.NDArray[Any]

_NUMBER_TYPES: frozenset[type] = frozenset({float, int})
_NESTED_TYPES = _NUMBER_TYPES | {list}
_TENSOR_KEYS = frozenset({"shape", "dtype", "data"})


def _invalid(field: str, detail: str) -> NoReturn:
    raise WireError(f"{field}: {detail}", status=422, field=field)


def _type_name(value: object) -> str:
    return {
        type(None): "null",
        bool: "a boolean",
        str: "a string",
        dict: "an object",
        list: "a list",
        float: "a number",
        int: "a number",
    }.get(type(value), type(value).__name__)


def _check_types(
    field: str, values: list[Any], types: frozenset[type] = _NUMBER_TYPES, what: str = "element"
) -> None:
    # `set(map(type, ...))` runs in C; exact types, because numpy would silently turn true into 1.0,
    # "1.5" into 1.5 and null into NaN.
    if not set(map(type, values)) <= types:
        index, bad = next((i, v) for i, v in enumerate(values) if type(v) not in types)
        _invalid(field, f"{what} {index} is {_type_name(bad)} ({show(bad)}); only numbers are allowed")


def _numbers(field: str, values: list[Any], dtype: np.dtype[Any]) -> Array | None:
    """A flat list of numbers (int or float, not bool) as an array of `dtype`; None if some element is
    not a number (the caller's `_check_types` then names it).

    Checked without looking at the type of every element (`_check_types` costs ~18 ns per element, about
    what parsing it costs): `sum` raises TypeError for anything but numbers and booleans (strings, null,
    lists, objects), and a boolean becomes exactly 0.0 or 1.0, so only the elements converted to those are
    looked at; when they are many, every element's type is (a list of mostly zeros and ones costs what
    `_check_types` costs)."""
    try:
        sum(values)
    except (TypeError, OverflowError):  # OverflowError: an int beyond a float's range beside a float
        return None
    try:
        arr = _convert(field, values, dtype, flat=True)
    except WireError:  # out of range: said once every element is known to be a number
        return None
    # a mask of a byte per element (a float64 array's eighth), and indices only when they are few
    suspect = arr == 0
    suspect |= arr == 1
    count = int(np.count_nonzero(suspect))
    if count > len(values) >> 4:  # many zeros and ones: every type at C speed is cheaper
        return arr if set(map(type, values)) <= _NUMBER_TYPES else None
    if count and any(type(values[i]) is bool for i in np.flatnonzero(suspect).tolist()):
        return None
    return arr


def _convert(field: str, value: Any, dtype: np.dtype[Any], flat: bool = False) -> Array:
    """`value` as an array of `dtype`; `flat` says it is a list already checked to hold only numbers, which
    np.fromiter converts faster than np.array (no nesting to discover)."""
    try:
        # Overflow to inf is reported by _check_finite, with a clearer message than numpy's warning.
        with np.errstate(over="ignore"):
            if flat:
                return np.fromiter(value, dtype=dtype, count=len(value))
            return np.array(value, dtype=dtype)
    except OverflowError:
        _invalid(field, f"a number is out of range for {dtype.name}")
    except (ValueError, TypeError):
        _invalid(
            field,
            f"nested lists must be regular (every row the same length), at most {MAX_NDIM} deep, "
            "and hold only numbers",
        )


def _check_finite(field: str, arr: Array) -> Array:
    if not np.isfinite(arr).all():
        _invalid(
            field,
            f"a number is out of range for {arr.dtype.name} (largest finite magnitude "
            f"{float(np.finfo(arr.dtype).max):.5g}); NaN and Infinity are not JSON",
        )
    return arr


def _resolve_dtype(field: str, name: object, allowed: Collection[str]) -> np.dtype[Any]:
    if not isinstance(name, str) or name not in allowed:
        _invalid(field, f"dtype {show(name)} is not supported; allowed: {describe(allowed)}")
    return np.dtype(name)


def _decode_object(
    value: dict[str, Any], default_dtype: np.dtype[Any], field: str, allowed: Collection[str]
) -> Array:
    if not value.keys() <= _TENSOR_KEYS or not {"shape", "data"} <= value.keys():
        _invalid(
            field,
            f"a tensor object has the keys shape, data and optionally dtype, not {show(sorted(value))}",
        )
    dtype = _resolve_dtype(f"{field}.dtype", value["dtype"], allowed) if "dtype" in value else default_dtype

    shape = value["shape"]
    problem = shape_error(shape, dtype.itemsize)
    if problem:
        _invalid(f"{field}.shape", problem)

    data = value["data"]
    if not isinstance(data, list):
        _invalid(
            f"{field}.data", f"data must be a flat list of numbers in row-major order, not {_type_name(data)}"
        )
    # Python ints: a hostile shape cannot overflow the comparison.
    if len(data) != math.prod(shape):
        _check_types(f"{field}.data", data)  # a wrong element is named before a wrong length
        _invalid(
            f"{field}.data", f"data has {len(data)} numbers but shape {show(shape)} needs {math.prod(shape)}"
        )
    arr = _numbers(f"{field}.data", data, dtype)
    if arr is None:
        _check_types(f"{field}.data", data)
        arr = _convert(f"{field}.data", data, dtype, flat=True)
    return _check_finite(f"{field}.data", arr).reshape(shape)


def _decode_nested(value: list[Any], dtype: np.dtype[Any], field: str) -> Array:
    flat = _numbers(field, value, dtype)
    if flat is not None:  # a flat list of numbers, the common case
        return _check_finite(field, flat)
    _check_types(field, value, _NESTED_TYPES)
    arr = _convert(field, value, dtype)
    # numpy accepted a regular nesting of depth ndim; flatten it to check what the leaves were.
    leaves: list[Any] = value
    for _ in range(arr.ndim - 1):
        leaves = list(chain.from_iterable(leaves))
    _check_types(field, leaves, what="element (in row-major order)")
    return _check_finite(field, arr)


def decode_tensor(
    value: Any,
    default_dtype: np.dtype[Any] | type[np.floating[Any]] | str,
    field: str,
    allowed_dtypes: Collection[str] = FLOAT_DTYPES,
) -> Array:
    """Read one JSON tensor into a new, writable array.

    Accepts the object form `{"shape": [2, 3], "dtype": "float32", "data": [6 numbers]}` (`dtype` may be
    left out: then it is `default_dtype`; a scalar has shape `[]`), a bare nested list of numbers, or a bare
    number, both read as `default_dtype`. `allowed_dtypes` holds numpy names. Anything else, including
    booleans, strings, null, ragged lists, wrong lengths, an unsupported dtype or a number too large for the
    dtype, is a 422 `WireError` naming `field` (or `field.shape` / `field.dtype` / `field.data`).
    """
    default = np.dtype(default_dtype)
    if isinstance(value, dict):
        return _decode_object(value, default, field, allowed_dtypes)
    if isinstance(value, list):
        return _decode_nested(value, default, field)
    if type(value) in _NUMBER_TYPES:
        return _check_finite(field, _convert(field, value, default))
    _invalid(
        field,
        f"expected a tensor object {{shape, dtype, data}}, a (nested) list of numbers or a number, "
        f"not {_type_name(value)}",
    )


def encode_tensor(arr: npt.ArrayLike) -> dict[str, Any]:
    """The object form, with `data` as a flat array that `dumps` writes natively and exactly: orjson writes
    the shortest decimal that reads back to the same float32 or float64 (a float16 as its float32)."""
    a = np.asarray(arr)
    if a.dtype.name not in FLOAT_DTYPES:
        raise ValueError(f"only {describe(FLOAT_DTYPES)} tensors can be encoded, not {a.dtype}")
    # orjson serializes only C-contiguous, native-endian arrays; ravel is a view when no copy is needed.
    flat = np.asarray(a.ravel(), dtype=a.dtype.newbyteorder("="))
    return {"shape": list(a.shape), "dtype": a.dtype.name, "data": flat}


def dumps(obj: Any) -> bytes:
    """JSON bytes with numpy arrays and scalars written natively. Beware: orjson writes NaN and Infinity,
    which JSON lacks, as null."""
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)


def loads(body: bytes | bytearray | memoryview | str) -> Any:
    """Parse a JSON body; anything that is not JSON (including NaN, Infinity and numbers that overflow
    a double) is a 400 `WireError`."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise WireError(f"the body is not valid JSON: {exc}", status=400) from None
