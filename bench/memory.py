"""(f) Server memory per session: 1000 Adam sessions of 10k float32 parameters on `memory://`.

A fresh `optserve serve --store memory://` process is warmed up (a few sessions created, stepped and left in
place, so imports, numba's kernels, uvicorn's buffers and the allocator's first arenas are paid for), then
its RSS (VmRSS of /proc/<pid>/status) is read; 1000 sessions are created (JSON) and each is stepped once
(safetensors, through the SDK's wire format with an Idempotency-Key, as the SDK sends it), because the Adam
moments are allocated as zero pages that only become resident when the first step writes them. RSS is read
again; per session = the difference / 1000.

A session's state is its parameters, exp_avg and exp_avg_sq: 3 x 10k x 4 bytes = 120,000 bytes (+ the step
counter). The target is 1.3 x that + 20 KB (20,480 bytes) per session.

Run: `python -m bench.memory`.
"""

from __future__ import annotations

import sys
import time
import uuid
from typing import Any

import httpx

from app.wire import safetensors
from bench.common import BENCH_ENV, ST, Measure, Section, create_session, grads_of, rss_bytes, section_main
from tests.system.server import Server

SESSIONS = 1000
NUMEL = 10_000
WARMUP_SESSIONS = 20
STATE_BYTES = 3 * NUMEL * 4 + 8  # params, exp_avg, exp_avg_sq (float32) and the step count
LIMIT_FACTOR, LIMIT_EXTRA = 1.3, 20 * 1024
COLUMNS = ["sessions", "params each", "RSS before MB", "RSS after MB", "per session bytes", "state bytes"]


def _populate(http: httpx.Client, count: int, body: bytes) -> list[str]:
    sids = []
    for _ in range(count):
        sid = create_session(http, NUMEL)
        headers = {"Content-Type": ST, "Accept": ST, "Idempotency-Key": str(uuid.uuid4())}
        http.post(f"/v1/sessions/{sid}/step", content=body, headers=headers).raise_for_status()
        sids.append(sid)
    return sids


def run(quick: bool = False, servers: object = None) -> Section:
    """Always on a server of its own: RSS must not carry the other sections' garbage."""
    sessions = 100 if quick else SESSIONS
    body = safetensors.encode_bytes({"w": grads_of(NUMEL)}, {"loss": "0.5"})
    with Server("memory://", env=BENCH_ENV) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        assert server.proc is not None
        pid = server.proc.pid
        _populate(http, WARMUP_SESSIONS, body)
        time.sleep(0.2)
        before = rss_bytes(pid)
        start = time.perf_counter()
        _populate(http, sessions, body)
        seconds = time.perf_counter() - start
        time.sleep(0.2)
        after = rss_bytes(pid)
    per_session = (after - before) / sessions
    limit_bytes = LIMIT_FACTOR * STATE_BYTES + LIMIT_EXTRA
    rows: list[dict[str, Any]] = [
        {
            "sessions": sessions,
            "params each": NUMEL,
            "RSS before MB": before / 2**20,
            "RSS after MB": after / 2**20,
            "per session bytes": round(per_session),
            "state bytes": STATE_BYTES,
        }
    ]
    measures = [
        Measure(
            "f",
            f"server memory per session ({sessions} x 10k Adam)",
            per_session / 1024,
            STATE_BYTES / 1024,
            "state",
            "KiB",
            limit_bytes / STATE_BYTES,
        )
    ]
    notes = [
        f"Target: ≤ 1.3 x state + 20 KiB = {limit_bytes:,.0f} bytes per session, i.e. ≤ "
        f"{limit_bytes / STATE_BYTES:.3f}x the state's {STATE_BYTES:,} bytes. Creating and stepping the "
        f"{sessions} sessions took {seconds:.1f} s; RSS is read 0.2 s after the last answer.",
    ]
    return Section("f", "Server memory per session", COLUMNS, rows, measures, notes)


if __name__ == "__main__":
    sys.exit(section_main(run))
