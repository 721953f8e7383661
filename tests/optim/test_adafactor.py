"""Adafactor against torch.optim.Adafactor: every option, factored and unfactored shapes, both dtypes."""

import re

import numpy as np
import pytest
import torch

from app.optim.adafactor import Adafactor, torch_sum
from app.optim.hparams import SpecError, parse
from tests.optim.oracle import assert_matches_torch, assert_one_step_matches_torch, initial_params, run_ours

# 1-D (full variance), 2-D with rows > cols and rows < cols, a 3-D parameter (factored over the last
# two axes) and one long enough that torch's sums take their vectorized path
SHAPES = {"w": (5, 4), "b": (4,), "v": (3, 7), "c": (2, 3, 4), "long": (17, 33)}

CASES = [
    {"name": "adafactor"},
    {"name": "adafactor", "lr": 0.05, "eps": [None, 1e-2]},
    {"name": "adafactor", "lr": 0.05, "eps": [1e-3, 1e-3]},
    {"name": "adafactor", "lr": 0.05, "eps": [1e-30, 0.0], "d": 1.5},
    {"name": "adafactor", "lr": 0.5, "d": 3.0, "weight_decay": 0.1},
    {"name": "adafactor", "lr": 0.05, "beta2_decay": -0.5, "maximize": True},
    {"name": "adafactor", "lr": 0.02, "beta2_decay": 0.0, "weight_decay": 0.01, "d": 1.0},
    {
        "name": "adafactor",
        "lr": 0.05,
        "beta2_decay": -0.3,
        "eps": [1e-8, 1e-4],
        "d": 2.0,
        "weight_decay": 0.05,
        "maximize": True,
    },
]


def _id(spec: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in spec.items() if k != "name") or "defaults"


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("spec", CASES, ids=_id)
def test_adafactor_matches_torch_for_200_steps(spec: dict, dtype: type) -> None:
    assert_matches_torch(spec, torch.optim.Adafactor, dtype=dtype, shapes=SHAPES)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("spec", CASES, ids=_id)
def test_adafactor_one_step_from_a_shared_state_matches_torch(spec: dict, dtype: type) -> None:
    assert_one_step_matches_torch(spec, torch.optim.Adafactor, dtype=dtype, shapes=SHAPES)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_adafactor_with_skipped_gradients_matches_torch(dtype: type) -> None:
    # a skipped parameter keeps its own step count, which drives beta2_t and rho_t
    assert_matches_torch(
        {"name": "adafactor", "lr": 0.05, "weight_decay": 0.01},
        torch.optim.Adafactor,
        dtype=dtype,
        shapes=SHAPES,
        skip_every=3,
    )


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_adafactor_param_groups_override_hyperparameters(dtype: type) -> None:
    groups = [
        {"params": ["w", "c"], "lr": 0.1, "eps": [1e-3, 1e-3], "maximize": True},
        {"params": ["b"], "d": 2.0, "beta2_decay": -0.5},
        {"params": ["v", "long"]},
    ]
    assert_matches_torch(
        {"name": "adafactor", "lr": 0.02, "weight_decay": 0.05},
        torch.optim.Adafactor,
        dtype=dtype,
        shapes=SHAPES,
        groups=groups,
    )


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_adafactor_scalar_parameter_matches_torch(dtype: type) -> None:
    # the oracle cannot hand out 0-d gradients, so this drives both optimizers directly
    opt = Adafactor()
    hp = parse(opt.hparams, {"lr": 0.05, "weight_decay": 0.1}, "optimizer")
    ours = np.array(1.5, dtype=dtype)
    state = opt.init_state(ours, hp)
    theirs = torch.tensor(1.5, dtype=torch.float64 if dtype == np.float64 else torch.float32)
    theirs.requires_grad_()
    reference = torch.optim.Adafactor([theirs], lr=0.05, weight_decay=0.1)
    rng = np.random.default_rng(0)
    for step in range(50):
        grad = np.array(rng.standard_normal() + 0.1 * float(ours), dtype=dtype)
        theirs.grad = torch.from_numpy(grad.copy())
        reference.step()
        opt.update([ours], [grad], [state], hp)
        assert ours.shape == ()
        np.testing.assert_allclose(ours, theirs.detach().numpy(), rtol=1e-12, err_msg=f"step {step + 1}")
    assert float(state["step"]) == 50


@pytest.mark.parametrize("shape", [(), (4,), (5, 4), (2, 3, 4)])
def test_adafactor_state_slots_are_torchs(shape: tuple[int, ...]) -> None:
    param = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
    reference = torch.optim.Adafactor([param])
    param.grad = torch.ones(shape, dtype=torch.float64)
    reference.step()
    theirs = reference.state[param]
    ours = Adafactor().init_state(np.zeros(shape), parse(Adafactor.hparams, {}, "optimizer"))
    assert set(ours) == set(theirs)
    for key, value in ours.items():
        assert value.shape == tuple(theirs[key].shape), key
        assert value.dtype == np.float64


@pytest.mark.parametrize("n", [1, 3, 5, 8, 13, 64, 70, 1000, 5000])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_torch_sum_adds_in_torchs_order(n: int, dtype: type) -> None:
    rng = np.random.default_rng(n)
    x = (np.abs(rng.standard_normal((3, n))) * 10.0 ** rng.uniform(-3, 1, (3, n))).astype(dtype)
    expected = torch.from_numpy(x).sum(dim=-1).numpy()
    np.testing.assert_array_equal(torch_sum(x), expected)


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        ({"lr": -1.0}, "optimizer.lr", "Learning rate should be >= 0 but is: -1.0"),
        ({"beta2_decay": 0.5}, "optimizer.beta2_decay", "beta2_decay should be <= 0 but is: 0.5"),
        ({"eps": [-1e-3, 1e-3]}, "optimizer.eps", "epsilon1 should be >= 0 but is: -0.001"),
        ({"eps": [None, -1.0]}, "optimizer.eps", "epsilon2 should be >= 0 but is: -1.0"),
        ({"eps": [1e-3, None]}, "optimizer.eps", "epsilon2 must be a number"),
        ({"eps": [1e-3]}, "optimizer.eps", "expected an array of 2 numbers"),
        ({"eps": ["tiny", 1e-3]}, "optimizer.eps", "expected an array of 2 numbers"),
        ({"d": 0.5}, "optimizer.d", "Clipping threshold d should be >= 1 but is: 0.5"),
        ({"weight_decay": -0.1}, "optimizer.weight_decay", "weight_decay should be >= 0 but is: -0.1"),
        ({"foreach": True}, "optimizer.foreach", "unknown argument"),
    ],
)
def test_adafactor_rejects_invalid_spec_naming_the_field(spec: dict, field: str, message: str) -> None:
    with pytest.raises(SpecError) as info:
        run_ours({"name": "adafactor", **spec}, initial_params({"w": (2,)}, np.float64), 1)
    assert info.value.errors[0].field == field
    assert message in info.value.errors[0].message


def test_adafactor_messages_are_torchs() -> None:
    for kwargs, message in [
        ({"lr": -1.0}, "Learning rate should be >= 0 but is: -1.0"),
        ({"beta2_decay": 0.5}, "beta2_decay should be <= 0 but is: 0.5"),
        ({"eps": (-1e-3, 1e-3)}, "epsilon1 should be >= 0 but is: -0.001"),
        ({"d": 0.5}, "Clipping threshold d should be >= 1 but is: 0.5"),
        ({"weight_decay": -0.1}, "weight_decay should be >= 0 but is: -0.1"),
    ]:
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            torch.optim.Adafactor([torch.zeros(2, requires_grad=True)], **kwargs)


def test_adafactor_defaults_and_order_are_torchs() -> None:
    assert [p.name for p in Adafactor.hparams] == [
        "lr",
        "beta2_decay",
        "eps",
        "d",
        "weight_decay",
        "maximize",
    ]
    defaults = torch.optim.Adafactor([torch.zeros(2, requires_grad=True)]).defaults
    for p in Adafactor.hparams:
        assert p.default == defaults[p.name], p.name


@pytest.mark.parametrize("shape", [(), (4,), (5, 4), (2, 3, 4), (1, 100_000)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adafactor_state_bytes_are_known_before_the_state_is_allocated(shape: tuple, dtype: type) -> None:
    opt = Adafactor()
    hp = parse(opt.hparams, {}, "optimizer")
    expected = sum(v.nbytes for v in opt.init_state(np.zeros(shape, dtype), hp).values())
    assert opt.state_nbytes(shape, np.dtype(dtype), hp) == expected
