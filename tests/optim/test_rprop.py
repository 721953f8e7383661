"""Rprop against torch.optim.Rprop: etas, step size bounds and maximize, float64 and float32."""

import torch

from tests.optim.cases import Table, contract

RPROP = Table(
    name="rprop",
    torch_cls=torch.optim.Rprop,
    cases=[
        {},
        {"lr": 0.05},
        {"lr": 0.05, "etas": [0.3, 1.5]},
        # a narrow band so both clamps bind: the size shrinks to the floor and grows to the ceiling
        {"lr": 0.05, "step_sizes": [0.01, 0.08]},
        {"lr": 0.05, "etas": [0.7, 1.1], "step_sizes": [1e-4, 0.2]},
        {"lr": 0.05, "maximize": True},
        {"lr": 0.02, "etas": [0.4, 1.3], "step_sizes": [1e-3, 0.1], "maximize": True},
    ],
    skipped=[{"lr": 0.05, "etas": [0.3, 1.5], "step_sizes": [1e-4, 0.2]}],
    groups=[
        # a group's lr is its initial step size
        (
            {"lr": 0.01},
            [
                {"params": ["w"], "lr": 0.1, "etas": [0.3, 1.5]},
                {"params": ["b"], "step_sizes": [1e-3, 0.05], "maximize": True},
            ],
        ),
    ],
    rejects=[
        ({"lr": -1.0}, "lr", "Invalid learning rate: -1.0"),
        ({"etas": [0.0, 1.2]}, "etas", "Invalid eta values: 0.0, 1.2"),
        ({"etas": [1.0, 1.2]}, "etas", "Invalid eta values: 1.0, 1.2"),
        ({"etas": [0.5, 1.0]}, "etas", "Invalid eta values: 0.5, 1.0"),
    ],
    malformed=[
        ({"etas": [0.5]}, "etas", "expected an array of 2 numbers"),
        ({"step_sizes": 1e-6}, "step_sizes", "expected an array of 2 numbers"),
        ({"weight_decay": 0.1}, "weight_decay", "unknown argument"),
    ],
    group_check=({"etas": [0.5, 0.9]}, "etas", "Invalid eta values: 0.5, 0.9"),
    first_step_slot="step_size",
)

TestRprop = contract(RPROP)
