"""The torch oracle: run one of our optimizers and its torch.optim twin on the same gradients."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from app.optim.base import State
from app.optim.hparams import Check, parse
from app.optim.registry import get_optimizer

torch.set_num_threads(1)

DEFAULT_SHAPES: dict[str, tuple[int, ...]] = {"w": (5, 4), "b": (4,)}
TOL = {np.float64: {"rtol": 1e-10, "atol": 1e-12}, np.float32: {"rtol": 1e-5, "atol": 1e-6}}
TORCH_DTYPE = {np.float64: torch.float64, np.float32: torch.float32}


def initial_params(shapes: Mapping[str, tuple[int, ...]], dtype: Any, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(dtype) for name, shape in shapes.items()}


def gradient(t: int, name: str, param: np.ndarray, skip_every: int) -> np.ndarray | None:
    """A noisy gradient of 0.05*|p|^2 that feeds back on the run's own parameters; None to skip."""
    index = sorted(DEFAULT_SHAPES).index(name) if name in DEFAULT_SHAPES else len(name)
    if skip_every and (t + index) % skip_every == 0:
        return None
    seed = (t * 7919 + sum(map(ord, name))) % (2**32)
    noise = np.random.default_rng(seed).standard_normal(param.shape)
    return (noise + 0.1 * param.astype(np.float64)).astype(param.dtype)


def run_ours(
    spec: Mapping[str, Any],
    params: dict[str, np.ndarray],
    steps: int,
    groups: Sequence[Mapping[str, Any]] | None = None,
    skip_every: int = 0,
    on_step: Callable[[int, dict[str, np.ndarray]], None] | None = None,
) -> dict[str, np.ndarray]:
    """Runs our optimizer alone; `groups` are torch-style `{"params": [names], **overrides}`."""
    opt = get_optimizer(spec["name"])
    base = parse(opt.hparams, spec, "optimizer")
    opt_check = Check("optimizer")
    opt.check(base, opt_check)
    opt_check.done()
    group_list = groups or [{"params": list(params)}]
    hps = []
    for i, g in enumerate(group_list):
        hp = parse(
            opt.hparams, {k: v for k, v in g.items() if k != "params"}, f"param_groups[{i}]", defaults=base
        )
        c = Check(f"param_groups[{i}]")
        opt.check(hp, c)
        c.done()
        hps.append(hp)
    params = {k: v.copy() for k, v in params.items()}
    states: dict[str, State] = {}
    for g, hp in zip(group_list, hps, strict=True):
        for name in g["params"]:
            states[name] = opt.init_state(params[name], hp)
    for t in range(steps):
        for g, hp in zip(group_list, hps, strict=True):
            ps, gs, ss = [], [], []
            for name in g["params"]:
                grad = gradient(t, name, params[name], skip_every)
                if grad is not None:
                    ps.append(params[name])
                    gs.append(grad)
                    ss.append(states[name])
            if ps:
                opt.update(ps, gs, ss, hp)
        if on_step:
            on_step(t, params)
    return params


def torch_kwargs(spec: Mapping[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items() if k != "name"}


def run_torch(
    torch_cls: type[torch.optim.Optimizer],
    kwargs: Mapping[str, Any],
    params: dict[str, np.ndarray],
    steps: int,
    groups: Sequence[Mapping[str, Any]] | None = None,
    skip_every: int = 0,
    on_step: Callable[[int, dict[str, np.ndarray]], None] | None = None,
) -> dict[str, np.ndarray]:
    tensors = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in params.items()}
    group_list = groups or [{"params": list(params)}]
    torch_groups = [
        {**torch_kwargs(g), "params": [tensors[n] for n in g["params"]]}
        for g in ({**g, "name": None} for g in group_list)
    ]
    opt = torch_cls(torch_groups, **kwargs)  # type: ignore[call-arg]
    for t in range(steps):
        for name, tensor in tensors.items():
            grad = gradient(t, name, tensor.detach().numpy(), skip_every)
            tensor.grad = None if grad is None else torch.from_numpy(grad)
        opt.step()
        if on_step:
            on_step(t, {k: v.detach().numpy() for k, v in tensors.items()})
    return {k: v.detach().numpy().copy() for k, v in tensors.items()}


def assert_matches_torch(
    spec: Mapping[str, Any],
    torch_cls: type[torch.optim.Optimizer],
    *,
    dtype: Any = np.float64,
    steps: int = 200,
    shapes: Mapping[str, tuple[int, ...]] = DEFAULT_SHAPES,
    groups: Sequence[Mapping[str, Any]] | None = None,
    skip_every: int = 0,
) -> None:
    """Every step's parameters agree with torch to the contract's tolerance for the dtype."""
    init = initial_params(shapes, dtype)
    theirs: list[dict[str, np.ndarray]] = []
    run_torch(
        torch_cls,
        torch_kwargs(spec),
        init,
        steps,
        groups,
        skip_every,
        lambda t, p: theirs.append({k: v.copy() for k, v in p.items()}),
    )

    def compare(t: int, ours: dict[str, np.ndarray]) -> None:
        for name, value in ours.items():
            assert value.dtype == dtype
            np.testing.assert_allclose(
                value, theirs[t][name], **TOL[dtype], err_msg=f"{spec} param {name!r} at step {t + 1}"
            )

    run_ours(spec, init, steps, groups, skip_every, compare)
    assert not all(np.array_equal(theirs[-1][k], init[k]) for k in init), "the run never moved"
