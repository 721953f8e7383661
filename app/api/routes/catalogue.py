"""The optimizer and scheduler catalogue, and the schedule preview."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from app.api.bodies import json_response
from app.api.deps import Tenant
from app.api.openapi import OPTIMIZERS_RESPONSE, PREVIEW_RESPONSE, SCHEDULERS_RESPONSE
from app.optim.engine import preview_schedule
from app.optim.registry import optimizer_catalogue
from app.optim.schedulers import scheduler_catalogue

router = APIRouter(prefix="/v1", tags=["catalogue"])


class Preview(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lr: float | list[float] = Field(description="base lr, or one per parameter group")
    scheduler: dict[str, Any] = Field(description="a scheduler spec, as in POST /v1/sessions")
    steps: Annotated[int, Field(ge=0, le=1_000_000)]
    steps_per_epoch: Annotated[int, Field(ge=1)] = 1
    losses: list[float] | None = Field(None, description="one loss per step, for reduce_lr_on_plateau")
    optimizer: dict[str, Any] | None = Field(None, description="optimizer spec (default sgd) for cycling")


@router.get("/optimizers", responses=OPTIMIZERS_RESPONSE)
async def optimizers(_: Tenant) -> Response:
    """Every optimizer with its hyperparameters, types, defaults and a one-line description."""
    return json_response({"optimizers": optimizer_catalogue()})


@router.get("/schedulers", responses=SCHEDULERS_RESPONSE)
async def schedulers(_: Tenant) -> Response:
    """Every scheduler with its arguments, types, defaults and a one-line description."""
    return json_response({"schedulers": scheduler_catalogue()})


@router.post("/schedules/preview", responses=PREVIEW_RESPONSE)
async def preview(body: Preview, _: Tenant) -> Response:
    """The lr before each of the next `steps` steps, per group."""
    lrs = preview_schedule(
        body.lr, body.scheduler, body.steps, body.steps_per_epoch, body.losses, body.optimizer
    )
    return json_response({"lr": lrs})
