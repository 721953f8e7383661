"""Adadelta against torch.optim.Adadelta: every option and their combinations, float64 and float32."""

import numpy as np
import pytest
import torch

from app.optim.hparams import SpecError, parse
from app.optim.registry import get_optimizer
from tests.optim.oracle import assert_matches_torch, initial_params, run_ours, torch_kwargs

CASES = [
    {"name": "adadelta"},
    {"name": "adadelta", "lr": 0.5},
    {"name": "adadelta", "rho": 0.5},
    {"name": "adadelta", "rho": 0.0},
    {"name": "adadelta", "rho": 1.0},
    {"name": "adadelta", "eps": 1e-4},
    {"name": "adadelta", "weight_decay": 0.1},
    {"name": "adadelta", "maximize": True},
    {"name": "adadelta", "lr": 2.0, "rho": 0.95, "eps": 1e-5, "weight_decay": 0.05},
    {"name": "adadelta", "lr": 0.5, "rho": 0.8, "eps": 1e-3, "weight_decay": 0.01, "maximize": True},
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(
    "spec", CASES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items() if k != "name") or "defaults"
)
def test_adadelta_matches_torch_for_200_steps(spec: dict, dtype: type) -> None:
    assert_matches_torch(spec, torch.optim.Adadelta, dtype=dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_adadelta_with_skipped_gradients_matches_torch(dtype: type) -> None:
    spec = {"name": "adadelta", "rho": 0.8, "weight_decay": 0.01}
    assert_matches_torch(spec, torch.optim.Adadelta, dtype=dtype, skip_every=3)


def test_adadelta_param_groups_override_hyperparameters() -> None:
    groups = [
        {"params": ["w"], "lr": 2.0, "rho": 0.5, "eps": 1e-4},
        {"params": ["b"], "weight_decay": 0.1, "maximize": True},
    ]
    assert_matches_torch({"name": "adadelta", "lr": 0.5, "rho": 0.95}, torch.optim.Adadelta, groups=groups)


@pytest.mark.parametrize(
    ("kwargs", "field", "message"),
    [
        ({"lr": -1.0}, "lr", "Invalid learning rate: -1.0"),
        ({"rho": -0.1}, "rho", "Invalid rho value: -0.1"),
        ({"rho": 1.5}, "rho", "Invalid rho value: 1.5"),
        ({"eps": -1e-6}, "eps", "Invalid epsilon value: -1e-06"),
        ({"weight_decay": -0.1}, "weight_decay", "Invalid weight_decay value: -0.1"),
    ],
)
def test_adadelta_rejects_what_torch_rejects_with_its_message(kwargs: dict, field: str, message: str) -> None:
    with pytest.raises(ValueError, match="Invalid") as theirs:
        torch.optim.Adadelta([torch.zeros(2)], **torch_kwargs(kwargs))
    assert str(theirs.value) == message
    with pytest.raises(SpecError) as ours:
        run_ours({"name": "adadelta", **kwargs}, initial_params({"w": (2,)}, np.float64), 1)
    assert [(e.field, e.message) for e in ours.value.errors] == [(f"optimizer.{field}", message)]


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        ({"name": "adadelta", "rho": [0.9]}, "optimizer.rho", "expected a number"),
        ({"name": "adadelta", "betas": [0.9, 0.99]}, "optimizer.betas", "unknown argument"),
    ],
)
def test_adadelta_rejects_malformed_spec_naming_the_field(spec: dict, field: str, message: str) -> None:
    with pytest.raises(SpecError) as info:
        run_ours(spec, initial_params({"w": (2,)}, np.float64), 1)
    assert info.value.errors[0].field == field
    assert message in info.value.errors[0].message


def test_adadelta_group_check_names_the_group() -> None:
    groups = [{"params": ["w"], "rho": 2.0}]
    with pytest.raises(SpecError) as info:
        run_ours({"name": "adadelta"}, initial_params({"w": (2,)}, np.float64), 1, groups=groups)
    assert [(e.field, e.message) for e in info.value.errors] == [
        ("param_groups[0].rho", "Invalid rho value: 2.0")
    ]


@pytest.mark.parametrize("maximize", [False, True])
def test_adadelta_never_writes_to_gradients(maximize: bool) -> None:
    opt = get_optimizer("adadelta")
    hp = parse(opt.hparams, {"name": "adadelta", "maximize": maximize}, "optimizer")
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
