"""SGD against torch.optim.SGD: every option combination, float64 and float32."""

import numpy as np
import pytest
import torch

from app.optim.hparams import SpecError
from tests.optim.oracle import assert_matches_torch, initial_params, run_ours

CASES = [
    {"name": "sgd", "lr": 0.05},
    {"name": "sgd", "lr": 0.05, "momentum": 0.9},
    {"name": "sgd", "lr": 0.05, "momentum": 0.9, "dampening": 0.3},
    {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True},
    {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
    {"name": "sgd", "lr": 0.05, "weight_decay": 0.1, "maximize": True},
    {"name": "sgd", "lr": 0.05, "momentum": 0.5, "dampening": 0.1, "weight_decay": 0.01, "maximize": True},
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(
    "spec", CASES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items() if k != "name")
)
def test_sgd_matches_torch_for_200_steps(spec: dict, dtype: type) -> None:
    assert_matches_torch(spec, torch.optim.SGD, dtype=dtype)


def test_sgd_momentum_with_skipped_gradients_matches_torch() -> None:
    assert_matches_torch({"name": "sgd", "lr": 0.05, "momentum": 0.9}, torch.optim.SGD, skip_every=3)


def test_sgd_param_groups_override_hyperparameters() -> None:
    groups = [{"params": ["w"], "lr": 0.1, "momentum": 0.5}, {"params": ["b"]}]
    assert_matches_torch({"name": "sgd", "lr": 0.01, "momentum": 0.9}, torch.optim.SGD, groups=groups)


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        ({"name": "sgd", "lr": -1.0}, "optimizer.lr", "Invalid learning rate: -1.0"),
        ({"name": "sgd", "momentum": -0.5}, "optimizer.momentum", "Invalid momentum value: -0.5"),
        ({"name": "sgd", "nesterov": True}, "optimizer.nesterov", "Nesterov momentum requires"),
        ({"name": "sgd", "lr": "fast"}, "optimizer.lr", "expected a number"),
        ({"name": "sgd", "betas": [0.9, 0.99]}, "optimizer.betas", "unknown argument"),
    ],
)
def test_sgd_rejects_invalid_spec_naming_the_field(spec: dict, field: str, message: str) -> None:
    with pytest.raises(SpecError) as info:
        run_ours(spec, initial_params({"w": (2,)}, np.float64), 1)
    assert info.value.errors[0].field == field
    assert message in info.value.errors[0].message
