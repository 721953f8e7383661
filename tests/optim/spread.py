"""How far torch is from itself across its CPU dispatch levels, and how far we are from it at each.

`python -m tests.optim.spread` runs `tests/optim` once per level this CPU offers with
`OPTSERVE_SPREAD_RECORD` set, so that every torch comparison of the oracle saves torch's results and ours
instead of asserting. It then writes `spread.json` (what the oracle's tolerances come from) and prints
one table row per optimizer, dtype and kind of comparison:

- trajectory: the largest |a - b| / (atol + rtol * max(|a|, |b|)) over 200 steps with the contract's
  float64/float32 tolerances, so 1.0 is exactly the contract; torch's spread is over every pair of levels;
- one step: the largest distance in ulps (oracle.ulps) after one step from a shared state.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import tempfile
from collections import defaultdict
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from tests.optim.levels import ROOT, level_env, levels, native_level
from tests.optim.oracle import MARGIN, ONE_STEP_ULPS, SPREAD_FILE, TOL, ulps


def contract_fraction(a: np.ndarray, b: np.ndarray) -> float:
    """The largest |a - b| as a fraction of the contract's tolerance for their dtype (1.0: at the edge)."""
    tol = TOL[a.dtype.type]
    scale = tol["atol"] + tol["rtol"] * np.maximum(np.abs(a), np.abs(b))
    with np.errstate(invalid="ignore"):
        ratio = np.abs(a.astype(np.float64) - b.astype(np.float64)) / scale
    ratio[(a == b) | (np.isnan(a) & np.isnan(b))] = 0.0
    return float(ratio.max(initial=0.0))


def distance(kind: str, a: np.ndarray, b: np.ndarray) -> float:
    return contract_fraction(a, b) if kind == "trajectory" else float(ulps(a, b).max(initial=0.0))


def record(level: str, folder: Path, variant: str | None = None) -> None:
    env = {**level_env(level), "OPTSERVE_SPREAD_RECORD": str(folder)}
    if variant:
        env["OPTSERVE_SPREAD_VARIANT"] = variant
    command = [sys.executable, "-m", "pytest", "tests/optim", "-q", "-p", "no:cacheprovider"]
    print(f"recording under ATEN_CPU_CAPABILITY={level} {variant or ''}...", flush=True)
    subprocess.run(command, cwd=ROOT, env=env, check=False, stdout=subprocess.DEVNULL)


def load(folder: Path) -> dict[str, dict[str, np.ndarray]]:
    runs = {}
    for meta in folder.glob("*.json"):
        with np.load(meta.with_suffix(".npz")) as arrays:
            runs[meta.read_text()] = {name: arrays[name] for name in arrays.files}
    return runs


def measure(recorded: dict[str, dict[str, dict[str, np.ndarray]]]) -> dict[str, Any]:
    """Per comparison: torch's spread over every pair of levels, and ours against torch at each level."""
    keys = set.intersection(*(set(runs) for runs in recorded.values()))
    out = {}
    for key in sorted(keys):
        kind = json.loads(key)["kind"]
        by_level = {level: runs[key] for level, runs in recorded.items()}
        names = [n.removeprefix("torch/") for n in next(iter(by_level.values())) if n.startswith("torch/")]
        spread = max(
            (
                distance(kind, by_level[a][f"torch/{n}"], by_level[b][f"torch/{n}"])
                for a, b in combinations(by_level, 2)
                for n in names
            ),
            default=0.0,
        )
        ours = {
            level: max(distance(kind, arrays[f"ours/{n}"], arrays[f"torch/{n}"]) for n in names)
            for level, arrays in by_level.items()
        }
        ours_vary = any(
            not np.array_equal(by_level[a][f"ours/{n}"], by_level[b][f"ours/{n}"], equal_nan=True)
            for a, b in combinations(by_level, 2)
            for n in names
        )
        out[key] = {
            "torch_spread": float(f"{spread:.3g}"),
            "ours": {k: float(f"{v:.3g}") for k, v in ours.items()},
            "ours_depend_on_host": ours_vary,
        }
    return out


def table(runs: dict[str, Any], level_names: list[str]) -> str:
    rows: dict[tuple[str, str, str], list[tuple[str, dict[str, Any]]]] = defaultdict(list)
    for key, entry in runs.items():
        run = json.loads(key)
        rows[(run["spec"]["name"], run["dtype"], run["kind"])].append((key, entry))
    head = ["optimizer", "dtype", "comparison", "runs", "torch's spread (worst run)"]
    head += [f"ours vs torch {lvl}" for lvl in level_names] + ["tolerance used"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (name, dtype, kind), entries in sorted(rows.items()):
        worst_key, worst = max(entries, key=lambda e: e[1]["torch_spread"])
        spec = json.loads(worst_key)["spec"]
        options = ",".join(f"{k}={v}" for k, v in spec.items() if k != "name") or "defaults"
        ours = [max(e["ours"][lvl] for _, e in entries) for lvl in level_names]
        if kind == "trajectory":
            tol = max(max(1.0, MARGIN * e["torch_spread"]) for _, e in entries)
            used = "contract" if tol == 1.0 else f"up to {tol:.3g}x contract"
            unit = ""
        else:
            used = f"up to {max(max(ONE_STEP_ULPS, MARGIN * e['torch_spread']) for _, e in entries):.3g} ulps"
            unit = " ulps"
        cells = [
            name,
            dtype,
            kind.replace("_", " "),
            str(len(entries)),
            f"{worst['torch_spread']:.3g}{unit} ({options})",
            *(f"{v:.3g}{unit}" for v in ours),
            used,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    native = native_level()
    variants = [(level, None) for level in levels()] + [(native, "exact-sqrt")]
    level_names = [f"{level}+{variant}" if variant else level for level, variant in variants]
    with tempfile.TemporaryDirectory() as tmp:
        recorded = {}
        for (level, variant), name in zip(variants, level_names, strict=True):
            record(level, Path(tmp) / name, variant)
            recorded[name] = load(Path(tmp) / name)
    runs = measure(recorded)
    import torch

    document = {
        "measured_on": {
            "cpu": _cpu_model(),
            "machine": platform.machine(),
            "torch": torch.__version__,
            "native_level": native,
            "margin": MARGIN,
            "levels": level_names,
        },
        "runs": runs,
    }
    SPREAD_FILE.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
    print(table(runs, level_names))
    host = [json.loads(k) for k, e in runs.items() if e["ours_depend_on_host"]]
    print(f"{len(runs)} comparisons; ours differ between hosts in {len(host)}: {host[:3]}")
    return 0


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
