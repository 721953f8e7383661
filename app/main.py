"""`create_app()` builds the ASGI app from settings; `app` is the default instance for any ASGI server."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from app import __version__
from app.api import errors
from app.api.deps import BodyDeadlines, InflightBytes
from app.api.offload import Offload
from app.api.openapi import COMPONENTS, STEP_OPERATION, secure
from app.api.routes import catalogue, docs, health, sessions, step, ui
from app.memory import keep_freed_memory_for_reuse, trim_freed_memory
from app.metrics import Metrics, MetricsMiddleware
from app.optim import fused
from app.optim.engine import StepOutcome
from app.sessions import SessionService
from app.settings import Settings
from app.store.base import Quota, Store

log = logging.getLogger("optserve")
EXPIRY_INTERVAL = 60.0
# What a page on another origin may read of an answer, besides the CORS-safelisted headers.
EXPOSED_HEADERS = [
    "Location",
    "Retry-After",
    "WWW-Authenticate",
    "Idempotent-Replayed",
    "Optserve-Step",
    "Optserve-Lr",
    "Optserve-Skipped",
    "Optserve-Grad-Norm",
    "Optserve-Staleness",
    "Optserve-Workers",
]


def open_store(settings: Settings) -> Store:
    """The store `settings.store` names: memory://, sqlite:///path, redis://host:port/db,
    redis+cluster://host:port."""
    url = settings.store
    scheme = url.split(":", 1)[0]
    if scheme == "memory":
        from app.store.memory import MemoryStore

        return MemoryStore(settings.history_limit)
    if scheme == "sqlite":
        from app.store.sqlite import SqliteStore

        return SqliteStore.from_url(url, settings.history_limit)
    if scheme in ("redis", "rediss", "redis+cluster", "rediss+cluster"):
        from app.store.redis import RedisStore

        # idle sessions expire through Redis TTLs on their keys, (re)set by every write
        return RedisStore.from_url(url, settings.history_limit, ttl=settings.session_ttl)
    raise ValueError(
        f"unsupported store URL {url!r}; use memory://, sqlite:///path, redis://host:port/db or "
        "redis+cluster://host:port"
    )


async def _return_memory_when_idle(metrics: Metrics, idle_seconds: float) -> None:
    """While large requests keep coming, freed buffers stay for the next large step to reuse; once none
    has come for `idle_seconds` (small ones may), they go back to the system, so a spike does not stay
    resident."""
    trimmed_at = time.monotonic()
    while True:
        await asyncio.sleep(min(1.0, idle_seconds))
        now = time.monotonic()
        if (
            metrics.large_in_flight == 0
            and metrics.last_large_done > trimmed_at
            and now - metrics.last_large_done >= idle_seconds
        ):
            trimmed_at = now
            gc.collect()  # buffers held only by reference cycles (an exception's frames) are freed now
            await anyio.to_thread.run_sync(trim_freed_memory)  # ctypes lets go of the GIL meanwhile


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    keep_freed_memory_for_reuse()
    store = open_store(settings)
    service = SessionService(
        store,
        ttl=settings.session_ttl,
        cache_bytes=settings.cache_bytes,
        max_session_bytes=settings.max_session_bytes,
        quota=Quota(settings.max_sessions_per_key, settings.max_bytes_per_key),
        max_round_bytes=settings.max_round_bytes,
    )
    metrics = Metrics()
    offload = Offload(settings.parse_workers)
    counted = metrics.stats.steps

    def count(outcome: StepOutcome) -> None:
        counted[outcome.skipped] += 1

    service.on_step = count
    keys = [k.encode() for k in settings.key_list()]

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if not keys:
            log.warning(
                "optserve runs OPEN: no OPTSERVE_API_KEYS / OPTSERVE_API_KEYS_FILE, every caller is trusted"
            )
        # compile (or load from numba's cache) the fused kernels now, so no step pays for it
        await anyio.to_thread.run_sync(fused.warm_up)
        sweeper = asyncio.create_task(_expire_forever(service)) if settings.session_ttl else None
        trimmer = asyncio.create_task(_return_memory_when_idle(metrics, settings.idle_trim_seconds))
        try:
            yield
        finally:
            trimmer.cancel()
            offload.close()
            if sweeper is not None:
                sweeper.cancel()
            await store.close()

    app = OptserveApp(
        title="optserve",
        version=__version__,
        summary="Optimizer-as-a-service: torch.optim's exact steps over HTTP",
        lifespan=lifespan,
        docs_url=None,  # served from the package's own assets (app/api/routes/docs.py), not a CDN
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.service = service
    app.state.metrics = metrics
    app.state.api_keys = keys
    app.state.inflight = InflightBytes(settings.max_inflight_bytes)
    app.state.deadlines = BodyDeadlines()
    app.state.offload = offload
    errors.install(app)
    app.router.routes.append(step.route)
    for router in (sessions.router, catalogue.router, health.router, docs.router):
        app.include_router(router)
    app.mount(docs.ASSETS_PATH, docs.assets, name="docs-assets")
    if settings.ui:
        app.router.routes.append(ui.redirect)
        app.mount(ui.PATH, ui.assets, name="ui")
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    origins = settings.cors_origin_list()
    if origins:  # outermost, so that preflights and every answer (the step's too) get their CORS headers
        app.add_middleware(CORSMiddleware, **cors_options(origins))
    # the step is answered before FastAPI's own middleware and routing (OptserveApp), counted in the same
    # metrics (by StepFastPath itself), with the same CORS headers
    step_stack: ASGIApp = step.StepFastPath(step.StepContext(app.state), metrics)
    if origins:
        step_stack = CORSMiddleware(step_stack, **cors_options(origins))
    app.step_stack = step_stack
    app.openapi = lambda: _openapi(app, bool(keys))  # type: ignore[method-assign]
    return app


def cors_options(origins: list[str]) -> dict[str, Any]:
    return {
        "allow_origins": origins,
        "allow_methods": ["GET", "POST", "PUT", "DELETE"],
        # by name: a wildcard does not cover Authorization (Fetch standard)
        "allow_headers": ["Authorization", "Content-Type", "Accept", "Idempotency-Key"],
        "expose_headers": EXPOSED_HEADERS,
        "max_age": 600,
    }


class OptserveApp(FastAPI):
    """FastAPI, except that `POST /v1/sessions/{id}/step`, the hot path, goes straight to `step_stack`:
    FastAPI's own middleware (telemetry, body limit, server errors), Starlette's routing and exception
    middleware cost more than the whole step of a small session. The step maps its own errors to
    problem+json (StepFastPath), so none of them reaches those layers."""

    step_stack: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.step_stack is not None:
            session_id = step.session_of(scope)
            if session_id is not None:
                scope["app"] = self
                scope["path_params"] = {"session_id": session_id}
                scope["route"] = step.route  # the metrics label requests by their route
                await self.step_stack(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


async def _expire_forever(service: SessionService) -> None:
    while True:
        await asyncio.sleep(EXPIRY_INTERVAL)
        try:
            removed = await service.expire()
            if removed:
                log.info("expired %d idle sessions", removed)
        except Exception:
            log.exception("session expiry failed")


def _openapi(app: FastAPI, keys_required: bool) -> dict[str, Any]:
    """FastAPI's document plus the hand-written schemas of the bodies the handlers parse themselves."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        schema.setdefault("components", {}).setdefault("schemas", {}).update(COMPONENTS)
        schema["paths"].setdefault(step.PATH, {})["post"] = STEP_OPERATION
        secure(schema, keys_required)
        app.openapi_schema = schema
    return app.openapi_schema


_default: FastAPI | None = None


def __getattr__(name: str) -> Any:
    # `app.main:app` builds the default app on first use, so importing this module opens no store
    global _default
    if name == "app":
        if _default is None:
            _default = create_app()
        return _default
    raise AttributeError(name)
