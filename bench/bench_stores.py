"""The step round trip over loopback HTTP (safetensors both ways) on each store, 1M float32 Adam params.

Run: `python -m bench.bench_stores`. Each store gets its own real `optserve serve` process; the ratio
is against `memory://` measured in the same run.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from app.wire import safetensors
from bench.common import median_seconds, table
from tests.system.redis_server import RedisServer
from tests.system.server import Server

ST = "application/vnd.safetensors"


def round_trip(store: str, numel: int, repeat: int) -> float:
    """Median seconds of one step request-response on a fresh session of `numel` parameters."""
    with Server(store) as server, httpx.Client(base_url=server.url, timeout=120) as client:
        zeros = {"shape": [numel], "dtype": "float32", "data": [0.0] * numel}
        spec = {"optimizer": {"name": "adam", "lr": 1e-3}, "params": {"w": zeros}}
        created = client.post("/v1/sessions", json=spec)
        created.raise_for_status()
        sid = created.json()["id"]
        noise = np.random.default_rng(0).standard_normal(numel).astype(np.float32)
        grads = safetensors.encode_bytes({"w": noise}, None)
        headers = {"Content-Type": ST, "Accept": ST}

        def step() -> None:
            r = client.post(f"/v1/sessions/{sid}/step", content=grads, headers=headers)
            r.raise_for_status()

        return median_seconds(step, repeat)


def run(numel: int = 1_000_000, repeat: int = 20) -> list[dict[str, Any]]:
    with (
        tempfile.TemporaryDirectory(prefix="optserve-bench-") as tmp,
        RedisServer(Path(tmp) / "redis") as redis,  # its own redis-server: AOF, appendfsync always
    ):
        stores = {"memory://": "memory://", "sqlite://": f"sqlite:///{tmp}/bench.db", "redis://": redis.url()}
        results = {name: round_trip(url, numel, repeat) for name, url in stores.items()}
    base = results["memory://"]
    return [
        {"store": name, "params": numel, "ms": t * 1000, "vs memory://": t / base}
        for name, t in results.items()
    ]


def main() -> int:
    rows = run()
    print(table(rows, ["store", "params", "ms", "vs memory://"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
