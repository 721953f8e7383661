"""OpenAPI 3.1 descriptions of the bodies the handlers read and write themselves (JSON and binary)."""

from __future__ import annotations

from typing import Any

PROBLEM = "application/problem+json"
SAFETENSORS = "application/vnd.safetensors"
OCTET = "application/octet-stream"


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


BINARY = {"type": "string", "format": "binary", "contentMediaType": SAFETENSORS}

COMPONENTS: dict[str, Any] = {
    "NestedNumbers": {
        "type": "array",
        "items": {"anyOf": [{"type": "number"}, ref("NestedNumbers")]},
    },
    "TensorObject": {
        "type": "object",
        "required": ["shape", "dtype", "data"],
        "additionalProperties": False,
        "properties": {
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "dtype": {"type": "string", "enum": ["float16", "float32", "float64"]},
            "data": {"type": "array", "items": {"type": "number"}},
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
            "nonfinite": {"type": "string", "enum": ["error", "skip"]},
            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    },
    "Step": {
        "type": "object",
        "required": ["grads"],
        "additionalProperties": False,
        "properties": {
            "grads": ref("Tensors"),
            "step": {"type": "integer", "minimum": 0},
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
            "shape": {"type": "array", "items": {"type": "integer"}},
            "dtype": {"type": "string", "enum": ["float32", "float64"]},
            "data": {"type": "array", "items": {"type": "number"}},
        },
    },
    "Lr": {"type": "array", "items": {"type": "number"}},
    "StepResult": {
        "type": "object",
        "required": ["step", "lr", "skipped", "grad_norm"],
        "properties": {
            "step": {"type": "integer"},
            "lr": ref("Lr"),
            "skipped": {"type": "boolean"},
            "grad_norm": {"type": ["number", "null"]},
            "params": {"type": "object", "additionalProperties": ref("TensorOut")},
        },
    },
    "Params": {
        "type": "object",
        "required": ["step", "params"],
        "properties": {
            "step": {"type": "integer"},
            "params": {"type": "object", "additionalProperties": ref("TensorOut")},
        },
    },
    "Session": {
        "type": "object",
        "required": ["id", "step", "lr", "optimizer", "param_groups", "params", "created_at", "updated_at"],
        "properties": {
            "id": {"type": "string"},
            "step": {"type": "integer"},
            "lr": ref("Lr"),
            "optimizer": {"type": "object"},
            "scheduler": {"type": ["object", "null"]},
            "param_groups": {"type": "array", "items": {"type": "object"}},
            "params": {"type": "object"},
            "created_at": {"type": "number"},
            "updated_at": {"type": "number"},
            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    },
    "Problem": {
        "type": "object",
        "required": ["type", "title", "status", "detail"],
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "errors": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
                },
            },
            "current_step": {"type": "integer"},
        },
    },
}


def _body(json_schema: str, binary_doc: str) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": ref(json_schema)},
                SAFETENSORS: {"schema": {**BINARY, "description": binary_doc}},
                OCTET: {"schema": {**BINARY, "description": f"synonym of {SAFETENSORS}"}},
            },
        }
    }


def _answer(status: int, json_schema: str | None, binary_doc: str | None) -> dict[int | str, Any]:
    content: dict[str, Any] = {}
    if json_schema:
        content["application/json"] = {"schema": ref(json_schema)}
    if binary_doc:
        content[SAFETENSORS] = {"schema": {**BINARY, "description": binary_doc}}
    return {status: {"description": "success", "content": content}}


CREATE_BODY = _body("CreateSession", "a checkpoint from GET /v1/sessions/{id}/checkpoint: restores it")
STEP_BODY = _body("Step", "the gradients; metadata `step` and `loss` optional")
PARAMS_BODY = _body("PutParams", "the parameters, same names and shapes")
SESSION_RESPONSE = _answer(200, "Session", None) | _answer(201, "Session", None)
STEP_RESPONSE = _answer(
    200, "StepResult", "the parameters; metadata step, lr (JSON list), skipped, grad_norm"
)
PARAMS_RESPONSE = _answer(200, "Params", "the parameters; metadata step")
CHECKPOINT_RESPONSE = _answer(200, None, "parameters, state tensors; metadata: spec, step, scheduler state")
