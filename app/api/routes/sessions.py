"""`/v1/sessions`: create or restore, read, step, parameters, checkpoint, history, delete."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from app.api import bodies
from app.api.deps import Body, JsonAnswer, Offloader, Service, Tenant
from app.api.openapi import (
    CHECKPOINT_RESPONSE,
    CREATE_BODY,
    CREATE_RESPONSE,
    DELETE_RESPONSE,
    HISTORY_RESPONSE,
    LIST_RESPONSE,
    PARAMS_BODY,
    PARAMS_RESPONSE,
    PUT_PARAMS_RESPONSE,
    SCHEDULE_RESPONSE,
    SESSION_RESPONSE,
)
from app.optim.limits import MAX_SESSION_TENSORS
from app.wire import envelopes
from app.wire.common import PARAM_DTYPES
from app.wire.negotiate import SAFETENSORS, NotAcceptable, request_format, response_format

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])
MAX_SCHEDULE_STEPS = 10_000


def _formats(request: Request) -> tuple[bodies.Format, bodies.Format]:
    fmt = request_format(request.headers.get("content-type"))
    return fmt, response_format(request.headers.get("accept"), fmt)


def _created(info: Any) -> Response:
    return bodies.json_response(info.to_json(), 201, {"Location": f"/v1/sessions/{info.meta.id}"})


@router.post(
    "",
    status_code=201,
    openapi_extra=CREATE_BODY,
    responses=CREATE_RESPONSE,
    dependencies=[JsonAnswer],
    operation_id="createSession",
)
async def create_session(
    request: Request, service: Service, tenant: Tenant, offload: Offloader, body: Body
) -> Response:
    """Create a session (a JSON spec, or safetensors parameters with the spec in metadata), or restore one
    from a checkpoint (safetensors)."""
    if request_format(request.headers.get("content-type")) == "json":
        options, params, metadata = await offload.parse(envelopes.parse_create, body)
        return _created(await service.create(tenant, options, params, metadata))
    tensors, metadata = await bodies.decode_safetensors(offload, body, PARAM_DTYPES, MAX_SESSION_TENSORS)
    if envelopes.CREATE_KEY not in metadata:
        return _created(await service.restore(tenant, tensors, metadata))
    options, metadata = await bodies.read_create_spec(offload, metadata)
    return _created(await service.create(tenant, options, tensors, metadata))


@router.get("", responses=LIST_RESPONSE, dependencies=[JsonAnswer], operation_id="listSessions")
async def list_sessions(service: Service, tenant: Tenant) -> Response:
    """The caller's sessions: id, step, lr, created_at, updated_at, metadata."""
    return bodies.json_response({"sessions": await service.list_sessions(tenant)})


@router.get("/{session_id}", responses=SESSION_RESPONSE, dependencies=[JsonAnswer], operation_id="getSession")
async def get_session(session_id: str, service: Service, tenant: Tenant) -> Response:
    """The session with every default filled in."""
    return bodies.json_response((await service.get(tenant, session_id)).to_json())


@router.get("/{session_id}/params", responses=PARAMS_RESPONSE, operation_id="getParams")
async def get_params(
    session_id: str, request: Request, service: Service, tenant: Tenant, offload: Offloader
) -> Response:
    """Current parameters, JSON or safetensors by Accept."""
    answer = response_format(request.headers.get("accept"), "json")
    response: Response = await service.params(tenant, session_id, bodies.render_params(answer, offload))
    return response


@router.put(
    "/{session_id}/params",
    openapi_extra=PARAMS_BODY,
    responses=PUT_PARAMS_RESPONSE,
    dependencies=[JsonAnswer],
    operation_id="putParams",
)
async def put_params(
    session_id: str, request: Request, service: Service, tenant: Tenant, offload: Offloader, body: Body
) -> Response:
    """Overwrite parameters (same names and shapes); optimizer state and step are kept."""
    fmt = request_format(request.headers.get("content-type"))
    values = await bodies.read_params(offload, body, fmt)
    return bodies.json_response((await service.put_params(tenant, session_id, values)).to_json())


@router.get(
    "/{session_id}/checkpoint",
    response_class=Response,
    responses=CHECKPOINT_RESPONSE,
    operation_id="getCheckpoint",
)
async def checkpoint(session_id: str, request: Request, service: Service, tenant: Tenant) -> Response:
    """Parameters, every optimizer state tensor, and the full spec and scheduler state, as safetensors."""
    if response_format(request.headers.get("accept"), "safetensors") != "safetensors":
        raise NotAcceptable(f"a checkpoint is only served as {SAFETENSORS}")
    response: Response = await service.checkpoint(tenant, session_id, bodies.safetensors_response)
    return response


@router.get(
    "/{session_id}/history", responses=HISTORY_RESPONSE, dependencies=[JsonAnswer], operation_id="getHistory"
)
async def history(
    session_id: str,
    service: Service,
    tenant: Tenant,
    limit: Annotated[int, Query(ge=0, le=100_000)] = 1000,
    since: Annotated[
        int | None,
        Query(
            ge=0,
            description="only the records of steps after this one, the first `limit` of them (what a live "
            "view polls for); without it, the newest `limit`",
        ),
    ] = None,
) -> Response:
    """Per-step records, oldest first. A record's `lr` is the lr after its step: the lr the next step is
    taken with (as torch's `get_last_lr()` after `scheduler.step()`)."""
    return bodies.json_response({"steps": await service.history(tenant, session_id, limit, since)})


@router.get(
    "/{session_id}/schedule",
    responses=SCHEDULE_RESPONSE,
    dependencies=[JsonAnswer],
    operation_id="getSchedule",
)
async def schedule(
    session_id: str,
    service: Service,
    tenant: Tenant,
    steps: Annotated[int, Query(ge=1, le=MAX_SCHEDULE_STEPS)] = 100,
) -> Response:
    """The lr the session's schedule gives each of its next `steps` steps, from its state now (nothing is
    changed)."""
    return bodies.json_response(await service.schedule(tenant, session_id, steps))


@router.delete("/{session_id}", status_code=204, responses=DELETE_RESPONSE, operation_id="deleteSession")
async def delete_session(session_id: str, service: Service, tenant: Tenant) -> Response:
    """Delete the session; afterwards it is 404."""
    await service.delete(tenant, session_id)
    return Response(status_code=204)
