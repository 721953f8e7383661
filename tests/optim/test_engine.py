"""The engine: gradient processing, steps_per_epoch, plateau losses, snapshots, all against torch."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch

from app.optim import clip
from app.optim.checkpoint import restore
from app.optim.engine import Engine, StepError
from app.optim.hparams import SpecError
from app.optim.preview import preview_schedule
from tests.optim.oracle import TOL, gradient, initial_params

SHAPES = {"w": (4, 3), "b": (3,)}


def torch_run(
    init: dict[str, np.ndarray],
    steps: int,
    make_opt: Any,
    make_sched: Any = None,
    steps_per_epoch: int = 1,
    clip_norm: float | None = None,
    clip_value: float | None = None,
    losses: list[float] | None = None,
) -> list[dict[str, np.ndarray]]:
    tensors = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in init.items()}
    opt = make_opt(list(tensors.values()))
    sched = make_sched(opt) if make_sched else None
    out = []
    epoch: list[float] = []
    for t in range(steps):
        for name, tensor in tensors.items():
            tensor.grad = torch.from_numpy(gradient(t, name, tensor.detach().numpy(), 0) * 3)
        if clip_value is not None:
            torch.nn.utils.clip_grad_value_(tensors.values(), clip_value)
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(tensors.values(), clip_norm)
        opt.step()
        if losses is not None:
            epoch.append(losses[t])
        if sched is not None and (t + 1) % steps_per_epoch == 0:
            if losses is not None:
                sched.step(sum(epoch) / len(epoch))
                epoch.clear()
            else:
                sched.step()
        out.append({k: v.detach().numpy().copy() for k, v in tensors.items()})
    return out


def engine_run(
    engine: Engine, steps: int, losses: list[float] | None = None, start: int = 0
) -> tuple[list[dict[str, np.ndarray]], Engine]:
    """Every step's parameters, and the engine at the end (each step makes a new one)."""
    out = []
    for t in range(start, start + steps):
        grads = {name: gradient(t, name, p, 0) * 3 for name, p in engine.params.items()}
        engine, _ = engine.step(grads, None if losses is None else losses[t])
        out.append({k: v.copy() for k, v in engine.params.items()})
    return out, engine


def assert_runs_equal(
    ours: list[dict[str, np.ndarray]], theirs: list[dict[str, np.ndarray]], dtype: Any
) -> None:
    for t, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        for name in a:
            np.testing.assert_allclose(a[name], b[name], **TOL[dtype], err_msg=f"{name} at step {t + 1}")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(("clip_norm", "clip_value"), [(0.5, None), (None, 0.3), (0.8, 0.4), (1e6, None)])
def test_clipping_matches_torch_utils(dtype: Any, clip_norm: float | None, clip_value: float | None) -> None:
    init = initial_params(SHAPES, dtype)
    engine = Engine.create(
        {
            "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
            "clip_grad_norm": clip_norm,
            "clip_grad_value": clip_value,
        },
        init,
    )
    theirs = torch_run(
        init,
        100,
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        clip_norm=clip_norm,
        clip_value=clip_value,
    )
    assert_runs_equal(engine_run(engine, 100)[0], theirs, dtype)


def test_grad_norm_is_reported_before_clipping() -> None:
    engine = Engine.create({"optimizer": {"name": "sgd"}, "clip_grad_norm": 0.1}, {"w": np.zeros(2)})
    engine, outcome = engine.step({"w": np.array([3.0, 4.0])})
    assert outcome.grad_norm == 5.0
    np.testing.assert_allclose(engine.params["w"], -0.001 * np.array([3.0, 4.0]) * 0.1 / (5 + 1e-6))


@pytest.mark.parametrize("steps_per_epoch", [1, 4])
def test_scheduler_advances_once_per_epoch_like_the_torch_loop(steps_per_epoch: int) -> None:
    init = initial_params(SHAPES, np.float64)
    engine = Engine.create(
        {
            "optimizer": {"name": "adam", "lr": 0.05},
            "scheduler": {"name": "exponential_lr", "gamma": 0.9},
            "steps_per_epoch": steps_per_epoch,
        },
        init,
    )
    theirs = torch_run(
        init,
        60,
        lambda p: torch.optim.Adam(p, lr=0.05),
        lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9),
        steps_per_epoch,
    )
    ours, engine = engine_run(engine, 60)
    assert_runs_equal(ours, theirs, np.float64)
    assert engine.lr == pytest.approx([0.05 * 0.9 ** (60 // steps_per_epoch)], rel=1e-12)


def test_plateau_uses_the_mean_loss_of_each_epoch() -> None:
    init = initial_params(SHAPES, np.float64)
    losses = [1.0 if (t // 3) % 5 else 0.5 for t in range(90)]
    losses = [x + 0.01 * (t % 3) for t, x in enumerate(losses)]
    engine = Engine.create(
        {
            "optimizer": {"name": "sgd", "lr": 0.1},
            "scheduler": {"name": "reduce_lr_on_plateau", "patience": 1, "factor": 0.5},
            "steps_per_epoch": 3,
        },
        init,
    )
    theirs = torch_run(
        init,
        90,
        lambda p: torch.optim.SGD(p, lr=0.1),
        lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=1, factor=0.5),
        3,
        losses=losses,
    )
    ours, engine = engine_run(engine, 90, losses)
    assert_runs_equal(ours, theirs, np.float64)
    assert engine.lr[0] < 0.1


def test_plateau_refuses_an_epoch_without_any_loss_and_changes_nothing() -> None:
    engine = Engine.create(
        {"optimizer": {"name": "sgd"}, "scheduler": {"name": "reduce_lr_on_plateau"}, "steps_per_epoch": 2},
        {"w": np.ones(2)},
    )
    engine, _ = engine.step({"w": np.ones(2)})
    with pytest.raises(StepError, match="loss"):
        engine.step({"w": np.ones(2)})
    assert engine.step_count == 1
    engine, _ = engine.step({"w": np.ones(2)}, loss=1.0)
    assert engine.step_count == 2


def test_snapshot_restore_continues_bit_exactly_through_json() -> None:
    init = initial_params(SHAPES, np.float32)
    options = {
        "optimizer": {"name": "nadam", "lr": 0.01},
        "scheduler": {"name": "one_cycle_lr", "max_lr": 0.05, "total_steps": 100},
        "param_groups": [{"params": ["w"]}, {"params": ["b"], "lr": 0.02}],
    }
    _, straight = engine_run(Engine.create(options, init), 20)
    tensors, meta = straight.snapshot()
    restored = restore({k: v.copy() for k, v in tensors.items()}, json.loads(json.dumps(meta)))
    a, straight = engine_run(straight, 30, start=20)
    b, restored = engine_run(restored, 30, start=20)
    for x, y in zip(a, b, strict=True):
        for name in x:
            np.testing.assert_array_equal(x[name], y[name])
    assert straight.lr == restored.lr
    assert straight.groups == restored.groups


def test_param_groups_must_cover_every_parameter_once() -> None:
    with pytest.raises(SpecError) as info:
        Engine.create(
            {"optimizer": {"name": "sgd"}, "param_groups": [{"params": ["w", "x"]}, {"params": ["w"]}]},
            {"w": np.ones(2), "b": np.ones(2)},
        )
    messages = {e.field: e.message for e in info.value.errors}
    assert "unknown parameter 'x'" in messages["param_groups[0].params"]
    assert "already in group 0" in messages["param_groups[1].params"]
    assert "b" in messages["param_groups"]


def test_preview_matches_a_torch_scheduler() -> None:
    values = preview_schedule(0.1, {"name": "cosine_annealing_warm_restarts", "T_0": 5, "T_mult": 2}, 40)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=5, T_mult=2)
    expected = []
    for _ in range(40):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert values == [pytest.approx(expected, rel=1e-12)]


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("size", [0, 1, 7, 1000, (1 << 16) + 3])
@pytest.mark.parametrize("scale", [1e-160, 1e-30, 1e-22, 1e-20, 1e-3, 1.0, 1e20, 1e300])
def test_the_norm_of_one_gradient_is_the_norm_of_norms_the_general_path_takes(
    dtype: type, size: int, scale: float
) -> None:
    """`clip.total_norm` of one gradient shortcuts the norm of the one-element vector of norms; the bits are
    those of the general path (checked by giving it the gradient next to an empty one)."""
    rng = np.random.default_rng(size)
    with np.errstate(over="ignore"):
        grad = (rng.standard_normal(size) * scale).astype(dtype)
        alone = clip.total_norm([grad])
        general = clip.total_norm([grad, np.zeros(0, dtype)])
    assert np.float64(alone).tobytes() == np.float64(general).tobytes()


def test_each_snapshot_shows_its_own_engines_groups() -> None:
    """A snapshot's groups are its engine's: their JSON, made once, passes from engine to engine only while
    the groups stay the same object (steps without a scheduler advance), and a restore from any snapshot
    goes on at that engine's learning rate."""
    engine = Engine.create(
        {
            "optimizer": {"name": "sgd", "lr": 0.1},
            "scheduler": {"name": "exponential_lr", "gamma": 0.5},
            "steps_per_epoch": 2,
        },
        {"w": np.zeros(3, np.float32)},
    )
    lrs = []
    for _ in range(5):
        engine.snapshot()  # the JSON of the groups is made before the step, on the engine before it
        engine, _ = engine.step({"w": np.ones(3, np.float32)})
        tensors, meta = engine.snapshot()
        assert [g["lr"] for g in meta["groups"]] == engine.lr
        assert restore(tensors, json.loads(json.dumps(meta))).lr == engine.lr
        lrs.append(engine.lr[0])
    assert lrs == [0.1, 0.05, 0.05, 0.025, 0.025]
