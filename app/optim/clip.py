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
    dtype = np.result_type(*grads)
    norms = np.array([_l2(g.reshape(-1)) for g in grads], dtype=dtype)
    return float(_l2(norms))


def _l2(v: Array) -> Any:
    # what np.linalg.norm computes for a real vector, without its dispatch (a step calls this per tensor)
    return np.sqrt(np.dot(v, v))


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
