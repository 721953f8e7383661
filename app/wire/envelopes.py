"""Request envelopes: the JSON create, step and parameters bodies, parsed and checked into plain values
and arrays. Light to import (no numerics, no HTTP), because large bodies are parsed in worker processes
(`app.api.offload`) that load only this."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from app.optim.limits import MAX_NAME_LENGTH, MAX_PARAMETERS
from app.values import immutable
from app.wire import jsontensor
from app.wire.common import FLOAT_DTYPES as GRAD_DTYPES
from app.wire.common import PARAM_DTYPES
from app.wire.errors import WireError

Array = npt.NDArray[Any]
CREATE_KEYS = (
    "optimizer",
    "params",
    "scheduler",
    "param_groups",
    "steps_per_epoch",
    "clip_grad_norm",
    "clip_grad_value",
    "nonfinite",
    "aggregation",
    "metadata",
)
SPEC_KEYS = tuple(k for k in CREATE_KEYS if k != "params")
STEP_KEYS = ("grads", "step", "loss", "worker", "weight")
# A safetensors create carries its parameters as tensors and the rest of the create body, as JSON, in
# this metadata key (a checkpoint carries `optserve.checkpoint` instead).
CREATE_KEY = "optserve.create"
Buffer = bytes | bytearray | memoryview


@immutable
class StepBody:
    grads: dict[str, Array]
    step: int | None
    loss: float | None
    worker: str | None = None  # a synchronous round's contributor
    weight: float | None = None  # its weight, for reduce 'weighted_mean'


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


def refuse_more_than(body: Buffer, separator: str, limit: int, what: str) -> None:
    """413 if `body` holds more than `limit` of `separator` (`:` counts members, `,` items): a scan of its
    bytes, before a parse that would hold the interpreter for all of them."""
    raw = np.frombuffer(body, np.uint8)
    if len(raw) > 100_000 and np.count_nonzero(raw == ord(separator)) > limit:
        raise WireError(f"the JSON body has more than {limit} {what}", status=413)


def _loads(body: Buffer) -> Any:
    refuse_more_than(body, ":", MAX_JSON_MEMBERS, "members; send large tensors as safetensors")
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


def _weight(value: float | None) -> float | None:
    """A contribution's weight: a finite number above 0, or absent."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise WireError(f"expected a finite number above 0, got {value!r}", field="weight")
    return value


def _worker(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_NAME_LENGTH:
        raise WireError(
            f"expected a worker id of 1 to {MAX_NAME_LENGTH} characters, got {value!r}"[:200], field="worker"
        )
    return value


def step_of_metadata(grads: dict[str, Array], metadata: Mapping[str, str]) -> StepBody:
    """A safetensors step: `step`, `loss`, `worker` and `weight` travel in `__metadata__`, as strings."""
    return StepBody(
        grads,
        _meta_int(metadata, "step"),
        _meta_float(metadata, "loss"),
        _worker(metadata.get("worker")),
        _weight(_meta_float(metadata, "weight")),
    )


def _create_options(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    metadata = data.pop("metadata", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise WireError("expected an object of string -> string", field="metadata")
    return data, metadata


def parse_create(body: Buffer) -> tuple[dict[str, Any], dict[str, Array], dict[str, str]]:
    """A JSON create body: (options, params, metadata)."""
    data = _object(_loads(body), CREATE_KEYS, "create")
    if "params" not in data:
        raise WireError("`params` is required: an object of name -> tensor", field="params")
    params = _tensors(data.pop("params"), "params", "float32", PARAM_DTYPES)
    options, metadata = _create_options(data)
    return options, params, metadata


def parse_create_spec(metadata: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The spec of a safetensors create, `__metadata__[CREATE_KEY]`: (options, metadata)."""
    unknown = sorted(set(metadata) - {CREATE_KEY})
    if unknown:
        raise WireError(
            f"unknown __metadata__ key {unknown[0]!r}: a create carries only {CREATE_KEY!r}", field=unknown[0]
        )
    data = _object(_loads(metadata[CREATE_KEY].encode()), SPEC_KEYS, f"{CREATE_KEY!r} spec")
    return _create_options(data)


def parse_step(body: Buffer) -> StepBody:
    """A JSON step body."""
    data = _object(_loads(body), STEP_KEYS, "step")
    if "grads" not in data:
        raise WireError("`grads` is required: an object of name -> tensor", field="grads")
    grads = _tensors(data["grads"], "grads", "float64", GRAD_DTYPES)
    return StepBody(
        grads,
        _int(data.get("step"), "step"),
        _number(data.get("loss"), "loss"),
        _worker(data.get("worker")),
        _weight(_number(data.get("weight"), "weight")),
    )


def parse_params(body: Buffer) -> dict[str, Array]:
    """A JSON parameters body."""
    data = _object(_loads(body), ("params",), "params")
    return _tensors(data.get("params"), "params", "float64", PARAM_DTYPES)
