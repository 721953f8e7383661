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
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from app.api import bodies
from app.api.deps import get_offload, get_service, get_tenant, read_body
from app.api.errors import to_problem
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


async def step(request: Request) -> Response:
    """Apply one optimizer step; answer the new step, lr, and (unless return_params=false) parameters."""
    tenant = await get_tenant(request)
    # most steps have no query: its parsing is skipped then
    return_params = (
        _return_params(request.query_params.get("return_params")) if request.scope["query_string"] else True
    )
    key = request.headers.get("idempotency-key")
    if key is not None and len(key) > MAX_KEY_LENGTH:
        raise WireError(f"at most {MAX_KEY_LENGTH} characters, got {len(key)}", field="Idempotency-Key")
    fmt = request_format(request.headers.get("content-type"))
    answer = response_format(request.headers.get("accept"), fmt)
    body = await read_body(request)
    offload = await get_offload(request)
    parsed = await bodies.read_step(offload, body, fmt)
    service = await get_service(request)
    render = bodies.render_step(answer, return_params, offload)
    session_id = request.path_params["session_id"]
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


# The route is matched only for the methods StepFastPath passes on, which it answers with 405.
route = Route(PATH, step, methods=["POST"], include_in_schema=False)
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
            response = await step(Request(scope, receive))
        except Exception as exc:  # every error becomes its problem+json, as the app's handlers do
            response = to_problem(exc)
        await response(scope, receive, send)
