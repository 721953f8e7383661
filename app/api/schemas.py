"""The JSON bodies of the API as pydantic models: the OpenAPI document's schemas are generated from these.

The handlers parse bodies themselves (`app.wire.envelopes`, faster than a model and with the contract's
exact messages); these models say the same thing for the document, as tightly as the server enforces it,
in shapes code generators handle (no recursive schemas; every array has its `items`). The preview body
alone is parsed with its model.
"""

from __future__ import annotations

import json
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel

from app.optim.limits import MAX_GROUPS, MAX_NAME_LENGTH, MAX_PARAMETERS
from app.optim.registry import optimizer_catalogue
from app.optim.schedulers import scheduler_catalogue
from app.optim.spec import MAX_ROUND_SECONDS, MAX_WORKERS
from app.wire.common import MAX_NDIM


def _no_default(schema: dict[str, Any]) -> None:
    """An optional member whose absence means something other than null (the schema has no `default`)."""
    schema.pop("default", None)


def _optional(**kwargs: Any) -> Any:
    return Field(None, json_schema_extra=_no_default, **kwargs)


def _defaults_to(value: Any, description: str = "", **kwargs: Any) -> Any:
    """An optional member the server fills in. Its default is said in words, not as `default`, which some
    generators (openapi-typescript) read as "always present" and so make the member required to send."""
    said = f"{description}; " if description else ""
    shown = "null" if value is None else json.dumps(value)
    return Field(value, description=f"{said}default {shown}", json_schema_extra=_no_default, **kwargs)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


OptimizerName = Enum(  # type: ignore[misc]
    "OptimizerName", {e["name"]: e["name"] for e in optimizer_catalogue()}, type=str
)
SchedulerName = Enum(  # type: ignore[misc]
    "SchedulerName", {e["name"]: e["name"] for e in scheduler_catalogue()}, type=str
)
Dtype = Literal["float16", "float32", "float64"]
ParamDtype = Literal["float32", "float64"]
Count = Annotated[int, Field(ge=0, le=2**53)]
Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME_LENGTH)]


class TensorObject(Strict):
    """A tensor: its shape and its row-major flat data."""

    shape: list[Annotated[int, Field(ge=0)]] = Field(max_length=MAX_NDIM)
    dtype: Dtype = _optional(description="the parameter's dtype when left out; float16 for gradients only")
    data: list[float] = Field(description="row-major, flat; shape's product of numbers")


class NestedNumbers(
    RootModel[list[float] | list[list[float]] | list[list[list[float]]] | list[list[list[list[float]]]]]
):
    """A list of numbers, or of rows of numbers (of equal lengths), up to 4 deep (deeper: the object
    form), read as the parameter's dtype."""


class Tensor(RootModel[TensorObject | NestedNumbers | float]):
    """A tensor: the object form, a (nested) list of numbers, or a number (a 0-d tensor)."""


class OptimizerSpec(BaseModel):
    """An optimizer from GET /v1/optimizers, with any of its hyperparameters."""

    model_config = ConfigDict(extra="allow")
    name: OptimizerName


class SchedulerSpec(BaseModel):
    """A scheduler from GET /v1/schedulers, with its arguments (composites nest scheduler specs)."""

    model_config = ConfigDict(extra="allow")
    name: SchedulerName


class ParamGroup(BaseModel):
    """Parameters by name, with hyperparameters that override the optimizer's for them."""

    model_config = ConfigDict(extra="allow")
    params: list[Name] = Field(min_length=1)


class AsyncAggregation(Strict):
    """Bounded staleness: each step says the step its gradient was computed at (`step`); it is applied when
    at most `max_staleness` steps behind (else 409), with the lr divided by 1 + staleness for that step
    alone under `staleness_lr: inverse`."""

    mode: Literal["async"]
    max_staleness: int = Field(ge=0, le=2**53)
    staleness_lr: Literal["none", "inverse"] = _defaults_to("none")


class SyncAggregation(Strict):
    """Synchronous rounds: each step is worker `worker`'s contribution to round `step`; the round applies
    one step to the reduced gradient once `workers` contributed, or `timeout` seconds after its first
    contribution if at least `min_workers` did (else every contributor gets 409 and nothing is applied);
    every contributor is answered with the round's step."""

    mode: Literal["sync"]
    workers: int = Field(ge=1, le=MAX_WORKERS)
    reduce: Literal["mean", "sum", "weighted_mean"] = _defaults_to("mean")
    timeout: float = _defaults_to(
        60.0, "seconds after the round's first contribution", gt=0, le=MAX_ROUND_SECONDS
    )
    min_workers: int = _optional(ge=1, le=MAX_WORKERS, description="at most workers; default: workers")


Aggregation = Annotated[AsyncAggregation | SyncAggregation, Field(discriminator="mode")]


class CreateSession(Strict):
    optimizer: OptimizerSpec
    params: dict[Name, Tensor] = Field(min_length=1, max_length=MAX_PARAMETERS)
    scheduler: SchedulerSpec | None = _defaults_to(None, "none: a constant lr")
    param_groups: list[ParamGroup] = _optional(
        min_length=1, max_length=MAX_GROUPS, description="when given, every parameter is in exactly one group"
    )
    steps_per_epoch: int = _defaults_to(1, "steps per scheduler epoch", ge=1, le=2**53)
    clip_grad_norm: Annotated[float, Field(gt=0)] | None = _defaults_to(None, "max L2 norm of all gradients")
    clip_grad_value: Annotated[float, Field(gt=0)] | None = _defaults_to(None, "max |gradient|")
    nonfinite: Literal["error", "skip", "allow"] = _defaults_to("error", "a step that would make NaN/Inf")
    aggregation: Aggregation | None = _defaults_to(None, "none: every step applies, in arrival order")
    metadata: dict[str, str] = _optional(description="yours, returned as given")


class Step(Strict):
    grads: dict[Name, Tensor] = Field(
        max_length=MAX_PARAMETERS, description="a parameter without a gradient is left alone this step"
    )
    step: Count = _optional(description="must equal the session's current step, else 409")
    loss: float = _optional(description="recorded in the history; reduce_lr_on_plateau's metric")
    worker: Name = _optional(description="synchronous rounds: this contributor's id (`step` is the round)")
    weight: float = _optional(gt=0, description="synchronous rounds with reduce weighted_mean: this weight")


class PutParams(Strict):
    params: dict[Name, Tensor] = Field(max_length=MAX_PARAMETERS)


class TensorOut(BaseModel):
    shape: list[Annotated[int, Field(ge=0)]]
    dtype: ParamDtype
    data: list[float | None] = Field(
        description="row-major; NaN and Infinity (a diverged run) are null, as JSON has neither"
    )


class TensorInfo(BaseModel):
    shape: list[Annotated[int, Field(ge=0)]]
    dtype: ParamDtype


Lr = Annotated[list[float], Field(description="one value per parameter group")]


class StepResult(BaseModel):
    step: Count
    lr: Lr
    skipped: bool
    grad_norm: float | None = Field(description="L2 norm of the gradients before clipping; null if skipped")
    params: dict[str, TensorOut] = _optional(description="left out with return_params=false")
    staleness: Count = Field(description="steps the gradient was behind the session (0 unless async)")
    workers: list[str] = _optional(description="synchronous rounds: the contributors, sorted")


class Params(BaseModel):
    step: Count
    params: dict[str, TensorOut]


class SessionSummary(BaseModel):
    id: str
    step: Count
    lr: Lr
    optimizer: str = Field(description="the optimizer's name")
    scheduler: str | None = Field(description="the scheduler's name, or null")
    loss: float | None = Field(description="the loss of the newest history record (null: none reported)")
    created_at: float
    updated_at: float
    metadata: dict[str, str]


class SessionList(BaseModel):
    sessions: list[SessionSummary]


class ParamGroupOut(BaseModel):
    model_config = ConfigDict(extra="allow")
    params: list[str]


class Session(BaseModel):
    """A session with every default filled in."""

    id: str
    step: Count
    lr: Lr
    optimizer: OptimizerSpec
    scheduler: SchedulerSpec | None
    param_groups: list[ParamGroupOut]
    params: dict[str, TensorInfo]
    steps_per_epoch: int = Field(ge=1)
    clip_grad_norm: float | None
    clip_grad_value: float | None
    nonfinite: Literal["error", "skip", "allow"]
    aggregation: Aggregation | None
    created_at: float
    updated_at: float
    metadata: dict[str, str]


class HistoryRecord(BaseModel):
    step: Count
    lr: Lr
    loss: float | None
    grad_norm: float | None
    skipped: bool
    time: float


class History(BaseModel):
    steps: list[HistoryRecord]


class Schedule(BaseModel):
    step: Count = Field(description="the session's step now")
    steps: list[int] = Field(description="the next steps, step + 1 onwards")
    lr: list[list[float]] = Field(description="per group, the lr each of those steps will be taken with")
    depends_on_loss: bool = Field(
        description="true when the scheduler reads the loss (reduce_lr_on_plateau): its lr is shown held"
    )


class Hyperparameter(BaseModel):
    name: str
    type: str = Field(description="e.g. number, integer | null, array[number, 2], array[scheduler]")
    description: str
    required: bool = _optional()
    default: Any = _optional()
    choices: list[str] = _optional()


class CatalogueEntry(BaseModel):
    name: str
    description: str
    needs_metric: bool = _optional(description="schedulers: whether steps must report `loss`")
    hyperparameters: list[Hyperparameter]


class Optimizers(BaseModel):
    optimizers: list[CatalogueEntry]


class Schedulers(BaseModel):
    schedulers: list[CatalogueEntry]


class Preview(Strict):
    lr: float | Annotated[list[float], Field(min_length=1, max_length=MAX_GROUPS)] = Field(
        description="base lr, or one per parameter group"
    )
    scheduler: SchedulerSpec
    steps: Annotated[int, Field(ge=0, le=1_000_000)] = Field(description="at most 100,000 x groups")
    steps_per_epoch: Annotated[int, Field(ge=1)] = _defaults_to(1)
    losses: Annotated[list[float], Field(max_length=100_000)] | None = _defaults_to(
        None, "one loss per step, for reduce_lr_on_plateau"
    )
    optimizer: OptimizerSpec | None = _defaults_to(None, "the optimizer (sgd when none), for cycling")


class PreviewResult(BaseModel):
    lr: list[list[float]] = Field(description="per group, the lr before each step")


class Status(BaseModel):
    status: str
    store: str = _optional()


class FieldProblem(BaseModel):
    field: str
    message: str


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int = Field(ge=400, le=599)
    detail: str
    errors: list[FieldProblem] = _optional(description="one entry per invalid field")
    current_step: Count = _optional(description="409: the session's step")
    session_id: str = _optional(description="422 unreadable-session")


MODELS: list[type[BaseModel]] = [
    CreateSession,
    Step,
    PutParams,
    StepResult,
    Params,
    SessionList,
    Session,
    History,
    Schedule,
    Optimizers,
    Schedulers,
    Preview,
    PreviewResult,
    Status,
    Problem,
]
