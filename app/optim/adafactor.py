"""Adafactor with factored second moments, relative step size and update clipping (torch.optim.Adafactor)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from app.optim.base import HP, LR, MAXIMIZE, Array, Optimizer, State, new_step, weight_decay
from app.optim.floats import VECTOR_BYTES, fma, lerp, sequential_sum, vector_norm
from app.optim.hparams import Check, HParam


def _ceil_log2(n: int) -> int:
    return (n - 1).bit_length() if n > 1 else 0


def _multi_row_sum(rows: Array) -> Array:
    """ATen's `multi_row_sum`: sums along axis 0 through its four-level cascade of partial sums."""
    size = rows.shape[0]
    level_power = max(4, _ceil_log2(size) // 4)
    step = 1 << level_power
    acc = np.zeros((4, *rows.shape[1:]), dtype=rows.dtype)
    i = 0
    while i + step <= size:
        acc[0] = sequential_sum(acc[0], rows[i : i + step])
        i += step
        for j in range(1, 4):
            acc[j] += acc[j - 1]
            acc[j - 1] = 0
            if i & ((step - 1) << (j * level_power)):
                break
    acc[0] = sequential_sum(acc[0], rows[i:])
    out: Array = acc[0] + acc[1] + acc[2] + acc[3]
    return out


def _row_sum(rows: Array) -> Array:
    """ATen's `row_sum`: four interleaved partial sums (ILP), the leftovers into the first, folded."""
    ilp = rows.shape[0] // 4
    partial = _multi_row_sum(rows[: ilp * 4].reshape(ilp, 4, *rows.shape[1:]))
    partial[0] = sequential_sum(partial[0], rows[ilp * 4 :])
    out: Array = partial[0] + partial[1] + partial[2] + partial[3]
    return out


def torch_sum(x: Array) -> Array:
    """`tensor.sum(-1)` over a contiguous last axis, in the order of ATen's `cascade_sum` (AVX2 width).

    Rows shorter than a vector take the scalar `row_sum`; longer ones sum whole vectors lane-wise, then
    add the leftover elements and finally the lanes. Matches torch bit for bit on one thread.
    """
    n = x.shape[-1]
    lanes = VECTOR_BYTES // x.dtype.itemsize
    rows = np.moveaxis(x, -1, 0)
    if n < lanes:
        return _row_sum(rows)
    whole = n // lanes * lanes
    lane_sums = _row_sum(rows[:whole].reshape(n // lanes, lanes, *rows.shape[1:]))
    leftover = sequential_sum(np.zeros(rows.shape[1:], dtype=x.dtype), rows[whole:])
    return sequential_sum(leftover, lane_sums)


def _norm(x: Array) -> float:
    """`tensor.norm(2).item()`: computed in the tensor's dtype, returned as a Python float."""
    return float(vector_norm(x.reshape(-1)))


class Adafactor(Optimizer):
    name = "adafactor"
    description = (
        "Adafactor: factored second-moment estimates, relative step size and update clipping "
        "(torch.optim.Adafactor)."
    )
    hparams = (
        dataclasses.replace(
            LR, default=1e-2, description="learning rate: caps the relative step size and scales weight decay"
        ),
        HParam("beta2_decay", "float", -0.8, "decay rate of beta2: 1 - beta2_t = t ** beta2_decay"),
        HParam(
            "eps",
            "tuple",
            (None, 1e-3),
            "(epsilon1, epsilon2): epsilon1 floors the variance estimate (null: the dtype's machine "
            "epsilon), epsilon2 floors the parameter RMS that scales the step",
            length=2,
            nullable_items=True,
        ),
        HParam("d", "float", 1.0, "clipping threshold on the update RMS"),
        weight_decay(),
        MAXIMIZE,
    )

    def check(self, hp: HP, check: Check) -> None:
        eps1, eps2 = hp["eps"]
        check.require(hp["lr"] >= 0.0, "lr", f"Learning rate should be >= 0 but is: {hp['lr']}")
        check.require(
            hp["beta2_decay"] <= 0.0,
            "beta2_decay",
            f"beta2_decay should be <= 0 but is: {hp['beta2_decay']}",
        )
        check.require(eps1 is None or eps1 >= 0.0, "eps", f"epsilon1 should be >= 0 but is: {eps1}")
        # torch would fail with a TypeError on a null epsilon2; only epsilon1 has a default
        check.require(eps2 is not None, "eps", "epsilon2 must be a number, only epsilon1 may be null")
        check.require(eps2 is None or eps2 >= 0.0, "eps", f"epsilon2 should be >= 0 but is: {eps2}")
        check.require(hp["d"] >= 1.0, "d", f"Clipping threshold d should be >= 1 but is: {hp['d']}")
        check.require(
            hp["weight_decay"] >= 0.0,
            "weight_decay",
            f"weight_decay should be >= 0 but is: {hp['weight_decay']}",
        )

    def state_nbytes(self, shape: tuple[int, ...], dtype: np.dtype[Any], hp: HP) -> int:
        """The step, and the two factors of a matrix (or of each matrix of a stack), or a full variance."""
        size = np.dtype(dtype).itemsize
        if len(shape) > 1:
            stack = math.prod(shape[:-2])
            return 8 + size * stack * (shape[-2] + shape[-1])
        return 8 + size * math.prod(shape)

    def init_state(self, param: Array, hp: HP) -> State:
        state = {"step": new_step()}
        if param.ndim > 1:
            # the factors keep the reduced axis with size 1, as torch's keepdim reductions produce them
            state["row_var"] = np.zeros((*param.shape[:-1], 1), dtype=param.dtype)
            state["col_var"] = np.zeros((*param.shape[:-2], 1, param.shape[-1]), dtype=param.dtype)
        else:
            state["variance"] = np.zeros_like(param)
        return state

    def update(
        self, params: Sequence[Array], grads: Sequence[Array], states: Sequence[State], hp: HP
    ) -> None:
        lr, beta2_decay, d, wd = hp["lr"], hp["beta2_decay"], hp["d"], hp["weight_decay"]
        eps1_hp, eps2 = hp["eps"]
        for param, grad, state in zip(params, grads, states, strict=True):
            g = -grad if hp["maximize"] else grad
            eps1 = float(np.finfo(param.dtype).eps) if eps1_hp is None else eps1_hp
            state["step"] += 1
            step = float(state["step"])
            one_minus_beta2_t = step**beta2_decay
            rho_t = min(lr, 1 / (step**0.5))
            alpha = max(eps2, _norm(param) / (param.size**0.5)) * rho_t
            if wd != 0:
                param *= 1 - lr * wd
            if g.ndim > 1:
                row_var, col_var = state["row_var"], state["col_var"]
                # torch squares the norm (rounding through the square root) rather than averaging g*g
                row_mean = vector_norm(g)[..., None]
                row_mean *= row_mean
                row_mean /= g.shape[-1]
                lerp(row_var, row_mean, one_minus_beta2_t, out=row_var)
                # across rows torch's generic reduction adds row after row, as numpy does
                col_mean = np.linalg.norm(g, axis=-2, keepdims=True)
                col_mean *= col_mean
                col_mean /= g.shape[-2]
                lerp(col_var, col_mean, one_minus_beta2_t, out=col_var)
                var_estimate = row_var @ col_var
                # torch's mean is its sum divided by the count; numpy's pairwise sum adds in another order
                row_var_mean = (torch_sum(row_var[..., 0]) / row_var.shape[-2])[..., None, None]
                np.maximum(row_var_mean, eps1, out=row_var_mean)
                var_estimate /= row_var_mean
            else:
                variance = state["variance"]
                lerp(variance, g * g, one_minus_beta2_t, out=variance)
                var_estimate = variance.copy()
            # eps1 is squared because the square root follows; torch's rsqrt is 1 / sqrt
            update = np.maximum(var_estimate, eps1 * eps1, out=var_estimate)
            np.sqrt(update, out=update)
            np.divide(1, update, out=update)
            update *= g
            denom = max(1.0, _norm(update) / ((update.size**0.5) * d))
            fma(update, -alpha / denom, param, out=param)
