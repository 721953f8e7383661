"""(g) The step round trip over loopback HTTP (safetensors both ways) on each store, 1M float32 Adam params.

Run: `python -m bench.bench_stores`. Each store gets its own real `optserve serve` process, all three up at
once and timed round-robin (plain httpx, pre-encoded body, medians), so the ratios against `memory://`
share the machine's load. `redis://` is a redis-server of its own (tests/system/redis_server.py): AOF with
`appendfsync always`, so every step is on disk before it is answered, as on `sqlite://` (WAL).
"""

from __future__ import annotations

import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

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

NUMEL = 1_000_000
COLUMNS = ["store", "params", "ms", "vs memory://"]


def run(quick: bool = False, servers: object = None, numel: int | None = None) -> Section:
    """Its own three servers (one per store); `servers` is accepted for the runner's uniform call."""
    numel = numel or (10_000 if quick else NUMEL)
    repeat = 5 if quick else 20
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
        seconds = interleaved_medians(steps, repeat)
    base = seconds["memory://"]
    rows: list[dict[str, Any]] = [
        {"store": name, "params": numel, "ms": s * 1e3, "vs memory://": s / base}
        for name, s in seconds.items()
    ]
    measures = [
        Measure("g", f"step on {name}, {sci(numel)} params", s * 1e3, base * 1e3, "memory://", "ms")
        for name, s in seconds.items()
        if name != "memory://"
    ]
    notes = [
        f"Medians of {repeat} steps per store after 3 warm-ups, round-robin across the three servers; the "
        "durable stores write the whole state (params and both moments) on every step.",
    ]
    return Section("g", "The same step per store", COLUMNS, rows, measures, notes)


if __name__ == "__main__":
    sys.exit(section_main(run))
