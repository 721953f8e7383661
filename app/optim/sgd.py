"""SGD with momentum, dampening, Nesterov and weight decay (torch.optim.SGD)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from app.optim.base import HP, LR, MAXIMIZE, Array, Optimizer, State, new_step, weight_decay
from app.optim.hparams import Check, HParam


class SGD(Optimizer):
    name = "sgd"
    description = "Stochastic gradient descent, optionally with (Nesterov) momentum (torch.optim.SGD)."
    hparams = (
        LR,
        HParam("momentum", "float", 0.0, "momentum factor"),
        HParam("dampening", "float", 0.0, "dampening for momentum"),
        weight_decay(),
        HParam("nesterov", "bool", False, "enables Nesterov momentum"),
        MAXIMIZE,
    )

    def check(self, hp: HP, check: Check) -> None:
        check.require(hp["lr"] >= 0.0, "lr", f"Invalid learning rate: {hp['lr']}")
        check.require(hp["momentum"] >= 0.0, "momentum", f"Invalid momentum value: {hp['momentum']}")
        check.require(
            hp["weight_decay"] >= 0.0, "weight_decay", f"Invalid weight_decay value: {hp['weight_decay']}"
        )
        check.require(
            not hp["nesterov"] or (hp["momentum"] > 0 and hp["dampening"] == 0),
            "nesterov",
            "Nesterov momentum requires a momentum and zero dampening",
        )

    def init_state(self, param: Array, hp: HP) -> State:
        state = {"step": new_step()}
        if hp["momentum"] != 0:
            state["momentum_buffer"] = np.zeros_like(param)
        return state

    def update(
        self, params: Sequence[Array], grads: Sequence[Array], states: Sequence[State], hp: HP
    ) -> None:
        lr, momentum, dampening, wd = hp["lr"], hp["momentum"], hp["dampening"], hp["weight_decay"]
        for param, grad, state in zip(params, grads, states, strict=True):
            state["step"] += 1
            d_p = -grad if hp["maximize"] else grad
            if wd != 0:
                d_p = d_p + wd * param
            if momentum != 0:
                buf = state.setdefault("momentum_buffer", np.zeros_like(param))
                if state["step"] == 1:
                    # torch creates the buffer as a copy of the first gradient
                    np.copyto(buf, d_p)
                else:
                    buf *= momentum
                    buf += (1 - dampening) * d_p
                d_p = d_p + momentum * buf if hp["nesterov"] else buf
            param -= lr * d_p
