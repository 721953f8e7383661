"""Request envelopes (JSON or safetensors) into domain inputs, and domain results into responses."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from starlette.responses import Response

from app.optim.base import Array
from app.optim.engine import StepOutcome
from app.optim.spec import MAX_PARAMETERS
from app.wire import jsontensor, safetensors
from app.wire.common import FLOAT_DTYPES as GRAD_DTYPES
from app.wire.common import PARAM_DTYPES
from app.wire.errors import WireError
from app.wire.negotiate import JSON, SAFETENSORS

Format = Literal["json", "safetensors"]
CREATE_KEYS = (
    "optimizer",
    "params",
    "scheduler",
    "param_groups",
    "steps_per_epoch",
    "clip_grad_norm",
    "clip_grad_value",
    "nonfinite",
    "metadata",
)
STEP_KEYS = ("grads", "step", "loss")


@dataclass(frozen=True)
class StepBody:
    grads: dict[str, Array]
    step: int | None
    loss: float | None


def _object(body: Any, allowed: tuple[str, ...], what: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise WireError(f"the {what} body must be a JSON object with keys {', '.join(allowed)}")
    unknown = [k for k in body if k not in allowed]
    if unknown:
        raise WireError(f"unknown key {unknown[0]!r}; allowed: {', '.join(allowed)}", field=unknown[0])
    return body


# Members (`"name":` pairs) a JSON body may hold, counted before it is parsed: parsing holds the
# interpreter for the whole document, so a body of a million tiny members is refused while that costs a
# scan of its bytes, not a second of parsing. Each of 10,000 tensors takes at most four (its name, shape,
# dtype, data), and a spec a few hundred.
MAX_JSON_MEMBERS = 4 * MAX_PARAMETERS + 10_000


def _loads(body: bytes | bytearray | memoryview) -> Any:
    raw = np.frombuffer(body, np.uint8)
    if len(raw) > 100_000 and np.count_nonzero(raw == ord(":")) > MAX_JSON_MEMBERS:
        raise WireError(
            f"the JSON body has more than {MAX_JSON_MEMBERS} members; send large tensors as safetensors",
            status=413,
        )
    return jsontensor.loads(body)


def _tensors(value: Any, field: str, default_dtype: str, allowed: Collection[str]) -> dict[str, Array]:
    if not isinstance(value, dict):
        raise WireError("expected an object of name -> tensor", field=field)
    if len(value) > MAX_PARAMETERS:  # before decoding any: a session has no more parameters than this
        raise WireError(f"at most {MAX_PARAMETERS} tensors, got {len(value)}", field=field)
    return {
        str(name): jsontensor.decode_tensor(v, default_dtype, f"{field}.{name}", allowed)
        for name, v in value.items()
    }


def _int(value: Any, field: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise WireError(f"expected a non-negative integer, got {value!r}", field=field)
    return value


def _number(value: Any, field: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise WireError(f"expected a finite number, got {value!r}", field=field)
    return float(value)


def _meta_int(metadata: Mapping[str, str], key: str) -> int | None:
    raw = metadata.get(key)
    if raw is None:
        return None
    try:
        return _int(int(raw), key)
    except ValueError:
        raise WireError(f"metadata {key!r} must be an integer, got {raw!r}", field=key) from None


def _meta_float(metadata: Mapping[str, str], key: str) -> float | None:
    """A number from safetensors metadata; NaN and Infinity pass, for the session's nonfinite policy."""
    raw = metadata.get(key)
    if raw is None:
        return None
    try:
        return float(raw)
    except ValueError:
        raise WireError(f"metadata {key!r} must be a number, got {raw!r}", field=key) from None


def parse_create(
    body: bytes | bytearray | memoryview,
) -> tuple[dict[str, Any], dict[str, Array], dict[str, str]]:
    """A JSON create body: (options, params, metadata)."""
    data = _object(_loads(body), CREATE_KEYS, "create")
    if "params" not in data:
        raise WireError("`params` is required: an object of name -> tensor", field="params")
    params = _tensors(data.pop("params"), "params", "float32", PARAM_DTYPES)
    metadata = data.pop("metadata", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise WireError("expected an object of string -> string", field="metadata")
    return data, params, metadata


def parse_step(body: bytes | bytearray | memoryview, fmt: Format) -> StepBody:
    if fmt == "safetensors":
        grads, metadata = safetensors.decode(body, GRAD_DTYPES)
        return StepBody(grads, _meta_int(metadata, "step"), _meta_float(metadata, "loss"))
    data = _object(_loads(body), STEP_KEYS, "step")
    if "grads" not in data:
        raise WireError("`grads` is required: an object of name -> tensor", field="grads")
    grads = _tensors(data["grads"], "grads", "float64", GRAD_DTYPES)
    return StepBody(grads, _int(data.get("step"), "step"), _number(data.get("loss"), "loss"))


def parse_params(body: bytes | bytearray | memoryview, fmt: Format) -> dict[str, Array]:
    if fmt == "safetensors":
        tensors, _ = safetensors.decode(body, PARAM_DTYPES)
        return tensors
    data = _object(_loads(body), ("params",), "params")
    return _tensors(data.get("params"), "params", "float64", PARAM_DTYPES)


def json_response(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(jsontensor.dumps(data), status_code=status, media_type=JSON, headers=headers)


def safetensors_response(tensors: Mapping[str, Array], metadata: Mapping[str, str]) -> Response:
    return Response(safetensors.encode_bytes(tensors, metadata), media_type=SAFETENSORS)


def _json_tensors(tensors: Mapping[str, Array]) -> dict[str, Any]:
    return {name: jsontensor.encode_tensor(value) for name, value in tensors.items()}


def render_step(fmt: Format, return_params: bool) -> Any:
    """The step answer, built while the session still holds exactly this step's parameters."""

    def render(outcome: StepOutcome, params: Mapping[str, Array], replayed: bool) -> Response:
        grad_norm = None if outcome.skipped or math.isnan(outcome.grad_norm) else outcome.grad_norm
        headers = {"Idempotent-Replayed": "true"} if replayed else None
        shown = params if return_params else {}
        if fmt == "safetensors":
            metadata = {
                "step": str(outcome.step),
                "lr": jsontensor.dumps(outcome.lr).decode(),
                "skipped": "true" if outcome.skipped else "false",
                "grad_norm": "null" if grad_norm is None else repr(grad_norm),
            }
            response = safetensors_response(shown, metadata)
            response.headers.update(headers or {})
            return response
        body = {
            "step": outcome.step,
            "lr": outcome.lr,
            "skipped": outcome.skipped,
            "grad_norm": grad_norm,
        }
        if return_params:
            body["params"] = _json_tensors(shown)
        return json_response(body, headers=headers)

    return render


def render_params(fmt: Format) -> Any:
    def render(step: int, params: Mapping[str, Array]) -> Response:
        if fmt == "safetensors":
            return safetensors_response(params, {"step": str(step)})
        return json_response({"step": step, "params": _json_tensors(params)})

    return render


def render_checkpoint(tensors: Mapping[str, Array], metadata: dict[str, str]) -> Response:
    return safetensors_response(tensors, metadata)
