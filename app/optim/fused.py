"""Single-pass numba kernels for Adam/AdamW and SGD, rounding as torch's CPU kernels do (FMA included):
the fast path, tested against the numpy references in `adam.py` and `sgd.py`, which stay the definition."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any, cast

import numpy as np

from app.optim.base import Array

try:
    from numba import njit, types
    from numba.extending import intrinsic
except ImportError:  # numba is optional: without it every optimizer runs its numpy reference
    HAVE_NUMBA = False
else:
    HAVE_NUMBA = True

DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
Scalar = Any  # in the kernels: an np.float32 or np.float64, the arrays' own dtype (numba reads no hints)


def enabled_by(value: str | None) -> bool:
    """Whether an `OPTSERVE_FUSED` value leaves the fast path on (unset, or anything but 0/false/off)."""
    return (value or "1").strip().lower() not in {"0", "false", "off"}


# read once: the dispatch runs for every parameter of every step, and an environment lookup costs more
# than a small parameter's whole update
ENABLED = enabled_by(os.environ.get("OPTSERVE_FUSED"))


def available() -> bool:
    """numba is importable and the fast path was not switched off with `OPTSERVE_FUSED=0` at start."""
    return HAVE_NUMBA and ENABLED


def usable(param: Array, grad: Array, *state: Array | None) -> bool:
    """Whether the kernels can take this parameter: `available()`, and every array (None slots skipped) is
    C-contiguous, aligned, float32/float64 of the parameter's dtype and shape, all but `grad` writeable."""
    if not ENABLED or not HAVE_NUMBA or param.dtype not in DTYPES:
        return False
    dtype, shape = param.dtype, param.shape
    for a in (param, grad, *state):  # a loop, not all() over a generator: this runs on every step
        if a is None:
            continue
        if a.dtype != dtype or a.shape != shape:
            return False
        flags = a.flags
        if not (flags.c_contiguous and flags.aligned and (flags.writeable or a is grad)):
            return False
    return True


def _flat(a: Array) -> Array:
    return a if a.ndim == 1 else a.reshape(-1)  # a view: every array here is C-contiguous


# float32's largest value and 2**128, halfway between: from here on a float64 rounds to inf (the tie to
# the even 2**128)
_F32_OVERFLOW = 2.0**128 * (1 - 2.0**-25)


def _to_float32(value: float) -> np.float32:
    """float32(value), beyond float32's range inf as the cast gives it, without numpy's warning: the
    kernels report the non-finite result, and the session's `nonfinite` option decides."""
    if abs(value) >= _F32_OVERFLOW:
        return np.float32(math.copysign(math.inf, value))
    return np.float32(value)


_SCALAR: dict[np.dtype[Any], Callable[[float], Any]] = {
    np.dtype(np.float32): _to_float32,
    np.dtype(np.float64): np.float64,
}


def _optional(a: Array | None, dtype: np.dtype[Any]) -> Array:
    return _EMPTY[dtype] if a is None else _flat(a)


def _flat_read_only(a: Array) -> Array:
    # numba specializes on writeability; a read-only view keeps one signature per dtype and the promise
    view = a.reshape(-1)
    view.flags.writeable = False
    return view


_EMPTY = {dtype: np.empty(0, dtype) for dtype in DTYPES}  # stands in for a slot the options leave unused


def adam_(
    param: Array,
    grad: Array,
    exp_avg: Array,
    exp_avg_sq: Array,
    max_exp_avg_sq: Array | None,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    maximize: bool,
    step_size: float,
    bias_correction2_sqrt: float,
    out: tuple[Array, Array, Array, Array | None] | None = None,
) -> bool:
    """One Adam/AdamW step of one parameter, `step` already bumped; AMSGrad when `max_exp_avg_sq`.

    In place, or into `out` = (param, exp_avg, exp_avg_sq, max_exp_avg_sq) of the same shapes, leaving the
    inputs as they were; True when every value written is finite. Scalars are rounded to the array dtype
    where torch rounds them (its CPU kernels take scalar operands in the tensor's dtype), so the loop does
    float32 arithmetic on float32 arrays. Into separate arrays LLVM vectorizes the loop; in place its
    aliasing check keeps it scalar, which is why the service steps into fresh arrays.
    """
    dtype = param.dtype
    t = _SCALAR[dtype]
    key = (dtype, beta1, beta2, eps, weight_decay, bool(decoupled), bool(maximize))
    constants = _ADAM_CONSTANTS.get(key)
    if constants is None:
        constants = _adam_constants(key)
    decay_factor = t(1 - lr * weight_decay) if weight_decay != 0 and decoupled else constants[4]
    param_out, exp_avg_out, exp_avg_sq_out, max_out = (
        (param, exp_avg, exp_avg_sq, max_exp_avg_sq) if out is None else out
    )
    return bool(
        _adam_kernel(
            _flat(param),
            _flat_read_only(grad),
            _flat(exp_avg),
            _flat(exp_avg_sq),
            _optional(max_exp_avg_sq, dtype),
            _flat(param_out),
            _flat(exp_avg_out),
            _flat(exp_avg_sq_out),
            _optional(max_out, dtype),
            *constants[:4],
            decay_factor,
            max_exp_avg_sq is not None,
            *constants[5:10],
            t(bias_correction2_sqrt),
            constants[10],
            t(-step_size),
        )
    )


# Adam's scalar operands that depend on the hyperparameters alone, rounded once per set of them rather than
# at every step (nine roundings cost a small step about 3 us); a bounded cache, emptied when full.
_ADAM_CONSTANTS: dict[tuple[Any, ...], tuple[Any, ...]] = {}
_MAX_CONSTANTS = 1024


def _adam_constants(key: tuple[Any, ...]) -> tuple[Any, ...]:
    """The kernel's operands from `maximize` to `one_m_beta2`, and `eps` last (index 4, the decay factor,
    is the one without decoupled weight decay: it depends on the lr when there is one), for `key` =
    (dtype, beta1, beta2, eps, weight_decay, decoupled, maximize)."""
    dtype, beta1, beta2, eps, weight_decay, decoupled, maximize = key
    t = _SCALAR[dtype]
    lerp_weight = t(1 - beta1)
    constants = (
        maximize,
        weight_decay != 0 and not decoupled,
        weight_decay != 0 and decoupled,
        t(weight_decay),
        t(1),  # 1 - lr * 0
        bool(abs(lerp_weight) < 0.5),
        lerp_weight,
        lerp_weight - t(1),  # exact: used only when the weight is at least 0.5
        t(beta2),
        t(1 - beta2),
        t(eps),
    )
    if len(_ADAM_CONSTANTS) >= _MAX_CONSTANTS:
        _ADAM_CONSTANTS.clear()
    _ADAM_CONSTANTS[key] = constants
    return constants


def sgd_(
    param: Array,
    grad: Array,
    momentum_buffer: Array | None,
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    first_step: bool,
    out: tuple[Array, Array | None] | None = None,
) -> bool:
    """One SGD step of one parameter, in place or into `out` = (param, momentum_buffer); the buffer is
    required when `momentum != 0` and is set to the gradient on the first step, as torch creates it.
    True when every value written is finite."""
    t = _SCALAR[param.dtype]
    has_momentum = momentum != 0
    if has_momentum and momentum_buffer is None:
        raise ValueError("SGD with momentum needs a momentum buffer")
    param_out, buffer_out = (param, momentum_buffer) if out is None else out
    return bool(
        _sgd_kernel(
            _flat(param),
            _flat_read_only(grad),
            _optional(momentum_buffer, param.dtype),
            _flat(param_out),
            _optional(buffer_out, param.dtype),
            bool(maximize),
            weight_decay != 0,
            t(weight_decay),
            has_momentum,
            bool(first_step),
            t(momentum),
            t(1 - dampening),
            bool(nesterov),
            t(-lr),
        )
    )


def warm_up() -> None:
    """Compiles (or loads from numba's on-disk cache) every kernel signature, so no request pays for it."""
    if not HAVE_NUMBA:
        return
    for dtype in DTYPES:
        a, b, c, d, e = (np.ones(2, dtype) for _ in range(5))
        adam_(
            a,
            b,
            c,
            d,
            e,
            lr=1e-3,
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
            weight_decay=0.0,
            decoupled=False,
            maximize=False,
            step_size=1e-2,
            bias_correction2_sqrt=0.03,
        )
        sgd_(
            a,
            b,
            c,
            lr=0.1,
            momentum=0.9,
            dampening=0.0,
            weight_decay=0.0,
            nesterov=False,
            maximize=False,
            first_step=True,
        )


# The kernels: one pass over the elements per parameter, each element through exactly torch's operations.
# Option flags are plain arguments: LLVM unswitches the loop on them (one vectorized loop per combination
# that runs), which keeps one compiled signature per dtype. error_model="numpy" lets x/0 give inf as torch
# does, instead of the check-and-raise that would also stop vectorization.
if HAVE_NUMBA:

    def _fma_typing(typingctx: Any, a: Any, b: Any, c: Any) -> Any:
        if not (a == b == c and isinstance(a, types.Float)):
            return None

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            return builder.fma(*args)

        return a(a, b, c), codegen

    # a * b + c rounded once (llvm.fma): torch's CPU add(alpha), lerp and addcmul kernels compile to FMAs
    _fma = cast("Callable[[Any, Any, Any], Any]", intrinsic(_fma_typing))

    _JIT: dict[str, Any] = {"cache": True, "nogil": True, "fastmath": False, "error_model": "numpy"}

    @njit(**_JIT)  # type: ignore[untyped-decorator]
    def _adam_kernel(
        param: Array,
        grad: Array,
        exp_avg: Array,
        exp_avg_sq: Array,
        max_exp_avg_sq: Array,
        param_out: Array,
        exp_avg_out: Array,
        exp_avg_sq_out: Array,
        max_out: Array,
        maximize: bool,
        coupled_decay: bool,
        decoupled_decay: bool,
        weight_decay: Scalar,
        decay_factor: Scalar,
        amsgrad: bool,
        small_weight: bool,
        lerp_weight: Scalar,
        lerp_weight_m1: Scalar,
        beta2: Scalar,
        one_m_beta2: Scalar,
        bias_correction2_sqrt: Scalar,
        eps: Scalar,
        neg_step_size: Scalar,
    ) -> bool:
        finite = True
        for i in range(param.shape[0]):
            p = param[i]
            g = -grad[i] if maximize else grad[i]
            if coupled_decay:
                g = _fma(weight_decay, p, g)  # grad.add(param, alpha=weight_decay)
            if decoupled_decay:
                p = p * decay_factor  # param.mul_(1 - lr * weight_decay)
            # exp_avg.lerp_(grad, 1 - beta1): torch's two formulas, switched on the weight
            m = exp_avg[i]
            m = _fma(lerp_weight, g - m, m) if small_weight else _fma(lerp_weight_m1, g - m, g)
            exp_avg_out[i] = m
            # exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            v = _fma(one_m_beta2 * g, g, exp_avg_sq[i] * beta2)
            exp_avg_sq_out[i] = v
            if amsgrad:
                # torch.maximum, NaN propagating
                v_max = max_exp_avg_sq[i]
                if v > v_max or v != v:
                    v_max = v
                max_out[i] = v_max
                v = v_max
            # param.addcdiv_(exp_avg, (v.sqrt() / bias_correction2_sqrt).add_(eps), value=-step_size)
            # The one operation we cannot round as torch does: its CPU sqrt (MKL VML) is off by an ulp on
            # ~1% of elements, while this one is correctly rounded (as numpy's in the reference).
            new = p + (neg_step_size * m) / (np.sqrt(v) / bias_correction2_sqrt + eps)
            param_out[i] = new
            # x - x is 0 for a finite x and NaN otherwise; AMSGrad's maximum of finite values is finite
            finite &= (new - new == 0) & (m - m == 0) & (exp_avg_sq_out[i] - exp_avg_sq_out[i] == 0)
        return finite

    @njit(**_JIT)  # type: ignore[untyped-decorator]
    def _sgd_kernel(
        param: Array,
        grad: Array,
        momentum_buffer: Array,
        param_out: Array,
        buffer_out: Array,
        maximize: bool,
        decay: bool,
        weight_decay: Scalar,
        has_momentum: bool,
        first_step: bool,
        momentum: Scalar,
        one_m_dampening: Scalar,
        nesterov: bool,
        neg_lr: Scalar,
    ) -> bool:
        finite = True
        for i in range(param.shape[0]):
            g = -grad[i] if maximize else grad[i]
            if decay:
                g = _fma(weight_decay, param[i], g)  # grad.add(param, alpha=weight_decay)
            if has_momentum:
                # step 1 clones the gradient; later ones buf.mul_(momentum).add_(grad, alpha=1 - dampening)
                b = g if first_step else _fma(one_m_dampening, g, momentum_buffer[i] * momentum)
                buffer_out[i] = b
                finite &= b - b == 0
                g = _fma(momentum, b, g) if nesterov else b  # grad.add(buf, alpha=momentum)
            new = _fma(neg_lr, g, param[i])  # param.add_(grad, alpha=-lr)
            param_out[i] = new
            finite &= new - new == 0
        return finite
