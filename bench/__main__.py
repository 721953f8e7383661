"""`make bench` / `python -m bench`: every benchmark in one run, each as a ratio against its baseline, one
summary table with the targets, and `bench/RESULTS.md` describing the machine.

`--quick` is a smoke run (small sizes, short durations: the numbers mean little); `--only c,d` runs some
sections; `--out PATH` writes the results elsewhere. `--isa avx2` runs everything (this process, the
servers, the workers) as on a CPU without AVX-512: torch's AVX2 kernels, numpy's AVX-512 loops switched
off, numba compiling for Haswell (AVX2 and FMA); `--isa default` as on an old x86-64 (torch's default
kernels, no AVX in numpy or numba). Only the instruction set changes: the clock, caches and memory of
this machine stay, so it shows what the instruction set alone costs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench import bench_optim, bench_stores, jsonstep, load, memory, roundtrip
from bench.common import SUMMARY_COLUMNS, Measure, Section, Servers, machine, sci, table
from bench.echo_app import same_tuning

RESULTS = Path(__file__).with_name("RESULTS.md")
OPTIM_LIMIT = 1.5

METHODOLOGY = [
    "Every section runs in this one process tree, one after the other; within a section the cases being "
    "compared are timed round-robin (or, for the load test, in A B B A B A A B order), so that a ratio's "
    "two sides see the same machine load. Times are medians after warm-ups.",
    "Servers are real processes on 127.0.0.1: `optserve serve` (uvicorn, httptools, uvloop, one worker, "
    "as `app/cli.py` runs it) and, as baselines, a bare FastAPI echo app under the same uvicorn settings "
    "(`bench/echo_app.py`), a raw asyncio HTTP echo (`bench/rawhttp.py`) and a raw TCP echo "
    "(`bench/floor.py`). The bench process is the client; torch runs in it on one thread.",
    "The machine is a shared 2-core VM: other work ran beside the bench, so absolute numbers move between "
    "runs by tens of percent; the ratios move less, but read a MISS or PASS near its line as a tie.",
]


def optim_section(quick: bool, servers: Servers | None = None) -> Section:
    """The optimizer update alone (bench_optim), with the target on our fused Adam vs torch fused Adam."""
    rows = bench_optim.run(sizes=(100_000,), repeat=5) if quick else bench_optim.run()
    ours = "optserve Adam fused" if any(r["case"] == "optserve Adam fused" for r in rows) else None
    ours = ours or "optserve Adam reference"
    measures = [
        Measure(
            "optim",
            f"Adam update alone, {sci(r['params'])} params",
            r["ms"],
            r["ms"] / r["vs torch fused Adam"],
            "torch fused Adam",
            "ms",
            OPTIM_LIMIT,
        )
        for r in rows
        if r["case"] == ours
    ]
    notes = [
        "float32, one thread each (torch.set_num_threads(1); our numba kernels are single-threaded), each "
        "case on its own arrays, round-robin medians."
    ]
    return Section("optim", "Optimizer update alone vs torch", bench_optim.COLUMNS, rows, measures, notes)


SECTIONS: dict[str, Callable[[bool, Servers], Section]] = {
    "optim": optim_section,
    "c": roundtrip.run,
    "d": load.run,
    "e": jsonstep.run,
    "f": memory.run,
    "g": bench_stores.run,
}


def render(sections: list[Section], info: dict[str, str], quick: bool, seconds: float) -> str:
    measures = [m for s in sections for m in s.measures]
    out = [
        "# optserve benchmarks",
        "",
        f"`python -m bench{' --quick' if quick else ''}` (`make bench`), one run of {seconds:.0f} s. "
        "Regenerate with `make bench`; this file is overwritten.",
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in info.items()],
        "",
        "## Summary",
        "",
        table([m.row() for m in measures], SUMMARY_COLUMNS),
        "",
        "(a) raw TCP echo of the step's bytes and (b) torch fused Adam on one thread are the floors of (c); "
        "their numbers are in the (c) table.",
        "",
    ]
    for s in sections:
        out += [
            f"## ({s.key}) {s.title}" if len(s.key) == 1 else f"## {s.title}",
            "",
            table(s.rows, s.columns),
        ]
        out += ["", *[f"- {n}" for n in s.notes], ""]
    tuning = ", ".join(same_tuning(apply=False)) or "none"
    out += ["## Method", "", *[f"- {n}" for n in METHODOLOGY]]
    out += [f"- Process tuning that `optserve serve` applies and the echo app mirrors: {tuning}.", ""]
    return "\n".join(out)


# what `--isa` sets in the environment of the bench and of every process it starts
ISA_ENV: dict[str, dict[str, str]] = {
    "avx2": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",
        "NUMBA_CPU_NAME": "haswell",
    },
    "default": {
        "ATEN_CPU_CAPABILITY": "default",
        "NPY_DISABLE_CPU_FEATURES": "X86_V3 X86_V4 AVX512_ICL AVX512_SPR",
        "NUMBA_CPU_NAME": "generic",
    },
}


def isa_note() -> str | None:
    """How the instruction set was forced, when it was (read back from the environment)."""
    forced = {k: os.environ[k] for k in ISA_ENV["avx2"] if k in os.environ}
    return ", ".join(f"{k}={v}" for k, v in forced.items()) or None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smoke run: small sizes, short durations")
    parser.add_argument("--only", help=f"comma-separated sections among {','.join(SECTIONS)}")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results file (default {RESULTS})")
    parser.add_argument(
        "--isa", choices=sorted(ISA_ENV), help="run as on a CPU with only this instruction set (see above)"
    )
    args = parser.parse_args(argv)
    if args.isa and any(os.environ.get(k) != v for k, v in ISA_ENV[args.isa].items()):
        # numpy, numba and torch read these when they load: start again with them set
        env = {**os.environ, **ISA_ENV[args.isa]}
        command = [sys.executable, "-m", "bench", *(sys.argv[1:] if argv is None else argv)]
        os.execve(sys.executable, command, env)
    chosen = args.only.split(",") if args.only else list(SECTIONS)
    unknown = [k for k in chosen if k not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose among {list(SECTIONS)}")
    info = machine()
    forced = isa_note()
    if forced:
        info["instruction set forced"] = forced
    start = time.perf_counter()
    sections: list[Section] = []
    with Servers() as servers:
        for key in chosen:
            t0 = time.perf_counter()
            section = SECTIONS[key](args.quick, servers)
            sections.append(section)
            print(f"\n## ({key}) {section.title}  [{time.perf_counter() - t0:.0f} s]\n", flush=True)
            print(table(section.rows, section.columns), flush=True)
    elapsed = time.perf_counter() - start
    print("\n## Summary\n")
    print(table([m.row() for s in sections for m in s.measures], SUMMARY_COLUMNS))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(sections, info, args.quick, elapsed))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
