"""Tensors on the wire (contract §2): arrays <-> JSON tensor objects or safetensors bodies, and JSON bytes."""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from typing import Any, Literal

import httpx
import numpy as np
import numpy.typing as npt

from optserve import _safetensors

Array = npt.NDArray[Any]
Wire = Literal["safetensors", "json"]

JSON = "application/json"
SAFETENSORS = "application/vnd.safetensors"
PARAM_DTYPES = ("float32", "float64")
GRAD_DTYPES = ("float16", "float32", "float64")


def arrays(values: Mapping[str, npt.ArrayLike], allowed: Collection[str], what: str) -> dict[str, Array]:
    """`values` as numpy arrays, keeping their dtypes, which must be among `allowed`."""
    out: dict[str, Array] = {}
    for name, value in values.items():
        array = np.asarray(value)
        if array.dtype.name not in allowed:
            raise TypeError(
                f"{what} {name!r} has dtype {array.dtype}; optserve carries {', '.join(allowed)} "
                f"(convert it, e.g. np.asarray(x, np.float32))"
            )
        out[name] = array
    return out


def tensor_json(array: Array) -> dict[str, Any]:
    # tolist() gives Python floats, whose repr reads back to the same float16/32/64 value.
    return {"shape": list(array.shape), "dtype": array.dtype.name, "data": array.ravel().tolist()}


def tensors_from_json(obj: Mapping[str, Any]) -> dict[str, Array]:
    return {name: np.asarray(t["data"], dtype=t["dtype"]).reshape(t["shape"]) for name, t in obj.items()}


def dumps(obj: Any) -> bytes:
    try:
        return json.dumps(obj, allow_nan=False, separators=(",", ":")).encode()
    except ValueError:
        raise ValueError(
            "NaN and Infinity cannot travel as JSON; send them with wire='safetensors'"
        ) from None


def tensors_body(
    wire: Wire, tensors: Mapping[str, Array], key: str, scalars: Mapping[str, Any]
) -> tuple[bytes, str]:
    """A request body carrying `tensors` and the scalars beside them (None ones left out), and its type.
    JSON: `{key: {name: tensor}, **scalars}`; safetensors: the scalars go in `__metadata__` as strings."""
    present = {k: v for k, v in scalars.items() if v is not None}
    if wire == "safetensors":
        metadata = {k: repr(float(v)) if isinstance(v, float) else str(v) for k, v in present.items()}
        return _safetensors.encode(tensors, metadata), SAFETENSORS
    return dumps({key: {n: tensor_json(a) for n, a in tensors.items()}, **present}), JSON


def is_safetensors(response: httpx.Response) -> bool:
    media_type = str(response.headers.get("content-type", "")).split(";")[0]
    return media_type.strip().lower() == SAFETENSORS
