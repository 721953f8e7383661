"""Adadelta against torch.optim.Adadelta: every option and their combinations, float64 and float32."""

import torch

from tests.optim.cases import Table, contract

ADADELTA = Table(
    name="adadelta",
    torch_cls=torch.optim.Adadelta,
    cases=[
        {},
        {"lr": 0.5},
        {"rho": 0.5},
        {"rho": 0.0},
        {"rho": 1.0},
        {"eps": 1e-4},
        {"weight_decay": 0.1},
        {"maximize": True},
        {"lr": 2.0, "rho": 0.95, "eps": 1e-5, "weight_decay": 0.05},
        {"lr": 0.5, "rho": 0.8, "eps": 1e-3, "weight_decay": 0.01, "maximize": True},
    ],
    skipped=[{"rho": 0.8, "weight_decay": 0.01}],
    groups=[
        (
            {"lr": 0.5, "rho": 0.95},
            [
                {"params": ["w"], "lr": 2.0, "rho": 0.5, "eps": 1e-4},
                {"params": ["b"], "weight_decay": 0.1, "maximize": True},
            ],
        ),
    ],
    rejects=[
        ({"lr": -1.0}, "lr", "Invalid learning rate: -1.0"),
        ({"rho": -0.1}, "rho", "Invalid rho value: -0.1"),
        ({"rho": 1.5}, "rho", "Invalid rho value: 1.5"),
        ({"eps": -1e-6}, "eps", "Invalid epsilon value: -1e-06"),
        ({"weight_decay": -0.1}, "weight_decay", "Invalid weight_decay value: -0.1"),
    ],
    malformed=[
        ({"rho": [0.9]}, "rho", "expected a number"),
        ({"betas": [0.9, 0.99]}, "betas", "unknown argument"),
    ],
    group_check=({"rho": 2.0}, "rho", "Invalid rho value: 2.0"),
)

TestAdadelta = contract(ADADELTA)
