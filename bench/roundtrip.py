"""(c) The step round trip over loopback HTTP, safetensors both ways, against the floors of `floor.py`.

A real `optserve serve --store memory://` process holds one Adam session of N float32 parameters per size.
Timed round-robin within each size, so that every case sees the same machine load:

- (a) the raw TCP echo of the step's request size (`floor.TcpEcho`) and (b) torch fused Adam, 1 thread;
- the targets: plain `httpx.Client.post` of a pre-encoded safetensors body to optserve's step (the answer
  read whole), and the SDK, `optserve.Client(url).get_session(id).step({"w": grads})` (which also encodes
  the gradients and decodes the answer into numpy arrays);
- diagnostics that split the cost: the same request from a raw-socket HTTP client (`rawhttp.RawClient`) to
  optserve and to a bare FastAPI echo app under the same uvicorn settings (`echo_app.py`), and httpx to
  that echo app and to a raw asyncio echo server (`rawhttp.serve_echo`, no framework).

Per case: the median wall time, the median CPU time of this (client) process, and the mean CPU time of the
server process per request (from /proc/<pid>/stat, all threads, over all repeats: 10 ms ticks, so coarse
at the small sizes). Ratios are against (a)+(b) at the same size. Run: `python -m bench.roundtrip`.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import httpx
import optserve
import torch

from app.wire import safetensors
from bench.common import (
    ST_HEADERS,
    Measure,
    PortPrinter,
    Section,
    Servers,
    Step,
    cpu_seconds,
    create_session,
    grads_of,
    pid_of,
    sci,
    section_main,
)
from bench.floor import TcpEcho, torch_adam
from bench.rawhttp import RawClient

SIZES = (100_000, 1_000_000, 10_000_000)
QUICK_SIZES = (10_000, 100_000)
TCP, TORCH = "(a) raw TCP echo", "(b) torch fused Adam, 1 thread"
HTTPX, SDK = "httpx → optserve step", "SDK → optserve step"
# at most this many times (a)+(b), per client; other sizes: informative
LIMITS = {SDK: {10_000_000: 1.5, 1_000_000: 1.5}, HTTPX: {10_000_000: 1.5, 1_000_000: 2.0}}
RAW_STEP = "raw HTTP client → optserve step"
RAW_ECHO_APP, HTTPX_ECHO_APP = "raw HTTP client → bare FastAPI echo", "httpx → bare FastAPI echo"
HTTPX_RAW_ECHO = "httpx → raw asyncio HTTP echo"
COLUMNS = ["case", "params", "ms", "vs (a)+(b)", "client CPU ms", "server CPU ms"]


def _repeat(numel: int, quick: bool) -> int:
    return 5 if quick else max(15, min(150, 40_000_000 // numel))


def timed_rounds(
    cases: dict[str, tuple[Step, Callable[[], float] | None]], repeat: int, warmup: int = 2
) -> dict[str, dict[str, float]]:
    """Round-robin over `cases` (step, server CPU clock or None): median wall and client CPU seconds, and
    the server's mean CPU seconds per call."""
    for step, _ in cases.values():
        for _ in range(warmup):
            step()
    wall: dict[str, list[float]] = {name: [] for name in cases}
    client: dict[str, list[float]] = {name: [] for name in cases}
    server = dict.fromkeys(cases, 0.0)
    for _ in range(repeat):
        for name, (step, server_clock) in cases.items():
            s0 = server_clock() if server_clock else 0.0
            c0, t0 = time.process_time(), time.perf_counter()
            step()
            t1, c1 = time.perf_counter(), time.process_time()
            if server_clock:
                server[name] += server_clock() - s0
            wall[name].append(t1 - t0)
            client[name].append(c1 - c0)
    return {
        name: {
            "wall": statistics.median(wall[name]),
            "client": statistics.median(client[name]),
            "server": server[name] / repeat if cases[name][1] else float("nan"),
        }
        for name in cases
    }


def _clock(pid: int) -> Callable[[], float]:
    return lambda: cpu_seconds(pid)


def run(quick: bool = False, servers: Servers | None = None) -> Section:
    own = servers is None
    servers = servers or Servers()
    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    measures: list[Measure] = []
    try:
        opt, echo = servers.optserve(), servers.echo()
        opt_clock, echo_clock = _clock(pid_of(opt)), _clock(echo.pid)
        with (
            TcpEcho() as tcp,
            PortPrinter("bench.rawhttp") as raw_echo,
            httpx.Client(base_url=opt.url, timeout=300) as http,
            httpx.Client(base_url=echo.url, timeout=300) as http_echo,
            httpx.Client(base_url=raw_echo.url, timeout=300) as http_raw_echo,
            optserve.Client(opt.url) as sdk,
        ):
            raw_opt, raw_echo_app = RawClient(opt.port), RawClient(echo.port)
            tcp_clock, raw_echo_clock = _clock(tcp.server.pid), _clock(raw_echo.pid)
            for numel in QUICK_SIZES if quick else SIZES:
                sid = create_session(http, numel)
                session = sdk.get_session(sid)
                grads = grads_of(numel)
                body = safetensors.encode_bytes({"w": grads}, None)
                path = f"/v1/sessions/{sid}/step"

                def post(client: httpx.Client, path: str = path, body: bytes = body) -> None:
                    client.post(path, content=body, headers=ST_HEADERS).raise_for_status()

                def raw(client: RawClient, path: str = path, body: bytes = body) -> None:
                    client.post(path, body, ST_HEADERS)

                cases: dict[str, tuple[Step, Callable[[], float] | None]] = {
                    TCP: (tcp.step(body), tcp_clock),
                    TORCH: (torch_adam(numel), None),
                    HTTPX: (partial(post, http), opt_clock),
                    SDK: (partial(session.step, {"w": grads}), opt_clock),
                    RAW_STEP: (partial(raw, raw_opt), opt_clock),
                    RAW_ECHO_APP: (partial(raw, raw_echo_app), echo_clock),
                    HTTPX_ECHO_APP: (partial(post, http_echo), echo_clock),
                    HTTPX_RAW_ECHO: (partial(post, http_raw_echo), raw_echo_clock),
                }
                timings = timed_rounds(cases, _repeat(numel, quick))
                floor = timings[TCP]["wall"] + timings[TORCH]["wall"]
                rows += [
                    {
                        "case": name,
                        "params": numel,
                        "ms": t["wall"] * 1e3,
                        "vs (a)+(b)": t["wall"] / floor,
                        "client CPU ms": t["client"] * 1e3,
                        "server CPU ms": t["server"] * 1e3,
                    }
                    for name, t in timings.items()
                ]
                rows.append({"case": "(a)+(b)", "params": numel, "ms": floor * 1e3, "vs (a)+(b)": 1.0})
                measures += [
                    Measure(
                        "c",
                        f"step via {via}, {sci(numel)} params",
                        timings[case]["wall"] * 1e3,
                        floor * 1e3,
                        "(a)+(b)",
                        "ms",
                        LIMITS[case].get(numel),
                    )
                    for via, case in (("SDK", SDK), ("httpx", HTTPX))
                ]
                http.delete(f"/v1/sessions/{sid}").raise_for_status()
            raw_opt.close()
            raw_echo_app.close()
    finally:
        if own:
            servers.close()
    notes = [
        "Round-robin medians per size (the repeat count falls with the size: 150 at 1e5, 40 at 1e6, 15 at "
        "1e7). The (a) echo moves the step's request size each way, which is also the size of its answer "
        "(the same tensors, plus a few bytes of metadata).",
        "Client CPU is this process's CPU time per call (median); server CPU is the server process's, all "
        "threads, per call (mean over the repeats, from 10 ms ticks). (a) and (b) are floors; the "
        "`raw HTTP client` rows replace httpx with `rawhttp.RawClient` (sendall + recv_into a preallocated "
        "buffer), so `raw HTTP client → optserve step` minus `raw HTTP client → bare FastAPI echo` is the "
        "step's own server-side work, and `httpx → raw asyncio HTTP echo` is mostly httpx's client cost.",
    ]
    return Section(
        "c", "Step round trip over loopback HTTP, safetensors both ways", COLUMNS, rows, measures, notes
    )


if __name__ == "__main__":
    sys.exit(section_main(run))
