"""Adagrad against torch.optim.Adagrad: every option and their combinations, float64 and float32."""

import torch

from tests.optim.cases import Table, contract

ADAGRAD = Table(
    name="adagrad",
    torch_cls=torch.optim.Adagrad,
    cases=[
        {},
        {"lr": 0.1},
        {"lr": 0.1, "lr_decay": 0.01},
        {"lr": 0.1, "initial_accumulator_value": 0.5},
        {"lr": 0.1, "weight_decay": 0.1},
        {"lr": 0.1, "eps": 1e-3},
        {"lr": 0.1, "maximize": True},
        {"lr": 0.1, "lr_decay": 0.05, "initial_accumulator_value": 0.1, "weight_decay": 0.01},
        {
            "lr": 0.1,
            "lr_decay": 0.02,
            "initial_accumulator_value": 1.0,
            "weight_decay": 0.05,
            "eps": 1e-6,
            "maximize": True,
        },
    ],
    skipped=[{"lr": 0.1, "lr_decay": 0.01, "weight_decay": 0.01}],
    groups=[
        # initial_accumulator_value is not overridden: torch fills every group's `sum` from the constructor's
        (
            {"lr": 0.05, "initial_accumulator_value": 0.2},
            [
                {"params": ["w"], "lr": 0.2, "lr_decay": 0.01, "eps": 1e-4},
                {"params": ["b"], "weight_decay": 0.1, "maximize": True},
            ],
        ),
    ],
    rejects=[
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
    malformed=[
        ({"lr_decay": "slow"}, "lr_decay", "expected a number"),
        ({"momentum": 0.9}, "momentum", "unknown argument"),
    ],
    group_check=({"lr_decay": -1.0}, "lr_decay", "Invalid lr_decay value: -1.0"),
    read_only={"lr_decay": 0.01, "initial_accumulator_value": 0.1},
)

TestAdagrad = contract(ADAGRAD)
