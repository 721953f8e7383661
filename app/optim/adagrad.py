"""Adagrad with learning-rate decay, weight decay and an initial accumulator (torch.optim.Adagrad)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from app.optim.base import HP, LR, MAXIMIZE, Array, Optimizer, State, new_step, weight_decay
from app.optim.floats import addcdiv, addcmul, fma
from app.optim.hparams import Check, HParam


class Adagrad(Optimizer):
    name = "adagrad"
    description = "Adagrad: steps scaled by the root of the summed squared gradients (torch.optim.Adagrad)."
    hparams = (
        replace(LR, default=1e-2),
        HParam("lr_decay", "float", 0.0, "learning rate decay"),
        weight_decay(),
        HParam("initial_accumulator_value", "float", 0.0, "initial value of the sum of squared gradients"),
        HParam("eps", "float", 1e-10, "term added to the denominator for numerical stability"),
        MAXIMIZE,
    )

    def check(self, hp: HP, check: Check) -> None:
        check.non_negative(hp, "lr", "learning rate")
        check.non_negative(hp, "lr_decay", "lr_decay value")
        check.non_negative(hp, "weight_decay", "weight_decay value")
        check.non_negative(hp, "initial_accumulator_value", "initial_accumulator_value value")
        check.non_negative(hp, "eps", "epsilon value")

    def init_state(self, param: Array, hp: HP) -> State:
        return {"step": new_step(), "sum": np.full_like(param, hp["initial_accumulator_value"])}

    def update(
        self, params: Sequence[Array], grads: Sequence[Array], states: Sequence[State], hp: HP
    ) -> None:
        lr, lr_decay, wd, eps = hp["lr"], hp["lr_decay"], hp["weight_decay"], hp["eps"]
        for param, grad, state in zip(params, grads, states, strict=True):
            state["step"] += 1
            step = float(state["step"])
            g = -grad if hp["maximize"] else grad
            if wd != 0:
                g = fma(param, wd, g)  # grad.add(param, alpha=weight_decay)
            clr = lr / (1 + (step - 1) * lr_decay)
            state_sum = state["sum"]
            addcmul(state_sum, g, g, out=state_sum)  # state_sum.addcmul_(grad, grad, value=1)
            std = np.sqrt(state_sum)
            std += eps
            addcdiv(param, g, std, -clr, out=param)  # param.addcdiv_(grad, std, value=-clr)
