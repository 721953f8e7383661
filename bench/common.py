"""Shared bench plumbing: timing medians, server processes on free ports, measures against targets, tables,
and a description of the machine."""

from __future__ import annotations

import datetime
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import orjson

from tests.system.server import Server, free_port, terminate

ST = "application/vnd.safetensors"
JSON = "application/json"
ST_HEADERS = {"Content-Type": ST, "Accept": ST}
JSON_HEADERS = {"Content-Type": JSON, "Accept": JSON}
ADAM: dict[str, Any] = {"name": "adam", "lr": 1e-3}

Step = Callable[[], Any]


def median_seconds(fn: Callable[[], Any], repeat: int, warmup: int = 2) -> float:
    """Median wall time of `fn` over `repeat` runs after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_times(steps: dict[str, Step], repeat: int, warmup: int = 3) -> dict[str, list[float]]:
    """The seconds of each run of each step, timed round-robin so that every case sees the same load."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeat):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times


def interleaved_medians(steps: dict[str, Step], repeat: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds of each step, timed round-robin so that every case sees the same machine load."""
    return {name: statistics.median(t) for name, t in interleaved_times(steps, repeat, warmup).items()}


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A Markdown table of `rows` restricted to `columns`, numbers formatted for reading."""

    def fmt(value: Any) -> str:
        if isinstance(value, float) and math.isnan(value):
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000:
            return sci(value)
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


# -- measures against targets -------------------------------------------------------------------------


@dataclass(frozen=True)
class Measure:
    """One line of the summary: `value` against `baseline` (same unit), and the ratio's target.

    `higher_is_better` flips the comparison (requests/s); `limit` None means the line is informative only.
    """

    section: str
    name: str
    value: float
    baseline: float
    baseline_name: str
    unit: str
    limit: float | None = None
    higher_is_better: bool = False

    @property
    def ratio(self) -> float:
        return self.value / self.baseline

    @property
    def target(self) -> str:
        if self.limit is None:
            return "-"
        return f"≥ {self.limit:.3g}x" if self.higher_is_better else f"≤ {self.limit:.3g}x"

    @property
    def verdict(self) -> str:
        if self.limit is None:
            return "info"
        ok = self.ratio >= self.limit if self.higher_is_better else self.ratio <= self.limit
        return "PASS" if ok else "MISS"

    def row(self) -> dict[str, Any]:
        return {
            "section": self.section,
            "measure": self.name,
            "value": f"{_num(self.value)} {self.unit}",
            "baseline": f"{self.baseline_name}: {_num(self.baseline)} {self.unit}",
            "ratio": f"{self.ratio:.2f}x",
            "target": self.target,
            "verdict": self.verdict,
        }


@dataclass
class Section:
    """One lettered part of the run: its detail table, the summary lines it contributes, its notes."""

    key: str
    title: str
    columns: list[str]
    rows: list[dict[str, Any]]
    measures: list[Measure]
    notes: list[str]


SUMMARY_COLUMNS = ["section", "measure", "value", "baseline", "ratio", "target", "verdict"]


def sci(n: int) -> str:
    """1e5 for 100000; other counts with thousands separators."""
    short = f"{n:.0e}".replace("e+0", "e").replace("e+", "e")
    return short if float(short) == n else f"{n:,}"


def _num(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


# -- processes ----------------------------------------------------------------------------------------


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{url} did not become ready")


class Process:
    """A child process serving HTTP on a free loopback port (`{port}` in `cmd` is replaced)."""

    def __init__(self, cmd: list[str], ready_path: str = "/readyz") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [part.replace("{port}", str(self.port)) for part in cmd]
        self.ready_path = ready_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Process:
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_ready(self.url + self.ready_path, self.proc)
        return self

    def stop(self) -> None:
        terminate(self.proc)

    def __enter__(self) -> Process:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


# the sections create thousands of sessions in open mode on purpose: past the default per-key quota
BENCH_ENV = {"OPTSERVE_MAX_SESSIONS_PER_KEY": "1000000"}


class Servers:
    """The server processes that several sections share within one run, started on first use: one
    `optserve serve --store memory://` and one bare FastAPI echo app under the same uvicorn settings."""

    def __init__(self) -> None:
        self._optserve: Server | None = None
        self._echo: Process | None = None

    def optserve(self) -> Server:
        if self._optserve is None:
            self._optserve = Server("memory://", env=BENCH_ENV).start()
        return self._optserve

    def echo(self) -> Process:
        if self._echo is None:
            self._echo = Process([sys.executable, "-m", "bench.echo_app", "--port", "{port}"]).start()
        return self._echo

    def close(self) -> None:
        if self._optserve is not None:
            self._optserve.stop()
        if self._echo is not None:
            self._echo.stop()
        self._optserve = self._echo = None

    def __enter__(self) -> Servers:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class PortPrinter:
    """A child process that prints the port it listens on as its first line (floor.py, rawhttp.py)."""

    def __init__(self, module: str, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", module, *args], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.strip():
            self.proc.kill()
            raise RuntimeError(f"{module} did not print its port")
        self.port = int(line)
        self.url = f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def __enter__(self) -> PortPrinter:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def pid_of(server: Server | Process | PortPrinter) -> int:
    if isinstance(server, Server):
        assert server.proc is not None
        return server.proc.pid
    return server.pid


def rss_bytes(pid: int) -> int:
    """Resident set size of `pid` (VmRSS in /proc/<pid>/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds `pid` has used so far (/proc/<pid>/stat), all threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- sessions -----------------------------------------------------------------------------------------


def create_body(numel: int, optimizer: dict[str, Any] | None = None) -> bytes:
    """A JSON create body of `numel` float32 zeros, written by orjson straight from a numpy array (the
    stdlib's `json` on a list of 1e7 floats takes seconds)."""
    zeros = np.zeros(numel, dtype=np.float32)
    params = {"w": {"shape": [numel], "dtype": "float32", "data": zeros}}
    return orjson.dumps({"optimizer": optimizer or ADAM, "params": params}, option=orjson.OPT_SERIALIZE_NUMPY)


def create_session(client: httpx.Client, numel: int) -> str:
    created = client.post("/v1/sessions", content=create_body(numel), headers={"Content-Type": JSON})
    created.raise_for_status()
    sid: str = created.json()["id"]
    return sid


def grads_of(numel: int, seed: int = 0) -> npt.NDArray[np.float32]:
    return np.random.default_rng(seed).standard_normal(numel, dtype=np.float32)


# -- the machine ----------------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    """CPU model, cores, memory, load, versions and date: what the numbers were measured on."""
    import torch  # imported here: the sections that do not need it should not pay for it

    cpu = "unknown"
    flags: set[str] = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() == "model name" and cpu == "unknown":
                cpu = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    with open("/proc/meminfo") as f:
        mem_kb = int(next(line for line in f if line.startswith("MemTotal:")).split()[1])
    simd = ", ".join(f for f in ("avx2", "avx512f", "fma") if f in flags) or "none of avx2/avx512f/fma"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    import fastapi
    import uvicorn

    return {
        "CPU": f"{cpu} ({simd})",
        "cores": f"{os.cpu_count()} logical (affinity: {len(os.sched_getaffinity(0))})",
        "memory": f"{mem_kb / 2**20:.1f} GiB",
        "load average at start (1, 5, 15 min)": load,
        "OS": f"{platform.system()} {platform.release()}",
        "Python": platform.python_version(),
        "numpy / torch": f"{np.__version__} / {torch.__version__} (CPU)",
        "torch's CPU kernels": torch.backends.cpu.get_cpu_capability(),
        "fastapi / uvicorn / httpx / orjson": (
            f"{fastapi.__version__} / {uvicorn.__version__} / {httpx.__version__} / {orjson.__version__}"
        ),
        "code": _revision(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _revision() -> str:
    """The commit measured, and whether app/ or the SDK had uncommitted changes (read-only git calls)."""
    root = Path(__file__).resolve().parents[1]
    git = ["git", "--no-optional-locks", "-C", str(root)]
    try:
        head = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", "app", "clients/python/optserve"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git)"
    state = "with uncommitted changes in app/ or the SDK" if dirty.stdout.strip() else "clean app/ and SDK"
    return f"commit {head.stdout.strip()}, {state}"


def section_main(run: Callable[..., Section]) -> int:
    """`python -m bench.<module> [--quick]`: one section alone, its table and its measures printed."""
    section = run(quick="--quick" in sys.argv)
    print(table(section.rows, section.columns))
    for measure in section.measures:
        print(measure.row())
    return 0
