"""SGD with momentum, dampening, Nesterov and weight decay (torch.optim.SGD)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from app.optim import fused
from app.optim.base import HP, LR, MAXIMIZE, Array, Optimizer, State, new_step, weight_decay
from app.optim.floats import fma
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
        check.non_negative(hp, "lr", "learning rate")
        check.non_negative(hp, "momentum", "momentum value")
        check.non_negative(hp, "weight_decay", "weight_decay value")
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
        """Per parameter: the fused kernel where `fused.usable`, else the numpy reference."""
        for param, grad, state in zip(params, grads, states, strict=True):
            buf = _momentum_buffer(param, state, hp)
            if fused.usable(param, grad, buf):
                self._fused(param, grad, state, hp, param, state)
            else:
                self._update_reference([param], [grad], [state], hp)

    def kernel_into(
        self, param: Array, grad: Array, state: State, hp: HP
    ) -> tuple[Array, State, bool] | None:
        buf = state.get("momentum_buffer") if hp["momentum"] != 0 else None
        if not fused.usable(param, grad, buf):
            return None
        new_state = {k: np.empty_like(v) for k, v in state.items()}
        if hp["momentum"] != 0 and buf is None:  # a state saved without momentum gains it
            state = {**state, "momentum_buffer": np.zeros_like(param)}
            new_state["momentum_buffer"] = np.empty_like(param)
        new_param = np.empty_like(param)
        finite = self._fused(param, grad, state, hp, new_param, new_state)
        return new_param, new_state, finite

    @staticmethod
    def _fused(param: Array, grad: Array, state: State, hp: HP, new_param: Array, new: State) -> bool:
        """One step through the kernel from `param`/`state` into `new_param`/`new` (the same, in place)."""
        new["step"][()] = state["step"] + 1
        return fused.sgd_(
            param,
            grad,
            state.get("momentum_buffer") if hp["momentum"] != 0 else None,
            lr=hp["lr"],
            momentum=hp["momentum"],
            dampening=hp["dampening"],
            weight_decay=hp["weight_decay"],
            nesterov=hp["nesterov"],
            maximize=hp["maximize"],
            first_step=bool(new["step"] == 1),
            out=(new_param, new.get("momentum_buffer") if hp["momentum"] != 0 else None),
        )

    def _update_reference(
        self, params: Sequence[Array], grads: Sequence[Array], states: Sequence[State], hp: HP
    ) -> None:
        """The definition: torch's single-tensor SGD in numpy, its fused adds (`alpha=`) rounded once."""
        lr, momentum, dampening, wd = hp["lr"], hp["momentum"], hp["dampening"], hp["weight_decay"]
        for param, grad, state in zip(params, grads, states, strict=True):
            state["step"] += 1
            d_p = -grad if hp["maximize"] else grad
            if wd != 0:
                d_p = fma(param, wd, d_p)  # grad.add(param, alpha=weight_decay)
            buf = _momentum_buffer(param, state, hp)
            if buf is not None:
                if state["step"] == 1:
                    # torch creates the buffer as a copy of the first gradient
                    np.copyto(buf, d_p)
                else:
                    # buf.mul_(momentum).add_(grad, alpha=1 - dampening)
                    buf *= momentum
                    fma(d_p, 1 - dampening, buf, out=buf)
                d_p = fma(buf, momentum, d_p) if hp["nesterov"] else buf  # grad.add(buf, alpha=momentum)
            fma(d_p, -lr, param, out=param)  # param.add_(grad, alpha=-lr)


def _momentum_buffer(param: Array, state: State, hp: HP) -> Array | None:
    """The momentum buffer when momentum is on, made on first need (a state saved without momentum may
    gain it), else None."""
    if hp["momentum"] == 0:
        return None
    if "momentum_buffer" not in state:
        state["momentum_buffer"] = np.zeros_like(param)
    return state["momentum_buffer"]
