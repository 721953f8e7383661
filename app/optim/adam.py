"""The Adam family (Adam, AdamW, NAdam, RAdam, Adamax), operation for operation as torch.optim's
single-tensor (CPU) code, so float rounding follows torch's."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import ClassVar

import numpy as np

from app.optim import fused
from app.optim.base import HP, LR, MAXIMIZE, Array, Optimizer, State, new_step, weight_decay
from app.optim.floats import addcdiv, addcmul, fma, lerp
from app.optim.hparams import Check, HParam

BETAS = HParam(
    "betas",
    "tuple",
    (0.9, 0.999),
    "coefficients of the running averages of the gradient and of its square (or infinity norm)",
    length=2,
)
EPS = HParam("eps", "float", 1e-8, "term added to the denominator for numerical stability")
AMSGRAD = HParam("amsgrad", "bool", False, "use AMSGrad: normalize by the running maximum of the 2nd moment")
DECOUPLED = HParam(
    "decoupled_weight_decay", "bool", False, "decay the parameters directly (AdamW) instead of the gradient"
)
MOMENTUM_DECAY = HParam("momentum_decay", "float", 4e-3, "momentum decay (psi) of NAdam's momentum schedule")
LR_2E3 = replace(LR, default=2e-3)


def _check_common(hp: HP, check: Check) -> None:
    """The checks every constructor of the family makes, in torch's order and words."""
    lr, eps, wd = hp["lr"], hp["eps"], hp["weight_decay"]
    beta1, beta2 = hp["betas"]
    check.require(lr >= 0.0, "lr", f"Invalid learning rate: {lr}")
    check.require(eps >= 0.0, "eps", f"Invalid epsilon value: {eps}")
    check.require(0.0 <= beta1 < 1.0, "betas", f"Invalid beta parameter at index 0: {beta1}")
    check.require(0.0 <= beta2 < 1.0, "betas", f"Invalid beta parameter at index 1: {beta2}")
    check.require(wd >= 0.0, "weight_decay", f"Invalid weight_decay value: {wd}")


def _moment_state(param: Array) -> State:
    return {"step": new_step(), "exp_avg": np.zeros_like(param), "exp_avg_sq": np.zeros_like(param)}


def _begin_step(param: Array, grad: Array, state: State, hp: HP, decoupled: bool) -> tuple[float, Array]:
    """Bumps `step` and returns it with the gradient torch steps on.

    The gradient is negated when maximizing and gets `weight_decay * param` added (coupled decay); decoupled
    decay shrinks the parameter instead. `grad` itself is never written: the result is `grad` or a new array.
    """
    state["step"] += 1
    g = -grad if hp["maximize"] else grad
    wd = hp["weight_decay"]
    if wd != 0:
        if decoupled:
            param *= 1 - hp["lr"] * wd
        else:
            g = fma(param, wd, g)  # grad.add(param, alpha=weight_decay)
    return float(state["step"]), g


def _bias_correction(beta: float, step: float) -> float:
    correction: float = 1 - beta**step  # float ** float is typed Any (a negative base gives a complex)
    return correction


def _adam_scalars(lr: float, beta1: float, beta2: float, step: float) -> tuple[float, float]:
    """Adam's step size and the square root of its second bias correction, in Python floats as torch's."""
    return lr / _bias_correction(beta1, step), _bias_correction(beta2, step) ** 0.5


def _update_moments(state: State, g: Array, beta1: float, beta2: float) -> None:
    """exp_avg.lerp_(g, 1 - beta1); exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)."""
    lerp(state["exp_avg"], g, 1 - beta1, out=state["exp_avg"])
    state["exp_avg_sq"] *= beta2
    addcmul(state["exp_avg_sq"], g, g, 1 - beta2, out=state["exp_avg_sq"])


class Adam(Optimizer):
    name = "adam"
    description = "Adam, optionally AMSGrad and decoupled (AdamW) weight decay (torch.optim.Adam)."
    hparams: ClassVar[tuple[HParam, ...]] = (LR, BETAS, EPS, weight_decay(), AMSGRAD, MAXIMIZE, DECOUPLED)

    def decoupled(self, hp: HP) -> bool:
        return bool(hp["decoupled_weight_decay"])

    def check(self, hp: HP, check: Check) -> None:
        _check_common(hp, check)

    def init_state(self, param: Array, hp: HP) -> State:
        state = _moment_state(param)
        if hp["amsgrad"]:
            state["max_exp_avg_sq"] = np.zeros_like(param)
        return state

    def update(
        self, params: Sequence[Array], grads: Sequence[Array], states: Sequence[State], hp: HP
    ) -> None:
        """Per parameter: the fused kernel where `fused.usable`, else the numpy reference."""
        for param, grad, state in zip(params, grads, states, strict=True):
            if self._fast(param, grad, state, hp):
                self._fused(param, grad, state, hp, param, state)
            else:
                self._update_reference([param], [grad], [state], hp)

    def kernel_into(
        self, param: Array, grad: Array, state: State, hp: HP
    ) -> tuple[Array, State, bool] | None:
        if not self._fast(param, grad, state, hp):
            return None
        new_param, new_state = np.empty_like(param), {k: np.empty_like(v) for k, v in state.items()}
        finite = self._fused(param, grad, state, hp, new_param, new_state)
        return new_param, new_state, finite

    @staticmethod
    def _fast(param: Array, grad: Array, state: State, hp: HP) -> bool:
        max_exp_avg_sq = state["max_exp_avg_sq"] if hp["amsgrad"] else None
        return fused.usable(param, grad, state["exp_avg"], state["exp_avg_sq"], max_exp_avg_sq)

    def _fused(self, param: Array, grad: Array, state: State, hp: HP, new_param: Array, new: State) -> bool:
        """One step through the kernel from `param`/`state` into `new_param`/`new` (the same, in place)."""
        beta1, beta2 = hp["betas"]
        new["step"][()] = state["step"] + 1
        step_size, bias_correction2_sqrt = _adam_scalars(hp["lr"], beta1, beta2, float(new["step"]))
        amsgrad = hp["amsgrad"]
        return fused.adam_(
            param,
            grad,
            state["exp_avg"],
            state["exp_avg_sq"],
            state["max_exp_avg_sq"] if amsgrad else None,
            lr=hp["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=hp["eps"],
            weight_decay=hp["weight_decay"],
            decoupled=self.decoupled(hp),
            maximize=hp["maximize"],
            step_size=step_size,
            bias_correction2_sqrt=bias_correction2_sqrt,
            out=(new_param, new["exp_avg"], new["exp_avg_sq"], new["max_exp_avg_sq"] if amsgrad else None),
        )

    def _update_reference(
        self, params: Sequence[Array], grads: Sequence[Array], states: Sequence[State], hp: HP
    ) -> None:
        """The definition: torch's single-tensor Adam in numpy, one operation at a time."""
        lr, eps = hp["lr"], hp["eps"]
        beta1, beta2 = hp["betas"]
        decoupled = self.decoupled(hp)
        for param, grad, state in zip(params, grads, states, strict=True):
            step, g = _begin_step(param, grad, state, hp, decoupled)
            _update_moments(state, g, beta1, beta2)
            step_size, bias_correction2_sqrt = _adam_scalars(lr, beta1, beta2, step)
            second = state["exp_avg_sq"]
            if hp["amsgrad"]:
                second = np.maximum(state["max_exp_avg_sq"], second, out=state["max_exp_avg_sq"])
            denom = np.sqrt(second)
            denom /= bias_correction2_sqrt
            denom += eps
            addcdiv(param, state["exp_avg"], denom, -step_size, out=param)


class AdamW(Adam):
    name = "adamw"
    description = "Adam with decoupled weight decay (torch.optim.AdamW)."
    hparams = (LR, BETAS, EPS, weight_decay(1e-2), AMSGRAD, MAXIMIZE)

    def decoupled(self, hp: HP) -> bool:
        return True


class NAdam(Optimizer):
    name = "nadam"
    description = "Adam with Nesterov momentum and a momentum-decay schedule (torch.optim.NAdam)."
    hparams = (LR_2E3, BETAS, EPS, weight_decay(), MOMENTUM_DECAY, DECOUPLED, MAXIMIZE)

    def check(self, hp: HP, check: Check) -> None:
        _check_common(hp, check)
        md = hp["momentum_decay"]
        check.require(md >= 0.0, "momentum_decay", f"Invalid momentum_decay value: {md}")

    def init_state(self, param: Array, hp: HP) -> State:
        state = _moment_state(param)
        # torch keeps mu_product in its default scalar dtype (float32) and rounds every product to it
        state["mu_product"] = np.ones((), dtype=np.float32)
        return state

    def update(
        self, params: Sequence[Array], grads: Sequence[Array], states: Sequence[State], hp: HP
    ) -> None:
        lr, eps, momentum_decay = hp["lr"], hp["eps"], hp["momentum_decay"]
        beta1, beta2 = hp["betas"]
        for param, grad, state in zip(params, grads, states, strict=True):
            step, g = _begin_step(param, grad, state, hp, hp["decoupled_weight_decay"])
            mu = beta1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))
            mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * momentum_decay)))
            state["mu_product"] *= mu
            mu_product = float(state["mu_product"])
            mu_product_next = mu_product * mu_next
            _update_moments(state, g, beta1, beta2)
            denom = np.sqrt(state["exp_avg_sq"] / _bias_correction(beta2, step))
            denom += eps
            addcdiv(param, g, denom, -lr * (1.0 - mu) / (1.0 - mu_product), out=param)
            addcdiv(param, state["exp_avg"], denom, (-lr * mu_next) / (1.0 - mu_product_next), out=param)


class RAdam(Optimizer):
    name = "radam"
    description = "Adam with the variance of the adaptive rate rectified (torch.optim.RAdam)."
    hparams = (LR, BETAS, EPS, weight_decay(), DECOUPLED, MAXIMIZE)

    def check(self, hp: HP, check: Check) -> None:
        _check_common(hp, check)

    def init_state(self, param: Array, hp: HP) -> State:
        return _moment_state(param)

    def update(
        self, params: Sequence[Array], grads: Sequence[Array], states: Sequence[State], hp: HP
    ) -> None:
        lr, eps = hp["lr"], hp["eps"]
        beta1, beta2 = hp["betas"]
        rho_inf = 2 / (1 - beta2) - 1
        for param, grad, state in zip(params, grads, states, strict=True):
            step, g = _begin_step(param, grad, state, hp, hp["decoupled_weight_decay"])
            _update_moments(state, g, beta1, beta2)
            bias_correction2 = _bias_correction(beta2, step)
            # bias_corrected_exp_avg * lr [* adaptive_lr * rect], multiplied left to right as torch does
            update = np.divide(state["exp_avg"], _bias_correction(beta1, step))
            update *= lr
            rho_t = rho_inf - 2 * step * (beta2**step) / bias_correction2
            if rho_t > 5.0:
                exp_avg_sq_sqrt = np.sqrt(state["exp_avg_sq"])
                exp_avg_sq_sqrt += eps
                # torch evaluates `float / tensor` as tensor.reciprocal() * float
                adaptive_lr = np.reciprocal(exp_avg_sq_sqrt)
                adaptive_lr *= bias_correction2**0.5
                update *= adaptive_lr
                update *= (
                    (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
                ) ** 0.5
            param -= update  # param.add_(update, alpha=-1.0): one rounding either way


class Adamax(Optimizer):
    name = "adamax"
    description = "Adam with the infinity norm in place of the second moment (torch.optim.Adamax)."
    hparams = (LR_2E3, BETAS, EPS, weight_decay(), MAXIMIZE)

    def check(self, hp: HP, check: Check) -> None:
        _check_common(hp, check)

    def init_state(self, param: Array, hp: HP) -> State:
        return {"step": new_step(), "exp_avg": np.zeros_like(param), "exp_inf": np.zeros_like(param)}

    def update(
        self, params: Sequence[Array], grads: Sequence[Array], states: Sequence[State], hp: HP
    ) -> None:
        lr, eps = hp["lr"], hp["eps"]
        beta1, beta2 = hp["betas"]
        for param, grad, state in zip(params, grads, states, strict=True):
            step, g = _begin_step(param, grad, state, hp, False)
            lerp(state["exp_avg"], g, 1 - beta1, out=state["exp_avg"])
            exp_inf = state["exp_inf"]
            exp_inf *= beta2
            norm = np.abs(g)
            norm += eps
            np.maximum(exp_inf, norm, out=exp_inf)
            clr = lr / _bias_correction(beta1, step)
            addcdiv(param, state["exp_avg"], exp_inf, -clr, out=param)
