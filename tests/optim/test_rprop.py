"""Rprop against torch.optim.Rprop: etas, step size bounds and maximize, float64 and float32."""

import numpy as np
import pytest
import torch

from app.optim.hparams import SpecError, parse
from app.optim.registry import get_optimizer
from tests.optim.oracle import assert_matches_torch, gradient, initial_params, run_ours, torch_kwargs

CASES = [
    {"name": "rprop"},
    {"name": "rprop", "lr": 0.05},
    {"name": "rprop", "lr": 0.05, "etas": [0.3, 1.5]},
    # a narrow band so both clamps bind: the size shrinks to the floor and grows to the ceiling
    {"name": "rprop", "lr": 0.05, "step_sizes": [0.01, 0.08]},
    {"name": "rprop", "lr": 0.05, "etas": [0.7, 1.1], "step_sizes": [1e-4, 0.2]},
    {"name": "rprop", "lr": 0.05, "maximize": True},
    {"name": "rprop", "lr": 0.02, "etas": [0.4, 1.3], "step_sizes": [1e-3, 0.1], "maximize": True},
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(
    "spec", CASES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items() if k != "name") or "defaults"
)
def test_rprop_matches_torch_for_200_steps(spec: dict, dtype: type) -> None:
    assert_matches_torch(spec, torch.optim.Rprop, dtype=dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_rprop_with_skipped_gradients_matches_torch(dtype: type) -> None:
    spec = {"name": "rprop", "lr": 0.05, "etas": [0.3, 1.5], "step_sizes": [1e-4, 0.2]}
    assert_matches_torch(spec, torch.optim.Rprop, dtype=dtype, skip_every=3)


def test_rprop_param_groups_override_hyperparameters() -> None:
    # a group's lr is its initial step size
    groups = [
        {"params": ["w"], "lr": 0.1, "etas": [0.3, 1.5]},
        {"params": ["b"], "step_sizes": [1e-3, 0.05], "maximize": True},
    ]
    assert_matches_torch({"name": "rprop", "lr": 0.01}, torch.optim.Rprop, groups=groups)


@pytest.mark.parametrize(
    ("kwargs", "field", "message"),
    [
        ({"lr": -1.0}, "lr", "Invalid learning rate: -1.0"),
        ({"etas": [0.0, 1.2]}, "etas", "Invalid eta values: 0.0, 1.2"),
        ({"etas": [1.0, 1.2]}, "etas", "Invalid eta values: 1.0, 1.2"),
        ({"etas": [0.5, 1.0]}, "etas", "Invalid eta values: 0.5, 1.0"),
    ],
)
def test_rprop_rejects_what_torch_rejects_with_its_message(kwargs: dict, field: str, message: str) -> None:
    with pytest.raises(ValueError, match="Invalid") as theirs:
        torch.optim.Rprop([torch.zeros(2)], **torch_kwargs(kwargs))
    assert str(theirs.value) == message
    with pytest.raises(SpecError) as ours:
        run_ours({"name": "rprop", **kwargs}, initial_params({"w": (2,)}, np.float64), 1)
    assert [(e.field, e.message) for e in ours.value.errors] == [(f"optimizer.{field}", message)]


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        ({"name": "rprop", "etas": [0.5]}, "optimizer.etas", "expected an array of 2 numbers"),
        ({"name": "rprop", "step_sizes": 1e-6}, "optimizer.step_sizes", "expected an array of 2 numbers"),
        ({"name": "rprop", "weight_decay": 0.1}, "optimizer.weight_decay", "unknown argument"),
    ],
)
def test_rprop_rejects_malformed_spec_naming_the_field(spec: dict, field: str, message: str) -> None:
    with pytest.raises(SpecError) as info:
        run_ours(spec, initial_params({"w": (2,)}, np.float64), 1)
    assert info.value.errors[0].field == field
    assert message in info.value.errors[0].message


def test_rprop_group_check_names_the_group() -> None:
    groups = [{"params": ["w"], "etas": [0.5, 0.9]}]
    with pytest.raises(SpecError) as info:
        run_ours({"name": "rprop"}, initial_params({"w": (2,)}, np.float64), 1, groups=groups)
    assert [(e.field, e.message) for e in info.value.errors] == [
        ("param_groups[0].etas", "Invalid eta values: 0.5, 0.9")
    ]


@pytest.mark.parametrize("maximize", [False, True])
def test_rprop_never_writes_to_gradients(maximize: bool) -> None:
    opt = get_optimizer("rprop")
    hp = parse(opt.hparams, {"name": "rprop", "maximize": maximize}, "optimizer")
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


def test_rprop_state_takes_the_lr_of_the_first_step() -> None:
    """torch creates the state at a parameter's first step: an lr a scheduler set after creation counts."""
    opt = get_optimizer("rprop")
    created = parse(opt.hparams, {"lr": 0.1}, "optimizer")
    stepped = {**created, "lr": 0.03}
    param = initial_params({"w": (5, 4)}, np.float64)["w"]
    state = opt.init_state(param, created)
    tensor = torch.tensor(param.copy(), requires_grad=True)
    theirs = torch.optim.Rprop([tensor], lr=0.1)
    theirs.param_groups[0]["lr"] = 0.03
    for t in range(5):
        tensor.grad = torch.from_numpy(gradient(t, "w", tensor.detach().numpy(), 0))
        theirs.step()
        opt.update([param], [gradient(t, "w", param, 0)], [state], stepped)
        np.testing.assert_allclose(param, tensor.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(state["step_size"], theirs.state[tensor]["step_size"].numpy())
