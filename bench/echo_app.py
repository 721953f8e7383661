"""The baseline server of the load and round-trip benches: a bare FastAPI app whose one POST endpoint, at the
step's path, reads the body and answers it back with the same media type. It is served as `optserve serve`
serves optserve (app/cli.py): uvicorn, httptools, uvloop, one worker, 127.0.0.1, log level info, no access
log, and with the process tuning `optserve serve` applies beyond uvicorn's arguments, when it has them
(`same_tuning`: uvicorn's body read-ahead `BODY_HIGH_WATER`, glibc's `keep_freed_memory_for_reuse`), so
that whatever optserve costs above this is the step itself: parsing, the update, rendering, the store.

Run: `python -m bench.echo_app --port 8001`.
"""

from __future__ import annotations

import argparse
import sys

from fastapi import FastAPI, Request
from starlette.responses import Response


def create_echo_app() -> FastAPI:
    app = FastAPI(title="echo")

    @app.post("/v1/sessions/{session_id}/step")
    async def echo(session_id: str, request: Request) -> Response:
        body = await request.body()
        return Response(body, media_type=request.headers.get("content-type"))

    @app.get("/readyz")
    async def ready() -> dict[str, str]:
        return {"status": "ready"}

    return app


def same_tuning(apply: bool = True) -> list[str]:
    """Applies to this process what `optserve serve` applies to its own besides uvicorn's arguments, looked
    up by name so that the echo follows the server as it changes; returns what was (or would be) applied."""
    from app import cli
    from app import memory as app_memory

    applied = []
    high_water = getattr(cli, "BODY_HIGH_WATER", None)
    if isinstance(high_water, int):
        from uvicorn.protocols.http import h11_impl, httptools_impl

        for protocol in (httptools_impl, h11_impl):
            if apply:
                protocol.HIGH_WATER_LIMIT = high_water  # type: ignore[attr-defined]
        applied.append(f"uvicorn HIGH_WATER_LIMIT={high_water}")
    keep_freed = getattr(app_memory, "keep_freed_memory_for_reuse", None)
    if callable(keep_freed):
        if apply:
            keep_freed()
        applied.append("keep_freed_memory_for_reuse()")
    return applied


def main() -> int:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    print("tuning:", ", ".join(same_tuning()) or "none", flush=True)
    uvicorn.run(
        create_echo_app(),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_level="info",
        access_log=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
