"""Adadelta: steps sized by running averages of squared gradients and updates (torch.optim.Adadelta)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from app.optim.base import HP, LR, MAXIMIZE, Array, Optimizer, State, new_step, weight_decay
from app.optim.floats import addcmul, fma
from app.optim.hparams import Check, HParam


class Adadelta(Optimizer):
    name = "adadelta"
    description = "Adadelta: unit-corrected steps from running averages of squared gradients and updates."
    hparams = (
        replace(LR, default=1.0, description="coefficient that scales the delta before it is applied"),
        HParam("rho", "float", 0.9, "coefficient of the running averages of squared gradients and updates"),
        HParam("eps", "float", 1e-6, "term added inside the square roots for numerical stability"),
        weight_decay(),
        MAXIMIZE,
    )

    def check(self, hp: HP, check: Check) -> None:
        check.non_negative(hp, "lr", "learning rate")
        check.require(0.0 <= hp["rho"] <= 1.0, "rho", f"Invalid rho value: {hp['rho']}")
        check.non_negative(hp, "eps", "epsilon value")
        check.non_negative(hp, "weight_decay", "weight_decay value")

    def init_state(self, param: Array, hp: HP) -> State:
        return {"step": new_step(), "square_avg": np.zeros_like(param), "acc_delta": np.zeros_like(param)}

    def update(
        self, params: Sequence[Array], grads: Sequence[Array], states: Sequence[State], hp: HP
    ) -> None:
        lr, rho, eps, wd = hp["lr"], hp["rho"], hp["eps"], hp["weight_decay"]
        for param, grad, state in zip(params, grads, states, strict=True):
            state["step"] += 1
            g = -grad if hp["maximize"] else grad
            if wd != 0:
                g = fma(param, wd, g)  # grad.add(param, alpha=weight_decay)
            square_avg, acc_delta = state["square_avg"], state["acc_delta"]
            # square_avg.mul_(rho).addcmul_(grad, grad, value=1 - rho)
            square_avg *= rho
            addcmul(square_avg, g, g, 1 - rho, out=square_avg)
            std = np.sqrt(square_avg + eps)
            delta = np.sqrt(acc_delta + eps)
            delta /= std
            delta *= g
            # acc_delta.mul_(rho).addcmul_(delta, delta, value=1 - rho)
            acc_delta *= rho
            addcmul(acc_delta, delta, delta, 1 - rho, out=acc_delta)
            fma(delta, -lr, param, out=param)  # param.add_(delta, alpha=-lr)
