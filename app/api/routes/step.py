"""`POST /v1/sessions/{id}/step`, the hot path, answered before FastAPI.

FastAPI's own middleware (telemetry, body limit, server errors), its dependency solving, Starlette's
route matching and exception middleware cost more than the whole step of a small session (about 250 us
against 45 us of numerics for 10k parameters), so `app.main.OptserveApp` hands this one operation to
`StepFastPath` (inside the metrics, and CORS when configured) before any of them: it calls directly the
pieces the other handlers reach through dependencies and maps errors with the same `to_problem`. Its
OpenAPI operation is `openapi.STEP_OPERATION`.
"""

from __future__ import annotations

import re

import xxhash
from starlette.datastructures import QueryParams
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from app.api import bodies
from app.api.deps import receive_body, tenant_for
from app.api.errors import to_problem
from app.api.offload import Offload
from app.sessions import SessionService
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


async def step(scope: Scope, receive: Receive) -> Response:
    """Apply one optimizer step; answer the new step, lr, and (unless return_params=false) parameters."""
    state = scope["app"].state
    head = _head(scope)
    tenant = tenant_for(state.api_keys, head.get(b"authorization"))
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
        receive, state.settings, state.inflight, state.deadlines, content_type, head.get(b"content-length")
    )
    offload: Offload = state.offload
    parsed = await bodies.read_step(offload, body, fmt)
    service: SessionService = state.service
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
    """The route's endpoint, for FastAPI's routing (which `StepFastPath` keeps POSTs from)."""
    return await step(request.scope, request.receive)


# The route is matched only for the methods StepFastPath passes on, which it answers with 405.
route = Route(PATH, _starlette_step, methods=["POST"], include_in_schema=False)
_PATH = re.compile(r"/v1/sessions/([^/]+)/step")


class StepFastPath:
    """Answers `POST /v1/sessions/{id}/step` (`matches`); `OptserveApp` sends it nothing else."""

    @staticmethod
    def matches(scope: Scope) -> bool:
        if scope["type"] != "http" or scope["method"] != "POST":
            return False
        return _PATH.fullmatch(scope["path"]) is not None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = _PATH.fullmatch(scope["path"])
        assert match is not None
        scope["route"] = route  # the metrics label requests by their route
        scope["path_params"] = {"session_id": match[1]}
        try:
            response = await step(scope, receive)
        except ClientDisconnect:
            return  # the client left before its body arrived: nothing was applied, and nobody to answer
        except Exception as exc:  # every error becomes its problem+json, as the app's handlers do
            response = to_problem(exc)
        await response(scope, receive, send)
