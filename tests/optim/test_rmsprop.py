"""RMSprop against torch.optim.RMSprop: centered x momentum x weight decay x maximize, float64 and float32."""

import torch

from tests.optim.cases import Table, contract, grid

RMSPROP = Table(
    name="rmsprop",
    torch_cls=torch.optim.RMSprop,
    cases=[
        # centered, momentum 0.9 and maximize in float32 drifted to 1.07x the tolerance while the reference
        # rounded torch's fused add(alpha=)/addcmul_/lerp_ twice
        *grid(
            lr=[0.01],
            centered=[False, True],
            momentum=[0.0, 0.9],
            weight_decay=[0.0, 0.1],
            maximize=[False, True],
        ),
        {},
        {"alpha": 0.9, "eps": 1e-3},
        # 1 - alpha >= 0.5 takes the other branch of torch's lerp for the centered average
        {"alpha": 0.3, "centered": True},
        {"alpha": 0.5, "centered": True, "momentum": 0.5},
        {"lr": 0.005, "alpha": 0.8, "eps": 1e-6, "momentum": 0.5, "centered": True},
    ],
    skipped=[{"momentum": 0.9, "centered": True, "weight_decay": 0.01}],
    groups=[
        (
            {"lr": 0.005, "momentum": 0.0},
            [
                {"params": ["w"], "lr": 0.02, "alpha": 0.9, "momentum": 0.5, "centered": True},
                {"params": ["b"], "eps": 1e-4, "weight_decay": 0.1, "maximize": True},
            ],
        ),
    ],
    rejects=[
        ({"lr": -1.0}, "lr", "Invalid learning rate: -1.0"),
        ({"eps": -1e-8}, "eps", "Invalid epsilon value: -1e-08"),
        ({"momentum": -0.9}, "momentum", "Invalid momentum value: -0.9"),
        ({"weight_decay": -0.1}, "weight_decay", "Invalid weight_decay value: -0.1"),
        ({"alpha": -0.99}, "alpha", "Invalid alpha value: -0.99"),
    ],
    malformed=[
        ({"centered": 1}, "centered", "expected true or false"),
        ({"nesterov": True}, "nesterov", "unknown argument"),
    ],
    group_check=({"momentum": -1.0}, "momentum", "Invalid momentum value: -1.0"),
    read_only={"momentum": 0.9, "centered": True},
    state_options=[{}, {"momentum": 0.9, "centered": True}],
)

TestRMSprop = contract(RMSPROP)
