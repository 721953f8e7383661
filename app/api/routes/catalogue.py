"""The optimizer and scheduler catalogue, and the schedule preview."""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.responses import Response

from app.api.bodies import json_response
from app.api.deps import Body, JsonAnswer, Tenant
from app.api.openapi import OPTIMIZERS_RESPONSE, PREVIEW_RESPONSE, SCHEDULERS_RESPONSE, ref
from app.api.schemas import Preview
from app.optim.hparams import SpecError
from app.optim.limits import MAX_SCHEDULE_POINTS
from app.optim.preview import preview_schedule
from app.optim.registry import optimizer_catalogue
from app.optim.schedulers import scheduler_catalogue
from app.wire.envelopes import refuse_more_than
from app.wire.negotiate import JSON, UnsupportedMediaType, request_format

router = APIRouter(prefix="/v1", tags=["catalogue"])
MAX_PREVIEW_POINTS = MAX_SCHEDULE_POINTS
# Numbers in a preview body (1,000 lrs, 100,000 losses, a spec), counted before pydantic parses it: that
# holds the interpreter for the whole body (200 ms for a body of 2 million numbers, 7 ms for 100,000).
MAX_PREVIEW_ITEMS = 110_000


@router.get(
    "/optimizers", responses=OPTIMIZERS_RESPONSE, dependencies=[JsonAnswer], operation_id="listOptimizers"
)
async def optimizers(_: Tenant) -> Response:
    """Every optimizer with its hyperparameters, types, defaults and a one-line description."""
    return json_response({"optimizers": optimizer_catalogue()})


@router.get(
    "/schedulers", responses=SCHEDULERS_RESPONSE, dependencies=[JsonAnswer], operation_id="listSchedulers"
)
async def schedulers(_: Tenant) -> Response:
    """Every scheduler with its arguments, types, defaults and a one-line description."""
    return json_response({"schedulers": scheduler_catalogue()})


@router.post(
    "/schedules/preview",
    responses=PREVIEW_RESPONSE,
    openapi_extra={
        "requestBody": {"required": True, "content": {JSON: {"schema": ref("Preview")}}},
    },
    dependencies=[JsonAnswer],
    operation_id="previewSchedule",
)
async def preview(request: Request, _: Tenant, body: Body) -> Response:
    """The lr before each of the next `steps` steps, per group."""
    # the body is read after the key is checked, so an unauthenticated caller learns nothing from it
    if request_format(request.headers.get("content-type")) != "json":
        raise UnsupportedMediaType(f"a preview is read from {JSON} only")
    refuse_more_than(body, ",", MAX_PREVIEW_ITEMS, "list items: a preview takes at most 100,000 losses")
    try:
        spec = Preview.model_validate_json(bytes(body) if isinstance(body, memoryview) else body)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None
    groups = len(spec.lr) if isinstance(spec.lr, list) else 1
    if spec.steps * groups > MAX_PREVIEW_POINTS:
        raise SpecError.one(
            "steps",
            f"{spec.steps} steps x {groups} groups is {spec.steps * groups} values; at most "
            f"{MAX_PREVIEW_POINTS} per preview",
        )

    def run() -> list[list[float]]:
        optimizer = spec.optimizer.model_dump(mode="json") if spec.optimizer else None
        scheduler = spec.scheduler.model_dump(mode="json")
        return preview_schedule(spec.lr, scheduler, spec.steps, spec.steps_per_epoch, spec.losses, optimizer)

    # a long schedule is seconds of Python: a thread keeps the event loop answering meanwhile
    lrs = run() if spec.steps * groups <= 1_000 else await anyio.to_thread.run_sync(run)
    return json_response({"lr": lrs})
