"""The fused kernels against the numpy reference and torch, every Adam/AdamW/SGD option, and the dispatch."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from app.optim import fused
from app.optim.base import State
from app.optim.hparams import parse
from app.optim.registry import get_optimizer
from tests.optim.oracle import TOL, assert_matches_torch, gradient, initial_params
from tests.optim.test_adam import ADAM_GRID

needs_numba = pytest.mark.skipif(not fused.HAVE_NUMBA, reason="numba is not installed")

DTYPES = [np.float64, np.float32]
# "big" has enough elements for the kernels' vectorized loop body as well as its scalar tail; the oracle's
# torch side cannot take a 0-d parameter, so "s" is compared with the reference only
TORCH_SHAPES: dict[str, tuple[int, ...]] = {"w": (5, 4), "b": (4,), "big": (37, 29)}
SHAPES = {**TORCH_SHAPES, "s": ()}
STEPS = 200

ADAM_CASES = [
    *({"name": "adam", **options} for options in ADAM_GRID),
    # beta1 = 0.3 puts lerp's weight 0.7 on torch's other formula
    {"name": "adam", "lr": 0.01, "betas": [0.3, 0.9], "eps": 1e-3},
    {"name": "adam", "lr": 0.01, "betas": [0.3, 0.9], "eps": 1e-3, "amsgrad": True, "weight_decay": 0.1},
    *(
        {"name": "adamw", "lr": 0.05, "amsgrad": a, "maximize": m, "weight_decay": wd}
        for a, m, wd in itertools.product([False, True], [False, True], [0.0, 0.3])
    ),
]
SGD_CASES = [
    {
        "name": "sgd",
        "lr": 0.05,
        "momentum": mom,
        "dampening": damp,
        "nesterov": nest,
        "weight_decay": wd,
        "maximize": m,
    }
    for mom, damp, nest, wd, m in itertools.product(
        [0.0, 0.9], [0.0, 0.3], [False, True], [0.0, 0.1], [False, True]
    )
    if not nest or (mom > 0 and damp == 0)  # torch's rule for Nesterov
]
CASES = ADAM_CASES + SGD_CASES
TORCH = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
KERNEL = {"adam": "adam_", "adamw": "adam_", "sgd": "sgd_"}


def case_id(spec: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in spec.items())


@pytest.fixture
def fused_calls(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """The fast path on, and a count of the calls into the fused kernels: which path ran."""
    monkeypatch.setattr(fused, "ENABLED", True)
    calls: Counter[str] = Counter()

    def spy(name: str) -> Any:
        kernel = getattr(fused, name)

        def counted(*args: Any, **kwargs: Any) -> None:
            calls[name] += 1
            kernel(*args, **kwargs)

        return counted

    for name in ("adam_", "sgd_"):
        monkeypatch.setattr(fused, name, spy(name))
    return calls


def _grad(t: int, name: str, param: np.ndarray) -> np.ndarray:
    return np.asarray(gradient(t, name, param, 0), dtype=param.dtype)  # the oracle's, as an array when 0-d


def run(
    spec: dict[str, Any],
    params: dict[str, np.ndarray],
    grads: list[dict[str, np.ndarray]],
    *,
    reference: bool = False,
) -> tuple[list[dict[str, np.ndarray]], dict[str, State]]:
    """Every step's parameters and the final states, through `update` (the dispatch) or the reference.

    `params` are updated in place (their layout is what some tests are about)."""
    opt = get_optimizer(spec["name"])
    hp = parse(opt.hparams, spec, "optimizer")
    states = {k: opt.init_state(v, hp) for k, v in params.items()}
    update = opt._update_reference if reference else opt.update  # type: ignore[attr-defined]
    history = []
    for g in grads:
        update(list(params.values()), [g[k] for k in params], list(states.values()), hp)
        history.append({k: v.copy() for k, v in params.items()})
    return history, states


def _copy(states: dict[str, State]) -> dict[str, State]:
    return {k: {slot: v.copy() for slot, v in state.items()} for k, state in states.items()}


def each_case(test: Callable[..., None]) -> Callable[..., None]:
    """Every case in both dtypes, where numba is installed."""
    by_case = pytest.mark.parametrize("spec", CASES, ids=case_id)(test)
    by_dtype: Callable[..., None] = pytest.mark.parametrize("dtype", DTYPES)(by_case)
    return needs_numba(by_dtype)


@each_case
def test_fused_matches_the_reference_step_by_step_for_200_steps(
    spec: dict[str, Any], dtype: type, fused_calls: Counter[str]
) -> None:
    """Each step both paths start from the reference's state; in float32 they agree bit for bit.

    float32 is exact on every host: the kernels' multiply-adds are `llvm.fma` (one rounding, whether the CPU
    has an FMA instruction or numba falls back to libm's fma), the reference's are a float64 product and
    sum rounded once to float32, and LLVM may not reorder or contract anything else (fastmath off). The
    `default` run of `tests.optim.levels` repeats this with numba compiling for a generic x86-64 and
    numpy's AVX loops off. float64 parts by under 0.06 of the contract's tolerance: there the reference
    rounds torch's multiply-adds twice (numpy has no float64 FMA) where the kernels fuse them.
    """
    opt = get_optimizer(spec["name"])
    hp = parse(opt.hparams, spec, "optimizer")
    params = initial_params(SHAPES, dtype)
    states = {k: opt.init_state(v, hp) for k, v in params.items()}

    def same(ours: np.ndarray, reference: np.ndarray, where: str) -> None:
        if dtype == np.float32:
            np.testing.assert_array_equal(ours, reference, err_msg=where)
        else:
            np.testing.assert_allclose(ours, reference, **TOL[dtype], err_msg=where)

    for t in range(STEPS):
        grads = [_grad(t, k, v) for k, v in params.items()]
        ours, our_states = {k: v.copy() for k, v in params.items()}, _copy(states)
        opt.update(list(ours.values()), grads, list(our_states.values()), hp)
        opt._update_reference(list(params.values()), grads, list(states.values()), hp)  # type: ignore[attr-defined]
        for name in SHAPES:
            assert ours[name].dtype == dtype
            where = f"{spec} {name!r} at step {t + 1}"
            same(ours[name], params[name], where)
            assert our_states[name].keys() == states[name].keys()
            for slot, value in our_states[name].items():
                same(value, states[name][slot], f"{where}: {slot}")
    assert fused_calls == {KERNEL[spec["name"]]: STEPS * len(SHAPES)}


@each_case
def test_fused_matches_torch_for_200_steps(
    spec: dict[str, Any], dtype: type, fused_calls: Counter[str]
) -> None:
    assert_matches_torch(spec, TORCH[spec["name"]], dtype=dtype, shapes=TORCH_SHAPES)
    assert fused_calls == {KERNEL[spec["name"]]: STEPS * len(TORCH_SHAPES)}


ODD_SPECS = [
    {"name": "adam", "lr": 0.05, "amsgrad": True, "weight_decay": 0.1},
    {"name": "adamw", "lr": 0.05},
    {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.1},
]


def _odd_params(kind: str) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """A parameter "ok" the kernels take, and one "odd" they must not, with 3 steps of gradients."""
    rng = np.random.default_rng(1)
    params = {"ok": rng.standard_normal((6, 4)).astype(np.float32)}
    if kind == "strided param":
        params["odd"] = rng.standard_normal((6, 8)).astype(np.float32)[:, ::2]
    elif kind == "float16":
        params["odd"] = rng.standard_normal((6, 4)).astype(np.float16)
    else:
        params["odd"] = rng.standard_normal((6, 4)).astype(np.float32)
    grads = []
    for _ in range(3):
        g = {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in params.items()}
        if kind == "transposed grad":
            g["odd"] = np.ascontiguousarray(g["odd"].T).T  # same values, Fortran order
        elif kind == "float64 grad":
            g["odd"] = g["odd"].astype(np.float64)
        grads.append(g)
    return params, grads


@needs_numba
@pytest.mark.parametrize("kind", ["strided param", "transposed grad", "float16", "float64 grad"])
@pytest.mark.parametrize("spec", ODD_SPECS, ids=case_id)
def test_dispatch_falls_back_per_parameter(
    spec: dict[str, Any], kind: str, fused_calls: Counter[str]
) -> None:
    params, grads = _odd_params(kind)
    assert fused.usable(params["ok"], grads[0]["ok"])
    assert not fused.usable(params["odd"], grads[0]["odd"])
    with np.errstate(all="ignore"):  # float16 Adam: eps underflows to 0
        fast, _ = run(spec, params, grads)
        assert fused_calls == {KERNEL[spec["name"]]: 3}  # "ok" only
        slow, _ = run(spec, _odd_params(kind)[0], grads, reference=True)
    np.testing.assert_array_equal(fast[-1]["odd"], slow[-1]["odd"])  # the reference itself ran
    np.testing.assert_allclose(fast[-1]["ok"], slow[-1]["ok"], **TOL[np.float32])
    assert fast[-1]["odd"].dtype == params["odd"].dtype


@pytest.mark.parametrize("value", ["0", "false", "OFF"])
@pytest.mark.parametrize("spec", ODD_SPECS, ids=case_id)
def test_env_switch_runs_the_reference(
    spec: dict[str, Any], value: str, fused_calls: Counter[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fused, "ENABLED", fused.enabled_by(value))
    assert not fused.available()
    init = initial_params(SHAPES, np.float32)
    grads = [{k: _grad(t, k, v) for k, v in init.items()} for t in range(20)]
    fast, fast_states = run(spec, init, grads)
    assert not fused_calls
    slow, slow_states = run(spec, initial_params(SHAPES, np.float32), grads, reference=True)
    for name in SHAPES:
        np.testing.assert_array_equal(fast[-1][name], slow[-1][name])
        for slot, value_ in fast_states[name].items():
            np.testing.assert_array_equal(value_, slow_states[name][slot])


@needs_numba
def test_available_unless_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    for value in (None, "1", "yes", " true "):
        monkeypatch.setattr(fused, "ENABLED", fused.enabled_by(value))
        assert fused.available()


@needs_numba
@pytest.mark.parametrize("spec", ODD_SPECS, ids=case_id)
def test_non_finite_values_follow_the_reference(spec: dict[str, Any], fused_calls: Counter[str]) -> None:
    """NaN and inf propagate as the reference's numpy does (AMSGrad's maximum included); eps=0 divides 0/0."""
    spec = {**spec, "eps": 0.0} if spec["name"] != "sgd" else spec
    params = {"p": np.linspace(-2, 2, 8, dtype=np.float32)}
    special = np.array([np.nan, np.inf, -np.inf, 0.0, 1e30, -1e-30, 1.0, -2.0], dtype=np.float32)
    grads = [{"p": special}, {"p": np.full(8, 0.5, np.float32)}, {"p": np.full(8, -0.25, np.float32)}]
    with np.errstate(all="ignore"):
        fast, fast_states = run(spec, {k: v.copy() for k, v in params.items()}, grads)
        slow, slow_states = run(spec, params, grads, reference=True)
    assert fused_calls
    for ours, theirs in zip(fast, slow, strict=True):
        np.testing.assert_allclose(ours["p"], theirs["p"], **TOL[np.float32])
    for slot, value in fast_states["p"].items():
        np.testing.assert_allclose(value, slow_states["p"][slot], **TOL[np.float32], err_msg=slot)


@needs_numba
def test_after_warm_up_no_update_compiles() -> None:
    """warm_up compiles one signature per dtype and kernel, and updates (writeable grads too) reuse them."""
    fused.warm_up()
    kernels = [fused._adam_kernel, fused._sgd_kernel]
    assert [len(k.signatures) for k in kernels] == [2, 2]
    for spec, dtype in itertools.product(CASES[::5], DTYPES):
        grads = [{"w": np.ones((3, 2), dtype)} for _ in range(2)]
        grads[0]["w"].flags.writeable = False  # decoded request bodies come both ways
        run(spec, initial_params({"w": (3, 2)}, dtype), grads)
    assert [len(k.signatures) for k in kernels] == [2, 2]


@pytest.mark.parametrize(
    "value",
    [
        3.4028234663852886e38,
        float(np.nextafter(2.0**128 * (1 - 2.0**-25), 0)),
        2.0**128 * (1 - 2.0**-25),
        1e39,
        -1e39,
        1.5,
        -0.0,
    ],
)
def test_scalars_round_to_float32_as_numpy_casts_them(value: float) -> None:
    """The kernels' scalar operands: numpy's cast, inf past float32's range included, without the warning."""
    with np.errstate(over="ignore"):
        expected = np.float32(value)
    assert fused._to_float32(value) == expected
    assert np.signbit(fused._to_float32(value)) == np.signbit(expected)


# Adam sessions that differ from the first in one hyperparameter each: every part of the constants' key,
# and the lr, which the decoupled decay factor depends on but the key leaves out
_BASE = {"name": "adam", "lr": 0.01, "betas": [0.9, 0.999], "eps": 1e-8}
KEY_CASES = [
    _BASE,
    {**_BASE, "betas": [0.3, 0.999]},
    {**_BASE, "betas": [0.9, 0.9]},
    {**_BASE, "eps": 1e-3},
    {**_BASE, "weight_decay": 0.1},
    {**_BASE, "weight_decay": 0.1, "decoupled_weight_decay": True},
    {**_BASE, "weight_decay": 0.1, "decoupled_weight_decay": True, "lr": 0.05},
    {**_BASE, "maximize": True},
    {**_BASE, "amsgrad": True},
]


@needs_numba
def test_adam_constants_are_kept_apart_per_set_of_hyperparameters(monkeypatch: pytest.MonkeyPatch) -> None:
    """Adam's scalar operands are rounded once per set of hyperparameters and dtype, and kept: sessions
    that differ in one hyperparameter each, stepped in turn through the one cache (smaller than them, so
    that it is also emptied on the way), land on the bits each gets with the cache emptied before each of
    its steps."""
    monkeypatch.setattr(fused, "ENABLED", True)
    monkeypatch.setattr(fused, "_ADAM_CONSTANTS", {})  # what other tests left there stays theirs
    monkeypatch.setattr(fused, "_MAX_CONSTANTS", 4)
    sessions = []
    for dtype, spec in itertools.product(DTYPES, KEY_CASES):
        opt = get_optimizer(spec["name"])
        hp = parse(opt.hparams, spec, "optimizer")
        params = initial_params(TORCH_SHAPES, dtype)
        cached = (params, {k: opt.init_state(v, hp) for k, v in params.items()})
        fresh = ({k: v.copy() for k, v in params.items()}, _copy(cached[1]))
        sessions.append((opt, hp, cached, fresh))
    for t in range(5):
        for opt, hp, cached, fresh in sessions:
            for (params, states), empty_first in ((cached, False), (fresh, True)):
                for name, param in params.items():
                    if empty_first:
                        fused._ADAM_CONSTANTS.clear()
                    opt.update([param], [_grad(t, name, param)], [states[name]], hp)
                assert len(fused._ADAM_CONSTANTS) <= 4
            for name in cached[0]:
                np.testing.assert_array_equal(cached[0][name], fresh[0][name], strict=True)
