"""(g) The step round trip over loopback HTTP (safetensors both ways) on each store, 1M float32 Adam params.

Run: `python -m bench.bench_stores`. Each store gets its own real `optserve serve` process, all three up at
once and timed round-robin (plain httpx, pre-encoded body, medians), so the ratios against `memory://`
share the machine's load. `redis://` is a redis-server of its own (tests/system/redis_server.py): AOF with
`appendfsync always`, so every step is on disk before it is answered, as on `sqlite://` (WAL).
"""

from __future__ import annotations

import asyncio
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from app.optim.engine import Engine
from app.sessions import rebuild, record_of
from app.store.base import LoggedStep, SessionMeta, Store
from app.store.redis import CHUNK_BYTES, LOG_RATIO, LOG_STEPS, RedisStore
from app.store.sqlite import SqliteStore
from app.wire import safetensors
from bench.common import (
    ST_HEADERS,
    Measure,
    Section,
    Step,
    create_session,
    grads_of,
    interleaved_times,
    sci,
    section_main,
)
from tests.system.redis_server import RedisServer
from tests.system.server import Server

SIZES = (1_000_000, 10_000_000)
TARGETS = {"sqlite://": 2.0, "redis://": 2.5}
FLOOR_OF = {"sqlite://": lambda disk, append: disk, "redis://": lambda disk, append: append}
"""The disk floor each durable store's cost over memory:// is bounded below by (see the notes)."""
"""Durable at nearly memory's speed: each durable store against memory:// in the same run."""
COLUMNS = [
    "store",
    "params",
    "ms",
    "vs memory://",
    "over memory:// ms",
    "mean ms",
    "mean vs memory://",
    "disk floor ms",
    "append floor ms",
    "over memory:// vs its floor",
    "recovery ms",
    "steps redone",
]


def disk_floor(directory: Path, numel: int, repeat: int) -> float:
    """The disk's limit for one durable Adam step in this directory: 12 bytes per parameter (params and
    both moments, float32) written over a file of that size and fdatasync'ed, as the SQLite store writes
    its state; the median seconds."""
    data = memoryview(np.random.default_rng(0).standard_normal(3 * numel).astype(np.float32)).cast("B")

    def allocate(fd: int) -> None:
        os.posix_fallocate(fd, 0, len(data))
        os.fsync(fd)

    def overwrite(fd: int) -> None:
        os.pwrite(fd, data, 0)
        os.fdatasync(fd)

    return _timed_writes(directory / "floor.bin", os.O_RDWR, overwrite, repeat, allocate)


def append_floor(directory: Path, numel: int, repeat: int) -> float:
    """The disk's limit for what the Redis store's step puts through Redis' AOF (`appendfsync always`):
    the step's prepared gradients (4 bytes per float32 parameter) appended to a file in chunks of
    `CHUNK_BYTES`, fsync'ed after each, as Redis fsyncs after each event-loop turn that read a chunk; the
    median seconds."""
    data = memoryview(np.random.default_rng(1).standard_normal(numel).astype(np.float32)).cast("B")

    def append(fd: int) -> None:
        for begin in range(0, len(data), CHUNK_BYTES):
            os.write(fd, data[begin : begin + CHUNK_BYTES])
            os.fsync(fd)

    return _timed_writes(directory / "append.bin", os.O_WRONLY | os.O_APPEND, append, repeat)


def _timed_writes(
    path: Path,
    flags: int,
    write: Callable[[int], None],
    repeat: int,
    prepare: Callable[[int], None] | None = None,
) -> float:
    """The median seconds of `write(fd)` on a new file at `path` (`flags` | O_CREAT), after 2 untimed
    runs and `prepare(fd)`; the file is removed after."""
    fd = os.open(path, flags | os.O_CREAT, 0o600)
    try:
        if prepare is not None:
            prepare(fd)
        times = []
        for _ in range(repeat + 2):
            start = time.perf_counter()
            write(fd)
            times.append(time.perf_counter() - start)
    finally:
        os.close(fd)
        path.unlink()
    return statistics.median(times[2:])


def settle_disk(timeout: float = 30.0) -> None:
    """Waits until the page cache holds no dirty data (at most `timeout` seconds): a store's timing must not
    pay for the previous store's writeback (SQLite writes 120 MB per 1e7 step), which lands in whatever
    fsync comes next."""
    os.sync()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _dirty_bytes() > 16 << 20:
        time.sleep(0.1)


def _dirty_bytes() -> int:
    """Dirty and under-writeback bytes of the page cache (/proc/meminfo; 0 where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
    except OSError:
        return 0
    return sum(int(fields.get(key, "0 kB").split()[0]) * 1024 for key in ("Dirty", "Writeback"))


def run(quick: bool = False, servers: object = None, numel: int | None = None) -> Section:
    """Its own three servers (one per store); `servers` is accepted for the runner's uniform call."""
    sizes = (numel,) if numel else (10_000,) if quick else SIZES
    rows: list[dict[str, Any]] = []
    measures = []
    for size in sizes:
        repeat = 5 if quick else 15 if size > 1_000_000 else 20
        pairs, floor, appended, recovery = _measure(size, repeat)
        for name, (s, base, mean, mean_base) in pairs.items():
            rows.append(
                {
                    "store": name,
                    "params": size,
                    "ms": s * 1e3,
                    "vs memory://": s / base,
                    "over memory:// ms": (s - base) * 1e3,
                    "mean ms": mean * 1e3,
                    "mean vs memory://": mean / mean_base,
                    "disk floor ms": floor * 1e3,
                    "append floor ms": appended * 1e3,
                    # what the store costs over memory:// against what its disk writes cost at the least
                    "over memory:// vs its floor": (s - base) / FLOOR_OF[name](floor, appended)
                    if name in FLOOR_OF
                    else math.nan,
                    "recovery ms": recovery[name][0] * 1e3 if name in recovery else math.nan,
                    "steps redone": recovery[name][1] if name in recovery else "-",
                }
            )
            if name != "memory://":
                what = f"step on {name}, {sci(size)} params"
                measures.append(Measure("g", what, s * 1e3, base * 1e3, "memory://", "ms", TARGETS[name]))
                floor_name = "append floor" if name == "redis://" else "disk floor"
                measures.append(
                    Measure(
                        "g",
                        f"{name} over memory://, {sci(size)} params",
                        (s - base) * 1e3,
                        FLOOR_OF[name](floor, appended) * 1e3,
                        floor_name,
                        "ms",
                    )
                )
    notes = [
        "Medians of 20 steps (15 at 1e7) per store after 3 warm-ups. Each durable store is timed round-robin "
        "with memory:// (its ratio is against that memory:// figure), one store after the other, so that "
        "Redis' AOF writes and rewrites do not land in the SQLite store's fsyncs. "
        "Both durable stores write the whole state (params and both moments) before answering: SQLite into "
        "the session's slot file (fdatasync) and a small transaction, Redis through its AOF "
        "(`appendfsync always`). The disk floor is that state written over a file and fdatasync'ed, in "
        "the SQLite store's directory: what the SQLite store's cost over memory:// is bounded below by. "
        "The append floor is what Redis' AOF does with a logged step: its gradients (a third of the "
        f"state) appended in {CHUNK_BYTES >> 20} MiB chunks, each fsync'ed: what the Redis store's cost over "
        "memory:// is bounded below by, besides its share of the snapshots; so `redis://` can be at best "
        "1 + append floor / memory:// times memory://. The last column divides each store's cost over "
        "memory:// by its floor. Before each store is timed "
        "(and each floor), the page cache's dirty data is written out and waited for, so that no store "
        "pays for the previous one's writeback.",
        "SQLite writes the whole state (params and both moments) at every step: into the session's slot "
        "file (fdatasync), then a small transaction. Redis stores each step's prepared gradients (a third of "
        "Adam's state) and writes the whole state behind the answers once the log since the last one holds "
        f"{LOG_RATIO:g}x the state's bytes or {LOG_STEPS} steps: the mean includes the steps that waited "
        "behind such a write, the median mostly does not.",
        "Recovery: what the first request after a restart (or on another replica) pays to load the session, "
        "measured in-process as the store's load and the engine's rebuild, median of 3. For Redis at the "
        "worst log the store allows (no snapshot written meanwhile: twice the background threshold, after "
        "which a step writes the whole state itself): the snapshot, the logged steps, and each step redone.",
    ]
    return Section("g", "The same step per store", COLUMNS, rows, measures, notes)


def _measure(
    numel: int, repeat: int
) -> tuple[dict[str, tuple[float, float, float, float]], float, float, dict[str, tuple[float, int]]]:
    """Per store, its median step and that of memory:// timed alongside it, and both means; the disk floor;
    the recovery time per durable store (and how many steps it redid)."""
    body = safetensors.encode_bytes({"w": grads_of(numel)}, None)
    with tempfile.TemporaryDirectory(prefix="optserve-bench-") as tmp, ExitStack() as stack:
        # as the README advises for large sessions: no AOF rewrite every few steps
        redis = stack.enter_context(
            RedisServer(Path(tmp) / "redis", None, "--auto-aof-rewrite-min-size", "4gb")
        )
        urls = {"memory://": "memory://", "sqlite://": f"sqlite:///{tmp}/bench.db", "redis://": redis.url()}
        steps: dict[str, Step] = {}
        for name, url in urls.items():
            server = stack.enter_context(Server(url))
            client = stack.enter_context(httpx.Client(base_url=server.url, timeout=120))
            path = f"/v1/sessions/{create_session(client, numel)}/step"

            def step(client: httpx.Client = client, path: str = path) -> None:
                client.post(path, content=body, headers=ST_HEADERS).raise_for_status()

            steps[name] = step
        pairs: dict[str, tuple[float, float, float, float]] = {}
        for durable in ("sqlite://", "redis://"):
            settle_disk()
            times = interleaved_times({"memory://": steps["memory://"], durable: steps[durable]}, repeat)
            med = {name: statistics.median(t) for name, t in times.items()}
            mean = {name: statistics.fmean(t) for name, t in times.items()}
            pairs.setdefault("memory://", (med["memory://"],) * 2 + (mean["memory://"],) * 2)
            pairs[durable] = (med[durable], med["memory://"], mean[durable], mean["memory://"])
        settle_disk()
        floor = disk_floor(Path(tmp), numel, repeat)
        settle_disk()
        appended = append_floor(Path(tmp), numel, repeat)
        recovery = asyncio.run(_recovery(numel, urls))
    return pairs, floor, appended, recovery


async def _recovery(numel: int, urls: dict[str, str]) -> dict[str, tuple[float, int]]:
    """Median seconds to load and rebuild a 1e6/1e7 Adam session on a store object that never saw it, per
    durable store; Redis with the longest log it allows."""
    spec = {"optimizer": {"name": "adam", "lr": 1e-3}}
    engine = Engine.create(spec, {"w": np.zeros(numel, np.float32)})
    grads = {"w": grads_of(numel)}
    out: dict[str, tuple[float, int]] = {}
    for name in ("sqlite://", "redis://"):
        writer = open_store(urls[name])
        if isinstance(writer, RedisStore):
            writer._snapshot_later = lambda record, nonce: None  # type: ignore[method-assign]
        now = time.time()
        meta = SessionMeta(f"s_recovery_{numel}", "", now, now)
        current = engine
        await writer.create(record_of(meta, current))
        prepared = current.prepare(grads)
        entry = safetensors.encoded_size(LoggedStep(prepared.grads, None, 0.0, False, 0).encode())
        # the steps the log may hold before a step writes the state (the store's rule in _commit_with)
        allowed = min(2 * LOG_STEPS, int(2 * LOG_RATIO * engine.nbytes // entry))
        for _ in range(allowed if isinstance(writer, RedisStore) else 1):
            prepared = current.prepare(grads)
            following, _ = current.advance(prepared)
            logged = LoggedStep(prepared.grads, None, prepared.grad_norm, False, 0)
            written = meta.written(time.time())
            assert await writer.commit(record_of(written, following), meta.version, None, None, logged)
            meta, current = written, following
        await writer.close()
        times = []
        for _ in range(3):
            reader = open_store(urls[name])
            start = time.perf_counter()
            record = await reader.load(meta.id)
            assert record is not None
            rebuilt = await asyncio.to_thread(rebuild, record)
            times.append(time.perf_counter() - start)
            assert rebuilt.step_count == current.step_count
            redone = len(record.log)
            await reader.close()
        out[name] = (statistics.median(times), redone)
    return out


def open_store(url: str) -> Store:
    return RedisStore.from_url(url) if url.startswith("redis") else SqliteStore.from_url(url)


if __name__ == "__main__":
    sys.exit(section_main(run))
