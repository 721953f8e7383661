"""Gradient processing before the optimizer: the total L2 norm and torch.nn.utils' two clippers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from app.optim.base import Array


def total_norm(grads: Sequence[Array]) -> float:
    """L2 norm over all gradients as one vector (torch's `_get_total_norm`), in the widest dtype."""
    if not grads:
        return 0.0
    if len(grads) == 1:
        # the norm of the one norm, as below: its square (rounded to its dtype) and the root of that
        (one,) = grads
        norm = _l2(one.reshape(-1))
        return float(np.sqrt(norm * norm))
    dtype = np.result_type(*grads)
    norms = np.array([_l2(g.reshape(-1)) for g in grads], dtype=dtype)
    return float(_l2(norms))


CHUNK = 1 << 16


def _l2(v: Array) -> Any:
    """sqrt of the sum of squares, summed in an order fixed by numpy's pairwise summation over chunks of
    CHUNK elements: the same bits on every CPU. (BLAS's dot, which np.linalg.norm uses, sums in the order
    of whichever kernel the CPU gets, so a clipped step moved by ulps between machines.)"""
    if v.size <= CHUNK:
        return np.sqrt(np.add.reduce(v * v))
    square = np.empty(CHUNK, v.dtype)
    partial = np.empty(-(-v.size // CHUNK), v.dtype)
    for i, start in enumerate(range(0, v.size, CHUNK)):
        part = v[start : start + CHUNK]
        np.multiply(part, part, out=square[: part.size])
        partial[i] = np.add.reduce(square[: part.size])
    return np.sqrt(np.add.reduce(partial))


def clip_by_value(grads: Sequence[Array], clip_value: float) -> list[Array]:
    """torch.nn.utils.clip_grad_value_: clamp into [-clip_value, clip_value] (new arrays)."""
    return [np.clip(g, -clip_value, clip_value) for g in grads]


def clip_by_norm(grads: Sequence[Array], max_norm: float, norm: float) -> list[Array]:
    """torch.nn.utils.clip_grad_norm_: scale by min(1, max_norm / (norm + 1e-6)) in the grads' dtype."""
    out = []
    for g in grads:
        # torch divides and clamps in the norm tensor's dtype, then multiplies every grad by it
        coef = min(g.dtype.type(max_norm) / (g.dtype.type(norm) + g.dtype.type(1e-6)), g.dtype.type(1.0))
        out.append(g * coef)
    return out
