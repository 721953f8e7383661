"""torch's CPU float arithmetic, reproduced in numpy: fused multiply-add, lerp, addcmul, norm and sum orders.

Where torch's kernels round once (FMA) or sum in a fixed vector order, these helpers do the same, so
optimizers built on them match torch to the last bit in float32 where numpy alone would not.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from app.optim.base import Array

# torch runs its 2-norm kernel at AVX2 width even on AVX512 CPUs: 32-byte vectors, so 8 float32 or 4 float64
# lanes, and a Vectorized<BFloat16> of 16 feeds the 8 float lanes in two halves.
VECTOR_BYTES = 32


def fma(a: Array, b: Any, c: Array, out: Array | None = None) -> Array:
    """`a * b + c` in c's dtype with one rounding, as torch's CPU kernels fuse it: `c.add(a, alpha=b)`.

    float32: the float64 product of two float32 values is exact, so rounding the float64 sum to float32
    gives the fused result (bar a float64 sum that lands exactly halfway between two float32, about one in
    2**29, where it can be an ulp off). float64: numpy has no fused multiply-add; two roundings stay within
    one ulp of torch, far inside the float64 contract. `out` may be `c` (or `a`) for an in-place update.
    """
    return _fma(a, b, c, out, a_is_scratch=False)


def _fma(a: Array, b: Any, c: Array, out: Array | None, a_is_scratch: bool) -> Array:
    """fma; with `a_is_scratch` (a temporary of the caller's) float64 may overwrite `a` with the product."""
    if out is None:
        out = np.empty_like(c)
    scale = c.dtype.type(b) if np.ndim(b) == 0 else b  # torch casts a scalar alpha to the tensor's dtype
    if c.dtype == np.float32:
        wide = np.multiply(a, scale, dtype=np.float64)
        wide += c
        np.copyto(out, wide, casting="same_kind")
        return out
    # float64: the product is rounded into an array that c is not read from, allocating one only if need be
    if a_is_scratch and isinstance(a, np.ndarray) and a.shape == out.shape and a.dtype == out.dtype:
        product = np.multiply(a, scale, out=a)
    elif not np.may_share_memory(out, c):
        product = np.multiply(a, scale, out=out)
    else:
        product = np.multiply(a, scale, dtype=c.dtype)
    np.add(product, c, out=out)
    return out


def lerp(start: Array, end: Array, weight: float, out: Array | None = None) -> Array:
    """torch.lerp: fused `start + w*(end - start)` when |w| < 0.5, else `end + (w - 1)*(end - start)`.

    The weight is taken in start's dtype, as torch does; `out=start` is `start.lerp_(end, weight)`.
    """
    w = start.dtype.type(weight)
    diff = end - start
    if abs(w) < 0.5:
        return _fma(diff, w, start, out, a_is_scratch=True)
    return _fma(diff, w - 1, end, out, a_is_scratch=True)


def addcmul(start: Array, t1: Array, t2: Array, value: float = 1.0, out: Array | None = None) -> Array:
    """torch's `start.addcmul(t1, t2, value=value)`: `value * t1` rounded, then `* t2 + start` fused.

    `out=start` is `start.addcmul_(t1, t2, value=value)`.
    """
    return _fma(np.multiply(t1, start.dtype.type(value)), t2, start, out, a_is_scratch=True)


def addcdiv(start: Array, t1: Array, t2: Array, value: float = 1.0, out: Array | None = None) -> Array:
    """torch's `start.addcdiv(t1, t2, value=value)`: `start + (value * t1) / t2`, each operation rounded.

    Unlike addcmul, torch's CPU kernel does not fuse it. `out=start` is the in-place `addcdiv_`.
    """
    quotient = np.multiply(t1, start.dtype.type(value))
    quotient /= t2
    result: Array = np.add(start, quotient, out=out)
    return result


def vector_norm(x: Array, chunk: int = 0) -> Array:
    """torch's 2-norm over the last axis, in the order of its vectorized CPU kernel; one norm per row.

    Element i of the first `n - n % chunk` goes to lane i % lanes (a product rounded, then added), the
    lanes are folded left to right, then the leftover elements are added in order: for float32 GCC
    vectorizes that loop four at a time with rounded products and fuses the last ones, float64 fuses all.
    A full reduction of a contiguous tensor is this over the flattened tensor. `chunk` defaults to the
    lane count.
    """
    lanes = VECTOR_BYTES // x.dtype.itemsize
    n = x.shape[-1]
    main = n - n % (chunk or lanes)
    squares = x * x
    lane_sums = np.zeros((*x.shape[:-1], lanes), dtype=x.dtype)
    if main:
        # cumsum adds strictly in sequence, which is what makes it a faithful accumulator here
        lane_sums = np.cumsum(squares[..., :main].reshape(*x.shape[:-1], -1, lanes), axis=-2)[..., -1, :]
    unfused = main + (n - main) // 4 * 4 if x.dtype == np.float32 else main
    terms = np.concatenate([lane_sums, squares[..., main:unfused]], axis=-1)
    total: Array = np.cumsum(terms, axis=-1)[..., -1]
    for i in range(unfused, n):  # at most three leftover elements
        total = fma(x[..., i], x[..., i], total)
    return np.sqrt(total)


def sequential_sum(start: Array, rows: Array) -> Array:
    """`start + rows[0] + rows[1] + ...` along axis 0, strictly left to right (cumsum never reorders)."""
    out: Array = np.cumsum(np.concatenate([start[None], rows]), axis=0)[-1]
    return out
