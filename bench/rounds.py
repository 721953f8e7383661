"""One synchronous round of W workers x N float32 parameters (Adam, safetensors, the SDK's AsyncClient, one
client per worker) against W sequential single-worker steps of the same size on a plain session, on a
real `optserve serve --store memory://`; and the memory the round's waiting contributions hold.

The round should cost about one step plus the reduction, not W steps: its W uploads and W answers travel
concurrently, and one optimizer step is applied. Memory: the server's resident set is sampled every 5 ms
during the rounds; its peak over the idle server is the contributions (W x N x 4 bytes) plus the float64
reduction and the answers; after the rounds (and the idle trim) it goes back.

`--store redis` runs the same on a real redis-server (AOF, `appendfsync always`), where the round lives in
Redis: each contribution is written to Redis (fsynced) and read back by the replica that applies the
round, and the server's memory holds only the requests in flight.

Run: `python -m bench.rounds [--workers 8] [--numel 1000000] [--repeat 5] [--store memory|redis]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import optserve

from bench.common import BENCH_ENV, cpu_seconds, machine, rss_bytes, table
from tests.system.redis_server import RedisServer
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

        async def one_round(t: int, answer: bool = True) -> tuple[float, float]:
            start, cpu = time.perf_counter(), cpu_seconds(pid)
            await asyncio.gather(
                *(
                    s.step(g, expected_step=t, worker=f"w{i}", return_params=answer)
                    for i, (s, g) in enumerate(zip(sessions, grads, strict=True))
                )
            )
            return time.perf_counter() - start, cpu_seconds(pid) - cpu

        async def sequential(answer: bool = True) -> tuple[float, float]:
            start, cpu = time.perf_counter(), cpu_seconds(pid)
            for g in grads:
                await plain.step(g, return_params=answer)
            return time.perf_counter() - start, cpu_seconds(pid) - cpu

        await one_round(0)  # warm-ups: connections, kernels, the allocator
        await sequential()
        idle = rss_bytes(pid)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        timed: dict[str, list[tuple[float, float]]] = {
            "round": [],
            "steps": [],
            "round, no params": [],
            "steps, no params": [],
        }
        t = 1
        for _ in range(repeat):  # interleaved, so that both see the same machine load
            timed["round"].append(await one_round(t))
            timed["steps"].append(await sequential())
            timed["round, no params"].append(await one_round(t + 1, answer=False))
            timed["steps, no params"].append(await sequential(answer=False))
            t += 2
        sampling.set()
        sampler.join()
        await asyncio.sleep(3.0)  # past OPTSERVE_IDLE_TRIM_SECONDS
        after = rss_bytes(pid)
    finally:
        for c in clients:
            await c.close()
    wall = {k: statistics.median(w for w, _ in v) * 1000 for k, v in timed.items()}
    cpu = {k: statistics.mean(c for _, c in v) * 1000 for k, v in timed.items()}
    rows = []
    for answer in ("", ", no params"):
        r, s_ = f"round{answer}", f"steps{answer}"
        rows.append(
            {
                "answers": "params" if not answer else "none",
                "round ms": round(wall[r], 1),
                f"{workers} steps ms": round(wall[s_], 1),
                f"round / {workers} steps": round(wall[r] / wall[s_], 2),
                "round / one step": round(wall[r] / (wall[s_] / workers), 2),
                "server CPU round ms": round(cpu[r], 1),
                f"server CPU {workers} steps ms": round(cpu[s_], 1),
            }
        )
    memory = {
        "contributions MiB": round(workers * numel * 4 / MiB),
        "peak RSS over idle MiB": round((max(samples) - idle) / MiB),
        "RSS after the rounds and the idle trim, over idle MiB": round((after - idle) / MiB),
    }
    return {"rows": rows, "memory": memory, "workers": workers, "params": numel}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--numel", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--store", choices=["memory", "redis"], default="memory")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        store = "memory://"
        if args.store == "redis":
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            store = stack.enter_context(RedisServer(directory)).url()
        server = stack.enter_context(Server(store, env={**BENCH_ENV, "OPTSERVE_IDLE_TRIM_SECONDS": "1"}))
        assert server.proc is not None
        result = asyncio.run(measure(server.url, args.workers, args.numel, args.repeat, server.proc.pid))
    info = machine()
    print(
        f"{args.workers} workers x {args.numel} float32 parameters, Adam, {store.split(':')[0]} store, "
        f"on {info['CPU']}, {info['cores']}\n"
    )
    print(table(result["rows"], list(result["rows"][0])))
    print()
    print(table([result["memory"]], list(result["memory"])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
