"""What the wire codecs share: the dtypes that travel (by numpy name), the limits on shapes, and helpers
that name them and quote untrusted values in error messages."""

from __future__ import annotations

import math
from collections.abc import Collection

import numpy as np

# float16 is for gradients only, as the contract says.
FLOAT_DTYPES: frozenset[str] = frozenset({"float16", "float32", "float64"})
PARAM_DTYPES: frozenset[str] = frozenset({"float32", "float64"})

# numpy cannot represent more dimensions than this, nor an array whose non-zero dimensions multiply
# (times the item size) beyond the largest intp, even when a zero dimension makes it empty.
MAX_NDIM = 64
_MAX_NBYTES = int(np.iinfo(np.intp).max)


def shape_error(shape: object, itemsize: int) -> str | None:
    """Why `shape` (untrusted JSON) cannot be a numpy shape for items of `itemsize` bytes, or None."""
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        # type(d) is int: JSON true/false are Python bools, an int subclass, and never a dimension.
        return f"shape {show(shape)} must be a list of non-negative integers ([] for a scalar)"
    if len(shape) > MAX_NDIM:
        return f"shape has {len(shape)} dimensions; at most {MAX_NDIM} are supported"
    if math.prod(d for d in shape if d) * itemsize > _MAX_NBYTES:
        return f"shape {show(shape)} is too large for an array"
    return None


def describe(allowed: Collection[str]) -> str:
    """`float16, float32, float64`: a stable, readable list for error messages."""
    return ", ".join(sorted(allowed))


def show(value: object, limit: int = 80) -> str:
    """`repr(value)` cut to `limit` characters: error messages quote untrusted input, which can be huge."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
