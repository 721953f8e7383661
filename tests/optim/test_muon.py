"""Muon against torch.optim.Muon: every option, wide and tall matrices, both dtypes."""

import re

import numpy as np
import pytest
import torch
from torch.optim._muon import _zeropower_via_newtonschulz

from app.optim.hparams import SpecError
from app.optim.muon import Muon, zeropower_via_newtonschulz
from tests.optim.oracle import assert_matches_torch, assert_one_step_matches_torch, initial_params, run_ours

# Rows < cols and rows > cols (torch transposes those, which changes the GEMM kernel ATen picks), a
# single row, and inner dimensions past 16 and 64 that reach the vectorized dot's blocked loops. Every
# GEMM stays at m*n*k <= 4096, where ATen runs its own bfloat16 kernel rather than oneDNN's.
SHAPES = {"w": (5, 4), "v": (3, 7), "wide": (4, 70), "tall": (20, 12), "row": (1, 6)}

CASES = [
    {"name": "muon", "lr": 0.02},
    {"name": "muon", "lr": 0.02, "nesterov": False},
    {"name": "muon", "lr": 0.02, "weight_decay": 0.0, "momentum": 0.5},
    {"name": "muon", "lr": 0.05, "weight_decay": 0.3, "momentum": 0.0, "nesterov": False},
    {"name": "muon", "lr": 0.02, "ns_steps": 2, "eps": 1e-3},
    {"name": "muon", "lr": 0.02, "ns_coefficients": [2.0, -1.5, 0.5], "ns_steps": 7},
    {"name": "muon", "lr": 0.02, "adjust_lr_fn": "original"},
    {"name": "muon", "lr": 0.01, "adjust_lr_fn": "match_rms_adamw", "momentum": 0.9},
]


def _id(spec: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in spec.items() if k != "name")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("spec", CASES, ids=_id)
def test_muon_matches_torch_for_200_steps(spec: dict, dtype: type) -> None:
    assert_matches_torch(spec, torch.optim.Muon, dtype=dtype, shapes=SHAPES)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("spec", CASES, ids=_id)
def test_muon_one_step_from_a_shared_state_matches_torch(spec: dict, dtype: type) -> None:
    assert_one_step_matches_torch(spec, torch.optim.Muon, dtype=dtype, shapes=SHAPES)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_muon_with_skipped_gradients_matches_torch(dtype: type) -> None:
    assert_matches_torch(
        {"name": "muon", "lr": 0.02}, torch.optim.Muon, dtype=dtype, shapes=SHAPES, skip_every=3
    )


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_muon_param_groups_override_hyperparameters(dtype: type) -> None:
    groups = [
        {"params": ["w", "tall"], "lr": 0.05, "nesterov": False, "adjust_lr_fn": "match_rms_adamw"},
        {"params": ["v"], "momentum": 0.5, "ns_steps": 3, "weight_decay": 0.0},
        {"params": ["wide", "row"]},
    ]
    assert_matches_torch(
        {"name": "muon", "lr": 0.02}, torch.optim.Muon, dtype=dtype, shapes=SHAPES, groups=groups
    )


def test_muon_large_matrix_matches_torch() -> None:
    """Above m*n*k = 4096 torch hands the bfloat16 GEMM to oneDNN, whose kernel sums in an order that
    depends on the CPU and dispatch level, and ours sums in OpenBLAS's float32 order, which depends on the
    CPU too: torch's own levels part by 904x the contract here (spread.json), and so may we."""
    assert_matches_torch(
        {"name": "muon", "lr": 0.02}, torch.optim.Muon, dtype=np.float32, shapes={"w": (32, 64)}
    )


def _newton_schulz_inputs() -> list:
    rng = np.random.default_rng(7)
    cases = []
    for rows, cols in [
        (1, 1),
        (1, 9),
        (9, 1),
        (2, 2),
        (4, 70),
        (70, 4),
        (8, 64),
        (64, 8),
        (10, 40),
        (40, 10),
    ]:
        for dtype in (np.float32, np.float64):
            # wide dynamic range, so torch's float32 accumulation order shows in the bfloat16 results
            values = rng.standard_normal((rows, cols)) * np.exp(rng.standard_normal((rows, cols)))
            coefficients = (3.4445, -4.7750, 2.0315)
            cases.append(
                pytest.param(values.astype(dtype), coefficients, id=f"{rows}x{cols}-{dtype.__name__}")
            )
    cases.append(pytest.param(np.zeros((3, 5)), (3.4445, -4.7750, 2.0315), id="zeros"))
    # b = 0 takes ATen's beta == 0 branch for the gram update
    cases.append(pytest.param(rng.standard_normal((6, 3)), (1.0, 0.0, -0.5), id="b=0"))
    return cases


@pytest.mark.parametrize(("grad", "coefficients"), _newton_schulz_inputs())
def test_newton_schulz_is_bit_identical_to_torchs_bfloat16_iteration(
    grad: np.ndarray, coefficients: tuple[float, float, float]
) -> None:
    expected = _zeropower_via_newtonschulz(torch.from_numpy(grad), coefficients, 5, 1e-7)
    assert expected.dtype == torch.bfloat16  # torch runs it in bfloat16 for float32 and float64 alike
    ours = zeropower_via_newtonschulz(grad, coefficients, 5, 1e-7)
    np.testing.assert_array_equal(ours, expected.float().numpy())


@pytest.mark.parametrize(
    ("shape", "size"),
    [((4,), "torch.Size([4])"), ((2, 3, 4), "torch.Size([2, 3, 4])"), ((), "torch.Size([])")],
)
def test_muon_rejects_parameters_that_are_not_matrices(shape: tuple[int, ...], size: str) -> None:
    why = Muon().check_param("bias", shape)
    assert why is not None
    assert "Muon only supports 2D parameters whereas we found a parameter with size: " + size in why
    assert "'bias'" in why
    # torch's own wording, which ours extends with the parameter's name
    with pytest.raises(ValueError, match=r"^Muon only supports 2D parameters") as info:
        torch.optim.Muon([torch.zeros(shape, requires_grad=True)])
    assert why == f"{info.value} (parameter 'bias')"
    assert Muon().check_param("w", (3, 5)) is None


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        ({"lr": -1.0}, "optimizer.lr", "Learning rate should be >= 0 but is: -1.0"),
        ({"momentum": -0.5}, "optimizer.momentum", "momentum should be >= 0 but is: -0.5"),
        ({"weight_decay": -0.1}, "optimizer.weight_decay", "weight decay should be >= 0 but is: -0.1"),
        ({"ns_steps": 100}, "optimizer.ns_steps", "Number of steps must be less than 100"),
        ({"ns_steps": 2.5}, "optimizer.ns_steps", "expected an integer"),
        ({"ns_coefficients": [3.0, -4.0]}, "optimizer.ns_coefficients", "expected an array of 3 numbers"),
        ({"adjust_lr_fn": "sqrt"}, "optimizer.adjust_lr_fn", "'sqrt' is not one of"),
        ({"nesterov": 1}, "optimizer.nesterov", "expected true or false"),
    ],
)
def test_muon_rejects_invalid_spec_naming_the_field(spec: dict, field: str, message: str) -> None:
    with pytest.raises(SpecError) as info:
        run_ours({"name": "muon", **spec}, initial_params({"w": (2, 3)}, np.float64), 1)
    assert info.value.errors[0].field == field
    assert message in info.value.errors[0].message


def test_muon_messages_are_torchs() -> None:
    for kwargs, message in [
        ({"lr": -1.0}, "Learning rate should be >= 0 but is: -1.0"),
        ({"momentum": -0.5}, "momentum should be >= 0 but is: -0.5"),
        ({"weight_decay": -0.1}, "weight decay should be >= 0 but is: -0.1"),
    ]:
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            torch.optim.Muon([torch.zeros(2, 3, requires_grad=True)], **kwargs)


def test_muon_defaults_and_order_are_torchs() -> None:
    names = [p.name for p in Muon.hparams]
    assert names == [
        "lr",
        "weight_decay",
        "momentum",
        "nesterov",
        "ns_coefficients",
        "eps",
        "ns_steps",
        "adjust_lr_fn",
    ]
    defaults = torch.optim.Muon([torch.zeros(2, 3, requires_grad=True)]).defaults
    for p in Muon.hparams:
        assert p.default == defaults[p.name], p.name
