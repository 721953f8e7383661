"""Muon: momentum orthogonalized by a bfloat16 Newton-Schulz iteration, 2-D only (torch.optim.Muon)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from app.optim.base import HP, LR, Array, Optimizer, State, weight_decay
from app.optim.floats import fma, lerp, sequential_sum, vector_norm
from app.optim.hparams import Check, HParam

# torch.optim._muon's defaults (Keller Jordan's constants)
DEFAULT_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
EPS = 1e-7
DEFAULT_NS_STEPS = 5

# ATen hands a bfloat16 GEMM to oneDNN only above this m*n*k (aten/src/ATen/native/mkldnn/Matmul.cpp);
# at or below it, its own scalar kernel runs, whose summation order we reproduce exactly.
_ONEDNN_MIN_MNK = 16 * 16 * 16
_BF16_CHUNK = 16


def _round_bf16(x: Any) -> Array:
    """float32 values rounded to the nearest bfloat16 (ties to even), kept as float32 as torch widens them."""
    # keeps the memory layout: a transposed view must stay one, as it picks torch's GEMM kernel
    bits = np.asarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) & np.uint32(0xFFFF0000)
    return rounded.view(np.float32)


def _bf16_norm(x: Array) -> Array:
    """`tensor.norm()` of a contiguous bfloat16 tensor: float32 sums (of exact squares), bf16 result."""
    return _round_bf16(vector_norm(x.reshape(-1), _BF16_CHUNK))


def _fold_lanes(v: Array) -> Array:
    """AVX2 `vec_reduce_all` over 8 float lanes on axis 0: ((v0+v4) + (v2+v6)) + ((v1+v5) + (v3+v7))."""
    halves = v[:4] + v[4:]
    quarters = halves[:2] + halves[2:]
    out: Array = quarters[0] + quarters[1]
    return out


def _ilp_dot(products: Array) -> Array:
    """ATen's scalar GEMM dot (cpublas `sum`): four interleaved float32 partial sums over axis 1.

    Term l goes to partial sum l % 4, the k % 4 leftover terms to the first, and the four are folded
    left to right.
    """
    m, k, n = products.shape
    main = k - k % 4
    partial = np.zeros((4, m, n), dtype=np.float32)
    if main:
        partial[...] = np.cumsum(products[:, :main].reshape(m, main // 4, 4, n), axis=1)[:, -1].transpose(
            1, 0, 2
        )
    partial[0] = sequential_sum(partial[0], products[:, main:].transpose(1, 0, 2))
    out: Array = partial[0] + partial[1] + partial[2] + partial[3]
    return out


def _vector_dot(products: Array) -> Array:
    """ATen's `bf16_dot_with_fp32_arith` over axis 1, at AVX2 width.

    Blocks of 64 feed eight registers of eight lanes, which are folded pairwise (4, 2, 1) and then
    across lanes; blocks of 16 feed one more register, folded the same way and added; the rest is
    added one by one.
    """
    m, k, n = products.shape
    main = k - k % 64
    registers = np.zeros((8, 8, m, n), dtype=np.float32)
    if main:
        blocks = products[:, :main].reshape(m, main // 64, 8, 8, n)
        registers = np.cumsum(blocks, axis=1)[:, -1].transpose(1, 2, 0, 3)
    for offset in (4, 2, 1):
        registers[:offset] = registers[:offset] + registers[offset : 2 * offset]
    total = _fold_lanes(registers[0])
    vectorized = k - k % 16
    tail = np.zeros((8, m, n), dtype=np.float32)
    if vectorized > main:
        chunks = products[:, main:vectorized].reshape(m, -1, 8, n)
        tail = np.cumsum(chunks, axis=1)[:, -1].transpose(1, 0, 2)
    total = total + _fold_lanes(tail)
    return sequential_sum(total, products[:, vectorized:].transpose(1, 0, 2))


def _elements(x: Array) -> tuple[int, int]:
    rows, cols = x.strides
    return rows // x.itemsize, cols // x.itemsize


def _blas_transposes(mat1: Array, mat2: Array) -> tuple[bool, bool]:
    """ATen's `addmm_impl_cpu_` layout logic for a fresh row-major result: BLAS's (transa, transb).

    The result goes to column-major BLAS as its transpose, so mat2 plays BLAS's `a` and mat1 its `b`,
    unless the result is a single column. Each operand is transposed for BLAS when its memory runs the
    other way.
    """
    rows, cols = mat1.shape[0], mat2.shape[1]
    swapped = cols != 1  # a contiguous result reads as column-major only when it is a single column
    a, b = (mat2, mat1) if swapped else (mat1, mat2)
    m, n = (cols, rows) if swapped else (rows, cols)
    k = a.shape[0] if swapped else a.shape[1]
    inner, outer = (1, 0) if swapped else (0, 1)  # which stride must be 1 for BLAS's no-transpose
    transposes = []
    for operand, plain_ld, transposed_ld in ((a, m, k), (b, k, n)):
        strides = _elements(operand)
        if strides[inner] == 1 and strides[outer] >= max(1, plain_ld):
            transposes.append(False)
        elif strides[outer] == 1 and strides[inner] >= max(1, transposed_ld):
            transposes.append(True)
        else:  # torch clones it contiguous
            transposes.append(not swapped)
    return transposes[0], transposes[1]


def _addmm_bf16(c: Array | None, mat1: Array, mat2: Array, beta: float, alpha: float) -> Array:
    """torch.addmm(c, mat1, mat2, beta=beta, alpha=alpha) (torch.mm when c is None) on bfloat16 CPU tensors.

    ATen's scalar kernel runs up to oneDNN's threshold, and which of its loops runs depends on the
    operands' memory layout (a transposed view in Newton-Schulz changes it). Products of bfloat16 values
    are exact in float32, so only the order of the float32 additions and the final fused
    `beta*c + alpha*dot` need reproducing. Above the threshold torch calls oneDNN, whose blocking
    depends on the CPU; a float32 numpy matmul keeps its float32 accumulation but not its order.
    """
    rows, k = mat1.shape
    if rows * k * mat2.shape[1] > _ONEDNN_MIN_MNK:
        dot: Array = mat1 @ mat2
    else:
        transa, transb = _blas_transposes(mat1, mat2)
        products = mat1[:, :, None] * mat2[None, :, :]
        if transb and not transa:
            # this loop accumulates in order into a float32 copy of beta*c; alpha is 1 wherever
            # Newton-Schulz reaches it, which keeps every product exact
            start = np.zeros_like(products[:, 0]) if c is None or beta == 0 else c * np.float32(beta)
            return _round_bf16(sequential_sum(start, (products * np.float32(alpha)).transpose(1, 0, 2)))
        dot = _vector_dot(products) if transa and not transb else _ilp_dot(products)
    if alpha != 1:
        dot = dot * np.float32(alpha)
    if c is None or beta == 0:
        return _round_bf16(dot)
    return _round_bf16(fma(c, beta, dot))


def zeropower_via_newtonschulz(
    grad: Array, ns_coefficients: tuple[float, float, float], ns_steps: int, eps: float
) -> Array:
    """torch's `_zeropower_via_newtonschulz`, which runs in bfloat16 whatever the parameter dtype.

    Returns the bfloat16 result widened to float32. float64 converts to bfloat16 through float32 (two
    roundings), as torch's conversion does.
    """
    a, b, c = ns_coefficients
    ortho = _round_bf16(grad.astype(np.float32))
    norm = _bf16_norm(ortho)  # in memory order: torch reduces the transposed view in memory order too
    transposed = grad.shape[0] > grad.shape[1]
    if transposed:
        ortho = ortho.T
    ortho = _round_bf16(ortho / np.maximum(norm, _round_bf16(eps)))
    for _ in range(ns_steps):
        gram = _addmm_bf16(None, ortho, ortho.T, 0.0, 1.0)
        gram_update = _addmm_bf16(gram, gram, gram, b, c)
        ortho = _addmm_bf16(ortho, gram_update, ortho, a, 1.0)
    return ortho.T if transposed else ortho


def adjust_lr(lr: float, adjust_lr_fn: str | None, shape: tuple[int, ...]) -> float:
    """torch's `_adjust_lr`: scales the step so rectangular matrices get a comparable update RMS."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        ratio = math.sqrt(max(1, rows / cols))
    elif adjust_lr_fn == "match_rms_adamw":
        ratio = 0.2 * math.sqrt(max(rows, cols))
    else:
        ratio = 1.0
    return lr * ratio


class Muon(Optimizer):
    name = "muon"
    description = (
        "Momentum orthogonalized by a bfloat16 Newton-Schulz iteration, for 2-D parameters only "
        "(torch.optim.Muon)."
    )
    hparams = (
        LR,
        weight_decay(0.1),
        HParam("momentum", "float", 0.95, "momentum factor"),
        HParam("nesterov", "bool", True, "enables Nesterov momentum"),
        HParam(
            "ns_coefficients",
            "tuple",
            DEFAULT_COEFFICIENTS,
            "coefficients (a, b, c) of the quintic Newton-Schulz polynomial",
            length=3,
        ),
        HParam("eps", "float", EPS, "lower bound of the norm the update is divided by before Newton-Schulz"),
        HParam("ns_steps", "int", DEFAULT_NS_STEPS, "number of Newton-Schulz iteration steps"),
        HParam(
            "adjust_lr_fn",
            "str",
            None,
            "learning-rate scaling by shape: 'original' (Keller Jordan) or 'match_rms_adamw' (Moonshot); "
            "null means 'original'",
            nullable=True,
            choices=("original", "match_rms_adamw"),
        ),
    )

    def check(self, hp: HP, check: Check) -> None:
        check.require(hp["lr"] >= 0.0, "lr", f"Learning rate should be >= 0 but is: {hp['lr']}")
        check.require(hp["momentum"] >= 0.0, "momentum", f"momentum should be >= 0 but is: {hp['momentum']}")
        check.require(
            hp["weight_decay"] >= 0.0,
            "weight_decay",
            f"weight decay should be >= 0 but is: {hp['weight_decay']}",
        )
        check.require(
            hp["adjust_lr_fn"] in (None, "original", "match_rms_adamw"),
            "adjust_lr_fn",
            f"Adjust learning rate function {hp['adjust_lr_fn']} is not supported",
        )
        # torch raises this only at the first step; rejecting the spec up front is kinder
        check.require(
            hp["ns_steps"] < 100,
            "ns_steps",
            "Number of steps must be less than 100 for computational efficiency",
        )

    def check_param(self, name: str, shape: tuple[int, ...]) -> str | None:
        if len(shape) == 2:
            return None
        return (
            f"Muon only supports 2D parameters whereas we found a parameter with size: "
            f"torch.Size({list(shape)}) (parameter {name!r})"
        )

    def init_state(self, param: Array, hp: HP) -> State:
        return {"momentum_buffer": np.zeros_like(param)}

    def update(
        self, params: Sequence[Array], grads: Sequence[Array], states: Sequence[State], hp: HP
    ) -> None:
        lr, wd, momentum = hp["lr"], hp["weight_decay"], hp["momentum"]
        for param, grad, state in zip(params, grads, states, strict=True):
            buf = state["momentum_buffer"]
            lerp(buf, grad, 1 - momentum, out=buf)
            update = lerp(grad, buf, momentum) if hp["nesterov"] else buf
            ortho = zeropower_via_newtonschulz(update, hp["ns_coefficients"], hp["ns_steps"], hp["eps"])
            adjusted_lr = adjust_lr(lr, hp["adjust_lr_fn"], param.shape)
            param *= 1 - lr * wd
            fma(ortho, -adjusted_lr, param, out=param)
