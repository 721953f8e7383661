"""What the service answers, as typed dataclasses: sessions, summaries, step results, history records."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[Any]


@dataclass(frozen=True)
class ParamInfo:
    """A parameter's shape and dtype (`float32` or `float64`), as the session holds it."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class SessionInfo:
    """`GET /v1/sessions/{id}`: the spec with every default filled in. `raw` is the whole body, members that
    this version of the SDK does not know included."""

    id: str
    step: int
    lr: list[float]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None
    param_groups: list[dict[str, Any]]
    params: dict[str, ParamInfo]
    steps_per_epoch: int
    clip_grad_norm: float | None
    clip_grad_value: float | None
    nonfinite: str
    created_at: float
    updated_at: float
    metadata: dict[str, str]
    raw: dict[str, Any] = field(repr=False, compare=False)
    aggregation: dict[str, Any] | None = None

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> SessionInfo:
        return cls(
            id=body["id"],
            step=body["step"],
            lr=body["lr"],
            optimizer=body["optimizer"],
            scheduler=body.get("scheduler"),
            param_groups=body["param_groups"],
            params={name: ParamInfo(tuple(p["shape"]), p["dtype"]) for name, p in body["params"].items()},
            steps_per_epoch=body.get("steps_per_epoch", 1),
            clip_grad_norm=body.get("clip_grad_norm"),
            clip_grad_value=body.get("clip_grad_value"),
            nonfinite=body.get("nonfinite", "error"),
            created_at=body["created_at"],
            updated_at=body["updated_at"],
            metadata=body.get("metadata") or {},
            raw=body,
            aggregation=body.get("aggregation"),
        )

    @property
    def param_bytes(self) -> int:
        """Bytes of all parameters: the size of a step's answer, used to size timeouts."""
        return sum(p.nbytes for p in self.params.values())


@dataclass(frozen=True)
class SessionSummary:
    """One entry of `GET /v1/sessions`."""

    id: str
    step: int
    lr: list[float]
    created_at: float
    updated_at: float
    metadata: dict[str, str]

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> SessionSummary:
        return cls(
            body["id"], body["step"], body["lr"], body["created_at"], body["updated_at"], body["metadata"]
        )


@dataclass(frozen=True)
class StepResult:
    """The answer to one step. `step` counts the steps applied so far; `lr` (one per parameter group) is what
    the next step will use; `params` is empty when the step was sent with `return_params=False`; `grad_norm`
    is the L2 norm before clipping (None for a skipped step); `replayed` says the server had already applied
    this step (a retry after a lost answer) and answered it again without applying anything; `staleness` is
    how many steps behind the session the gradient was (0 unless the session aggregates asynchronously);
    `workers` are a synchronous round's contributors (sorted)."""

    step: int
    lr: list[float]
    params: dict[str, Array]
    skipped: bool
    grad_norm: float | None
    replayed: bool = False
    staleness: int = 0
    workers: tuple[str, ...] = ()


@dataclass(frozen=True)
class HistoryRecord:
    """One step of `GET /v1/sessions/{id}/history`; `time` is seconds since the epoch."""

    step: int
    lr: list[float]
    loss: float | None
    grad_norm: float | None
    skipped: bool
    time: float

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> HistoryRecord:
        return cls(
            body["step"], body["lr"], body.get("loss"), body.get("grad_norm"), body["skipped"], body["time"]
        )
