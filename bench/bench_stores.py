"""(g) The step round trip over loopback HTTP (safetensors both ways) on each store, 1M float32 Adam params.

Run: `python -m bench.bench_stores`. Each store gets its own real `optserve serve` process, all three up at
once and timed round-robin (plain httpx, pre-encoded body, medians), so the ratios against `memory://`
share the machine's load. `redis://` is a redis-server of its own (tests/system/redis_server.py): AOF with
`appendfsync always`, so every step is on disk before it is answered, as on `sqlite://` (WAL).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from app.wire import safetensors
from bench.common import (
    ST_HEADERS,
    Measure,
    Section,
    Step,
    create_session,
    grads_of,
    interleaved_medians,
    sci,
    section_main,
)
from tests.system.redis_server import RedisServer
from tests.system.server import Server

SIZES = (1_000_000, 10_000_000)
TARGETS = {"sqlite://": 2.0, "redis://": 2.5}
"""Durable at nearly memory's speed: each durable store against memory:// in the same run."""
COLUMNS = ["store", "params", "ms", "vs memory://", "over memory:// ms", "disk floor ms"]


def disk_floor(directory: Path, numel: int, repeat: int) -> float:
    """The disk's limit for one durable Adam step in this directory: 12 bytes per parameter (params and
    both moments, float32) written over a file of that size and fdatasync'ed, as the SQLite store writes
    its state; the median seconds."""
    data = np.random.default_rng(0).standard_normal(3 * numel).astype(np.float32)
    path = directory / "floor.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, data.nbytes)
        os.fsync(fd)
        times = []
        for _ in range(repeat + 2):
            start = time.perf_counter()
            os.pwrite(fd, memoryview(data).cast("B"), 0)
            os.fdatasync(fd)
            times.append(time.perf_counter() - start)
    finally:
        os.close(fd)
        path.unlink()
    return statistics.median(times[2:])


def run(quick: bool = False, servers: object = None, numel: int | None = None) -> Section:
    """Its own three servers (one per store); `servers` is accepted for the runner's uniform call."""
    sizes = (numel,) if numel else (10_000,) if quick else SIZES
    rows: list[dict[str, Any]] = []
    measures = []
    for size in sizes:
        repeat = 5 if quick or size > 1_000_000 else 20
        pairs, floor = _measure(size, repeat)
        for name, (s, base) in pairs.items():
            rows.append(
                {
                    "store": name,
                    "params": size,
                    "ms": s * 1e3,
                    "vs memory://": s / base,
                    "over memory:// ms": (s - base) * 1e3,
                    "disk floor ms": floor * 1e3,
                }
            )
            if name != "memory://":
                what = f"step on {name}, {sci(size)} params"
                measures.append(Measure("g", what, s * 1e3, base * 1e3, "memory://", "ms", TARGETS[name]))
    notes = [
        "Medians of 20 steps (5 at 1e7) per store after 3 warm-ups. Each durable store is timed round-robin "
        "with memory:// (its ratio is against that memory:// figure), one store after the other, so that "
        "Redis' AOF writes and rewrites do not land in the SQLite store's fsyncs. "
        "Both durable stores write the whole state (params and both moments) before answering: SQLite into "
        "the session's slot file (fdatasync) and a small transaction, Redis through its AOF "
        "(`appendfsync always`). The disk floor is that state written over a file and fdatasync'ed, in "
        "the SQLite store's directory: what the SQLite store's cost over memory:// is bounded below by.",
    ]
    return Section("g", "The same step per store", COLUMNS, rows, measures, notes)


def _measure(numel: int, repeat: int) -> tuple[dict[str, tuple[float, float]], float]:
    """Per store, its median step and that of memory:// timed alongside it; and the disk floor."""
    body = safetensors.encode_bytes({"w": grads_of(numel)}, None)
    with tempfile.TemporaryDirectory(prefix="optserve-bench-") as tmp, ExitStack() as stack:
        redis = stack.enter_context(RedisServer(Path(tmp) / "redis"))
        urls = {"memory://": "memory://", "sqlite://": f"sqlite:///{tmp}/bench.db", "redis://": redis.url()}
        steps: dict[str, Step] = {}
        for name, url in urls.items():
            server = stack.enter_context(Server(url))
            client = stack.enter_context(httpx.Client(base_url=server.url, timeout=120))
            path = f"/v1/sessions/{create_session(client, numel)}/step"

            def step(client: httpx.Client = client, path: str = path) -> None:
                client.post(path, content=body, headers=ST_HEADERS).raise_for_status()

            steps[name] = step
        pairs: dict[str, tuple[float, float]] = {}
        for durable in ("sqlite://", "redis://"):
            seconds = interleaved_medians({"memory://": steps["memory://"], durable: steps[durable]}, repeat)
            pairs.setdefault("memory://", (seconds["memory://"], seconds["memory://"]))
            pairs[durable] = (seconds[durable], seconds["memory://"])
        floor = disk_floor(Path(tmp), numel, repeat)
    return pairs, floor


if __name__ == "__main__":
    sys.exit(section_main(run))
