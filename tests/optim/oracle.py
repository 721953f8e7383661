"""The torch oracle: run one of our optimizers and its torch.optim twin on the same gradients.

Two comparisons, each with a tolerance taken from how far torch is from *itself* across its CPU dispatch
levels (`ATEN_CPU_CAPABILITY`: default, avx2, avx512) and with and without MKL's sqrt, as
`python -m tests.optim.spread` measures it into `spread.json`:

- `assert_matches_torch`: the whole trajectory, every step's parameters. Where torch's levels agree to the
  contract's tolerance (float64 everywhere, most float32 runs) that tolerance stands; where one-ulp
  differences grow along the run (maximize with momentum, centered RMSprop, Muon's bfloat16 iteration)
  it is widened to `MARGIN` times the spread torch itself shows for that run.
- `assert_one_step_matches_torch`: one step from a shared state, with nothing to amplify: parameters and
  every state slot within ONE_STEP_ULPS units in the last place of torch on this machine (or MARGIN x
  torch's own spread: Muon's bfloat16 Newton-Schulz flips whole bfloat16 ulps between levels).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from app.optim.base import State
from app.optim.hparams import Check, parse
from app.optim.registry import get_optimizer

torch.set_num_threads(1)

DEFAULT_SHAPES: dict[str, tuple[int, ...]] = {"w": (5, 4), "b": (4,)}
# the v1 contract's tolerances, which a run keeps wherever torch's own dispatch levels keep them
TOL = {np.float64: {"rtol": 1e-10, "atol": 1e-12}, np.float32: {"rtol": 1e-5, "atol": 1e-6}}
TORCH_DTYPE = {np.float64: torch.float64, np.float32: torch.float32}
SPREAD_FILE = Path(__file__).with_name("spread.json")
# A comparison's tolerance is MARGIN times torch's measured spread where that exceeds the floor (the
# contract's tolerance for a trajectory, ONE_STEP_ULPS for one step). Why 4: the spread is measured on one
# machine, over its dispatch levels and MKL's sqrt against a correctly rounded one; another machine can
# add a source of one-ulp differences we could not run here (another vendor's vector math, another
# compiler's contraction), and a run amplifies whichever it meets to a size that depends on where they
# fall. Each source we could compare stayed within 2x of the others; 4 leaves room for one more without
# hiding an error in a formula, which shows as 10x-1000x, and in the one-step test as well.
MARGIN = 4.0
# One step from a shared state: |ours - torch| in units in the last place of the larger of the two
# values, or of SCALE_FLOOR times the array's largest magnitude where both are below it: an element that
# cancelled towards zero carries the rounding error of its operands, which are of the array's scale.
ONE_STEP_ULPS = 2.0
SCALE_FLOOR = 0.25
# set by tests.optim.spread: save torch's (and our) results under this folder instead of comparing them
RECORD_DIR = os.environ.get("OPTSERVE_SPREAD_RECORD")
# set by tests.optim.spread for one more variant of torch: "exact-sqrt" replaces torch's CPU sqrt (MKL's
# vector math where torch has MKL: on an AMD EPYC one ulp off on 17% of float32 and 1.3% of float64
# values, at every dispatch level) by a correctly rounded one, as builds without MKL (aarch64) compute it
VARIANT = os.environ.get("OPTSERVE_SPREAD_VARIANT")


def _correctly_rounded_sqrt() -> None:
    def sqrt(self: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(np.sqrt(self.detach().numpy())))

    def sqrt_(self: torch.Tensor) -> torch.Tensor:
        return self.copy_(sqrt(self))

    torch.Tensor.sqrt = sqrt  # type: ignore[method-assign]
    torch.Tensor.sqrt_ = sqrt_  # type: ignore[method-assign]


if VARIANT == "exact-sqrt":
    _correctly_rounded_sqrt()
elif VARIANT is not None:
    raise RuntimeError(f"OPTSERVE_SPREAD_VARIANT={VARIANT!r}: the one variant is 'exact-sqrt'")


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


class Ours:
    """Our optimizer over named parameters, grouped as torch groups them, stepped with the oracle's
    gradients; `states` are the per-parameter slots, open to be read and overwritten."""

    def __init__(
        self,
        spec: Mapping[str, Any],
        params: Mapping[str, np.ndarray],
        groups: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        self.optimizer = opt = get_optimizer(spec["name"])
        base = parse(opt.hparams, spec, "optimizer")
        opt_check = Check("optimizer")
        opt.check(base, opt_check)
        opt_check.done()
        self.groups = [list(g["params"]) for g in groups or [{"params": list(params)}]]
        self.hps = []
        for i, g in enumerate(groups or [{}]):
            overrides = {k: v for k, v in g.items() if k != "params"}
            hp = parse(opt.hparams, overrides, f"param_groups[{i}]", defaults=base)
            check = Check(f"param_groups[{i}]")
            opt.check(hp, check)
            check.done()
            self.hps.append(hp)
        self.params = {k: v.copy() for k, v in params.items()}
        self.states: dict[str, State] = {}
        for names, hp in zip(self.groups, self.hps, strict=True):
            for name in names:
                self.states[name] = opt.init_state(self.params[name], hp)

    def step(self, t: int, skip_every: int = 0) -> None:
        for names, hp in zip(self.groups, self.hps, strict=True):
            ps, gs, ss = [], [], []
            for name in names:
                grad = gradient(t, name, self.params[name], skip_every)
                if grad is not None:
                    ps.append(self.params[name])
                    gs.append(grad)
                    ss.append(self.states[name])
            if ps:
                self.optimizer.update(ps, gs, ss, hp)


def run_ours(
    spec: Mapping[str, Any],
    params: dict[str, np.ndarray],
    steps: int,
    groups: Sequence[Mapping[str, Any]] | None = None,
    skip_every: int = 0,
    on_step: Callable[[int, dict[str, np.ndarray]], None] | None = None,
) -> dict[str, np.ndarray]:
    """Runs our optimizer alone; `groups` are torch-style `{"params": [names], **overrides}`."""
    ours = Ours(spec, params, groups)
    for t in range(steps):
        ours.step(t, skip_every)
        if on_step:
            on_step(t, ours.params)
    return ours.params


def torch_kwargs(spec: Mapping[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items() if k != "name"}


def torch_optimizer(
    torch_cls: type[torch.optim.Optimizer],
    kwargs: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    groups: Sequence[Mapping[str, Any]] | None = None,
) -> torch.optim.Optimizer:
    group_list = groups or [{"params": list(tensors)}]
    torch_groups = [
        {**torch_kwargs(g), "params": [tensors[n] for n in g["params"]]}
        for g in ({**g, "name": None} for g in group_list)
    ]
    return torch_cls(torch_groups, **kwargs)  # type: ignore[call-arg]


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
    opt = torch_optimizer(torch_cls, kwargs, tensors, groups)
    for t in range(steps):
        for name, tensor in tensors.items():
            grad = gradient(t, name, tensor.detach().numpy(), skip_every)
            tensor.grad = None if grad is None else torch.from_numpy(grad)
        opt.step()
        if on_step:
            on_step(t, {k: v.detach().numpy() for k, v in tensors.items()})
    return {k: v.detach().numpy().copy() for k, v in tensors.items()}


def run_key(
    kind: str,
    spec: Mapping[str, Any],
    dtype: Any,
    shapes: Mapping[str, tuple[int, ...]],
    groups: Sequence[Mapping[str, Any]] | None,
    **run: Any,
) -> str:
    """The canonical description of one comparison: what `spread.json` is keyed by."""
    described = {
        "kind": kind,
        "spec": dict(spec),
        "dtype": np.dtype(dtype).name,
        "shapes": {k: list(v) for k, v in shapes.items()},
        "groups": [dict(g) for g in groups] if groups else None,
        **run,
    }
    return json.dumps(described, sort_keys=True, separators=(",", ":"))


@cache
def measured() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(SPREAD_FILE.read_text())
    return loaded


def spread_of(key: str) -> float:
    """torch's measured spread across dispatch levels for one comparison, in its own unit."""
    entry = measured()["runs"].get(key)
    if entry is None:
        pytest.fail(
            f"torch's spread across its dispatch levels was never measured for {key}: run "
            "`python -m tests.optim.spread` (it rewrites tests/optim/spread.json) and commit the result"
        )
    spread: float = entry["torch_spread"]
    return spread


def trajectory_tolerance(key: str, dtype: Any) -> dict[str, float]:
    """The contract's tolerance, widened to MARGIN x torch's own spread where that is larger."""
    factor = max(1.0, MARGIN * spread_of(key))
    return {name: value * factor for name, value in TOL[dtype].items()}


def one_step_tolerance(key: str) -> float:
    """ONE_STEP_ULPS, widened to MARGIN x torch's own spread in ulps where that is larger."""
    return max(ONE_STEP_ULPS, MARGIN * spread_of(key))


def record(key: str, arrays: Mapping[str, np.ndarray]) -> None:
    """Saves one comparison's results for tests.optim.spread, named by the hash of its key."""
    assert RECORD_DIR is not None
    folder = Path(RECORD_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    np.savez(folder / f"{digest}.npz", **arrays)
    (folder / f"{digest}.json").write_text(key)


def _copied(params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.copy() for k, v in params.items()}


def _stacked(steps: Sequence[Mapping[str, np.ndarray]], prefix: str) -> dict[str, np.ndarray]:
    return {f"{prefix}/{name}": np.stack([s[name] for s in steps]) for name in steps[0]}


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
    """Every step's parameters agree with torch to the tolerance its own dispatch levels allow."""
    key = run_key("trajectory", spec, dtype, shapes, groups, steps=steps, skip_every=skip_every)
    init = initial_params(shapes, dtype)
    theirs: list[dict[str, np.ndarray]] = []
    run_torch(
        torch_cls,
        torch_kwargs(spec),
        init,
        steps,
        groups,
        skip_every,
        lambda t, p: theirs.append(_copied(p)),
    )
    if RECORD_DIR is not None:
        ours: list[dict[str, np.ndarray]] = []
        run_ours(spec, init, steps, groups, skip_every, lambda t, p: ours.append(_copied(p)))
        record(key, {**_stacked(theirs, "torch"), **_stacked(ours, "ours")})
        return
    tolerance = trajectory_tolerance(key, dtype)

    def compare(t: int, ours: dict[str, np.ndarray]) -> None:
        for name, value in ours.items():
            assert value.dtype == dtype
            np.testing.assert_allclose(
                value, theirs[t][name], **tolerance, err_msg=f"{spec} param {name!r} at step {t + 1}"
            )

    run_ours(spec, init, steps, groups, skip_every, compare)
    assert not all(np.array_equal(theirs[-1][k], init[k]) for k in init), "the run never moved"


def ulps(ours: np.ndarray, theirs: np.ndarray) -> np.ndarray:
    """|ours - theirs| in units in the last place of the larger value, or of SCALE_FLOOR x the array's
    largest magnitude where both are smaller than that."""
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    magnitude = np.maximum(np.abs(ours), np.abs(theirs))
    floor = SCALE_FLOOR * float(magnitude.max(initial=0.0))
    unit = np.spacing(np.maximum(magnitude, floor).astype(theirs.dtype))
    diff = np.abs(ours.astype(np.float64) - theirs.astype(np.float64))
    same = (ours == theirs) | (np.isnan(ours) & np.isnan(theirs))
    out: np.ndarray = np.where(same, 0.0, diff / unit.astype(np.float64))
    return out


def _torch_layout(
    torch_cls: type[torch.optim.Optimizer],
    spec: Mapping[str, Any],
    params: Mapping[str, np.ndarray],
    groups: Sequence[Mapping[str, Any]] | None,
) -> dict[str, dict[str, Any]]:
    """The state torch keeps per parameter (slot names, dtypes, shapes), from one step of a throwaway
    copy."""
    tensors = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in params.items()}
    opt = torch_optimizer(torch_cls, torch_kwargs(spec), tensors, groups)
    for tensor in tensors.values():
        tensor.grad = torch.ones_like(tensor)
    opt.step()
    return {name: dict(opt.state[tensor]) for name, tensor in tensors.items()}


def _share_state(
    ours: Ours,
    opt: torch.optim.Optimizer,
    tensors: Mapping[str, torch.Tensor],
    layout: Mapping[str, Mapping[str, Any]],
) -> None:
    """Gives torch our state, each slot in the dtype torch keeps it in, and takes the rounded values back,
    so that both sides start the next step from the same bits."""
    for name, tensor in tensors.items():
        slots: dict[str, Any] = {}
        for slot, like in layout[name].items():
            if not isinstance(like, torch.Tensor):
                slots[slot] = like
                continue
            mine = ours.states[name][slot]
            shared = torch.from_numpy(np.array(mine, dtype=np.float64)).to(like.dtype).reshape(like.shape)
            slots[slot] = shared
            ours.states[name][slot] = shared.numpy().astype(mine.dtype).reshape(mine.shape)
        opt.state[tensor] = slots


def assert_one_step_matches_torch(
    spec: Mapping[str, Any],
    torch_cls: type[torch.optim.Optimizer],
    *,
    dtype: Any = np.float64,
    warmup: int = 60,
    shapes: Mapping[str, tuple[int, ...]] = DEFAULT_SHAPES,
    groups: Sequence[Mapping[str, Any]] | None = None,
) -> None:
    """From `warmup` steps of ours, both take one step from the same parameters and state: parameters and
    every slot torch keeps agree within ONE_STEP_ULPS, however much a trajectory would amplify."""
    key = run_key("one_step", spec, dtype, shapes, groups, warmup=warmup)
    ours = Ours(spec, initial_params(shapes, dtype), groups)
    for t in range(warmup):
        ours.step(t)
    tensors = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in ours.params.items()}
    opt = torch_optimizer(torch_cls, torch_kwargs(spec), tensors, groups)
    _share_state(ours, opt, tensors, _torch_layout(torch_cls, spec, ours.params, groups))
    for name, tensor in tensors.items():
        grad = gradient(warmup, name, ours.params[name], 0)
        assert grad is not None
        tensor.grad = torch.from_numpy(grad)
    opt.step()
    ours.step(warmup)
    results = {
        f"{name}/{slot}": (ours.states[name][slot], value.numpy())
        for name, tensor in tensors.items()
        for slot, value in opt.state[tensor].items()
        if isinstance(value, torch.Tensor)
    }
    results.update({f"{name}/param": (ours.params[name], t.detach().numpy()) for name, t in tensors.items()})
    if RECORD_DIR is not None:
        theirs_by_key = {f"torch/{k}": theirs for k, (_, theirs) in results.items()}
        record(key, {**theirs_by_key, **{f"ours/{k}": mine for k, (mine, _) in results.items()}})
        return
    tolerance = one_step_tolerance(key)
    for where, (mine, theirs) in results.items():
        distance = ulps(mine.reshape(theirs.shape), theirs)
        worst = float(distance.max(initial=0.0))
        assert worst <= tolerance, f"{spec} {where}: {worst:.3g} ulps from torch after one shared step"
