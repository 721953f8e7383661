"""Liveness, readiness (the store answers) and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import PlainTextResponse, Response

from app.api.bodies import json_response
from app.api.errors import problem
from app.api.openapi import HEALTH_RESPONSE, METRICS_RESPONSE, READY_RESPONSE
from app.store.base import StoreError

router = APIRouter(tags=["health"])


@router.get("/healthz", responses=HEALTH_RESPONSE, operation_id="healthz")
async def healthz() -> Response:
    """The process is up."""
    return json_response({"status": "ok"})


@router.get("/readyz", responses=READY_RESPONSE, operation_id="readyz")
async def readyz(request: Request) -> Response:
    """The store is reachable."""
    try:
        await request.app.state.service.store.ping()
    except (StoreError, OSError, RuntimeError) as exc:
        return problem(503, "Not ready", f"store unreachable: {exc}")
    return json_response({"status": "ready", "store": request.app.state.settings.store.split(":", 1)[0]})


@router.get("/metrics", response_class=PlainTextResponse, responses=METRICS_RESPONSE, operation_id="metrics")
async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    m = request.app.state.metrics
    m.sessions.set(request.app.state.service.cached_sessions)
    return Response(m.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
