"""Tensors on the wire (contract §2): arrays <-> JSON tensor objects or safetensors bodies, and JSON bytes."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any, Literal

import httpx
import numpy as np
import numpy.typing as npt
import orjson

from optserve import _safetensors
from optserve.transport import BODY_EXTENSION, BufferStream

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
    """`data` is a flat float64 array that `dumps` writes natively: the shortest decimal that reads back to
    the same double, which is exactly the float16/32 value. (orjson writes a float32 array as the shortest
    decimal of the float32 itself, which is shorter, but a reader that parses it as a double and then rounds
    to float32, as the server does, gets a neighbour for two values: +-7.038531e-26.)"""
    data = np.ascontiguousarray(array, dtype=np.float64).reshape(-1)  # no copy for a C-contiguous float64
    return {"shape": list(array.shape), "dtype": array.dtype.name, "data": data}


def tensors_from_json(obj: Mapping[str, Any]) -> dict[str, Array]:
    return {name: _array(t["data"], np.dtype(t["dtype"])).reshape(t["shape"]) for name, t in obj.items()}


def _array(data: Any, dtype: np.dtype[Any]) -> Array:
    if type(data) is list:  # the contract's flat list of numbers: fromiter is the fastest reader
        try:
            return np.fromiter(data, dtype, len(data))
        except (TypeError, ValueError):  # null (NaN on the server; np.asarray reads it so), nesting
            pass
    return np.asarray(data, dtype)


def _check_finite(obj: Any) -> None:
    if isinstance(obj, np.ndarray):
        finite = bool(np.isfinite(obj).all())
    elif isinstance(obj, float | np.floating):
        finite = math.isfinite(obj)
    else:
        if isinstance(obj, Mapping):
            for value in obj.values():
                _check_finite(value)
        elif isinstance(obj, list | tuple):
            for value in obj:
                _check_finite(value)
        return
    if not finite:
        raise ValueError("NaN and Infinity cannot travel as JSON; send them with wire='safetensors'")


def dumps(obj: Any) -> bytes:
    """Compact JSON, numpy arrays written natively by orjson (which would write NaN and Infinity as null:
    refused here, as JSON has neither)."""
    _check_finite(obj)
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)


def tensors_body(
    wire: Wire, tensors: Mapping[str, Array], key: str, scalars: Mapping[str, Any]
) -> tuple[bytes | BufferStream, str]:
    """A request body carrying `tensors` and the scalars beside them (None ones left out), and its type.
    JSON: `{key: {name: tensor}, **scalars}`; safetensors: the scalars go in `__metadata__` as strings, and
    the body is a `BufferStream` of views of the arrays, joined only if the transport needs it."""
    present = {k: v for k, v in scalars.items() if v is not None}
    if wire == "safetensors":
        metadata = {k: repr(float(v)) if isinstance(v, float) else str(v) for k, v in present.items()}
        return BufferStream(_safetensors.encode_parts(tensors, metadata)), SAFETENSORS
    return dumps({key: {n: tensor_json(a) for n, a in tensors.items()}, **present}), JSON


def is_safetensors(response: httpx.Response) -> bool:
    media_type = str(response.headers.get("content-type", "")).split(";")[0]
    return media_type.strip().lower() == SAFETENSORS


def handed_over(response: httpx.Response) -> memoryview | None:
    """The body a fast transport received into a buffer of its own and handed over (see `transport`)."""
    body: memoryview | None = response.extensions.get(BODY_EXTENSION)
    return body


def content(response: httpx.Response) -> bytes | memoryview:
    body = handed_over(response)
    return response.content if body is None else body


def loads(response: httpx.Response) -> Any:
    """The answer's JSON body."""
    return orjson.loads(content(response))


def safetensors_answer(response: httpx.Response) -> tuple[dict[str, Array], dict[str, str]]:
    """A safetensors answer's tensors and metadata; the arrays are views of the handed-over body when there
    is one (no copy), else of one copy of `content`."""
    body = handed_over(response)
    if body is None:
        return _safetensors.decode(response.content)
    return _safetensors.decode(body, owned=True)
