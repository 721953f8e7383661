"""The reduction of a synchronous round (`app/optim/aggregate.py`): bit-identical in any arrival order, and
one step on the reduced gradient is torch's step on the same mean (float64, rtol 1e-10)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from app.optim.aggregate import Contribution, mean_loss, reduce
from app.optim.engine import Engine

SHAPES = {"w": (4, 3), "b": (3,)}


def contributions(n: int, dtype: type = np.float64, seed: int = 0) -> list[Contribution]:
    rng = np.random.default_rng(seed)
    return [
        Contribution(
            f"worker-{i:02d}",
            {
                name: rng.standard_normal(shape).astype(dtype) * 10.0 ** rng.integers(-3, 4)
                for name, shape in SHAPES.items()
            },
            weight=float(rng.integers(1, 64)),
            loss=float(rng.random()),
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("how", ["mean", "sum", "weighted_mean"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_reduction_is_bit_identical_in_any_arrival_order(how: str, dtype: type) -> None:
    parts = contributions(8, dtype)
    first = reduce(parts, how)
    rng = np.random.default_rng(1)
    for _ in range(10):
        shuffled = [parts[i] for i in rng.permutation(len(parts))]
        again = reduce(shuffled, how)
        assert again.keys() == first.keys()
        for name in first:
            assert again[name].tobytes() == first[name].tobytes()
    assert mean_loss(parts) == mean_loss(list(reversed(parts)))


def test_the_reductions_are_what_they_say() -> None:
    parts = contributions(3)
    ordered = sorted(parts, key=lambda c: c.worker)
    for name in SHAPES:
        grads = [c.grads[name] for c in ordered]
        np.testing.assert_allclose(reduce(parts, "sum")[name], sum(grads), rtol=1e-15)
        np.testing.assert_allclose(reduce(parts, "mean")[name], sum(grads) / 3, rtol=1e-15)
        weights = [c.weight for c in ordered]
        expected = sum(w * g for w, g in zip(weights, grads, strict=True)) / sum(weights)
        np.testing.assert_allclose(reduce(parts, "weighted_mean")[name], expected, rtol=1e-15)
    assert mean_loss(parts) == pytest.approx(sum(c.loss for c in ordered if c.loss is not None) / 3)


def test_a_parameter_is_reduced_over_the_workers_that_sent_it() -> None:
    a = Contribution("a", {"w": np.full(2, 1.0), "b": np.full(1, 10.0)})
    b = Contribution("b", {"w": np.full(2, 3.0)})
    c = Contribution("c", {"w": np.full(2, 5.0)})
    reduced = reduce([c, a, b], "mean")
    np.testing.assert_array_equal(reduced["w"], [3.0, 3.0])
    np.testing.assert_array_equal(reduced["b"], [10.0])  # one sender: its gradient
    assert "x" not in reduce([Contribution("a", {})], "mean")
    assert mean_loss([a, b]) is None


def test_a_worker_twice_or_mismatched_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="twice"):
        reduce([Contribution("a", {"w": np.ones(2)}), Contribution("a", {"w": np.ones(2)})], "mean")
    with pytest.raises(ValueError, match="shape"):
        reduce([Contribution("a", {"w": np.ones(2)}), Contribution("b", {"w": np.ones(3)})], "mean")
    with pytest.raises(ValueError, match="unknown reduction"):
        reduce([], "median")


@pytest.mark.parametrize(("optimizer", "torch_cls", "kwargs"), [
    ("adam", torch.optim.Adam, {"lr": 0.01, "betas": (0.8, 0.95), "weight_decay": 0.01}),
    ("sgd", torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
])  # fmt: skip
def test_a_round_is_torchs_step_on_the_same_mean(optimizer: str, torch_cls: type, kwargs: dict) -> None:
    init = {name: np.random.default_rng(7).standard_normal(shape) for name, shape in SHAPES.items()}
    spec = {"name": optimizer, **{k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}}
    engine = Engine.create({"optimizer": spec}, {k: v.copy() for k, v in init.items()})
    tensors = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in init.items()}
    opt = torch_cls(list(tensors.values()), **kwargs)
    for round_ in range(5):
        parts = contributions(4, seed=round_)
        engine, _ = engine.step(reduce(parts, "mean"))
        for name, tensor in tensors.items():
            total = torch.zeros(SHAPES[name], dtype=torch.float64)
            for c in sorted(parts, key=lambda c: c.worker):  # the mean computed the same way
                total += torch.from_numpy(c.grads[name])
            tensor.grad = total / len(parts)
        opt.step()
        for name, tensor in tensors.items():
            np.testing.assert_allclose(engine.params[name], tensor.detach().numpy(), rtol=1e-10, atol=1e-14)


def test_every_arrival_order_of_four_workers_gives_the_same_step() -> None:
    parts = contributions(4, np.float32)
    init = {name: np.zeros(shape, np.float32) for name, shape in SHAPES.items()}
    base = Engine.create({"optimizer": {"name": "adam"}}, init)
    results = set()
    for order in itertools.permutations(parts):
        stepped, _ = base.step(reduce(list(order), "weighted_mean"))
        results.add(b"".join(stepped.params[n].tobytes() for n in SHAPES))
    assert len(results) == 1
