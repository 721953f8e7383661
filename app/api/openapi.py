"""OpenAPI 3.1 descriptions of the bodies the handlers read and write themselves (JSON and binary), and of
every answer an operation can give: its success bodies and its problem+json (RFC 9457) errors."""

from __future__ import annotations

from typing import Any

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

_NUMBER_OR_NULL = {"type": ["number", "null"]}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}

COMPONENTS: dict[str, Any] = {
    "NestedNumbers": {
        "type": "array",
        "items": {"anyOf": [{"type": "number"}, ref("NestedNumbers")]},
    },
    "TensorObject": {
        "type": "object",
        "required": ["shape", "data"],
        "additionalProperties": False,
        "properties": {
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "dtype": {
                "type": "string",
                "enum": ["float16", "float32", "float64"],
                "description": "the parameter's dtype when left out; float16 for gradients only",
            },
            "data": {"type": "array", "items": {"type": "number"}, "description": "row-major, flat"},
        },
    },
    "Tensor": {
        "description": "object form, or a bare (nested) list of numbers, or a bare number",
        "anyOf": [ref("TensorObject"), ref("NestedNumbers"), {"type": "number"}],
    },
    "Tensors": {"type": "object", "additionalProperties": ref("Tensor")},
    "Spec": {
        "type": "object",
        "required": ["name"],
        "properties": {"name": {"type": "string"}},
        "additionalProperties": True,
        "description": "a name from GET /v1/optimizers or /v1/schedulers and its arguments",
    },
    "CreateSession": {
        "type": "object",
        "required": ["optimizer", "params"],
        "additionalProperties": False,
        "properties": {
            "optimizer": ref("Spec"),
            "params": ref("Tensors"),
            "scheduler": {"anyOf": [ref("Spec"), {"type": "null"}]},
            "param_groups": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["params"],
                    "properties": {"params": {"type": "array", "items": {"type": "string"}}},
                },
            },
            "steps_per_epoch": {"type": "integer", "minimum": 1},
            "clip_grad_norm": {"anyOf": [{"type": "number", "exclusiveMinimum": 0}, {"type": "null"}]},
            "clip_grad_value": {"anyOf": [{"type": "number", "exclusiveMinimum": 0}, {"type": "null"}]},
            "nonfinite": {"type": "string", "enum": ["error", "skip", "allow"]},
            "metadata": _STRING_MAP,
        },
    },
    "Step": {
        "type": "object",
        "required": ["grads"],
        "additionalProperties": False,
        "properties": {
            "grads": ref("Tensors"),
            "step": {"type": "integer", "minimum": 0, "description": "must equal the session's step (409)"},
            "loss": {"type": "number"},
        },
    },
    "PutParams": {
        "type": "object",
        "required": ["params"],
        "additionalProperties": False,
        "properties": {"params": ref("Tensors")},
    },
    "TensorOut": {
        "type": "object",
        "required": ["shape", "dtype", "data"],
        "properties": {
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "dtype": {"type": "string", "enum": ["float32", "float64"]},
            "data": {
                "type": "array",
                "items": {"type": ["number", "null"]},
                "description": "row-major; NaN and Infinity (a diverged run) are null, as JSON has neither",
            },
        },
    },
    "TensorInfo": {
        "type": "object",
        "required": ["shape", "dtype"],
        "properties": {
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "dtype": {"type": "string", "enum": ["float32", "float64"]},
        },
    },
    "Lr": {"type": "array", "items": {"type": "number"}, "description": "one value per parameter group"},
    "StepResult": {
        "type": "object",
        "required": ["step", "lr", "skipped", "grad_norm"],
        "properties": {
            "step": {"type": "integer", "minimum": 0},
            "lr": ref("Lr"),
            "skipped": {"type": "boolean"},
            "grad_norm": _NUMBER_OR_NULL,
            "params": {"type": "object", "additionalProperties": ref("TensorOut")},
        },
    },
    "Params": {
        "type": "object",
        "required": ["step", "params"],
        "properties": {
            "step": {"type": "integer", "minimum": 0},
            "params": {"type": "object", "additionalProperties": ref("TensorOut")},
        },
    },
    "SessionSummary": {
        "type": "object",
        "required": ["id", "step", "lr", "created_at", "updated_at", "metadata"],
        "properties": {
            "id": {"type": "string"},
            "step": {"type": "integer", "minimum": 0},
            "lr": ref("Lr"),
            "created_at": {"type": "number"},
            "updated_at": {"type": "number"},
            "metadata": _STRING_MAP,
        },
    },
    "SessionList": _list_of("sessions", "SessionSummary"),
    "Session": {
        "type": "object",
        "required": [
            "id",
            "step",
            "lr",
            "optimizer",
            "scheduler",
            "param_groups",
            "params",
            "created_at",
            "updated_at",
            "metadata",
        ],
        "properties": {
            "id": {"type": "string"},
            "step": {"type": "integer", "minimum": 0},
            "lr": ref("Lr"),
            "optimizer": ref("Spec"),
            "scheduler": {"anyOf": [ref("Spec"), {"type": "null"}]},
            "param_groups": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["params"],
                    "properties": {"params": {"type": "array", "items": {"type": "string"}}},
                },
            },
            "params": {"type": "object", "additionalProperties": ref("TensorInfo")},
            "steps_per_epoch": {"type": "integer", "minimum": 1},
            "clip_grad_norm": _NUMBER_OR_NULL,
            "clip_grad_value": _NUMBER_OR_NULL,
            "nonfinite": {"type": "string", "enum": ["error", "skip", "allow"]},
            "created_at": {"type": "number"},
            "updated_at": {"type": "number"},
            "metadata": _STRING_MAP,
        },
    },
    "HistoryRecord": {
        "type": "object",
        "required": ["step", "lr", "loss", "grad_norm", "skipped", "time"],
        "properties": {
            "step": {"type": "integer", "minimum": 0},
            "lr": ref("Lr"),
            "loss": _NUMBER_OR_NULL,
            "grad_norm": _NUMBER_OR_NULL,
            "skipped": {"type": "boolean"},
            "time": {"type": "number"},
        },
    },
    "History": _list_of("steps", "HistoryRecord"),
    "CatalogueEntry": {
        "type": "object",
        "required": ["name", "description", "hyperparameters"],
        "properties": {
            "name": {"type": "string"},
            "description": {"type": "string"},
            "needs_metric": {"type": "boolean"},
            "hyperparameters": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name", "type", "description"],
                    "properties": {
                        "name": {"type": "string"},
                        "type": {"type": "string"},
                        "description": {"type": "string"},
                        "required": {"type": "boolean"},
                        "choices": {"type": "array"},
                    },
                },
            },
        },
    },
    "Optimizers": _list_of("optimizers", "CatalogueEntry"),
    "Schedulers": _list_of("schedulers", "CatalogueEntry"),
    "PreviewResult": {
        "type": "object",
        "required": ["lr"],
        "properties": {
            "lr": {
                "type": "array",
                "items": {"type": "array", "items": {"type": "number"}},
                "description": "per group, the lr before each step",
            }
        },
    },
    "Status": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"type": "string"}, "store": {"type": "string"}},
    },
    "Problem": {
        "type": "object",
        "description": "RFC 9457 problem details",
        "required": ["type", "title", "status", "detail"],
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer", "minimum": 400, "maximum": 599},
            "detail": {"type": "string"},
            "errors": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["field", "message"],
                    "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
                },
            },
            "current_step": {"type": "integer", "minimum": 0},
        },
    },
}

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
                SAFETENSORS: {"schema": {**BINARY, "description": binary_doc}},
                OCTET: {"schema": {**BINARY, "description": f"synonym of {SAFETENSORS}"}},
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
LIST_RESPONSE = _answer(200, "SessionList", None) | problems(*_V1, 406, 503)
SESSION_RESPONSE = _answer(200, "Session", None) | problems(*_SESSION, 406)
DELETE_RESPONSE = problems(*_SESSION)
STEP_RESPONSE = _answer(
    200,
    "StepResult",
    "the parameters; metadata step, lr (JSON list), skipped, grad_norm",
    headers={"Idempotent-Replayed": {"schema": {"type": "string", "enum": ["true"]}}},
) | problems(*_SESSION, *_BODY, 406, 409)
PARAMS_RESPONSE = _answer(200, "Params", "the parameters; metadata step") | problems(*_SESSION, 406)
PUT_PARAMS_RESPONSE = _answer(200, "Session", None) | problems(*_SESSION, *_BODY, 406)
CHECKPOINT_RESPONSE = _answer(
    200, None, "parameters, state tensors; metadata: spec, step, scheduler state"
) | problems(*_SESSION, 406)
HISTORY_RESPONSE = _answer(200, "History", None) | problems(*_SESSION, 406)
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
    "operationId": "step_v1_sessions__session_id__step_post",
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
