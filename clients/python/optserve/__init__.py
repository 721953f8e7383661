"""optserve's Python SDK: `Client`/`AsyncClient` speak the v1 HTTP API; `optserve.torch.RemoteOptimizer` (with
the `torch` extra) makes a server session a `torch.optim.Optimizer`."""

from typing import TYPE_CHECKING, Any

from optserve._client import AsyncClient, AsyncSession, Client, Session
from optserve._policy import RetryPolicy, Timeout
from optserve._version import __version__
from optserve._worker import AsyncWorker, Worker
from optserve.errors import (
    APIError,
    BadRequest,
    FieldError,
    NotFound,
    OptserveError,
    PayloadTooLarge,
    ServerError,
    ServiceUnavailable,
    StepConflict,
    TooManyRequests,
    TransportError,
    Unauthorized,
    UnexpectedResponse,
    UnsupportedMediaType,
    ValidationError,
)
from optserve.models import HistoryRecord, ParamInfo, SessionInfo, SessionSummary, StepResult

__all__ = [
    "APIError",
    "AsyncClient",
    "AsyncSession",
    "AsyncWorker",
    "BadRequest",
    "Client",
    "FieldError",
    "HistoryRecord",
    "NotFound",
    "OptserveError",
    "ParamInfo",
    "PayloadTooLarge",
    "RetryPolicy",
    "ServerError",
    "ServiceUnavailable",
    "Session",
    "SessionInfo",
    "SessionSummary",
    "StepConflict",
    "StepResult",
    "Timeout",
    "TooManyRequests",
    "TransportError",
    "Unauthorized",
    "UnexpectedResponse",
    "UnsupportedMediaType",
    "ValidationError",
    "Worker",
    "__version__",
    "torch",
]

if TYPE_CHECKING:
    from optserve import torch


def __getattr__(name: str) -> Any:
    # `optserve.torch` loads on first use, so that `import optserve` works, and stays light, without torch
    if name == "torch":
        import importlib

        return importlib.import_module("optserve.torch")
    raise AttributeError(f"module 'optserve' has no attribute {name!r}")
