"""(d) Throughput under concurrency: 32 clients stepping 32 sessions of 10k float32 Adam parameters, against
a bare FastAPI echo endpoint under the same server settings (`echo_app.py`), driven the same way.

The load generator runs in its own process (`python -m bench.load --generate`, a JSON config on stdin, a
JSON result on stdout), on uvloop. 32 keep-alive connections each send one request at a time to their own
session's step (`POST /v1/sessions/{id}/step`, safetensors both ways, the same pre-built bytes against both
servers: the echo app answers them back), for `duration` seconds after a `warmup`; the requests completed
inside the window count. Two generators:

- `raw` (the one the target is measured with): `rawhttp.AsyncRawClient`, a bare asyncio `Protocol` that
  writes a pre-built request and parses just the response's Content-Length;
- `httpx`: one `httpx.AsyncClient` (pool of 32), `post(content=...)`, for comparison.

That the generator is not the limit is checked three ways, all in the table: its own CPU use during the
window (a generator at ~100% of a core would be the bottleneck), the server's CPU use, and the generator's
ceiling: the same generator against `rawhttp.serve_echo`, an echo server with no framework, which must go
well above the echo app's rate. The optserve and echo runs alternate (A B B A B A A B) so drift hits both
alike.

Run: `python -m bench.load` (`--quick` for a short one).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import httpx

from app.wire import safetensors
from bench.common import (
    ST_HEADERS,
    Measure,
    PortPrinter,
    Section,
    Servers,
    cpu_seconds,
    create_session,
    grads_of,
    pid_of,
    table,
)
from bench.lean_step import in_process
from bench.rawhttp import AsyncRawClient, request_head

CONNECTIONS = 32
NUMEL = 10_000
LIMIT = 0.8  # optserve's requests/s at least this fraction of the echo app's
COLUMNS = ["run", "target", "generator", "req/s", "p50 ms", "p99 ms", "generator CPU", "server CPU", "errors"]


@dataclass(frozen=True)
class LoadConfig:
    port: int
    server_pid: int
    session_ids: list[str]
    numel: int = NUMEL
    duration: float = 5.0
    warmup: float = 1.0
    client: str = "raw"


def _body(numel: int, seed: int) -> bytes:
    return safetensors.encode_bytes({"w": grads_of(numel, seed=seed)}, {"loss": "0.5"})


def _requests(config: LoadConfig) -> list[tuple[str, bytes]]:
    """(path, body) per connection: its own session, its own gradients."""
    return [(f"/v1/sessions/{sid}/step", _body(config.numel, i)) for i, sid in enumerate(config.session_ids)]


async def _generate(config: LoadConfig) -> dict[str, Any]:
    host = f"127.0.0.1:{config.port}"
    clock = time.perf_counter  # uvloop's loop.time() ticks in whole milliseconds
    started = clock()
    window = (started + config.warmup, started + config.warmup + config.duration)
    latencies: list[float] = []
    errors = 0
    stop = False

    def done(sent: float, ok: bool) -> None:
        nonlocal errors
        now = clock()
        if window[0] <= now < window[1]:
            latencies.append(now - sent)
            errors += not ok

    async def raw_worker(path: str, body: bytes) -> None:
        conn = await AsyncRawClient.connect("127.0.0.1", config.port)
        request = request_head("POST", path, host, ST_HEADERS, len(body)) + body
        try:
            while not stop:
                sent = clock()
                status = await conn.send(request)
                done(sent, status == 200)
        finally:
            conn.close()

    async def httpx_worker(client: httpx.AsyncClient, path: str, body: bytes) -> None:
        while not stop:
            sent = clock()
            response = await client.post(path, content=body, headers=ST_HEADERS)
            done(sent, response.status_code == 200)

    requests = _requests(config)
    limits = httpx.Limits(max_connections=len(requests), max_keepalive_connections=len(requests))
    async with httpx.AsyncClient(base_url=f"http://{host}", limits=limits, timeout=60) as client:
        if config.client == "raw":
            workers = [asyncio.create_task(raw_worker(p, b)) for p, b in requests]
        else:
            workers = [asyncio.create_task(httpx_worker(client, p, b)) for p, b in requests]
        await asyncio.sleep(window[0] - clock())
        cpu0, server0, t0 = time.process_time(), cpu_seconds(config.server_pid), clock()
        await asyncio.sleep(window[1] - clock())
        cpu1, server1, t1 = time.process_time(), cpu_seconds(config.server_pid), clock()
        stop = True
        await asyncio.gather(*workers)
    ms = sorted(x * 1e3 for x in latencies)
    return {
        "requests": len(latencies),
        "seconds": t1 - t0,
        "rps": len(latencies) / (t1 - t0),
        "p50 ms": statistics.median(ms) if ms else float("nan"),
        "p99 ms": ms[int(0.99 * (len(ms) - 1))] if ms else float("nan"),
        "generator CPU": (cpu1 - cpu0) / (t1 - t0),
        "server CPU": (server1 - server0) / (t1 - t0),
        "errors": errors,
    }


def generate(config: LoadConfig) -> dict[str, Any]:
    """Runs the generator in a process of its own and returns its result."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.load", "--generate"],
        input=json.dumps(config.__dict__),
        capture_output=True,
        text=True,
        timeout=config.warmup + config.duration + 120,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the load generator failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def run(quick: bool = False, servers: Servers | None = None) -> Section:
    own = servers is None
    servers = servers or Servers()
    duration, warmup = (1.0, 0.3) if quick else (5.0, 1.0)
    rows: list[dict[str, Any]] = []
    try:
        opt, echo = servers.optserve(), servers.echo()
        with httpx.Client(base_url=opt.url, timeout=60) as http, PortPrinter("bench.rawhttp") as raw_echo:
            sids = [create_session(http, NUMEL) for _ in range(CONNECTIONS)]
            targets = {
                "optserve": (opt.port, pid_of(opt)),
                "bare FastAPI echo": (echo.port, echo.pid),
                "raw asyncio echo (generator ceiling)": (raw_echo.port, raw_echo.pid),
            }
            plan = [("optserve", "raw"), ("bare FastAPI echo", "raw")]
            if not quick:
                # A B B A B A A B: on a shared VM the echo's rate alone moved 20% between runs seconds
                # apart, so the ratio takes four runs of each, balanced in order
                plan += [("bare FastAPI echo", "raw"), ("optserve", "raw")]
                plan += [("bare FastAPI echo", "raw"), ("optserve", "raw")]
                plan += [("optserve", "raw"), ("bare FastAPI echo", "raw")]
                plan += [("bare FastAPI echo", "httpx"), ("optserve", "httpx")]
            plan += [("raw asyncio echo (generator ceiling)", "raw")]
            for i, (target, client) in enumerate(plan):
                port, pid = targets[target]
                config = LoadConfig(port, pid, sids, duration=duration, warmup=warmup, client=client)
                rows.append({"run": i + 1, "target": target, "generator": client, **generate(config)})
            for sid in sids:
                http.delete(f"/v1/sessions/{sid}").raise_for_status()
    finally:
        if own:
            servers.close()

    def mean_rps(target: str) -> float:
        return float(
            statistics.mean(r["rps"] for r in rows if r["target"] == target and r["generator"] == "raw")
        )

    httpx_note = _httpx_note(rows)
    for r in rows:
        r["req/s"] = r["rps"]
        r["generator CPU"] = f"{r['generator CPU']:.0%}"
        r["server CPU"] = f"{r['server CPU']:.0%}"
    ceiling = mean_rps("raw asyncio echo (generator ceiling)")
    measures = [
        Measure(
            "d",
            f"{CONNECTIONS} clients x 10k-param steps, req/s",
            mean_rps("optserve"),
            mean_rps("bare FastAPI echo"),
            "bare FastAPI echo",
            "req/s",
            LIMIT,
            higher_is_better=True,
        ),
        Measure(
            "d",
            "load generator headroom: ceiling req/s",
            ceiling,
            mean_rps("bare FastAPI echo"),
            "bare FastAPI echo",
            "req/s",
        ),
    ]
    # the same requests in this process through ASGI: each app's own cost, apart from server and network
    alone = in_process(NUMEL, CONNECTIONS, n=300 if quick else 1500, rounds=2 if quick else 7)
    echo_us = alone["bare FastAPI echo"] * 1e6
    for name, what in (("optserve step", "step"), ("lean step (arithmetic only)", "arithmetic-only step")):
        measure = f"10k-param {what} in process (ASGI), us"
        measures.append(Measure("d", measure, alone[name] * 1e6, echo_us, "bare FastAPI echo", "us"))
    notes = [
        f"{CONNECTIONS} keep-alive connections, one request in flight each, each on its own session of "
        f"{NUMEL:,} float32 Adam parameters; safetensors both ways ({len(_body(NUMEL, 0)):,} bytes per "
        f"request body); {warmup:g} s warm-up then {duration:g} s counted; the ratio uses the mean of the "
        "`raw` generator's runs per target.",
        "CPU columns are CPU seconds per wall second over the counted window (100% = one core; all threads). "
        "The ceiling run shows what the generator can drive when the server costs almost nothing.",
        *httpx_note,
        "In process: the same bodies sent to optserve's app, the echo app and `bench/lean_step.py`'s "
        "arithmetic-only step through ASGI in one process (no sockets, no uvicorn), the least mean of "
        f"{'2' if quick else '7'} rounds: "
        + ", ".join(f"{name} {seconds * 1e6:.1f} us" for name, seconds in alone.items())
        + " per request. Over the wire each adds the same server and network cost per request.",
    ]
    return Section("d", "Concurrent load: optserve vs a bare FastAPI echo", COLUMNS, rows, measures, notes)


def _httpx_note(rows: list[dict[str, Any]]) -> list[str]:
    """What the httpx generator's runs show, when there were any (CPU still numeric)."""
    runs = [r for r in rows if r["generator"] == "httpx"]
    if not runs:
        return []
    shown = "; ".join(
        f"{r['target']} {r['rps']:,.0f} req/s, generator CPU {r['generator CPU']:.0%}" for r in runs
    )
    bound = all(r["generator CPU"] >= 0.9 for r in runs)
    verdict = "its one core, not the server, sets the pace" if bound else "see its CPU column"
    return [
        f"With httpx.AsyncClient as the generator ({shown}): {verdict}. The target uses the raw generator."
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--generate", action="store_true", help="be the load generator (config on stdin)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.generate:
        import uvloop

        config = LoadConfig(**json.loads(sys.stdin.read()))
        print(json.dumps(uvloop.run(_generate(config))))
        return 0
    section = run(quick=args.quick)
    print(table(section.rows, section.columns))
    for note in section.notes:
        print(f"\n{note}")
    for measure in section.measures:
        print(measure.row())
    return 0


if __name__ == "__main__":
    sys.exit(main())
