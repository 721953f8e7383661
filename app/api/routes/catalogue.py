"""The optimizer and scheduler catalogue, and the schedule preview."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import Response

from app.api.bodies import json_response
from app.api.deps import Body, JsonAnswer, Tenant
from app.api.openapi import OPTIMIZERS_RESPONSE, PREVIEW_RESPONSE, SCHEDULERS_RESPONSE
from app.optim.preview import preview_schedule
from app.optim.registry import optimizer_catalogue
from app.optim.schedulers import scheduler_catalogue
from app.wire.negotiate import JSON

router = APIRouter(prefix="/v1", tags=["catalogue"])


class Preview(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lr: float | list[float] = Field(description="base lr, or one per parameter group")
    scheduler: dict[str, Any] = Field(description="a scheduler spec, as in POST /v1/sessions")
    steps: Annotated[int, Field(ge=0, le=1_000_000)]
    steps_per_epoch: Annotated[int, Field(ge=1)] = 1
    losses: list[float] | None = Field(None, description="one loss per step, for reduce_lr_on_plateau")
    optimizer: dict[str, Any] | None = Field(None, description="optimizer spec (default sgd) for cycling")


PREVIEW_SCHEMA = Preview.model_json_schema()


@router.get("/optimizers", responses=OPTIMIZERS_RESPONSE, dependencies=[JsonAnswer])
async def optimizers(_: Tenant) -> Response:
    """Every optimizer with its hyperparameters, types, defaults and a one-line description."""
    return json_response({"optimizers": optimizer_catalogue()})


@router.get("/schedulers", responses=SCHEDULERS_RESPONSE, dependencies=[JsonAnswer])
async def schedulers(_: Tenant) -> Response:
    """Every scheduler with its arguments, types, defaults and a one-line description."""
    return json_response({"schedulers": scheduler_catalogue()})


@router.post(
    "/schedules/preview",
    responses=PREVIEW_RESPONSE,
    openapi_extra={"requestBody": {"required": True, "content": {JSON: {"schema": PREVIEW_SCHEMA}}}},
    dependencies=[JsonAnswer],
)
async def preview(_: Tenant, body: Body) -> Response:
    """The lr before each of the next `steps` steps, per group."""
    # the body is read after the key is checked, so an unauthenticated caller learns nothing from it
    try:
        spec = Preview.model_validate_json(body)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None
    lrs = preview_schedule(
        spec.lr, spec.scheduler, spec.steps, spec.steps_per_epoch, spec.losses, spec.optimizer
    )
    return json_response({"lr": lrs})
