"""OpenAPI 3.1 descriptions of the bodies the handlers read and write themselves (JSON and binary), and of
every answer an operation can give: its success bodies and its problem+json (RFC 9457) errors. The JSON
schemas come from the pydantic models of `app.api.schemas`; what is written here by hand is what a model
cannot say: which operation reads and answers which media types, statuses and headers."""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from app.api.schemas import MODELS

PROBLEM = "application/problem+json"
JSON = "application/json"
SAFETENSORS = "application/vnd.safetensors"
OCTET = "application/octet-stream"


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


# A safetensors body: OpenAPI 3.1 describes raw bytes as a string with a `contentMediaType`; `format: binary`
# is kept for the tools that still read the 3.0 spelling.
def _list_of(key: str, item: str) -> dict[str, Any]:
    """An answer that is one object holding one array, `{key: [item, ...]}`."""
    return {"type": "object", "required": [key], "properties": {key: {"type": "array", "items": ref(item)}}}


BINARY = {"type": "string", "format": "binary", "contentMediaType": SAFETENSORS}


def _components() -> dict[str, Any]:
    _, schema = models_json_schema(
        [(model, "validation") for model in MODELS], ref_template="#/components/schemas/{model}"
    )
    components: dict[str, Any] = schema["$defs"]
    return components


COMPONENTS: dict[str, Any] = _components()

# Why each status is answered; every one of them is a Problem.
_PROBLEMS: dict[int, str] = {
    400: "the body cannot be parsed at all (not JSON, or safetensors whose framing or header cannot be read)",
    401: "API keys are configured and the request has no valid `Authorization: Bearer <key>`",
    404: "no such session for this caller",
    406: "`Accept` excludes every format this operation answers with",
    408: "the body did not arrive within the server's deadline (OPTSERVE_BODY_TIMEOUT)",
    409: "`step` was sent and is not the session's current step (see `current_step`)",
    413: "the body is larger than the server's limit",
    415: "the body's `Content-Type` is not one this operation reads",
    422: "the request parses but is invalid (spec, names, shapes, dtypes, values); `errors` says where",
    429: "the caller's key holds as many sessions, or bytes, as its quota allows; nothing was stored",
    503: "the session store is unreachable or failed, or the server is receiving as many request bytes as "
    "it allows; nothing was applied",
}
_PROBLEM_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"required": True, "schema": {"type": "string"}}},
    503: {"Retry-After": {"schema": {"type": "string"}}},
}


def problems(*statuses: int) -> dict[int | str, Any]:
    """The problem+json answers for `statuses`."""
    answers: dict[int | str, Any] = {}
    for status in statuses:
        answer: dict[str, Any] = {
            "description": _PROBLEMS[status],
            "content": {PROBLEM: {"schema": ref("Problem")}},
        }
        if status in _PROBLEM_HEADERS:
            answer["headers"] = _PROBLEM_HEADERS[status]
        answers[status] = answer
    return answers


def _body(json_schema: str, binary_doc: str) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {
                JSON: {"schema": ref(json_schema)},
                # application/octet-stream is read as safetensors too; it is not listed as a second binary
                # type, because generators then make the body optional (openapi-python-client 0.29 then
                # writes a create it cannot import)
                SAFETENSORS: {
                    "schema": {**BINARY, "description": f"{binary_doc} ({OCTET} is read the same)"}
                },
            },
        }
    }


def _answer(
    status: int,
    json_schema: str | None,
    binary_doc: str | None,
    description: str = "success",
    headers: dict[str, Any] | None = None,
) -> dict[int | str, Any]:
    content: dict[str, Any] = {}
    if json_schema:
        content[JSON] = {"schema": ref(json_schema)}
    if binary_doc:
        content[SAFETENSORS] = {"schema": {**BINARY, "description": binary_doc}}
    answer: dict[str, Any] = {"description": description, "content": content}
    if headers:
        answer["headers"] = headers
    return {status: answer}


_V1 = (401, 422)  # every /v1 operation: keys, and FastAPI's own parameter validation
_SESSION = (*_V1, 404, 503)  # every operation on one stored session
_BODY = (400, 408, 413, 415)  # every operation that reads a JSON or safetensors body itself

CREATE_BODY = _body("CreateSession", "a checkpoint from GET /v1/sessions/{id}/checkpoint: restores it")
STEP_BODY = _body("Step", "the gradients; metadata `step` and `loss` optional")
PARAMS_BODY = _body("PutParams", "the parameters, same names and shapes")

CREATE_RESPONSE = _answer(
    201,
    "Session",
    None,
    "created (or restored)",
    {"Location": {"required": True, "schema": {"type": "string"}, "description": "the new session"}},
) | problems(*_V1, *_BODY, 406, 429, 503)
# What a client can do next with the session it created: OpenAPI links, which tools follow
CREATE_RESPONSE[201]["links"] = {
    name: {
        "operationId": name,
        "parameters": {"session_id": "$response.body#/id"},
        "description": f"`{name}` on the new session",
    }
    for name in (
        "getSession",
        "step",
        "getParams",
        "putParams",
        "getCheckpoint",
        "getHistory",
        "getSchedule",
        "deleteSession",
    )
}
LIST_RESPONSE = _answer(200, "SessionList", None) | problems(*_V1, 406, 503)
SESSION_RESPONSE = _answer(200, "Session", None) | problems(*_SESSION, 406)
DELETE_RESPONSE = problems(*_SESSION)
_STEP_HEADERS: dict[str, Any] = {
    "Idempotent-Replayed": {
        "schema": {"type": "string", "enum": ["true"]},
        "description": "this answer is the first answer to this Idempotency-Key again; nothing was applied",
    },
    "Optserve-Step": {
        "required": True,
        "schema": {"type": "integer", "minimum": 0},
        "description": "the session's step after this one",
    },
    "Optserve-Lr": {
        "required": True,
        "schema": {"type": "string"},
        "description": "the lr per group as a JSON list, e.g. `[0.1]`",
    },
    "Optserve-Skipped": {"required": True, "schema": {"type": "string", "enum": ["true", "false"]}},
    "Optserve-Grad-Norm": {
        "required": True,
        "schema": {"type": "string"},
        "description": "the gradients' L2 norm before clipping, or `null` when skipped",
    },
    "Optserve-Workers": {
        "schema": {"type": "string"},
        "description": "synchronous rounds: the contributors, a JSON list of their ids",
    },
    "Optserve-Staleness": {
        "required": True,
        "schema": {"type": "integer", "minimum": 0},
        "description": "how many steps behind the session the gradient was (0 unless aggregation is async)",
    },
}
STEP_RESPONSE = _answer(
    200,
    "StepResult",
    "the new parameters (none with return_params=false). `__metadata__` holds, as strings: `step` (an "
    "integer), `lr` (a JSON list of numbers, one per group), `skipped` (`true` or `false`), `grad_norm` "
    "(a number, or `null`), `staleness` (an integer); the Optserve-* headers carry the same",
    "the step's result, in the format `Accept` asks for; without `Accept`, in the request's format",
    headers=_STEP_HEADERS,
) | problems(*_SESSION, *_BODY, 406, 409)
PARAMS_RESPONSE = _answer(
    200,
    "Params",
    "the parameters; `__metadata__` `step` (an integer, as a string)",
    "the parameters, in the format `Accept` asks for (JSON without one)",
) | problems(*_SESSION, 406)
PUT_PARAMS_RESPONSE = _answer(200, "Session", None) | problems(*_SESSION, *_BODY, 406)
CHECKPOINT_RESPONSE = _answer(
    200, None, "parameters, state tensors; metadata: spec, step, scheduler state"
) | problems(*_SESSION, 406)
HISTORY_RESPONSE = _answer(200, "History", None) | problems(*_SESSION, 406)
SCHEDULE_RESPONSE = _answer(200, "Schedule", None) | problems(*_SESSION, 406)
OPTIMIZERS_RESPONSE = _answer(200, "Optimizers", None) | problems(*_V1, 406)
SCHEDULERS_RESPONSE = _answer(200, "Schedulers", None) | problems(*_V1, 406)
PREVIEW_RESPONSE = _answer(200, "PreviewResult", None) | problems(*_V1, 400, 406, 408, 413, 503)
HEALTH_RESPONSE = _answer(200, "Status", None)
READY_RESPONSE = _answer(200, "Status", None) | problems(503)
METRICS_RESPONSE: dict[int | str, Any] = {
    200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}
}

# The step route is a plain Starlette route (app/api/routes/step.py), so its operation is written here.
STEP_OPERATION: dict[str, Any] = {
    "tags": ["sessions"],
    "summary": "Step",
    "description": "One optimizer step; answers the new step, lr and (unless return_params=false) params.",
    "operationId": "step",
    "parameters": [
        {"name": "session_id", "in": "path", "required": True, "schema": {"type": "string"}},
        {
            "name": "return_params",
            "in": "query",
            "required": False,
            "schema": {"type": "boolean", "default": True},
        },
        {
            "name": "idempotency-key",
            "in": "header",
            "required": False,
            "schema": {"type": "string", "maxLength": 255},
            "description": "the same key with the same body replays the first answer, applying nothing",
        },
    ],
    **STEP_BODY,
    "responses": {str(status): answer for status, answer in STEP_RESPONSE.items()},
}


SECURITY_SCHEME = "bearerAuth"


def secure(document: dict[str, Any], keys_required: bool) -> None:
    """Declares the API key as a bearer security scheme on every /v1 operation (optional in open mode)."""
    document.setdefault("components", {})["securitySchemes"] = {
        SECURITY_SCHEME: {
            "type": "http",
            "scheme": "bearer",
            "description": "an API key from OPTSERVE_API_KEYS; a server started without keys takes none",
        }
    }
    requirement: list[dict[str, list[str]]] = [{SECURITY_SCHEME: []}]
    if not keys_required:
        requirement.append({})
    for path, item in document["paths"].items():
        if path.startswith("/v1/"):
            for operation in item.values():
                operation["security"] = requirement
