"""What a step costs with nothing but its arithmetic: the measure behind the README's account of the
32-client load test (section d), where optserve runs at ~0.45x a bare FastAPI echo and the target is 0.8x.

`lean_app` is an ASGI app that answers `POST /v1/sessions/{id}/step` as optserve does for an Adam session
of one float32 tensor, doing only the step's arithmetic: it parses the safetensors body, takes the norm
(`clip.total_norm`), runs the fused Adam kernel into fresh arrays, renders the answer with the same
metadata and headers, and keeps the arrays in a dict. No tenant, body bounds, lock, idempotency, history,
store, metrics or problem+json: what is left of optserve's request path is everything this leaves out.

Run: `python -m bench.lean_step` serves it and drives it and the echo app with section d's generator, in
A B B A order, and prints requests/s. `in_process()` (section d's info lines, or `python -m bench.lean_step
--in-process`) drives optserve's app, the echo app and this one through ASGI in this process, no sockets:
what each costs per request apart from the server and the network.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
import time
from typing import Any

import httpx
import numpy as np
import orjson
from starlette.types import Message, Receive, Scope, Send

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


async def _per_request(app: Any, scopes: list[Scope], body: bytes, n: int, rounds: int) -> float:
    """The least mean seconds per request over `rounds` rounds of `n` requests through `app` in turn to each
    of `scopes` (after a warm-up), each answered 200."""
    answer: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Message) -> None:
        answer.append(message)

    async def one(scope: Scope) -> None:
        answer.clear()
        await app(dict(scope), receive, send)
        if answer[0]["status"] != 200:
            raise RuntimeError(
                f"{scope['path']}: {answer[0]['status']} {answer[-1].get('body', b'')[:200]!r}"
            )

    for i in range(min(n, 300)):
        await one(scopes[i % len(scopes)])
    best = math.inf
    for _ in range(rounds):
        start = time.perf_counter()
        for i in range(n):
            await one(scopes[i % len(scopes)])
        best = min(best, (time.perf_counter() - start) / n)
    return best


def in_process(numel: int = 10_000, sessions: int = 32, n: int = 1500, rounds: int = 7) -> dict[str, float]:
    """Seconds per request, in this process through ASGI (no sockets, no server), of optserve's step on
    `memory://` (`sessions` sessions of `numel` float32 Adam parameters, stepped in turn, safetensors both
    ways, as section d sends them), of the bare FastAPI echo with the same bodies, and of `lean_app`."""
    import asyncio

    from app.main import create_app
    from app.settings import Settings
    from bench.common import create_body, grads_of
    from bench.echo_app import create_echo_app
    from tests.asgi import post_scope

    body = safetensors.encode_bytes({"w": grads_of(numel)}, {"loss": "0.5"})
    st = b"application/vnd.safetensors"

    def scope(path: str) -> Scope:
        headers = [(b"host", b"bench"), (b"content-type", st), (b"accept", st)]
        return post_scope(path, [*headers, (b"content-length", b"%d" % len(body))])

    async def run() -> dict[str, float]:
        optserve = create_app(Settings(store="memory://", max_sessions_per_key=1_000_000))
        async with optserve.router.lifespan_context(optserve):
            created = []
            for _ in range(sessions):
                answer: list[Message] = []
                create = {**scope("/v1/sessions"), "headers": [(b"content-type", b"application/json")]}

                async def receive() -> Message:
                    return {"type": "http.request", "body": create_body(numel), "more_body": False}

                async def send(message: Message, answer: list[Message] = answer) -> None:
                    answer.append(message)

                await optserve(create, receive, send)
                created.append(orjson.loads(answer[-1]["body"])["id"])
            paths = [f"/v1/sessions/{sid}/step" for sid in created]
            scopes = [scope(path) for path in paths]
            return {
                "optserve step": await _per_request(optserve, scopes, body, n, rounds),
                "bare FastAPI echo": await _per_request(create_echo_app(), scopes, body, n, rounds),
                "lean step (arithmetic only)": await _per_request(lean_app, scopes, body, n, rounds),
            }

    return asyncio.run(run())


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
    if sys.argv[1:2] == ["--in-process"]:
        for name, seconds in in_process().items():
            print(f"{name:>28}: {seconds * 1e6:.1f} us per request in process")
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
