"""optserve's numbers do not depend on which kernels the CPU gets: the same steps give the same bits with
numpy's SIMD dispatch lowered (AVX-512, then AVX2 turned off) and with OpenBLAS forced to another core
type. Clipping included: the gradient norm is summed in a fixed order, not by BLAS's dot. (Muon's matmuls
are the exception at numpy's SSE4.2 baseline, which neither machine kind we run on is.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OPTIMIZERS = ["sgd", "adagrad", "adadelta", "rmsprop", "adam", "nadam", "radam", "adamax", "rprop", "asgd"]
OPTIMIZERS += ["adafactor", "adamw", "muon"]
PROGRAM = r"""
import hashlib, json, sys
import numpy as np
from app.optim.engine import Engine
out = {}
for name in sys.argv[1].split(","):
    spec = {
        "optimizer": {"name": name, "lr": 1e-2},
        "scheduler": {"name": "cosine_annealing_lr", "T_max": 20},
        "clip_grad_norm": 1.0,
    }
    rng = np.random.default_rng(0)
    if name == "muon":
        params = {"w": rng.standard_normal((64, 48)).astype(np.float32)}
    else:
        params = {"w": rng.standard_normal(200_003).astype(np.float32), "v": rng.standard_normal(1001)}
    engine = Engine.create(spec, params)
    for t in range(20):
        rng = np.random.default_rng(100 + t)
        g = {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in params.items()}
        engine, outcome = engine.advance(engine.prepare(g, 1.0))
    h = hashlib.sha256(repr(outcome.grad_norm).encode())
    for k in sorted(engine.params):
        h.update(engine.params[k].tobytes())
    out[name] = h.hexdigest()
print(json.dumps(out))
"""


def found_simd() -> set[str]:
    from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__

    return {f for f in __cpu_dispatch__ if __cpu_features__.get(f)}


def run(env: dict[str, str]) -> dict[str, str]:
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM, ",".join(OPTIMIZERS)],
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, str] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.fixture(scope="module")
def native() -> dict[str, str]:
    return run({})


def levels() -> list[tuple[str, dict[str, str]]]:
    out: list[tuple[str, dict[str, str]]] = [("OpenBLAS as Prescott", {"OPENBLAS_CORETYPE": "Prescott"})]
    groups = found_simd()  # numpy >= 2.4 names them X86_V2, X86_V3, X86_V4
    if "X86_V4" in groups:
        out.append(("numpy without AVX-512", {"NPY_DISABLE_CPU_FEATURES": "X86_V4"}))
    if "X86_V3" in groups:
        disable = "X86_V3,X86_V4" if "X86_V4" in groups else "X86_V3"
        out.append(("numpy without AVX2", {"NPY_DISABLE_CPU_FEATURES": disable}))
    return out


@pytest.mark.parametrize(("level", "env"), levels(), ids=[name for name, _ in levels()])
def test_the_same_steps_give_the_same_bits_whatever_kernels_the_cpu_gets(
    native: dict[str, str], level: str, env: dict[str, str]
) -> None:
    other = run(env)
    differ = sorted(name for name in OPTIMIZERS if other[name] != native[name])
    if "without AVX2" in level:
        assert differ in ([], ["muon"]), f"{level}: {differ}"  # numpy's SSE4.2 baseline: Muon's matmuls
    else:
        assert differ == [], f"{level}: {differ}"
