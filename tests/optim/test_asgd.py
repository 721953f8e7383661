"""ASGD against torch.optim.ASGD: the eta/mu schedule, averaging after t0, float64 and float32."""

from typing import Any

import numpy as np
import pytest
import torch

from app.optim.hparams import SpecError, parse
from app.optim.registry import get_optimizer
from tests.optim.oracle import (
    DEFAULT_SHAPES,
    TOL,
    TORCH_DTYPE,
    assert_matches_torch,
    gradient,
    initial_params,
    run_ours,
    torch_kwargs,
)

CASES = [
    {"name": "asgd"},
    {"name": "asgd", "lr": 0.05},
    {"name": "asgd", "lr": 0.05, "lambd": 0.01, "alpha": 0.5},
    {"name": "asgd", "lr": 0.05, "t0": 50.0},
    {"name": "asgd", "lr": 0.05, "t0": 0.0},
    {"name": "asgd", "lr": 0.05, "weight_decay": 0.1},
    {"name": "asgd", "lr": 0.05, "maximize": True},
    {
        "name": "asgd",
        "lr": 0.1,
        "lambd": 0.05,
        "alpha": 0.9,
        "t0": 20.0,
        "weight_decay": 0.01,
        "maximize": True,
    },
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(
    "spec", CASES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items() if k != "name") or "defaults"
)
def test_asgd_matches_torch_for_200_steps(spec: dict, dtype: type) -> None:
    assert_matches_torch(spec, torch.optim.ASGD, dtype=dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
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


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_asgd_with_skipped_gradients_matches_torch(dtype: type) -> None:
    spec = {"name": "asgd", "lr": 0.05, "lambd": 0.01, "t0": 30.0, "weight_decay": 0.01}
    assert_matches_torch(spec, torch.optim.ASGD, dtype=dtype, skip_every=3)


def test_asgd_param_groups_override_hyperparameters() -> None:
    # a group's lr is also its initial eta
    groups = [
        {"params": ["w"], "lr": 0.1, "lambd": 0.02, "alpha": 0.6},
        {"params": ["b"], "t0": 10.0, "weight_decay": 0.1, "maximize": True},
    ]
    assert_matches_torch({"name": "asgd", "lr": 0.03}, torch.optim.ASGD, groups=groups)


@pytest.mark.parametrize(
    ("kwargs", "field", "message"),
    [
        ({"lr": -1.0}, "lr", "Invalid learning rate: -1.0"),
        ({"weight_decay": -0.1}, "weight_decay", "Invalid weight_decay value: -0.1"),
    ],
)
def test_asgd_rejects_what_torch_rejects_with_its_message(kwargs: dict, field: str, message: str) -> None:
    with pytest.raises(ValueError, match="Invalid") as theirs:
        torch.optim.ASGD([torch.zeros(2)], **torch_kwargs(kwargs))
    assert str(theirs.value) == message
    with pytest.raises(SpecError) as ours:
        run_ours({"name": "asgd", **kwargs}, initial_params({"w": (2,)}, np.float64), 1)
    assert [(e.field, e.message) for e in ours.value.errors] == [(f"optimizer.{field}", message)]


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        ({"name": "asgd", "t0": "later"}, "optimizer.t0", "expected a number"),
        ({"name": "asgd", "momentum": 0.9}, "optimizer.momentum", "unknown argument"),
    ],
)
def test_asgd_rejects_malformed_spec_naming_the_field(spec: dict, field: str, message: str) -> None:
    with pytest.raises(SpecError) as info:
        run_ours(spec, initial_params({"w": (2,)}, np.float64), 1)
    assert info.value.errors[0].field == field
    assert message in info.value.errors[0].message


def test_asgd_group_check_names_the_group() -> None:
    groups = [{"params": ["w"], "weight_decay": -1.0}]
    with pytest.raises(SpecError) as info:
        run_ours({"name": "asgd"}, initial_params({"w": (2,)}, np.float64), 1, groups=groups)
    assert [(e.field, e.message) for e in info.value.errors] == [
        ("param_groups[0].weight_decay", "Invalid weight_decay value: -1.0")
    ]


@pytest.mark.parametrize("maximize", [False, True])
def test_asgd_never_writes_to_gradients(maximize: bool) -> None:
    opt = get_optimizer("asgd")
    hp = parse(opt.hparams, {"name": "asgd", "t0": 0.0, "maximize": maximize}, "optimizer")
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


def test_asgd_state_takes_the_lr_of_the_first_step() -> None:
    """torch creates the state at a parameter's first step: an lr a scheduler set after creation counts."""
    opt = get_optimizer("asgd")
    created = parse(opt.hparams, {"lr": 0.1}, "optimizer")
    stepped = {**created, "lr": 0.03}
    param = initial_params({"w": (5, 4)}, np.float64)["w"]
    state = opt.init_state(param, created)
    tensor = torch.tensor(param.copy(), requires_grad=True)
    theirs = torch.optim.ASGD([tensor], lr=0.1)
    theirs.param_groups[0]["lr"] = 0.03
    for t in range(5):
        tensor.grad = torch.from_numpy(gradient(t, "w", tensor.detach().numpy(), 0))
        theirs.step()
        opt.update([param], [gradient(t, "w", param, 0)], [state], stepped)
        np.testing.assert_allclose(param, tensor.detach().numpy(), rtol=1e-10, atol=1e-12)
    assert state["eta"] == theirs.state[tensor]["eta"].item()
