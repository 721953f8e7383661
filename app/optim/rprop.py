"""Rprop: per-coordinate step sizes grown or shrunk by successive gradient signs (torch.optim.Rprop)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from app.optim.base import HP, LR, MAXIMIZE, Array, Optimizer, State, new_step
from app.optim.floats import addcmul
from app.optim.hparams import Check, HParam


class Rprop(Optimizer):
    name = "rprop"
    description = "Resilient backpropagation: sign-based steps with adaptive per-coordinate sizes."
    hparams = (
        replace(LR, default=1e-2, description="learning rate: the initial step size"),
        HParam(
            "etas", "tuple", (0.5, 1.2), "(etaminus, etaplus): step size shrink and growth factors", length=2
        ),
        HParam("step_sizes", "tuple", (1e-6, 50.0), "(min, max) allowed step sizes", length=2),
        MAXIMIZE,
    )

    def check(self, hp: HP, check: Check) -> None:
        etaminus, etaplus = hp["etas"]
        check.non_negative(hp, "lr", "learning rate")
        check.require(0.0 < etaminus < 1.0 < etaplus, "etas", f"Invalid eta values: {etaminus}, {etaplus}")

    def init_state(self, param: Array, hp: HP) -> State:
        return {"step": new_step(), "prev": np.zeros_like(param), "step_size": np.full_like(param, hp["lr"])}

    def update(
        self, params: Sequence[Array], grads: Sequence[Array], states: Sequence[State], hp: HP
    ) -> None:
        etaminus, etaplus = hp["etas"]
        step_size_min, step_size_max = hp["step_sizes"]
        for param, grad, state in zip(params, grads, states, strict=True):
            prev, step_size = state["prev"], state["step_size"]
            if state["step"] == 0:
                # torch fills the step sizes at the parameter's first step, with the lr of that moment,
                # which a scheduler may have changed since init_state
                step_size.fill(hp["lr"])
            state["step"] += 1
            g = -grad if hp["maximize"] else grad
            # sign = grad.mul(prev).sign(), its entries then replaced by the factors (an array even when 0-d)
            factor = np.sign(np.multiply(g, prev), out=np.empty_like(prev))
            factor[factor > 0] = etaplus
            factor[factor < 0] = etaminus
            factor[factor == 0] = 1
            step_size *= factor
            np.clip(step_size, step_size_min, step_size_max, out=step_size)
            # after a sign change the gradient counts as zero: no step now, no sign comparison next time;
            # torch finds those coordinates by comparing with etaminus in the parameter's precision
            np.copyto(prev, g)
            prev[factor == etaminus] = 0
            # param.addcmul_(grad.sign(), step_size, value=-1): the product is exact, one rounding either way
            addcmul(param, np.sign(prev), step_size, -1, out=param)
