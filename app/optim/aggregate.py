"""The reduction of a synchronous round: several workers' gradients into the one gradient a step applies.

Deterministic: the same contributions give bit-identical results in any arrival order. Contributions are
taken in the order of their worker ids (sorted), and each parameter is reduced in float64 (the step then
casts it to the parameter's dtype, as any gradient). A parameter is reduced over the workers that sent a
gradient for it; one that none sent is absent, and the step leaves it alone, as torch does for
`grad is None`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from app.optim.base import Array

REDUCTIONS = ("mean", "sum", "weighted_mean")


@dataclass(frozen=True)
class Contribution:
    """One worker's part of a round: its gradients, its weight (e.g. its batch size, for weighted_mean)
    and the loss it reported."""

    worker: str
    grads: Mapping[str, Array]
    weight: float = 1.0
    loss: float | None = None


def reduce(contributions: Sequence[Contribution], how: str) -> dict[str, Array]:
    """The round's gradient per parameter (float64): the mean, sum or weighted mean over its senders."""
    if how not in REDUCTIONS:
        raise ValueError(f"unknown reduction {how!r}; one of {', '.join(REDUCTIONS)}")
    ordered = sorted(contributions, key=lambda c: c.worker)
    workers = [c.worker for c in ordered]
    if len(set(workers)) != len(workers):
        raise ValueError(f"a worker contributed twice to one round: {workers}")
    reduced: dict[str, Array] = {}
    for name in sorted({name for c in ordered for name in c.grads}):
        senders = [c for c in ordered if name in c.grads]
        shape = np.shape(senders[0].grads[name])
        total = np.zeros(shape, np.float64)
        weights = 0.0
        for c in senders:
            grad = np.asarray(c.grads[name])
            if grad.shape != shape:
                raise ValueError(
                    f"{name}: worker {c.worker!r} sent shape {list(grad.shape)}, others {list(shape)}"
                )
            if how == "weighted_mean":
                total += np.multiply(grad, c.weight, dtype=np.float64)
                weights += c.weight
            else:
                # widened to float64 inside the ufunc's buffer (exactly), never as a whole float64 copy
                np.add(total, grad, out=total)
        if how == "mean":
            total /= len(senders)
        elif how == "weighted_mean":
            total /= weights
        reduced[name] = total
    return reduced


def mean_loss(contributions: Sequence[Contribution]) -> float | None:
    """The mean of the losses the workers reported (in worker order), None if none did."""
    losses = [c.loss for c in sorted(contributions, key=lambda c: c.worker) if c.loss is not None]
    if not losses:
        return None
    total = 0.0
    for loss in losses:
        total += loss
    return total / len(losses)
