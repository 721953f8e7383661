"""Averaged SGD with a decaying step size and a running parameter average (torch.optim.ASGD)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from app.optim.base import HP, LR, MAXIMIZE, Array, Optimizer, State, new_step, weight_decay
from app.optim.floats import fma
from app.optim.hparams import Check, HParam

# torch keeps `eta` and `mu` as 0-d tensors of its default scalar dtype, float32 whatever the parameter's
# dtype, and reads them back with `.item()`: their float32 rounding is part of every update.
SCALAR_DTYPE = np.float32


class ASGD(Optimizer):
    name = "asgd"
    description = "Averaged stochastic gradient descent: SGD with decaying steps and a running average `ax`."
    hparams = (
        replace(LR, default=1e-2),
        HParam("lambd", "float", 1e-4, "decay term"),
        HParam("alpha", "float", 0.75, "power for the eta update"),
        HParam("t0", "float", 1e6, "step at which averaging starts"),
        weight_decay(),
        MAXIMIZE,
    )

    def check(self, hp: HP, check: Check) -> None:
        check.non_negative(hp, "lr", "learning rate")
        check.non_negative(hp, "weight_decay", "weight_decay value")

    def init_state(self, param: Array, hp: HP) -> State:
        return {
            "step": new_step(),
            "eta": np.array(hp["lr"], dtype=SCALAR_DTYPE),
            "mu": np.ones((), dtype=SCALAR_DTYPE),
            "ax": np.zeros_like(param),
        }

    def update(
        self, params: Sequence[Array], grads: Sequence[Array], states: Sequence[State], hp: HP
    ) -> None:
        lr, lambd, alpha, t0, wd = hp["lr"], hp["lambd"], hp["alpha"], hp["t0"], hp["weight_decay"]
        for param, grad, state in zip(params, grads, states, strict=True):
            if state["step"] == 0:
                # torch sets eta at the parameter's first step, to the lr of that moment, which a
                # scheduler may have changed since init_state
                state["eta"][...] = lr
            g = -grad if hp["maximize"] else grad
            state["step"] += 1
            if wd != 0:
                g = fma(param, wd, g)  # grad.add(param, alpha=weight_decay)
            eta = float(state["eta"])
            param *= 1 - lambd * eta
            fma(g, -eta, param, out=param)  # param.add_(grad, alpha=-eta)
            ax, mu = state["ax"], float(state["mu"])
            if mu != 1:
                diff = np.subtract(param, ax)
                diff *= mu
                ax += diff
            else:
                np.copyto(ax, param)
            step = float(state["step"])
            state["eta"][...] = lr / ((1 + lambd * lr * step) ** alpha)
            state["mu"][...] = 1 / max(1, step - t0)
