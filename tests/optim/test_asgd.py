"""ASGD against torch.optim.ASGD: the eta/mu schedule, averaging after t0, float64 and float32."""

from typing import Any

import numpy as np
import pytest
import torch

from app.optim.hparams import parse
from app.optim.registry import get_optimizer
from tests.optim.cases import DTYPES, Table, contract, dtype_id
from tests.optim.oracle import DEFAULT_SHAPES, TOL, TORCH_DTYPE, gradient, initial_params, torch_kwargs

ASGD = Table(
    name="asgd",
    torch_cls=torch.optim.ASGD,
    cases=[
        {},
        {"lr": 0.05},
        {"lr": 0.05, "lambd": 0.01, "alpha": 0.5},
        {"lr": 0.05, "t0": 50.0},
        {"lr": 0.05, "t0": 0.0},
        {"lr": 0.05, "weight_decay": 0.1},
        {"lr": 0.05, "maximize": True},
        {"lr": 0.1, "lambd": 0.05, "alpha": 0.9, "t0": 20.0, "weight_decay": 0.01, "maximize": True},
    ],
    skipped=[{"lr": 0.05, "lambd": 0.01, "t0": 30.0, "weight_decay": 0.01}],
    groups=[
        # a group's lr is also its initial eta
        (
            {"lr": 0.03},
            [
                {"params": ["w"], "lr": 0.1, "lambd": 0.02, "alpha": 0.6},
                {"params": ["b"], "t0": 10.0, "weight_decay": 0.1, "maximize": True},
            ],
        ),
    ],
    rejects=[
        ({"lr": -1.0}, "lr", "Invalid learning rate: -1.0"),
        ({"weight_decay": -0.1}, "weight_decay", "Invalid weight_decay value: -0.1"),
    ],
    malformed=[
        ({"t0": "later"}, "t0", "expected a number"),
        ({"momentum": 0.9}, "momentum", "unknown argument"),
    ],
    group_check=({"weight_decay": -1.0}, "weight_decay", "Invalid weight_decay value: -1.0"),
    read_only={"t0": 0.0},
    first_step_slot="eta",
)

TestASGD = contract(ASGD)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize(
    "spec",
    [
        {"name": "asgd", "lr": 0.05, "lambd": 0.01, "alpha": 0.5, "t0": 50.0},
        {"name": "asgd", "lr": 0.1, "lambd": 0.05, "t0": 0.0, "weight_decay": 0.01, "maximize": True},
    ],
    ids=["t0=50", "t0=0"],
)
def test_asgd_state_follows_torch_every_step(spec: dict, dtype: Any) -> None:
    """`ax` never feeds back into the parameters, so the oracle's parameter check cannot see it."""
    opt = get_optimizer("asgd")
    hp = parse(opt.hparams, spec, "optimizer")
    ours = initial_params(DEFAULT_SHAPES, dtype)
    states = {name: opt.init_state(p, hp) for name, p in ours.items()}
    tensors = {name: torch.tensor(p.copy(), dtype=TORCH_DTYPE[dtype]) for name, p in ours.items()}
    theirs = torch.optim.ASGD(list(tensors.values()), **torch_kwargs(spec))
    averaged = False
    for t in range(200):
        for name, tensor in tensors.items():
            tensor.grad = torch.from_numpy(gradient(t, name, tensor.numpy(), 0))
            opt.update([ours[name]], [gradient(t, name, ours[name], 0)], [states[name]], hp)
        theirs.step()
        for name, tensor in tensors.items():
            state, expected = states[name], theirs.state[tensor]
            assert float(state["step"]) == expected["step"].item()
            assert state["eta"] == expected["eta"].item(), f"eta at step {t + 1}"
            assert state["mu"] == expected["mu"].item(), f"mu at step {t + 1}"
            np.testing.assert_allclose(state["ax"], expected["ax"].numpy(), **TOL[dtype])
            averaged |= expected["mu"].item() != 1
    assert averaged, "averaging never started"
    assert states["w"]["eta"] < hp["lr"]
