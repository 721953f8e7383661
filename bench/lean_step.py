"""What a step costs with nothing but its arithmetic: the measure behind the README's account of the
32-client load test (section d), where optserve runs at ~0.45x a bare FastAPI echo and the target is 0.8x.

`lean_app` is an ASGI app that answers `POST /v1/sessions/{id}/step` as optserve does for an Adam session
of one float32 tensor, doing only the step's arithmetic: it parses the safetensors body, takes the norm
(`clip.total_norm`), runs the fused Adam kernel into fresh arrays, renders the answer with the same
metadata and headers, and keeps the arrays in a dict. No tenant, body bounds, lock, idempotency, history,
store, metrics or problem+json: what is left of optserve's request path is everything this leaves out.

Run: `python -m bench.lean_step` serves it and drives it and the echo app with section d's generator, in
A B B A order, and prints requests/s.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from typing import Any

import httpx
import numpy as np
import orjson
from starlette.types import Receive, Scope, Send

from app.optim import fused
from app.optim.adam import _adam_scalars
from app.optim.clip import total_norm
from app.wire import safetensors

_PATH = re.compile(r"/v1/sessions/([^/]+)/step")
_ADAM = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0}
_sessions: dict[str, tuple[int, Any, Any, Any]] = {}


async def lean_app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["path"] == "/readyz":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})
        return
    match = _PATH.fullmatch(scope["path"])
    assert match is not None
    message = await receive()
    body = message["body"]
    while message.get("more_body"):
        message = await receive()
        body += message["body"]
    n = int.from_bytes(body[:8], "little")
    header = orjson.loads(body[8 : 8 + n])
    header.pop("__metadata__", None)
    ((name, entry),) = header.items()
    begin, end = entry["data_offsets"]
    grad = np.frombuffer(body, np.float32, count=(end - begin) // 4, offset=8 + n + begin)
    state = _sessions.get(match[1])
    if state is None:
        zeros = np.zeros(grad.size, np.float32)
        state = (0, zeros, zeros.copy(), zeros.copy())
    step, param, exp_avg, exp_avg_sq = state
    norm = total_norm([grad])
    step += 1
    step_size, bias_correction2_sqrt = _adam_scalars(1e-3, 0.9, 0.999, float(step))
    out = (np.empty_like(param), np.empty_like(param), np.empty_like(param), None)
    fused.adam_(
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        None,
        decoupled=False,
        maximize=False,
        step_size=step_size,
        bias_correction2_sqrt=bias_correction2_sqrt,
        out=out,
        **_ADAM,
    )
    _sessions[match[1]] = (step, out[0], out[1], out[2])
    metadata = {"step": str(step), "lr": "0.001", "skipped": "false", "grad_norm": repr(norm)}
    metadata["staleness"] = "0"
    answer = safetensors.encode_bytes({name: out[0]}, metadata)
    headers = [(b"content-type", b"application/vnd.safetensors"), (b"content-length", b"%d" % len(answer))]
    headers += [(b"optserve-" + k.encode(), v.encode()) for k, v in metadata.items()]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": answer})


def serve(port: int) -> None:
    import uvicorn

    from bench.echo_app import same_tuning

    same_tuning()
    uvicorn.run(lean_app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", log_level="warning")


def main() -> int:
    from bench.common import Servers
    from bench.load import CONNECTIONS, LoadConfig, generate
    from tests.system.server import free_port

    if sys.argv[1:2] == ["--serve"]:
        serve(int(sys.argv[2]))
        return 0
    port = free_port()
    lean = subprocess.Popen([sys.executable, "-m", "bench.lean_step", "--serve", str(port)])
    try:
        for _ in range(300):
            try:
                httpx.get(f"http://127.0.0.1:{port}/readyz")
                break
            except httpx.TransportError:
                time.sleep(0.1)
        sessions = [f"s{i}" for i in range(CONNECTIONS)]
        with Servers() as servers:
            echo = servers.echo()
            targets = {"lean step": (port, lean.pid), "bare FastAPI echo": (echo.port, echo.pid)}
            for target in ("lean step", "bare FastAPI echo", "bare FastAPI echo", "lean step"):
                at, pid = targets[target]
                result = generate(LoadConfig(at, pid, sessions, duration=4, warmup=1))
                print(f"{target:>18}: {result['rps']:,.0f} req/s, server CPU {result['server CPU']:.0%}")
    finally:
        lean.kill()
        lean.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
