"""torch's CPU dispatch levels on this machine, and the numerics tests run under each one.

torch compiles its CPU kernels once per instruction set and picks one at start-up (`ATEN_CPU_CAPABILITY`
forces a lower one), so its float results move by ulps from machine to machine. `python -m
tests.optim.levels` runs `tests/optim` under every level this CPU offers besides the one torch picks by
itself (which the main run covers), so that a green suite here means green on every machine.

Under `default`, our own code is made to run as on an old CPU too: numba compiles its kernels for a
generic x86-64 (no FMA instruction, no AVX) and numpy's AVX2/AVX-512 loops are switched off, so the same
tests also show that our results do not depend on the host's instruction set.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# the CPU flags each of torch's x86 levels needs (aten/src/ATen/cpu/Utils.cpp, Dispatch.cpp)
X86_LEVELS = {
    "avx2": {"avx2", "fma"},
    "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq"},
}
# numpy's dispatchable targets above its x86-64-v2 baseline, and numba's most basic target
OLD_CPU = {
    "NPY_DISABLE_CPU_FEATURES": "X86_V3 X86_V4 AVX512_ICL AVX512_SPR",
    "NUMBA_CPU_NAME": "generic",
}


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def levels() -> list[str]:
    """Every level torch can run at here: `default` on any CPU, the x86 ones the CPU has the flags for."""
    if platform.machine().lower() not in {"x86_64", "amd64"}:
        return ["default"]
    flags = cpu_flags()
    return ["default", *(name for name, needs in X86_LEVELS.items() if needs <= flags)]


def native_level() -> str:
    """The level torch picks by itself (or is told to), as a new interpreter reports it."""
    code = "import torch; print(torch.backends.cpu.get_cpu_capability().lower())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def level_env(level: str) -> dict[str, str]:
    env = {**os.environ, "ATEN_CPU_CAPABILITY": level}
    if level == "default":
        env.update(OLD_CPU)
    return env


def main(argv: list[str]) -> int:
    native = native_level()
    others = [level for level in levels() if level != native]
    print(f"torch's dispatch levels here: {', '.join(levels())}; native: {native}; now running: {others}")
    failed = []
    for level in others:
        started = time.monotonic()
        command = [sys.executable, "-m", "pytest", "tests/optim", "-q", "-p", "no:cacheprovider", *argv]
        code = subprocess.run(command, cwd=ROOT, env=level_env(level), check=False).returncode
        print(f"ATEN_CPU_CAPABILITY={level}: exit {code} in {time.monotonic() - started:.0f} s", flush=True)
        if code != 0:
            failed.append(level)
    if failed:
        print(f"numerics tests failed under: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
