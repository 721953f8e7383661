"""`POST /v1/sessions/{id}/step`, the hot path, answered before FastAPI.

FastAPI's own middleware (telemetry, body limit, server errors), its dependency solving, Starlette's
route matching and exception middleware cost more than the whole step of a small session (about 250 us
against 45 us of numerics for 10k parameters), so `app.main.OptserveApp` hands this one operation to
`StepFastPath` (inside CORS when configured) before any of them: it counts itself in the metrics, calls
directly the pieces the other handlers reach through dependencies and maps errors with the same
`to_problem`. Its
OpenAPI operation is `openapi.STEP_OPERATION`.
"""

from __future__ import annotations

import re
import time

import xxhash
from starlette.datastructures import QueryParams, State
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from app.api import bodies
from app.api.deps import BodyDeadlines, InflightBytes, receive_body, tenant_for
from app.api.errors import to_problem
from app.api.offload import Offload
from app.metrics import Metrics, content_length
from app.sessions import SessionService
from app.settings import Settings
from app.wire.errors import WireError
from app.wire.negotiate import request_format, response_format

PATH = "/v1/sessions/{session_id}/step"
MAX_KEY_LENGTH = 255
_FLAGS = {"true": True, "1": True, "yes": True, "on": True} | {
    "false": False,
    "0": False,
    "no": False,
    "off": False,
}


def _return_params(raw: str | None) -> bool:
    if raw is None:
        return True
    try:
        return _FLAGS[raw.lower()]
    except KeyError:
        raise WireError(f"expected true or false, got {raw!r}", field="return_params") from None


# the request headers the step reads; the first of each counts (as Starlette's `Headers.get`)
_READ = frozenset({b"authorization", b"content-type", b"content-length", b"accept", b"idempotency-key"})


def _head(scope: Scope) -> dict[bytes, str]:
    """The headers `_READ` names, from the raw list in one pass (latin-1, as HTTP/1.1 carries them)."""
    head: dict[bytes, str] = {}
    for name, value in scope["headers"]:
        if name in _READ and name not in head:
            head[name] = value.decode("latin-1")
    return head


class StepContext:
    """The app's pieces a step uses, taken from its state once: Starlette's `State` looks each attribute up
    through `__getattr__`, which six times per request cost a small step about 4 us."""

    __slots__ = ("api_keys", "deadlines", "inflight", "offload", "service", "settings")

    def __init__(self, state: State) -> None:
        self.api_keys: list[bytes] = state.api_keys
        self.settings: Settings = state.settings
        self.inflight: InflightBytes = state.inflight
        self.deadlines: BodyDeadlines = state.deadlines
        self.offload: Offload = state.offload
        self.service: SessionService = state.service


async def step(context: StepContext, scope: Scope, head: dict[bytes, str], receive: Receive) -> Response:
    """Apply one optimizer step; answer the new step, lr, and (unless return_params=false) parameters.
    `head`: the request's headers (`_head`)."""
    tenant = tenant_for(context.api_keys, head.get(b"authorization"))
    query = scope["query_string"]
    # most steps have no query: its parsing is skipped then
    return_params = _return_params(QueryParams(query).get("return_params")) if query else True
    key = head.get(b"idempotency-key")
    if key is not None and len(key) > MAX_KEY_LENGTH:
        raise WireError(f"at most {MAX_KEY_LENGTH} characters, got {len(key)}", field="Idempotency-Key")
    content_type = head.get(b"content-type")
    fmt = request_format(content_type)
    answer = response_format(head.get(b"accept"), fmt)
    body = await receive_body(
        receive,
        context.settings,
        context.inflight,
        context.deadlines,
        content_type,
        head.get(b"content-length"),
    )
    offload = context.offload
    parsed = await bodies.read_step(offload, body, fmt)
    service = context.service
    render = bodies.render_step(answer, return_params, offload)
    session_id = scope["path_params"]["session_id"]
    response: Response
    if parsed.worker is not None:
        # a worker's request in a round: its Idempotency-Key (if any) and body; a resend carries both
        hasher = xxhash.xxh3_128((key or "").encode())
        hasher.update(b"\n")
        hasher.update(body)
        fingerprint = hasher.hexdigest()
        response = await service.contribute(
            tenant,
            session_id,
            parsed.worker,
            parsed.grads,
            render,
            round_step=parsed.step,
            loss=parsed.loss,
            weight=parsed.weight,
            fingerprint=fingerprint,
        )
        return response
    fingerprint = xxhash.xxh3_128_hexdigest(body) if key is not None else ""
    response = await service.step(
        tenant,
        session_id,
        parsed.grads,
        render,
        loss=parsed.loss,
        expected_step=parsed.step,
        idempotency_key=key,
        fingerprint=fingerprint,
    )
    return response


async def _starlette_step(request: Request) -> Response:
    """The route's endpoint, for FastAPI's routing (which `OptserveApp` keeps POSTs from)."""
    scope = request.scope
    return await step(StepContext(request.app.state), scope, _head(scope), request.receive)


# The route is matched only for the methods OptserveApp passes on, which it answers with 405.
route = Route(PATH, _starlette_step, methods=["POST"], include_in_schema=False)
_PATH = re.compile(r"/v1/sessions/([^/]+)/step")


def session_of(scope: Scope) -> str | None:
    """The session a request steps, when it is `POST /v1/sessions/{id}/step`; else None."""
    if scope["type"] != "http" or scope["method"] != "POST":
        return None
    match = _PATH.fullmatch(scope["path"])
    return None if match is None else match[1]


class StepFastPath:
    """Answers `POST /v1/sessions/{id}/step`: `OptserveApp` sends it nothing else, with the session's id
    in the scope's `path_params` and the step's `route` set. It counts its requests in the metrics itself,
    as `MetricsMiddleware` counts the others: the middleware's wrapping of every message cost a small step
    about 10 us. What it counts as sent is its answer's body, whole (uvicorn takes the answer to a client
    that has gone, too)."""

    def __init__(self, context: StepContext, metrics: Metrics) -> None:
        self.context = context
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        head = _head(scope)
        large = self.metrics.started(content_length(head.get(b"content-length")) or 0)
        status, received, sent = 500, 0, 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            return message

        try:
            try:
                response = await step(self.context, scope, head, counting_receive)
            except ClientDisconnect:
                return  # the client left before its body arrived: nothing was applied, and nobody to answer
            except Exception as exc:  # every error becomes its problem+json, as the app's handlers do
                response = to_problem(exc)
            status, sent = response.status_code, bodies.body_length(response)
            await response(scope, receive, send)
        finally:
            self.metrics.ended("POST", PATH, large, start, status, received, sent)
