"""The optimizer update alone on 1M and 10M float32 parameters: ours (fused kernel and numpy reference)
against torch's fused Adam and SGD, measured in the same run, one thread each.

Run: `python -m bench.bench_optim`. Our kernels are single-threaded (no numba parallelism), so torch gets
`torch.set_num_threads(1)`. Ratios are against torch's fused Adam at the same size, and against the row's
torch twin (Adam rows: fused Adam; SGD rows: torch SGD with momentum).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from app.memory import keep_freed_memory_for_reuse
from app.optim import fused
from app.optim.adam import Adam
from app.optim.base import Optimizer
from app.optim.hparams import parse
from app.optim.sgd import SGD
from bench.common import interleaved_medians, table

SIZES = (1_000_000, 10_000_000)
ADAM_SPEC: dict[str, Any] = {"lr": 1e-3}
SGD_SPEC: dict[str, Any] = {"lr": 1e-2, "momentum": 0.9}
TORCH_ADAM = "torch Adam fused=True"
COLUMNS = ["case", "params", "ms", "ns/param", "vs torch fused Adam", "vs torch twin"]

Step = Callable[[], Any]


def _ours(opt: Optimizer, spec: dict[str, Any], numel: int, reference: bool) -> Step:
    rng = np.random.default_rng(0)
    param = rng.standard_normal(numel, dtype=np.float32)
    grad = rng.standard_normal(numel, dtype=np.float32)
    grad.flags.writeable = False  # the engine hands gradients over read-only
    hp = parse(opt.hparams, spec, "optimizer")
    state = opt.init_state(param, hp)
    if reference:
        return lambda: opt._update_reference([param], [grad], [state], hp)  # type: ignore[attr-defined]
    # what a session runs: the step into fresh arrays, the old ones left for a refused step; each round
    # steps from the state the last one made, and the arrays it replaces go back to the allocator
    current = [[param], [state]]

    def step() -> None:
        current[0], current[1], _ = opt.step_into(current[0], [grad], current[1], hp)

    return step


def _torch(make: Callable[[list[torch.Tensor]], torch.optim.Optimizer], numel: int) -> Step:
    gen = torch.Generator().manual_seed(0)
    param = torch.randn(numel, generator=gen).requires_grad_()
    param.grad = torch.randn(numel, generator=gen)
    opt = make([param])
    opt.step()  # fails here, not in the timing, if this build cannot do it
    return opt.step


def _torch_sgd(numel: int) -> tuple[str, Step]:
    """torch SGD with momentum, fused if this CPU build supports it, else its default implementation."""
    try:
        return "torch SGD momentum fused=True", _torch(
            lambda p: torch.optim.SGD(p, **SGD_SPEC, fused=True), numel
        )
    except (RuntimeError, ValueError):
        return "torch SGD momentum (default)", _torch(lambda p: torch.optim.SGD(p, **SGD_SPEC), numel)


def _cases(numel: int) -> list[tuple[str, str, Step]]:
    """(name, torch twin's name, step) per case, each on its own freshly allocated arrays."""
    # without the fused path `update` runs the reference: no row may then be labelled "fused"
    ours = fused.available()
    sgd, sgd_step = _torch_sgd(numel)
    torch_adam_default = _torch(lambda p: torch.optim.Adam(p, **ADAM_SPEC), numel)
    return [
        (TORCH_ADAM, TORCH_ADAM, _torch(lambda p: torch.optim.Adam(p, **ADAM_SPEC, fused=True), numel)),
        ("torch Adam default (single-tensor)", TORCH_ADAM, torch_adam_default),
        *([("optserve Adam fused", TORCH_ADAM, _ours(Adam(), ADAM_SPEC, numel, False))] if ours else []),
        ("optserve Adam reference", TORCH_ADAM, _ours(Adam(), ADAM_SPEC, numel, reference=True)),
        (sgd, sgd, sgd_step),
        *([("optserve SGD momentum fused", sgd, _ours(SGD(), SGD_SPEC, numel, False))] if ours else []),
        ("optserve SGD momentum reference", sgd, _ours(SGD(), SGD_SPEC, numel, reference=True)),
    ]


def run(sizes: tuple[int, ...] = SIZES, repeat: int | None = None) -> list[dict[str, Any]]:
    """One row per case and size: median seconds over `repeat` runs (default: more for smaller sizes)."""
    torch.set_num_threads(1)
    fused.warm_up()
    # the server's malloc tuning: freed step buffers are reused instead of mapped afresh every round
    keep_freed_memory_for_reuse()
    rows: list[dict[str, Any]] = []
    for numel in sizes:
        reps = repeat or max(15, 50_000_000 // numel)
        cases = _cases(numel)
        seconds = interleaved_medians({name: step for name, _, step in cases}, reps)
        rows += [
            {
                "case": name,
                "params": numel,
                "seconds": seconds[name],
                "ms": seconds[name] * 1e3,
                "ns/param": seconds[name] * 1e9 / numel,
                "vs torch fused Adam": seconds[name] / seconds[TORCH_ADAM],
                "vs torch twin": seconds[name] / seconds[twin],
                "repeat": reps,
            }
            for name, twin, _ in cases
        ]
    return rows


def main() -> int:
    rows = run()
    print(
        f"float32; torch on 1 thread, our kernels single-threaded; fused path available: {fused.available()}"
    )
    print(table(rows, COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
