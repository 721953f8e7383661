"""A small codec of safetensors (https://github.com/huggingface/safetensors), the binary wire format: an
8-byte little-endian header length, a JSON header of `__metadata__` and tensor entries, the data buffer."""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

Array = npt.NDArray[Any]
Buffer = bytes | bytearray | memoryview

_PREFIX = struct.Struct("<Q")
_METADATA = "__metadata__"
_TO_NUMPY: dict[str, np.dtype[Any]] = {"F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "F64": np.dtype("<f8")}
_FROM_NUMPY = {dtype.name: name for name, dtype in _TO_NUMPY.items()}


class FormatError(ValueError):
    """A body that is not a safetensors file this codec can read."""


def encode(tensors: Mapping[str, Array], metadata: Mapping[str, str] | None = None) -> bytes:
    """One body; each tensor's bytes are copied once, straight into it."""
    return b"".join(encode_parts(tensors, metadata))


def encode_parts(tensors: Mapping[str, Array], metadata: Mapping[str, str] | None = None) -> list[Buffer]:
    """The body as buffers to send one after the other, without joining them: the length prefix and header,
    then each tensor's bytes, a view of the array itself when it is already little-endian and C-contiguous
    (else of a converted copy).

    As the reference writer does, tensors go in order of descending itemsize then name, which keeps every
    tensor aligned for its dtype, and the header is padded with spaces to a multiple of 8 bytes.
    """
    arrays: dict[str, Array] = {}
    for name, value in tensors.items():
        if value.dtype.name not in _FROM_NUMPY:
            raise TypeError(f"tensor {name!r} has dtype {value.dtype}; only {', '.join(_FROM_NUMPY)} travel")
        arrays[name] = np.asarray(value, dtype=value.dtype.newbyteorder("<"), order="C")
    order = sorted(arrays, key=lambda name: (-arrays[name].itemsize, name))
    header: dict[str, Any] = {_METADATA: dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        array = arrays[name]
        header[name] = {
            "dtype": _FROM_NUMPY[array.dtype.name],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    head = orjson.dumps(header)
    head += b" " * (-len(head) % 8)
    parts: list[Buffer] = [_PREFIX.pack(len(head)) + head]
    parts += [arrays[name].reshape(-1).view(np.uint8).data for name in order if arrays[name].size]
    return parts


def _entry(name: str, entry: Any, data_len: int) -> tuple[np.dtype[Any], tuple[int, ...], int, int]:
    if not isinstance(entry, dict) or entry.get("dtype") not in _TO_NUMPY:
        raise FormatError(f"tensor {name!r}: expected dtype one of {', '.join(_TO_NUMPY)}")
    dtype = _TO_NUMPY[entry["dtype"]]
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise FormatError(f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise FormatError(f"tensor {name!r}: data_offsets {offsets!r} are not two integers")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len or end - begin != math.prod(shape) * dtype.itemsize:
        raise FormatError(f"tensor {name!r}: data_offsets {offsets!r} do not fit shape {shape} in the body")
    return dtype, tuple(shape), begin, end


def decode(body: Buffer, owned: bool = False) -> tuple[dict[str, Array], dict[str, str]]:
    """`({name: array}, metadata)`. The arrays are writable views into one copy of `body`, so that callers
    (and `torch.from_numpy`) may use them freely; a tensor misaligned for its dtype is copied on its own.
    `owned`: `body` is a writable buffer that nothing else will use (as the fast transports hand over): the
    arrays are views of it, no copy at all."""
    if len(body) < _PREFIX.size:
        raise FormatError(f"a safetensors body is at least 8 bytes long, this one is {len(body)}")
    (header_len,) = _PREFIX.unpack_from(body)
    start = _PREFIX.size + header_len
    if start > len(body):
        raise FormatError(f"the header claims {header_len} bytes but the body has {len(body) - 8} after it")
    try:
        header = orjson.loads(body[_PREFIX.size : start])
    except ValueError as exc:
        raise FormatError(f"the header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise FormatError("the header is not a JSON object")
    metadata = header.pop(_METADATA, None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError("__metadata__ is not an object of strings")
    buffer = body if owned and not memoryview(body).readonly else bytearray(body)
    tensors: dict[str, Array] = {}
    for name, entry in header.items():
        dtype, shape, begin, end = _entry(name, entry, len(body) - start)
        array = np.frombuffer(buffer, dtype, (end - begin) // dtype.itemsize, start + begin)
        tensors[name] = (array if array.flags.aligned else array.copy()).reshape(shape)
    return tensors, metadata
