"""Adam, AdamW, NAdam, RAdam and Adamax against torch.optim: every option, float64 and float32."""

from functools import partial

import numpy as np
import pytest
import torch

from app.optim.hparams import SpecError
from tests.optim.cases import Rejection, Table, contract, grid
from tests.optim.oracle import initial_params, run_ours

# Adam's options, every combination; test_fused runs the kernels over it too
ADAM_GRID = grid(
    lr=[0.05],
    amsgrad=[False, True],
    weight_decay=[0.0, 0.1],
    decoupled_weight_decay=[False, True],
    maximize=[False, True],
)

# the constructor checks every optimizer of the family makes, in torch's words
CHECKS: list[Rejection] = [
    ({"lr": -1.0}, "lr", "Invalid learning rate: -1.0"),
    ({"eps": -1e-8}, "eps", "Invalid epsilon value: -1e-08"),
    ({"betas": [1.0, 0.999]}, "betas", "Invalid beta parameter at index 0: 1.0"),
    ({"betas": [-0.1, 0.999]}, "betas", "Invalid beta parameter at index 0: -0.1"),
    ({"betas": [0.9, 1.0]}, "betas", "Invalid beta parameter at index 1: 1.0"),
    ({"weight_decay": -0.1}, "weight_decay", "Invalid weight_decay value: -0.1"),
]
# what the family's tables share unless they say otherwise
FamilyTable = partial(
    Table,
    rejects=CHECKS,
    group_check=({"eps": -1.0}, "eps", "Invalid epsilon value: -1.0"),
    read_only={"weight_decay": 0.1},
)


def _override(spec: dict, override: dict) -> tuple[dict, list[dict]]:
    """A param-group row: `w` in a group with `override`, `b` in one with the spec's values."""
    return spec, [{"params": ["w"], **override}, {"params": ["b"]}]


ADAM = FamilyTable(
    name="adam",
    torch_cls=torch.optim.Adam,
    cases=[
        *ADAM_GRID,
        # beta1 = 0.3 puts lerp's weight 0.7 on torch's other formula
        {"lr": 0.01, "betas": [0.3, 0.9], "eps": 1e-3},
    ],
    skipped=[{"lr": 0.05, "amsgrad": True, "weight_decay": 0.1}],
    groups=[
        _override({"lr": 0.01}, {"lr": 0.1, "betas": [0.8, 0.99], "amsgrad": True, "weight_decay": 0.1}),
    ],
    malformed=[({"betas": [0.9]}, "betas", "expected an array of 2 numbers")],
    state_options=[{}, {"amsgrad": True}],
    fused=True,
)

ADAMW = FamilyTable(
    name="adamw",
    torch_cls=torch.optim.AdamW,
    cases=[
        *grid(lr=[0.05], amsgrad=[False, True], maximize=[False, True]),
        {"lr": 0.05, "weight_decay": 0.0},
        {"lr": 0.05, "weight_decay": 0.3, "betas": [0.5, 0.99], "amsgrad": True},
    ],
    skipped=[{"lr": 0.05}],
    groups=[_override({"lr": 0.01, "amsgrad": True}, {"amsgrad": False, "weight_decay": 0.2})],
    malformed=[({"decoupled_weight_decay": False}, "decoupled_weight_decay", "unknown argument")],
    state_options=[{}, {"amsgrad": True}],
    fused=True,
)

NADAM = FamilyTable(
    name="nadam",
    torch_cls=torch.optim.NAdam,
    cases=[
        *grid(
            lr=[0.02],
            momentum_decay=[4e-3, 0.0, 0.05],
            weight_decay=[0.0, 0.1],
            decoupled_weight_decay=[False, True],
        ),
        {"lr": 0.02, "betas": [0.4, 0.95], "weight_decay": 0.05, "maximize": True},
    ],
    skipped=[{"lr": 0.02, "weight_decay": 0.1, "decoupled_weight_decay": True}],
    groups=[
        _override(
            {"lr": 0.01}, {"momentum_decay": 0.02, "weight_decay": 0.1, "decoupled_weight_decay": True}
        ),
    ],
    rejects=[*CHECKS, ({"momentum_decay": -0.5}, "momentum_decay", "Invalid momentum_decay value: -0.5")],
    malformed=[({"momentum_decay": "slow"}, "momentum_decay", "expected a number")],
)

RADAM = FamilyTable(
    name="radam",
    torch_cls=torch.optim.RAdam,
    cases=[
        *grid(lr=[0.05], weight_decay=[0.0, 0.1], decoupled_weight_decay=[False, True]),
        {"lr": 0.05, "betas": [0.3, 0.99], "eps": 1e-4, "weight_decay": 0.05, "maximize": True},
    ],
    skipped=[{"lr": 0.05, "weight_decay": 0.1}],
    groups=[_override({"lr": 0.01}, {"lr": 0.05, "betas": [0.5, 0.99], "weight_decay": 0.1})],
    malformed=[({"momentum_decay": 4e-3}, "momentum_decay", "unknown argument")],
)

ADAMAX = FamilyTable(
    name="adamax",
    torch_cls=torch.optim.Adamax,
    cases=[
        *grid(lr=[0.05], weight_decay=[0.0, 0.1], maximize=[False, True]),
        {"lr": 0.05, "betas": [0.45, 0.9], "eps": 1e-2},
    ],
    skipped=[{"lr": 0.05, "weight_decay": 0.1}],
    groups=[_override({"lr": 0.01}, {"lr": 0.05, "eps": 1e-3, "maximize": True})],
    malformed=[({"amsgrad": True}, "amsgrad", "unknown argument")],
)

TestAdam = contract(ADAM)
TestAdamW = contract(ADAMW)
TestNAdam = contract(NADAM)
TestRAdam = contract(RADAM)
TestAdamax = contract(ADAMAX)


def test_radam_cases_cross_the_rectification_switch() -> None:
    """rho_t (torch's formula) starts at or below 5 and exceeds it within the 200 compared steps."""
    for spec in RADAM.cases:
        beta2 = spec.get("betas", [0.9, 0.999])[1]
        rho_inf = 2 / (1 - beta2) - 1
        rho = [rho_inf - 2 * t * beta2**t / (1 - beta2**t) for t in range(1, 201)]
        assert rho[0] <= 5.0 < rho[-1], spec


@pytest.mark.parametrize("name", ["adam", "adamw", "nadam", "radam", "adamax"])
def test_both_bad_betas_are_reported_at_once(name: str) -> None:
    with pytest.raises(SpecError) as info:
        run_ours({"name": name, "betas": [1.5, -1.0]}, initial_params({"w": (2,)}, np.float64), 1)
    assert [(e.field, e.message) for e in info.value.errors] == [
        ("optimizer.betas", "Invalid beta parameter at index 0: 1.5"),
        ("optimizer.betas", "Invalid beta parameter at index 1: -1.0"),
    ]
