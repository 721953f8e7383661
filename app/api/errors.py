"""Every error as RFC 9457 problem+json; the only place that knows domain errors' HTTP statuses."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.routing import Match

from app.api.offload import WorkerLost, WorkersBusy
from app.optim.engine import StepError
from app.optim.hparams import SpecError
from app.sessions import (
    IdempotencyConflict,
    NotFound,
    RoundConflict,
    RoundsFull,
    StepConflict,
    UnreadableSession,
)
from app.store.base import QuotaExceeded, StoreError
from app.wire.errors import WireError
from app.wire.jsontensor import dumps

PROBLEM = "application/problem+json"
log = logging.getLogger("optserve")


class ApiError(Exception):
    """An HTTP-level refusal raised by the API layer itself (auth, body size)."""

    def __init__(self, status: int, title: str, detail: str, headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.title = title
        self.detail = detail
        self.headers = headers or {}
        super().__init__(detail)


def problem(
    status: int, title: str, detail: str, headers: dict[str, str] | None = None, **extra: Any
) -> Response:
    slug = title.lower().replace(" ", "-")
    body = {
        "type": f"urn:optserve:problem:{slug}",
        "title": title,
        "status": status,
        "detail": detail,
        **extra,
    }
    return Response(dumps(body), status_code=status, media_type=PROBLEM, headers=headers)


def _field_errors(errors: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"field": f, "message": m} for f, m in errors]


def to_problem(exc: Exception) -> Response:
    """Maps one exception to its answer; unknown exceptions are a logged 500 that leaks nothing."""
    if isinstance(exc, SpecError):
        errors = _field_errors([(e.field, e.message) for e in exc.errors])
        return problem(422, "Invalid specification", str(exc), errors=errors)
    if isinstance(exc, StepError):
        return problem(422, "Invalid request", str(exc), errors=_field_errors([(exc.field, exc.message)]))
    if isinstance(exc, WireError):
        extra: dict[str, Any] = {}
        if exc.field:
            extra["errors"] = _field_errors([(exc.field, exc.detail)])
        titles = {400: "Malformed body", 406: "Not acceptable", 415: "Unsupported media type"}
        detail = exc.detail if not exc.field or exc.field in exc.detail else f"{exc.field}: {exc.detail}"
        return problem(exc.status, titles.get(exc.status, "Invalid body"), detail, **extra)
    if isinstance(exc, NotFound):
        return problem(404, "Session not found", str(exc))
    if isinstance(exc, RoundsFull):
        return problem(503, "Busy", str(exc), headers={"Retry-After": "1"})
    if isinstance(exc, RoundConflict):
        return problem(409, "Round conflict", str(exc), current_step=exc.current)
    if isinstance(exc, StepConflict):
        return problem(409, "Step conflict", str(exc), current_step=exc.current)
    if isinstance(exc, IdempotencyConflict):
        return problem(422, "Idempotency key reused", str(exc))
    if isinstance(exc, UnreadableSession):
        return problem(422, "Unreadable session", str(exc), session_id=exc.session_id)
    if isinstance(exc, QuotaExceeded):
        return problem(429, "Quota exceeded", str(exc))
    if isinstance(exc, StoreError):
        return problem(503, "Store unavailable", str(exc), headers={"Retry-After": "1"})
    if isinstance(exc, WorkerLost):
        return problem(503, "Worker lost", str(exc), headers={"Retry-After": "1"})
    if isinstance(exc, WorkersBusy):
        return problem(503, "Busy", str(exc), headers={"Retry-After": "1"})
    if isinstance(exc, ApiError):
        return problem(exc.status, exc.title, exc.detail, headers=exc.headers)
    log.exception("unhandled error", exc_info=exc)
    return problem(500, "Internal error", "the server failed to handle this request; nothing was applied")


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def allowed_methods(request: Request) -> str:
    """Every method some route answers on this request's path, and OPTIONS (each method is tried against
    the routes, so that routers nested in routers count too)."""
    routes = request.app.router.routes
    allowed = [
        method
        for method in _METHODS
        if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes)
    ]
    return ", ".join([*allowed, "OPTIONS"])


def install(app: FastAPI) -> None:
    async def domain(_: Request, exc: Exception) -> Response:
        return to_problem(exc)

    async def http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names the methods of the first route on the path; the answer names all of them
            headers["Allow"] = allowed_methods(request)
            if request.method == "OPTIONS":
                return Response(status_code=204, headers=headers)
        title = {404: "Not found", 405: "Method not allowed"}.get(exc.status_code, "HTTP error")
        return problem(exc.status_code, title, str(exc.detail), headers=headers)

    async def validation(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = [
            {"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]}
            for e in exc.errors()  # pydantic's list, one entry per bad field
        ]
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        return problem(422, "Invalid request", detail, errors=errors)

    for cls in (
        SpecError,
        StepError,
        WireError,
        NotFound,
        StepConflict,
        RoundConflict,
        RoundsFull,
        IdempotencyConflict,
        UnreadableSession,
        QuotaExceeded,
        StoreError,
        WorkerLost,
        WorkersBusy,
        ApiError,
    ):
        app.add_exception_handler(cls, domain)
    app.add_exception_handler(HTTPException, http)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(Exception, domain)
