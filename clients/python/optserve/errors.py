"""Every exception the SDK raises; error answers become typed exceptions carrying their problem details:

OptserveError                  base of everything below
├── TransportError             no answer: connection failed or broke, after the allowed retries
├── UnexpectedResponse         an answer the SDK cannot read (not optserve, or a newer protocol)
└── APIError                   an error status: status, title, detail, errors, problem
    ├── BadRequest             400  the body could not be parsed
    ├── Unauthorized           401  missing or unknown API key
    ├── NotFound               404  no such session (or another tenant's)
    ├── StepConflict           409  `expected_step` was not the session's step: current_step
    ├── PayloadTooLarge        413  body over the server's limit
    ├── UnsupportedMediaType   415
    ├── ValidationError        422  bad spec, names, shapes, non-finite values: errors per field
    ├── TooManyRequests        429
    └── ServerError            5xx
        └── ServiceUnavailable 503  the store is unreachable; retried before it is raised
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx


class OptserveError(Exception):
    """Base of every exception this SDK raises."""


class TransportError(OptserveError):
    """The request got no answer (connection refused, reset or timed out), after `attempts` tries."""

    def __init__(self, message: str, attempts: int) -> None:
        self.attempts = attempts
        super().__init__(message)


class UnexpectedResponse(OptserveError):
    """A success status whose body is not what the contract describes."""


@dataclass(frozen=True)
class FieldError:
    """One entry of a problem's `errors`: the offending field (`optimizer.lr`, `grads.w`), what is wrong."""

    field: str
    message: str


class APIError(OptserveError):
    """The server answered with an error status; `problem` is the whole problem+json body."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        errors: list[FieldError] | None = None,
        problem: Mapping[str, Any] | None = None,
    ) -> None:
        self.status = status
        self.title = title
        self.detail = detail
        self.errors = errors or []
        self.problem = dict(problem or {})
        super().__init__(f"{status} {title}: {detail}" if detail else f"{status} {title}")


class BadRequest(APIError):
    """400: the body could not be parsed at all."""


class Unauthorized(APIError):
    """401: send a valid key (`api_key=`)."""


class NotFound(APIError):
    """404: no such session for this key."""


class StepConflict(APIError):
    """409: the session is at `current_step`, not at the step the request expected."""

    @property
    def current_step(self) -> int | None:
        current = self.problem.get("current_step")
        return current if isinstance(current, int) and not isinstance(current, bool) else None


class PayloadTooLarge(APIError):
    """413: the body exceeds the server's `OPTSERVE_MAX_BODY_BYTES`."""


class UnsupportedMediaType(APIError):
    """415: the server does not read this Content-Type."""


class ValidationError(APIError):
    """422: the request was understood but is invalid; `errors` names each offending field."""


class TooManyRequests(APIError):
    """429: rate limited; retried (honouring Retry-After) before it is raised."""


class ServerError(APIError):
    """5xx: the server failed; nothing was applied."""


class ServiceUnavailable(ServerError):
    """503: the server cannot reach its store; retried (honouring Retry-After) before it is raised."""


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequest,
    401: Unauthorized,
    404: NotFound,
    409: StepConflict,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    422: ValidationError,
    429: TooManyRequests,
    503: ServiceUnavailable,
}


def _field_errors(raw: object) -> list[FieldError]:
    if not isinstance(raw, list):
        return []
    return [
        FieldError(str(e.get("field", "")), str(e.get("message", ""))) for e in raw if isinstance(e, dict)
    ]


def error_from_response(response: httpx.Response) -> APIError:
    """The typed exception for an error answer: problem+json when the server sent it, else its status line
    and the start of its body (a proxy's HTML page, say)."""
    status = response.status_code
    cls = _BY_STATUS.get(status, ServerError if status >= 500 else APIError)
    try:
        problem = response.json()
    except ValueError:
        problem = None
    if not isinstance(problem, dict):
        return cls(status, response.reason_phrase or "Error", response.text[:500].strip())
    title = str(problem.get("title") or response.reason_phrase or "Error")
    return cls(status, title, str(problem.get("detail") or ""), _field_errors(problem.get("errors")), problem)
