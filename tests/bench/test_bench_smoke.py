"""`python -m bench --quick` end to end: every section runs and reports numbers, and the results file is
written. Speed is the bench's business (`make bench` prints PASS/MISS against the targets), not this test's:
nothing here asserts a ratio."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ("optim", "c", "d", "e", "f", "g")
HEADINGS = ("## Machine", "## Summary", "## (c)", "## (d)", "## (e)", "## (f)", "## (g)", "## Method")


def _summary_rows(text: str) -> list[list[str]]:
    """The cells of the summary table's body rows."""
    block = text.split("## Summary", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in block.splitlines() if line.startswith("| ")][1:]  # without the header
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_quick_bench_reports_every_section(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    text = out.read_text()
    for heading in HEADINGS:
        assert heading in text
    for described in ("CPU:", "cores:", "memory:", "Python:", "numpy / torch:", "date:"):
        assert described in text

    rows = _summary_rows(text)
    assert {row[0] for row in rows} == set(SECTIONS)
    for section, measure, value, baseline, ratio, _target, verdict in rows:
        number = float(value.split()[0].replace(",", ""))
        base = float(baseline.split(": ", 1)[1].split()[0].replace(",", ""))
        assert 0 < number < math.inf, (section, measure, value)  # NaN fails both comparisons
        assert 0 < base < math.inf, (section, measure, baseline)
        assert 0 < float(ratio.removesuffix("x")) < math.inf, (section, measure, ratio)
        assert verdict in ("PASS", "MISS", "info"), (section, measure, verdict)
    # the targets of the issue are all there to be judged, PASS or MISS
    judged = {row[0] for row in rows if row[6] != "info"}
    assert judged >= {"optim", "d", "e", "f"}


def test_isa_runs_the_bench_and_its_servers_as_on_a_cpu_without_avx512(tmp_path: Path) -> None:
    """`--isa default` (which every x86-64 can run) starts the bench again with the instruction set forced
    for torch, numpy and numba, and says so in the results."""
    out = tmp_path / "RESULTS.md"
    command = [sys.executable, "-m", "bench", "--quick", "--isa", "default", "--only", "c", "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    text = out.read_text()
    assert "- torch's CPU kernels: DEFAULT" in text
    assert "- instruction set forced: ATEN_CPU_CAPABILITY=default, NPY_DISABLE_CPU_FEATURES=" in text
    assert "NUMBA_CPU_NAME=generic" in text
    assert "## (c)" in text
