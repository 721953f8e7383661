"""One synchronous round of W workers x N float32 parameters (Adam, safetensors, the SDK's AsyncClient, one
client per worker) against W sequential single-worker steps of the same size on a plain session, on a
real `optserve serve --store memory://`; and the memory the round's waiting contributions hold.

The round should cost about one step plus the reduction, not W steps: its W uploads and W answers travel
concurrently, and one optimizer step is applied. Memory: the server's resident set is sampled every 5 ms
during the rounds; its peak over the idle server is the contributions (W x N x 4 bytes) plus the float64
reduction and the answers; after the rounds (and the idle trim) it goes back.

Run: `python -m bench.rounds [--workers 8] [--numel 1000000] [--repeat 5]`.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time
from typing import Any

import numpy as np
import optserve

from bench.common import BENCH_ENV, machine, rss_bytes, table
from tests.system.server import Server

MiB = 1 << 20


async def measure(url: str, workers: int, numel: int, repeat: int, pid: int) -> dict[str, Any]:
    params = {"w": np.zeros(numel, np.float32)}
    adam = {"name": "adam", "lr": 1e-3}
    grads = [{"w": np.random.default_rng(i).standard_normal(numel, dtype=np.float32)} for i in range(workers)]
    clients = [optserve.AsyncClient(url) for _ in range(workers)]
    try:
        rounds = {"mode": "sync", "workers": workers, "timeout": 120}
        created = await clients[0].create_session(params, adam, aggregation=rounds)
        sessions = [await c.get_session(created.id) for c in clients]
        plain = await clients[0].create_session(params, adam)
        samples: list[int] = []
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.is_set():
                samples.append(rss_bytes(pid))
                time.sleep(0.005)

        async def one_round(t: int) -> float:
            start = time.perf_counter()
            await asyncio.gather(
                *(
                    s.step(g, expected_step=t, worker=f"w{i}")
                    for i, (s, g) in enumerate(zip(sessions, grads, strict=True))
                )
            )
            return time.perf_counter() - start

        async def sequential() -> float:
            start = time.perf_counter()
            for g in grads:
                await plain.step(g)
            return time.perf_counter() - start

        await one_round(0)  # warm-ups: connections, kernels, the allocator
        await sequential()
        idle = rss_bytes(pid)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        round_times, sequential_times = [], []
        for t in range(1, repeat + 1):  # interleaved, so that both see the same machine load
            round_times.append(await one_round(t))
            sequential_times.append(await sequential())
        sampling.set()
        sampler.join()
        await asyncio.sleep(3.0)  # past OPTSERVE_IDLE_TRIM_SECONDS
        after = rss_bytes(pid)
    finally:
        for c in clients:
            await c.close()
    one_round_s = statistics.median(round_times)
    steps_s = statistics.median(sequential_times)
    return {
        "workers": workers,
        "params": numel,
        "round ms": round(one_round_s * 1000, 1),
        f"{workers} steps ms": round(steps_s * 1000, 1),
        "one step ms": round(steps_s / workers * 1000, 1),
        "round / one step": round(one_round_s / (steps_s / workers), 2),
        f"round / {workers} steps": round(one_round_s / steps_s, 2),
        "peak RSS over idle MiB": round((max(samples) - idle) / MiB),
        "contributions MiB": round(workers * numel * 4 / MiB),
        "RSS after, over idle MiB": round((after - idle) / MiB),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--numel", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with Server("memory://", env={**BENCH_ENV, "OPTSERVE_IDLE_TRIM_SECONDS": "1"}) as server:
        assert server.proc is not None
        row = asyncio.run(measure(server.url, args.workers, args.numel, args.repeat, server.proc.pid))
    info = machine()
    print(f"rounds on {info['CPU']}, {info['cores']}\n")
    print(table([row], list(row)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
