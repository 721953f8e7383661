"""RMSprop, optionally centered and with momentum (torch.optim.RMSprop)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from app.optim.base import HP, LR, MAXIMIZE, Array, Optimizer, State, new_step, weight_decay
from app.optim.floats import addcdiv, addcmul, fma, lerp
from app.optim.hparams import Check, HParam


class RMSprop(Optimizer):
    name = "rmsprop"
    description = "RMSprop: steps divided by a running RMS of the gradients (torch.optim.RMSprop)."
    hparams = (
        replace(LR, default=1e-2),
        HParam("alpha", "float", 0.99, "smoothing constant of the running average of squared gradients"),
        HParam("eps", "float", 1e-8, "term added to the denominator for numerical stability"),
        weight_decay(),
        HParam("momentum", "float", 0.0, "momentum factor"),
        HParam("centered", "bool", False, "normalize by an estimate of the gradient's variance"),
        MAXIMIZE,
    )

    def check(self, hp: HP, check: Check) -> None:
        check.non_negative(hp, "lr", "learning rate")
        check.non_negative(hp, "eps", "epsilon value")
        check.non_negative(hp, "momentum", "momentum value")
        check.non_negative(hp, "weight_decay", "weight_decay value")
        check.non_negative(hp, "alpha", "alpha value")

    def init_state(self, param: Array, hp: HP) -> State:
        state = {"step": new_step(), "square_avg": np.zeros_like(param)}
        if hp["momentum"] > 0:
            state["momentum_buffer"] = np.zeros_like(param)
        if hp["centered"]:
            state["grad_avg"] = np.zeros_like(param)
        return state

    def update(
        self, params: Sequence[Array], grads: Sequence[Array], states: Sequence[State], hp: HP
    ) -> None:
        lr, alpha, eps, wd, momentum = hp["lr"], hp["alpha"], hp["eps"], hp["weight_decay"], hp["momentum"]
        for param, grad, state in zip(params, grads, states, strict=True):
            state["step"] += 1
            g = -grad if hp["maximize"] else grad
            if wd != 0:
                g = fma(param, wd, g)  # grad.add(param, alpha=weight_decay)
            square_avg = state["square_avg"]
            # square_avg.mul_(alpha).addcmul_(grad, grad, value=1 - alpha)
            square_avg *= alpha
            addcmul(square_avg, g, g, 1 - alpha, out=square_avg)
            if hp["centered"]:
                grad_avg = state["grad_avg"]
                lerp(grad_avg, g, 1 - alpha, out=grad_avg)
                # square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()
                avg = np.sqrt(addcmul(square_avg, grad_avg, grad_avg, -1))
            else:
                avg = np.sqrt(square_avg)
            avg += eps
            if momentum > 0:
                if "momentum_buffer" not in state:
                    # a scheduler cycling momentum can switch it on after the state was created
                    state["momentum_buffer"] = np.zeros_like(param)
                buf = state["momentum_buffer"]
                buf *= momentum
                addcdiv(buf, g, avg, out=buf)  # buf.mul_(momentum).addcdiv_(grad, avg)
                fma(buf, -lr, param, out=param)  # param.add_(buf, alpha=-lr)
            else:
                addcdiv(param, g, avg, -lr, out=param)
