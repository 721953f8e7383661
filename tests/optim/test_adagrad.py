"""Adagrad against torch.optim.Adagrad: every option and their combinations, float64 and float32."""

import numpy as np
import pytest
import torch

from app.optim.hparams import SpecError, parse
from app.optim.registry import get_optimizer
from tests.optim.oracle import assert_matches_torch, initial_params, run_ours, torch_kwargs

CASES = [
    {"name": "adagrad"},
    {"name": "adagrad", "lr": 0.1},
    {"name": "adagrad", "lr": 0.1, "lr_decay": 0.01},
    {"name": "adagrad", "lr": 0.1, "initial_accumulator_value": 0.5},
    {"name": "adagrad", "lr": 0.1, "weight_decay": 0.1},
    {"name": "adagrad", "lr": 0.1, "eps": 1e-3},
    {"name": "adagrad", "lr": 0.1, "maximize": True},
    {"name": "adagrad", "lr": 0.1, "lr_decay": 0.05, "initial_accumulator_value": 0.1, "weight_decay": 0.01},
    {
        "name": "adagrad",
        "lr": 0.1,
        "lr_decay": 0.02,
        "initial_accumulator_value": 1.0,
        "weight_decay": 0.05,
        "eps": 1e-6,
        "maximize": True,
    },
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(
    "spec", CASES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items() if k != "name") or "defaults"
)
def test_adagrad_matches_torch_for_200_steps(spec: dict, dtype: type) -> None:
    assert_matches_torch(spec, torch.optim.Adagrad, dtype=dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_adagrad_with_skipped_gradients_matches_torch(dtype: type) -> None:
    spec = {"name": "adagrad", "lr": 0.1, "lr_decay": 0.01, "weight_decay": 0.01}
    assert_matches_torch(spec, torch.optim.Adagrad, dtype=dtype, skip_every=3)


def test_adagrad_param_groups_override_hyperparameters() -> None:
    # initial_accumulator_value is not overridden: torch fills every group's `sum` from the constructor value
    groups = [
        {"params": ["w"], "lr": 0.2, "lr_decay": 0.01, "eps": 1e-4},
        {"params": ["b"], "weight_decay": 0.1, "maximize": True},
    ]
    spec = {"name": "adagrad", "lr": 0.05, "initial_accumulator_value": 0.2}
    assert_matches_torch(spec, torch.optim.Adagrad, groups=groups)


@pytest.mark.parametrize(
    ("kwargs", "field", "message"),
    [
        ({"lr": -1.0}, "lr", "Invalid learning rate: -1.0"),
        ({"lr_decay": -0.1}, "lr_decay", "Invalid lr_decay value: -0.1"),
        ({"weight_decay": -0.1}, "weight_decay", "Invalid weight_decay value: -0.1"),
        (
            {"initial_accumulator_value": -0.5},
            "initial_accumulator_value",
            "Invalid initial_accumulator_value value: -0.5",
        ),
        ({"eps": -1e-10}, "eps", "Invalid epsilon value: -1e-10"),
    ],
)
def test_adagrad_rejects_what_torch_rejects_with_its_message(kwargs: dict, field: str, message: str) -> None:
    with pytest.raises(ValueError, match="Invalid") as theirs:
        torch.optim.Adagrad([torch.zeros(2)], **torch_kwargs(kwargs))
    assert str(theirs.value) == message
    with pytest.raises(SpecError) as ours:
        run_ours({"name": "adagrad", **kwargs}, initial_params({"w": (2,)}, np.float64), 1)
    assert [(e.field, e.message) for e in ours.value.errors] == [(f"optimizer.{field}", message)]


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        ({"name": "adagrad", "lr_decay": "slow"}, "optimizer.lr_decay", "expected a number"),
        ({"name": "adagrad", "momentum": 0.9}, "optimizer.momentum", "unknown argument"),
    ],
)
def test_adagrad_rejects_malformed_spec_naming_the_field(spec: dict, field: str, message: str) -> None:
    with pytest.raises(SpecError) as info:
        run_ours(spec, initial_params({"w": (2,)}, np.float64), 1)
    assert info.value.errors[0].field == field
    assert message in info.value.errors[0].message


def test_adagrad_group_check_names_the_group() -> None:
    groups = [{"params": ["w"], "lr_decay": -1.0}]
    with pytest.raises(SpecError) as info:
        run_ours({"name": "adagrad"}, initial_params({"w": (2,)}, np.float64), 1, groups=groups)
    assert [(e.field, e.message) for e in info.value.errors] == [
        ("param_groups[0].lr_decay", "Invalid lr_decay value: -1.0")
    ]


@pytest.mark.parametrize("maximize", [False, True])
def test_adagrad_never_writes_to_gradients(maximize: bool) -> None:
    opt = get_optimizer("adagrad")
    hp = parse(
        opt.hparams,
        {"name": "adagrad", "lr_decay": 0.01, "initial_accumulator_value": 0.1, "maximize": maximize},
        "optimizer",
    )
    param = initial_params({"w": (5, 4)}, np.float32)["w"]
    grad = np.linspace(-1.0, 1.0, param.size, dtype=np.float32).reshape(param.shape)
    expected = grad.copy()
    grad.setflags(write=False)
    state = opt.init_state(param, hp)
    for _ in range(3):
        opt.update([param], [grad], [state], hp)
    np.testing.assert_array_equal(grad, expected)
    assert param.dtype == np.float32
    assert all(value.dtype == np.float32 for value in state.values() if value.shape == param.shape)
