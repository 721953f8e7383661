"""Schedulers against torch.optim.lr_scheduler step by step, bit-exact restores, and torch's validation."""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.optim import lr_scheduler as tl

from app.optim.hparams import SpecError
from app.optim.schedulers import SCHEDULERS, Scheduler, build_scheduler, filled_spec, scheduler_catalogue

pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`:UserWarning")

STEPS = 300
RTOL = 1e-12


def inverse_time(decay_rate: float, decay_steps: int, staircase: bool = False) -> Callable[[int], float]:
    """The documented formula, as a factor of base_lr."""
    return lambda t: 1 / (1 + decay_rate * (math.floor(t / decay_steps) if staircase else t / decay_steps))


def piecewise_constant(boundaries: list[int], factors: list[float]) -> Callable[[int], float]:
    return lambda t: factors[sum(b <= t for b in boundaries)]


TORCH_SCHEDULERS: dict[str, Callable[..., Any]] = {
    "step_lr": tl.StepLR,
    "multi_step_lr": tl.MultiStepLR,
    "constant_lr": tl.ConstantLR,
    "linear_lr": tl.LinearLR,
    "exponential_lr": tl.ExponentialLR,
    "polynomial_lr": tl.PolynomialLR,
    "cosine_annealing_lr": tl.CosineAnnealingLR,
    "cosine_annealing_warm_restarts": tl.CosineAnnealingWarmRestarts,
    "cyclic_lr": tl.CyclicLR,
    "one_cycle_lr": tl.OneCycleLR,
    "sequential_lr": tl.SequentialLR,
    "chained_scheduler": lambda opt, schedulers: tl.ChainedScheduler(schedulers, optimizer=opt),
    "reduce_lr_on_plateau": tl.ReduceLROnPlateau,
    # torch has no such schedulers; LambdaLR with the formula stands in for them inside composites
    "inverse_time_lr": lambda opt, **kw: tl.LambdaLR(opt, inverse_time(**kw)),
    "piecewise_constant_lr": lambda opt, **kw: tl.LambdaLR(opt, piecewise_constant(**kw)),
}


def torch_optimizer(kind: str) -> torch.optim.Optimizer:
    """Two param groups with different lrs; SGD cycles `momentum`, Adam `betas`, Adagrad has neither."""
    params = [torch.zeros(3, requires_grad=True) for _ in range(3)]
    groups: list[dict[str, Any]] = [{"params": params[:2]}, {"params": params[2:], "lr": 0.05}]
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    if kind == "adam":
        return torch.optim.Adam(groups, lr=0.1, betas=(0.9, 0.999))
    return torch.optim.Adagrad(groups, lr=0.1)


def torch_scheduler(spec: dict[str, Any], opt: torch.optim.Optimizer) -> Any:
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    if "schedulers" in kwargs:
        kwargs["schedulers"] = [torch_scheduler(inner, opt) for inner in kwargs["schedulers"]]
    return TORCH_SCHEDULERS[spec["name"]](opt, **kwargs)


def plain_groups(opt: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in opt.param_groups]


def close(ours: Any, theirs: Any) -> bool:
    if isinstance(theirs, (tuple, list)):
        return len(ours) == len(theirs) and all(map(close, ours, theirs))
    if isinstance(theirs, float):
        return ours == theirs or math.isclose(ours, theirs, rel_tol=RTOL, abs_tol=0.0)
    return bool(ours == theirs)


def assert_groups_match(ours: list[dict[str, Any]], opt: torch.optim.Optimizer, where: str) -> None:
    """Every key torch's groups hold (lr, momentum/betas, initial_lr, max_lr, ...) and no other."""
    for i, (group, theirs) in enumerate(zip(ours, plain_groups(opt), strict=True)):
        assert group.keys() == theirs.keys(), f"group {i} keys at {where}"
        for key, value in theirs.items():
            assert close(group[key], value), (
                f"group {i} {key}: ours {group[key]!r}, torch {value!r} at {where}"
            )


def plateau_losses(sign: float = 1.0) -> list[float]:
    """Improves every 40 steps, stalls with small noise in between: reductions, cooldowns, min_lr clamps."""
    return [sign * (1.0 / (1 + t // 40) + 1e-3 * ((t * 37) % 11)) for t in range(STEPS)]


def metrics_for(spec: dict[str, Any]) -> list[float] | None:
    if spec["name"] != "reduce_lr_on_plateau":
        return None
    return plateau_losses(-1.0 if spec.get("mode") == "max" else 1.0)


def linear(start: float, total: int) -> dict[str, Any]:
    return {"name": "linear_lr", "start_factor": start, "total_iters": total}


def exponential(gamma: float) -> dict[str, Any]:
    return {"name": "exponential_lr", "gamma": gamma}


def cyclic(**kw: Any) -> dict[str, Any]:
    return {"name": "cyclic_lr", "base_lr": 0.01, "max_lr": 0.1, **kw}


CASES = [
    pytest.param({"name": "step_lr", "step_size": 30, "gamma": 0.5}, "sgd", id="step"),
    pytest.param({"name": "step_lr", "step_size": 7}, "adam", id="step-default-gamma"),
    pytest.param(
        {"name": "multi_step_lr", "milestones": [30, 80, 80, 200], "gamma": 0.3},
        "sgd",
        id="multistep-repeated",
    ),
    pytest.param({"name": "constant_lr", "factor": 0.25, "total_iters": 40}, "sgd", id="constant"),
    pytest.param({"name": "constant_lr"}, "adam", id="constant-defaults"),
    pytest.param(linear(0.05, 40), "sgd", id="linear-warmup"),
    pytest.param(
        {"name": "linear_lr", "start_factor": 1.0, "end_factor": 0.1, "total_iters": 250},
        "sgd",
        id="linear-decay",
    ),
    pytest.param(exponential(0.98), "sgd", id="exponential"),
    pytest.param({"name": "polynomial_lr", "total_iters": 200, "power": 2.5}, "sgd", id="polynomial-power"),
    pytest.param({"name": "polynomial_lr", "total_iters": 120, "power": 0.5}, "adam", id="polynomial-sqrt"),
    pytest.param({"name": "cosine_annealing_lr", "T_max": 50, "eta_min": 0.001}, "sgd", id="cosine-periods"),
    pytest.param({"name": "cosine_annealing_lr", "T_max": 300}, "adam", id="cosine-one-period"),
    pytest.param({"name": "cosine_annealing_warm_restarts", "T_0": 25}, "sgd", id="warm-restarts"),
    pytest.param(
        {"name": "cosine_annealing_warm_restarts", "T_0": 10, "T_mult": 2, "eta_min": 0.001},
        "sgd",
        id="warm-restarts-T_mult",
    ),
    pytest.param(cyclic(step_size_up=20, step_size_down=30), "sgd", id="cyclic-triangular-momentum"),
    pytest.param(
        cyclic(base_lr=[0.01, 0.001], max_lr=[0.1, 0.05], step_size_up=25, mode="triangular2"),
        "adam",
        id="cyclic-triangular2-betas-lists",
    ),
    pytest.param(
        cyclic(step_size_up=15, mode="exp_range", gamma=0.995, base_momentum=[0.8, 0.85], max_momentum=0.95),
        "sgd",
        id="cyclic-exp-range",
    ),
    pytest.param(cyclic(step_size_up=40, cycle_momentum=False), "adagrad", id="cyclic-no-momentum"),
    pytest.param({"name": "one_cycle_lr", "max_lr": 0.5, "total_steps": 300}, "sgd", id="one-cycle"),
    pytest.param(
        {
            "name": "one_cycle_lr",
            "max_lr": [0.5, 0.2],
            "epochs": 10,
            "steps_per_epoch": 31,
            "pct_start": 0.25,
        },
        "adam",
        id="one-cycle-epochs-max-lr-list-betas",
    ),
    pytest.param(
        {
            "name": "one_cycle_lr",
            "max_lr": 0.3,
            "total_steps": 320,
            "three_phase": True,
            "anneal_strategy": "linear",
            "div_factor": 10.0,
            "final_div_factor": 100.0,
            "base_momentum": [0.8, 0.7],
        },
        "sgd",
        id="one-cycle-three-phase-linear",
    ),
    pytest.param(
        {
            "name": "one_cycle_lr",
            "max_lr": 0.3,
            "total_steps": 300,
            "three_phase": True,
            "cycle_momentum": False,
        },
        "adagrad",
        id="one-cycle-three-phase-cos",
    ),
    pytest.param(
        {
            "name": "sequential_lr",
            "schedulers": [linear(0.1, 10), {"name": "cosine_annealing_lr", "T_max": 100}],
            "milestones": [10],
        },
        "sgd",
        id="sequential-warmup-cosine",
    ),
    pytest.param(
        {
            "name": "sequential_lr",
            "schedulers": [
                {"name": "constant_lr", "factor": 0.5, "total_iters": 20},
                exponential(0.97),
                {"name": "step_lr", "step_size": 15, "gamma": 0.5},
            ],
            "milestones": [5, 50],
        },
        "sgd",
        id="sequential-three",
    ),
    pytest.param(
        {
            "name": "sequential_lr",
            "schedulers": [
                {"name": "cosine_annealing_warm_restarts", "T_0": 10, "T_mult": 2},
                cyclic(step_size_up=10),
                {"name": "polynomial_lr", "total_iters": 50, "power": 2.0},
            ],
            "milestones": [70, 150],
        },
        "adam",
        id="sequential-restarts-cyclic-polynomial",
    ),
    pytest.param(
        {
            "name": "sequential_lr",
            "schedulers": [
                {"name": "multi_step_lr", "milestones": [0, 20], "gamma": 0.5},
                {"name": "piecewise_constant_lr", "boundaries": [5, 40], "factors": [1.0, 0.3, 0.1]},
                {"name": "inverse_time_lr", "decay_rate": 0.2, "decay_steps": 7, "staircase": True},
            ],
            "milestones": [0, 100],
        },
        "sgd",
        id="sequential-milestone-zero-lambda-like",
    ),
    pytest.param(
        {
            "name": "sequential_lr",
            "schedulers": [
                exponential(0.99),
                {"name": "multi_step_lr", "milestones": [0, 30], "gamma": 0.5},
                {"name": "constant_lr", "factor": 0.5, "total_iters": 10},
                linear(0.5, 20),
            ],
            "milestones": [20, 60, 120],
        },
        "sgd",
        id="sequential-closed-forms",
    ),
    pytest.param(
        {
            "name": "sequential_lr",
            "schedulers": [
                {"name": "step_lr", "step_size": 10},
                {"name": "cosine_annealing_warm_restarts", "T_0": 15, "T_mult": 2, "eta_min": 0.001},
            ],
            "milestones": [40],
        },
        "adam",
        id="sequential-into-restarts",
    ),
    pytest.param(
        {
            "name": "sequential_lr",
            "schedulers": [
                linear(0.2, 20),
                {"name": "one_cycle_lr", "max_lr": 0.4, "total_steps": 250},
            ],
            "milestones": [50],
        },
        "sgd",
        id="sequential-into-one-cycle",
    ),
    pytest.param(
        {
            "name": "sequential_lr",
            "schedulers": [
                {
                    "name": "chained_scheduler",
                    "schedulers": [
                        {"name": "constant_lr", "factor": 0.5, "total_iters": 30},
                        exponential(0.99),
                    ],
                },
                {"name": "cosine_annealing_lr", "T_max": 60, "eta_min": 0.001},
            ],
            "milestones": [100],
        },
        "sgd",
        id="sequential-of-chained",
    ),
    pytest.param(
        {
            "name": "sequential_lr",
            "schedulers": [
                {
                    "name": "sequential_lr",
                    "schedulers": [linear(0.1, 10), exponential(0.95)],
                    "milestones": [5],
                },
                {"name": "step_lr", "step_size": 20},
            ],
            "milestones": [50],
        },
        "adam",
        id="sequential-of-sequential",
    ),
    pytest.param(
        {
            "name": "chained_scheduler",
            "schedulers": [{"name": "constant_lr", "factor": 0.5, "total_iters": 20}, exponential(0.99)],
        },
        "sgd",
        id="chained",
    ),
    pytest.param(
        {
            "name": "chained_scheduler",
            "schedulers": [
                {"name": "step_lr", "step_size": 30, "gamma": 0.5},
                {"name": "multi_step_lr", "milestones": [100, 200]},
                {"name": "cosine_annealing_lr", "T_max": 40, "eta_min": 0.001},
            ],
        },
        "adam",
        id="chained-three",
    ),
    pytest.param(
        {"name": "chained_scheduler", "schedulers": [cyclic(step_size_up=30), exponential(0.999)]},
        "adam",
        id="chained-cyclic",
    ),
    pytest.param(
        {
            "name": "chained_scheduler",
            "schedulers": [
                {
                    "name": "sequential_lr",
                    "schedulers": [linear(0.1, 10), exponential(0.99)],
                    "milestones": [10],
                },
                {"name": "step_lr", "step_size": 50},
            ],
        },
        "sgd",
        id="chained-of-sequential",
    ),
    pytest.param(
        {"name": "reduce_lr_on_plateau", "factor": 0.5, "patience": 5, "cooldown": 3, "min_lr": [1e-3, 1e-4]},
        "sgd",
        id="plateau-min-rel-cooldown-min-lr-list",
    ),
    pytest.param(
        {
            "name": "reduce_lr_on_plateau",
            "mode": "max",
            "threshold_mode": "abs",
            "threshold": 1e-3,
            "patience": 3,
            "factor": 0.3,
            "min_lr": 1e-4,
        },
        "adam",
        id="plateau-max-abs",
    ),
    pytest.param(
        {"name": "reduce_lr_on_plateau", "mode": "max", "patience": 4, "cooldown": 6},
        "sgd",
        id="plateau-max-rel",
    ),
    pytest.param(
        {
            "name": "reduce_lr_on_plateau",
            "threshold_mode": "abs",
            "threshold": 2e-3,
            "patience": 2,
            "cooldown": 2,
            "eps": 1e-3,
        },
        "sgd",
        id="plateau-min-abs-eps",
    ),
    pytest.param({"name": "reduce_lr_on_plateau"}, "sgd", id="plateau-defaults"),
]

FORMULAS = [
    pytest.param(
        {"name": "inverse_time_lr", "decay_rate": 0.5, "decay_steps": 10},
        inverse_time(0.5, 10),
        id="inverse-time",
    ),
    pytest.param(
        {"name": "inverse_time_lr", "decay_rate": 0.3, "decay_steps": 7, "staircase": True},
        inverse_time(0.3, 7, staircase=True),
        id="inverse-time-staircase",
    ),
    pytest.param(
        {"name": "piecewise_constant_lr", "boundaries": [10, 50, 120], "factors": [1.0, 0.5, 0.1, 0.01]},
        piecewise_constant([10, 50, 120], [1.0, 0.5, 0.1, 0.01]),
        id="piecewise-constant",
    ),
    pytest.param(
        {"name": "piecewise_constant_lr", "boundaries": [], "factors": [0.5]},
        piecewise_constant([], [0.5]),
        id="piecewise-constant-single",
    ),
]


def run_torch(spec: dict[str, Any], kind: str) -> None:
    opt = torch_optimizer(kind)
    scheduler = torch_scheduler(spec, opt)
    for _ in range(STEPS):
        opt.step()
        scheduler.step()


@pytest.mark.parametrize(("spec", "kind"), CASES)
def test_matches_torch_every_step(spec: dict[str, Any], kind: str) -> None:
    opt = torch_optimizer(kind)
    groups = plain_groups(opt)
    ours = build_scheduler(spec, groups)
    theirs = torch_scheduler(spec, opt)
    assert_groups_match(groups, opt, "construction")
    metrics = metrics_for(spec)
    lrs = set()
    for t in range(STEPS):
        opt.step()
        if metrics is None:
            theirs.step()
            ours.step()
        else:
            theirs.step(metrics[t])
            ours.step(metrics[t])
        assert_groups_match(groups, opt, f"step {t + 1}")
        assert close(ours.state_dict()["_last_lr"], theirs.get_last_lr()), f"last lr at step {t + 1}"
        lrs.add(groups[0]["lr"])
    assert len(lrs) > (2 if metrics else 1), "the schedule barely moved"


@pytest.mark.parametrize(("spec", "factor"), FORMULAS)
def test_factor_schedulers_follow_their_formula(spec: dict[str, Any], factor: Callable[[int], float]) -> None:
    groups: list[dict[str, Any]] = [{"lr": 0.1, "momentum": 0.9}, {"lr": 0.05, "momentum": 0.9}]
    scheduler = build_scheduler(spec, groups)
    for t in range(STEPS + 1):
        for group, base_lr in zip(groups, (0.1, 0.05), strict=True):
            assert group["initial_lr"] == base_lr
            assert math.isclose(group["lr"], base_lr * factor(t), rel_tol=RTOL), f"step {t}"
        scheduler.step()


def run_ours(
    spec: dict[str, Any], steps: int, scheduler: Scheduler, groups: list[dict[str, Any]], start: int = 0
) -> list[list[dict[str, Any]]]:
    metrics = metrics_for(spec)
    snapshots = []
    for t in range(start, start + steps):
        scheduler.step(None if metrics is None else metrics[t])
        snapshots.append(json.loads(json.dumps(groups)))
    return snapshots


def restore(spec: dict[str, Any], state: dict[str, Any], stored: list[dict[str, Any]], how: str) -> Scheduler:
    """The two ways to keep the constructor's side effects off the restored groups."""
    if how == "bind":
        scheduler = build_scheduler(spec, copy.deepcopy(stored))
        scheduler.load_state_dict(state)
        scheduler.bind(stored)
        return scheduler
    saved = copy.deepcopy(stored)
    scheduler = build_scheduler(spec, stored)
    for group, values in zip(stored, saved, strict=True):
        group.clear()
        group.update(values)
    scheduler.load_state_dict(state)
    return scheduler


@pytest.mark.parametrize("how", ["bind", "overwrite"])
@pytest.mark.parametrize("k", [0, 10, 23])
@pytest.mark.parametrize(("spec", "kind"), [*CASES, *((p.values[0], "sgd") for p in FORMULAS)])
def test_restore_continues_bit_for_bit(spec: dict[str, Any], kind: str, k: int, how: str) -> None:
    total = 60
    groups = plain_groups(torch_optimizer(kind))
    uninterrupted = run_ours(spec, total, build_scheduler(spec, groups), groups)

    groups = plain_groups(torch_optimizer(kind))
    scheduler = build_scheduler(spec, groups)
    run_ours(spec, k, scheduler, groups)
    state = json.loads(json.dumps(scheduler.state_dict(), allow_nan=False))
    stored_groups = json.loads(json.dumps(groups))
    restored = restore(spec, state, stored_groups, how)
    assert run_ours(spec, total - k, restored, stored_groups, start=k) == uninterrupted[k:]


def test_plateau_state_is_strict_json_before_any_step() -> None:
    scheduler = build_scheduler({"name": "reduce_lr_on_plateau", "mode": "max"}, [{"lr": 0.1}])
    state = json.loads(json.dumps(scheduler.state_dict(), allow_nan=False))
    restored = build_scheduler({"name": "reduce_lr_on_plateau", "mode": "max"}, [{"lr": 0.1}])
    restored.load_state_dict(state)
    assert restored.state_dict() == scheduler.state_dict()


def test_plateau_needs_a_metric() -> None:
    scheduler = build_scheduler({"name": "reduce_lr_on_plateau"}, [{"lr": 0.1}])
    assert SCHEDULERS["reduce_lr_on_plateau"].needs_metric
    with pytest.raises(ValueError, match="metric"):
        scheduler.step()


def test_one_cycle_refuses_to_step_past_total_steps_like_torch() -> None:
    spec = {"name": "one_cycle_lr", "max_lr": 0.1, "total_steps": 5}
    opt = torch_optimizer("sgd")
    groups = plain_groups(opt)
    ours, theirs = build_scheduler(spec, groups), torch_scheduler(spec, opt)
    for _ in range(5):
        opt.step()
        ours.step()
        theirs.step()
    message = "Tried to step 6 times. The specified number of total steps is 5"
    for scheduler in (ours, theirs):
        with pytest.raises(ValueError, match=re.escape(message)):
            scheduler.step()


def seq(*inner: dict[str, Any], milestones: list[int]) -> dict[str, Any]:
    return {"name": "sequential_lr", "schedulers": list(inner), "milestones": milestones}


PLATEAU = {"name": "reduce_lr_on_plateau"}
ADAGRAD = "adagrad"

# (spec, optimizer kind, field, message): torch's constructor raises ValueError with this very message
TORCH_ERRORS = [
    pytest.param(
        {"name": "constant_lr", "factor": 1.5},
        "sgd",
        "scheduler.factor",
        "Constant multiplicative factor expected to be between 0 and 1.",
        id="constant-factor",
    ),
    pytest.param(
        {"name": "linear_lr", "start_factor": 0.0},
        "sgd",
        "scheduler.start_factor",
        "Starting multiplicative factor expected to be greater than 0 and less or equal to 1.",
        id="linear-start",
    ),
    pytest.param(
        {"name": "linear_lr", "end_factor": 1.5},
        "sgd",
        "scheduler.end_factor",
        "Ending multiplicative factor expected to be between 0 and 1.",
        id="linear-end",
    ),
    pytest.param(
        {"name": "cosine_annealing_warm_restarts", "T_0": 0},
        "sgd",
        "scheduler.T_0",
        "Expected positive integer T_0, but got 0",
        id="restarts-T_0",
    ),
    pytest.param(
        {"name": "cosine_annealing_warm_restarts", "T_0": 5, "T_mult": 0},
        "sgd",
        "scheduler.T_mult",
        "Expected integer T_mult >= 1, but got 0",
        id="restarts-T_mult",
    ),
    pytest.param(
        cyclic(max_lr=[0.1, 0.2, 0.3]),
        "sgd",
        "scheduler.max_lr",
        "max_lr must have the same length as optimizer.param_groups. "
        "max_lr has 3 values, param_groups has 2.",
        id="cyclic-max-lr-length",
    ),
    pytest.param(
        cyclic(base_momentum=[0.8]),
        "sgd",
        "scheduler.base_momentum",
        "base_momentum must have the same length as optimizer.param_groups. "
        "base_momentum has 1 values, param_groups has 2.",
        id="cyclic-momentum-length",
    ),
    pytest.param(
        cyclic(),
        ADAGRAD,
        "scheduler.cycle_momentum",
        "optimizer must support momentum or beta1 with `cycle_momentum` option enabled",
        id="cyclic-no-momentum",
    ),
    pytest.param(
        {"name": "one_cycle_lr", "max_lr": 0.1},
        "sgd",
        "scheduler.total_steps",
        "You must define either total_steps OR (epochs AND steps_per_epoch)",
        id="one-cycle-no-length",
    ),
    pytest.param(
        {"name": "one_cycle_lr", "max_lr": 0.1, "total_steps": 0},
        "sgd",
        "scheduler.total_steps",
        "Expected positive integer total_steps, but got 0",
        id="one-cycle-total",
    ),
    pytest.param(
        {"name": "one_cycle_lr", "max_lr": 0.1, "epochs": -1, "steps_per_epoch": 10},
        "sgd",
        "scheduler.epochs",
        "Expected positive integer epochs, but got -1",
        id="one-cycle-epochs",
    ),
    pytest.param(
        {"name": "one_cycle_lr", "max_lr": 0.1, "total_steps": 100, "pct_start": 1.5},
        "sgd",
        "scheduler.pct_start",
        "Expected float between 0 and 1 pct_start, but got 1.5",
        id="one-cycle-pct",
    ),
    pytest.param(
        {"name": "one_cycle_lr", "max_lr": 0.1, "total_steps": 100},
        ADAGRAD,
        "scheduler.cycle_momentum",
        "optimizer must support momentum or beta1",
        id="one-cycle-no-momentum",
    ),
    pytest.param(
        seq(milestones=[]),
        "sgd",
        "scheduler.schedulers",
        "SequentialLR expects at least one scheduler, but got no scheduler.",
        id="sequential-empty",
    ),
    pytest.param(
        seq(exponential(0.9), exponential(0.8), milestones=[3, 4]),
        "sgd",
        "scheduler.milestones",
        "Sequential Schedulers expects number of schedulers provided to be one more than the number of "
        "milestone points, but got number of schedulers 2 and the number of milestones to be equal to 2",
        id="sequential-milestones",
    ),
    pytest.param(
        seq(exponential(0.9), PLATEAU, milestones=[3]),
        "sgd",
        "scheduler.schedulers[1]",
        "SequentialLR does not support `ReduceLROnPlateau` scheduler as it requires additional kwargs to "
        "be specified when calling `step`, but got one at index 1 in the given schedulers sequence.",
        id="sequential-plateau",
    ),
    pytest.param(
        {"name": "chained_scheduler", "schedulers": []},
        "sgd",
        "scheduler.schedulers",
        "ChainedScheduler expects at least one scheduler to be chained, but got no scheduler.",
        id="chained-empty",
    ),
    pytest.param(
        {"name": "chained_scheduler", "schedulers": [PLATEAU]},
        "sgd",
        "scheduler.schedulers[0]",
        "ChainedScheduler does not support `ReduceLROnPlateau` scheduler",
        id="chained-plateau",
    ),
    pytest.param(
        {"name": "reduce_lr_on_plateau", "factor": 1.0},
        "sgd",
        "scheduler.factor",
        "Factor should be < 1.0.",
        id="plateau-factor",
    ),
    pytest.param(
        {"name": "reduce_lr_on_plateau", "min_lr": [0.1, 0.2, 0.3]},
        "sgd",
        "scheduler.min_lr",
        "expected 2 min_lrs, got 3",
        id="plateau-min-lr-length",
    ),
]

# torch accepts these, then fails with `exception` once it steps far enough: we refuse them up front
TORCH_CRASHES = [
    pytest.param(
        {"name": "step_lr", "step_size": 0},
        "scheduler.step_size",
        "Expected positive integer step_size, but got 0",
        ZeroDivisionError,
        id="step-size",
    ),
    pytest.param(
        {"name": "cosine_annealing_lr", "T_max": 0},
        "scheduler.T_max",
        "Expected positive integer T_max, but got 0",
        ZeroDivisionError,
        id="cosine-T_max",
    ),
    pytest.param(
        {"name": "constant_lr", "factor": 0.0, "total_iters": 5},
        "scheduler.factor",
        "factor 0 makes torch divide by zero",
        ZeroDivisionError,
        id="constant-factor-zero",
    ),
    pytest.param(
        cyclic(step_size_up=0, step_size_down=10),
        "scheduler.step_size_up",
        "Expected positive integer step_size_up, but got 0",
        ZeroDivisionError,
        id="cyclic-up",
    ),
    pytest.param(
        cyclic(step_size_up=5, step_size_down=-5),
        "scheduler.step_size_down",
        "Expected non-negative step_size_down, but got -5",
        ZeroDivisionError,
        id="cyclic-down",
    ),
    pytest.param(
        {"name": "one_cycle_lr", "max_lr": 0.1, "total_steps": 10, "pct_start": 0.1},
        "scheduler.pct_start",
        "gives a phase of no steps",
        ZeroDivisionError,
        id="one-cycle-empty-warmup",
    ),
    pytest.param(
        {"name": "one_cycle_lr", "max_lr": 0.1, "total_steps": 10, "pct_start": 1.0},
        "scheduler.pct_start",
        "gives a phase of no steps",
        ZeroDivisionError,
        id="one-cycle-empty-anneal",
    ),
    pytest.param(
        {"name": "one_cycle_lr", "max_lr": 0.1, "total_steps": 10, "final_div_factor": 0.0},
        "scheduler.final_div_factor",
        "final_div_factor 0 makes torch divide by zero",
        ZeroDivisionError,
        id="one-cycle-final-div-factor",
    ),
    pytest.param(
        seq(
            exponential(0.9), {"name": "chained_scheduler", "schedulers": [exponential(0.9)]}, milestones=[3]
        ),
        "scheduler.schedulers[1]",
        "only the first scheduler may be a sequential_lr or chained_scheduler",
        NotImplementedError,
        id="sequential-composite-later",
    ),
]

OUR_ERRORS = [
    pytest.param(
        {"name": "warmup"},
        "scheduler.name",
        "unknown scheduler 'warmup'; allowed: chained_scheduler, ",
        id="unknown-name",
    ),
    pytest.param({}, "scheduler.name", "unknown scheduler None", id="no-name"),
    pytest.param(
        {"name": "step_lr", "step_size": 3, "gama": 0.5},
        "scheduler.gama",
        "unknown argument; allowed: step_size, gamma",
        id="unknown-argument",
    ),
    pytest.param(
        {"name": "step_lr", "step_size": "3"},
        "scheduler.step_size",
        "expected an integer, got '3'",
        id="wrong-type",
    ),
    pytest.param({"name": "step_lr"}, "scheduler.step_size", "is required", id="required"),
    pytest.param(
        cyclic(max_lr=[0.1, "fast"]),
        "scheduler.max_lr[1]",
        "expected a number, got 'fast'",
        id="per-group-item-type",
    ),
    pytest.param(
        cyclic(mode="sine"),
        "scheduler.mode",
        "'sine' is not one of 'triangular', 'triangular2', 'exp_range'",
        id="cyclic-mode",
    ),
    pytest.param(
        {"name": "one_cycle_lr", "max_lr": 0.1, "total_steps": 9, "anneal_strategy": "sin"},
        "scheduler.anneal_strategy",
        "is not one of 'cos', 'linear'",
        id="anneal-strategy",
    ),
    pytest.param(
        {"name": "reduce_lr_on_plateau", "threshold_mode": "pct"},
        "scheduler.threshold_mode",
        "is not one of 'rel', 'abs'",
        id="threshold-mode",
    ),
    pytest.param(
        seq(exponential(0.9), {"name": "cosine_annealing_lr", "T_max": 1.5}, milestones=[3]),
        "scheduler.schedulers[1].T_max",
        "expected an integer, got 1.5",
        id="nested-field",
    ),
    pytest.param(
        seq(exponential(0.9), {"name": "cosine"}, milestones=[3]),
        "scheduler.schedulers[1].name",
        "unknown scheduler 'cosine'",
        id="nested-name",
    ),
    pytest.param(
        {"name": "chained_scheduler", "schedulers": [seq({"name": "step_lr"}, milestones=[])]},
        "scheduler.schedulers[0].schedulers[0].step_size",
        "is required",
        id="doubly-nested",
    ),
    pytest.param(
        {"name": "chained_scheduler", "schedulers": [3]},
        "scheduler.schedulers",
        "expected an array of scheduler specs",
        id="spec-list-type",
    ),
    pytest.param(
        {"name": "inverse_time_lr", "decay_rate": 0.5, "decay_steps": 0},
        "scheduler.decay_steps",
        "Expected positive integer decay_steps, but got 0",
        id="inverse-steps",
    ),
    pytest.param(
        {"name": "inverse_time_lr", "decay_rate": -0.5, "decay_steps": 3},
        "scheduler.decay_rate",
        "Expected non-negative decay_rate, but got -0.5",
        id="inverse-rate",
    ),
    pytest.param(
        {"name": "piecewise_constant_lr", "boundaries": [5, 5], "factors": [1.0, 0.5, 0.1]},
        "scheduler.boundaries",
        "boundaries must be strictly increasing, got [5, 5]",
        id="piecewise-boundaries",
    ),
    pytest.param(
        {"name": "piecewise_constant_lr", "boundaries": [5], "factors": [1.0]},
        "scheduler.factors",
        "expected 2 factors (one more than boundaries), got 1",
        id="piecewise-factors",
    ),
]


def assert_rejected(spec: dict[str, Any], kind: str, field: str, message: str) -> None:
    opt = torch_optimizer(kind)
    groups = plain_groups(opt)
    with pytest.raises(SpecError) as info:
        build_scheduler(spec, groups)
    assert [e.field for e in info.value.errors] == [field]
    assert message in info.value.errors[0].message
    assert groups == plain_groups(opt), "a rejected spec must leave the groups alone"


@pytest.mark.parametrize(("spec", "kind", "field", "message"), TORCH_ERRORS)
def test_rejects_what_torch_rejects_with_its_message(
    spec: dict[str, Any], kind: str, field: str, message: str
) -> None:
    assert_rejected(spec, kind, field, message)
    with pytest.raises(ValueError, match=re.escape(message)):
        torch_scheduler(spec, torch_optimizer(kind))


@pytest.mark.parametrize(("spec", "field", "message", "exception"), TORCH_CRASHES)
def test_rejects_what_torch_later_crashes_on(
    spec: dict[str, Any], field: str, message: str, exception: type[Exception]
) -> None:
    assert_rejected(spec, "sgd", field, message)
    with pytest.raises(exception):
        run_torch(spec, "sgd")


@pytest.mark.parametrize(("spec", "field", "message"), OUR_ERRORS)
def test_rejects_malformed_specs_naming_the_field(spec: dict[str, Any], field: str, message: str) -> None:
    assert_rejected(spec, "sgd", field, message)


def test_a_bad_inner_spec_leaves_the_groups_alone() -> None:
    groups: list[dict[str, Any]] = [{"lr": 0.1, "momentum": 0.9}]
    spec = seq(cyclic(), {"name": "step_lr", "step_size": -1}, milestones=[5])
    with pytest.raises(SpecError, match=r"scheduler\.schedulers\[1\]\.step_size"):
        build_scheduler(spec, groups)
    assert groups == [{"lr": 0.1, "momentum": 0.9}]


def test_prefix_names_the_fields() -> None:
    with pytest.raises(SpecError) as info:
        build_scheduler({"name": "step_lr"}, [{"lr": 0.1}], prefix="session.scheduler")
    assert info.value.errors[0].field == "session.scheduler.step_size"


def test_load_state_dict_rejects_a_state_of_another_shape() -> None:
    groups: list[dict[str, Any]] = [{"lr": 0.1}]
    chained = build_scheduler({"name": "chained_scheduler", "schedulers": [exponential(0.9)]}, groups)
    with pytest.raises(ValueError, match="_schedulers"):
        chained.load_state_dict({"_last_lr": [0.1], "_schedulers": []})
    with pytest.raises(ValueError, match="lacks last_epoch"):
        build_scheduler(exponential(0.9), groups).load_state_dict({})


def test_catalogue_lists_every_scheduler_with_its_arguments() -> None:
    catalogue = {entry["name"]: entry for entry in scheduler_catalogue()}
    assert catalogue.keys() == SCHEDULERS.keys()
    assert json.loads(json.dumps(catalogue)) == catalogue
    cyclic_args = {p["name"]: p for p in catalogue["cyclic_lr"]["hyperparameters"]}
    assert cyclic_args["max_lr"] == {
        "name": "max_lr",
        "type": "number | array[number]",
        "description": "upper lr boundary of the cycle",
        "required": True,
    }
    assert cyclic_args["mode"]["choices"] == ["triangular", "triangular2", "exp_range"]
    assert catalogue["reduce_lr_on_plateau"]["needs_metric"]
    assert {
        p["name"]: p["default"] for p in catalogue["one_cycle_lr"]["hyperparameters"] if "default" in p
    } == {
        "total_steps": None,
        "epochs": None,
        "steps_per_epoch": None,
        "pct_start": 0.3,
        "anneal_strategy": "cos",
        "cycle_momentum": True,
        "base_momentum": 0.85,
        "max_momentum": 0.95,
        "div_factor": 25.0,
        "final_div_factor": 1e4,
        "three_phase": False,
    }


def test_filled_spec_fills_defaults_in_nested_specs_and_keeps_per_group_arrays() -> None:
    spec = seq(cyclic(max_lr=[0.1, 0.2]), {"name": "step_lr", "step_size": 3}, milestones=[5])
    filled = filled_spec(spec)
    assert filled["schedulers"][0]["max_lr"] == [0.1, 0.2]
    assert filled["schedulers"][0]["step_size_down"] is None
    assert filled["schedulers"][1] == {"name": "step_lr", "step_size": 3, "gamma": 0.1}
    assert filled_spec(filled) == filled
    with pytest.raises(SpecError, match=r"scheduler\.schedulers\[1\]\.name"):
        filled_spec(seq(exponential(0.9), {"name": "cosine"}, milestones=[3]))
