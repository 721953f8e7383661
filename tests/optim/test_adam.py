"""Adam, AdamW, NAdam, RAdam and Adamax against torch.optim: every option, float64 and float32."""

import inspect
import itertools

import numpy as np
import pytest
import torch

from app.optim.hparams import SpecError, parse
from app.optim.registry import get_optimizer
from tests.optim.oracle import assert_matches_torch, initial_params, run_ours

TORCH = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "nadam": torch.optim.NAdam,
    "radam": torch.optim.RAdam,
    "adamax": torch.optim.Adamax,
}

CASES = [
    *(
        {
            "name": "adam",
            "lr": 0.05,
            "amsgrad": a,
            "weight_decay": wd,
            "decoupled_weight_decay": d,
            "maximize": m,
        }
        for a, wd, d, m in itertools.product([False, True], [0.0, 0.1], [False, True], [False, True])
    ),
    # beta1 = 0.3 puts lerp's weight 0.7 on torch's other formula
    {"name": "adam", "lr": 0.01, "betas": [0.3, 0.9], "eps": 1e-3},
    *(
        {"name": "adamw", "lr": 0.05, "amsgrad": a, "maximize": m}
        for a, m in itertools.product([False, True], [False, True])
    ),
    {"name": "adamw", "lr": 0.05, "weight_decay": 0.0},
    {"name": "adamw", "lr": 0.05, "weight_decay": 0.3, "betas": [0.5, 0.99], "amsgrad": True},
    *(
        {"name": "nadam", "lr": 0.02, "momentum_decay": md, "weight_decay": wd, "decoupled_weight_decay": d}
        for md, wd, d in itertools.product([4e-3, 0.0, 0.05], [0.0, 0.1], [False, True])
    ),
    {"name": "nadam", "lr": 0.02, "betas": [0.4, 0.95], "weight_decay": 0.05, "maximize": True},
    *(
        {"name": "radam", "lr": 0.05, "weight_decay": wd, "decoupled_weight_decay": d}
        for wd, d in itertools.product([0.0, 0.1], [False, True])
    ),
    {"name": "radam", "lr": 0.05, "betas": [0.3, 0.99], "eps": 1e-4, "weight_decay": 0.05, "maximize": True},
    *(
        {"name": "adamax", "lr": 0.05, "weight_decay": wd, "maximize": m}
        for wd, m in itertools.product([0.0, 0.1], [False, True])
    ),
    {"name": "adamax", "lr": 0.05, "betas": [0.45, 0.9], "eps": 1e-2},
]


def case_id(spec: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in spec.items())


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("spec", CASES, ids=case_id)
def test_matches_torch_for_200_steps(spec: dict, dtype: type) -> None:
    assert_matches_torch(spec, TORCH[spec["name"]], dtype=dtype)


def test_radam_cases_cross_the_rectification_switch() -> None:
    """rho_t (torch's formula) starts at or below 5 and exceeds it within the 200 compared steps."""
    for spec in CASES:
        if spec["name"] != "radam":
            continue
        beta2 = spec.get("betas", [0.9, 0.999])[1]
        rho_inf = 2 / (1 - beta2) - 1
        rho = [rho_inf - 2 * t * beta2**t / (1 - beta2**t) for t in range(1, 201)]
        assert rho[0] <= 5.0 < rho[-1], spec


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(
    "spec",
    [
        {"name": "adam", "lr": 0.05, "amsgrad": True, "weight_decay": 0.1},
        {"name": "adamw", "lr": 0.05},
        {"name": "nadam", "lr": 0.02, "weight_decay": 0.1, "decoupled_weight_decay": True},
        {"name": "radam", "lr": 0.05, "weight_decay": 0.1},
        {"name": "adamax", "lr": 0.05, "weight_decay": 0.1},
    ],
    ids=case_id,
)
def test_skipped_gradients_keep_per_parameter_steps(spec: dict, dtype: type) -> None:
    assert_matches_torch(spec, TORCH[spec["name"]], dtype=dtype, skip_every=3)


@pytest.mark.parametrize(
    ("spec", "override"),
    [
        (
            {"name": "adam", "lr": 0.01},
            {"lr": 0.1, "betas": [0.8, 0.99], "amsgrad": True, "weight_decay": 0.1},
        ),
        ({"name": "adamw", "lr": 0.01, "amsgrad": True}, {"amsgrad": False, "weight_decay": 0.2}),
        (
            {"name": "nadam", "lr": 0.01},
            {"momentum_decay": 0.02, "weight_decay": 0.1, "decoupled_weight_decay": True},
        ),
        ({"name": "radam", "lr": 0.01}, {"lr": 0.05, "betas": [0.5, 0.99], "weight_decay": 0.1}),
        ({"name": "adamax", "lr": 0.01}, {"lr": 0.05, "eps": 1e-3, "maximize": True}),
    ],
    ids=lambda v: v.get("name", ""),
)
def test_param_groups_override_hyperparameters(spec: dict, override: dict) -> None:
    groups = [{"params": ["w"], **override}, {"params": ["b"]}]
    assert_matches_torch(spec, TORCH[spec["name"]], groups=groups)


@pytest.mark.parametrize("name", TORCH)
def test_hyperparameters_match_the_torch_constructor(name: str) -> None:
    """Names, defaults and order as torch's signature, minus the implementation switches."""
    switches = {"params", "foreach", "fused", "capturable", "differentiable"}
    signature = inspect.signature(TORCH[name].__init__).parameters.values()
    theirs = [(p.name, p.default) for p in signature if p.name not in switches | {"self"}]
    ours = [(p.name, p.default) for p in get_optimizer(name).hparams]
    assert ours == theirs


@pytest.mark.parametrize(
    ("name", "amsgrad"), [*((name, False) for name in TORCH), ("adam", True), ("adamw", True)]
)
def test_state_slots_match_torch(name: str, amsgrad: bool) -> None:
    kwargs = {"amsgrad": True} if amsgrad else {}
    p = torch.zeros(3, requires_grad=True)
    opt = TORCH[name]([p], **kwargs)
    p.grad = torch.ones(3)
    opt.step()
    theirs = opt.state[p]
    optimizer = get_optimizer(name)
    ours = optimizer.init_state(np.zeros(3), parse(optimizer.hparams, kwargs, "optimizer"))
    assert set(ours) == set(theirs)
    for key, value in ours.items():
        assert value.shape == tuple(theirs[key].shape), key


@pytest.mark.parametrize("name", TORCH)
def test_update_never_writes_to_read_only_gradients(name: str) -> None:
    optimizer = get_optimizer(name)
    hp = parse(optimizer.hparams, {"weight_decay": 0.1, "maximize": True}, "optimizer")
    params = initial_params({"w": (5, 4), "s": ()}, np.float32)
    grads = [np.ones_like(p) for p in params.values()]
    for grad in grads:
        grad.flags.writeable = False
    states = [optimizer.init_state(p, hp) for p in params.values()]
    before = {k: v.copy() for k, v in params.items()}
    for _ in range(3):
        optimizer.update(list(params.values()), grads, states, hp)
    assert all(g.dtype == np.float32 and (g == 1).all() for g in grads)
    assert all(params[k].dtype == np.float32 and not np.array_equal(params[k], before[k]) for k in params)


def _torch_message(name: str, kwargs: dict) -> str:
    with pytest.raises(ValueError, match=r"^Invalid") as info:
        TORCH[name]([torch.zeros(1, requires_grad=True)], **kwargs)
    return str(info.value)


CHECKS = [
    ({"lr": -1.0}, "lr", "Invalid learning rate: -1.0"),
    ({"eps": -1e-8}, "eps", "Invalid epsilon value: -1e-08"),
    ({"betas": [1.0, 0.999]}, "betas", "Invalid beta parameter at index 0: 1.0"),
    ({"betas": [-0.1, 0.999]}, "betas", "Invalid beta parameter at index 0: -0.1"),
    ({"betas": [0.9, 1.0]}, "betas", "Invalid beta parameter at index 1: 1.0"),
    ({"weight_decay": -0.1}, "weight_decay", "Invalid weight_decay value: -0.1"),
]


@pytest.mark.parametrize(
    ("name", "args", "field", "message"),
    [
        *((name, *check) for name, check in itertools.product(TORCH, CHECKS)),
        ("nadam", {"momentum_decay": -0.5}, "momentum_decay", "Invalid momentum_decay value: -0.5"),
    ],
)
def test_rejects_what_torch_rejects_with_its_message(name: str, args: dict, field: str, message: str) -> None:
    assert (
        _torch_message(name, {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}) == message
    )
    with pytest.raises(SpecError) as info:
        run_ours({"name": name, **args}, initial_params({"w": (2,)}, np.float64), 1)
    assert [(e.field, e.message) for e in info.value.errors] == [(f"optimizer.{field}", message)]


def test_both_bad_betas_are_reported_at_once() -> None:
    with pytest.raises(SpecError) as info:
        run_ours({"name": "adam", "betas": [1.5, -1.0]}, initial_params({"w": (2,)}, np.float64), 1)
    assert [(e.field, e.message) for e in info.value.errors] == [
        ("optimizer.betas", "Invalid beta parameter at index 0: 1.5"),
        ("optimizer.betas", "Invalid beta parameter at index 1: -1.0"),
    ]


def test_param_group_checks_name_the_group() -> None:
    groups = [{"params": ["w"], "eps": -1.0}]
    with pytest.raises(SpecError) as info:
        run_ours({"name": "radam"}, initial_params({"w": (2,)}, np.float64), 1, groups=groups)
    assert [(e.field, e.message) for e in info.value.errors] == [
        ("param_groups[0].eps", "Invalid epsilon value: -1.0")
    ]


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        (
            {"name": "adamw", "decoupled_weight_decay": False},
            "optimizer.decoupled_weight_decay",
            "unknown argument",
        ),
        ({"name": "adamax", "amsgrad": True}, "optimizer.amsgrad", "unknown argument"),
        ({"name": "adam", "betas": [0.9]}, "optimizer.betas", "expected an array of 2 numbers"),
        ({"name": "nadam", "momentum_decay": "slow"}, "optimizer.momentum_decay", "expected a number"),
    ],
)
def test_rejects_malformed_spec_naming_the_field(spec: dict, field: str, message: str) -> None:
    with pytest.raises(SpecError) as info:
        run_ours(spec, initial_params({"w": (2,)}, np.float64), 1)
    assert info.value.errors[0].field == field
    assert message in info.value.errors[0].message
