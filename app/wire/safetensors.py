"""A strict, zero-copy codec of the safetensors format (https://github.com/huggingface/safetensors).

Layout: an 8-byte little-endian u64 N, N bytes of JSON header, then the data buffer that the header's
`data_offsets` index into. Decoding trusts nothing in the body and allocates nothing based on its sizes.
"""

from __future__ import annotations

import functools
import json
import math
import struct
from collections import Counter
from collections.abc import Collection, Mapping
from typing import Any, NoReturn

import numpy as np
import numpy.typing as npt
import orjson

from app.wire.common import FLOAT_DTYPES, describe, shape_error, show
from app.wire.errors import WireError

Array = npt.NDArray[Any]

# The reference implementation refuses headers above 100 MB; we refuse them above 16 MiB, before reading
# them: a checkpoint of 10,000 parameters with five slots each and 256-character names stays under it,
# and parsing that much JSON holds the interpreter for a fraction of a second, not for seconds.
MAX_HEADER_BYTES = 16 << 20

_PREFIX = struct.Struct("<Q")
_METADATA_KEY = "__metadata__"
_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})

# safetensors name -> little-endian numpy dtype, for the ones we carry.
_TO_NUMPY: dict[str, np.dtype[Any]] = {
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
}
_ST_NAMES: dict[np.dtype[Any], str] = {dt: st for st, dt in _TO_NUMPY.items()}


def _unparsable(detail: str) -> NoReturn:
    raise WireError(f"malformed safetensors body: {detail}", status=400)


def _invalid(detail: str, name: str | None = None) -> NoReturn:
    raise WireError(f"invalid safetensors body: {detail}", status=422, field=name)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        duplicate = next(key for key, count in Counter(key for key, _ in pairs).items() if count > 1)
        _invalid(
            f"the header repeats the key {show(duplicate)}; every tensor name and entry key must be unique"
        )
    return obj


def _reject_constant(token: str) -> NoReturn:
    raise ValueError(f"{token} is not JSON")


def _parse_header(text: str) -> dict[str, Any]:
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_reject_constant)
    except WireError:
        raise
    except RecursionError:
        _unparsable("the JSON header is nested too deeply")
    except ValueError as exc:  # JSONDecodeError, and int strings beyond Python's digit limit
        _unparsable(f"the header is not valid JSON ({exc})")
    if not isinstance(header, dict):
        _invalid(f"the header must be a JSON object of tensor entries, not {type(header).__name__}")
    return header


def _canonical_header(header: bytes | bytearray | memoryview) -> dict[str, Any] | None:
    """The header as `_parse_header` reads it, when it is an object in compact JSON that orjson writes back
    to the same bytes (the reference writer's form, and our clients'), else None. The same bytes back is
    the proof that no key repeats (orjson keeps one of two equal keys, so writing back would be shorter)
    and that nothing non-standard is in it; anything else takes the strict parser, which says what is
    wrong. The common header costs ~1 us this way against ~6 us."""
    raw = bytes(header).rstrip(b" ")
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if type(parsed) is not dict or orjson.dumps(parsed) != raw:
        return None
    return parsed


def _parse_metadata(value: object) -> dict[str, str]:
    # The reference reader treats `"__metadata__": null` as absent, so we accept it too.
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        _invalid("__metadata__ must be a JSON object whose values are all strings", _METADATA_KEY)
    return value


def _parse_entry(
    name: str, entry: object, data_len: int, allowed_st: Collection[str]
) -> tuple[np.dtype[Any], tuple[int, ...], int, int]:
    if not isinstance(entry, dict):
        _invalid(f"tensor {show(name)} must be an object with dtype, shape and data_offsets", name)
    if entry.keys() != _ENTRY_KEYS:
        missing = sorted(_ENTRY_KEYS - entry.keys())
        extra = sorted(entry.keys() - _ENTRY_KEYS)
        _invalid(
            f"tensor {show(name)} must have exactly the keys dtype, shape and data_offsets "
            f"(missing: {show(missing)}, unexpected: {show(extra)})",
            name,
        )

    st_dtype = entry["dtype"]
    if not isinstance(st_dtype, str) or st_dtype not in allowed_st:
        _invalid(
            f"tensor {show(name)} has unsupported dtype {show(st_dtype)}; allowed: {describe(allowed_st)}",
            name,
        )
    dtype = _TO_NUMPY[st_dtype]

    shape = entry["shape"]
    problem = shape_error(shape, dtype.itemsize)
    if problem:
        _invalid(f"tensor {show(name)}: {problem}", name)

    offsets = entry["data_offsets"]
    # type(o) is int: JSON true/false are Python bools, an int subclass.
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and type(offsets[0]) is int
        and type(offsets[1]) is int
    ):
        _invalid(
            f"tensor {show(name)} has data_offsets {show(offsets)}; expected two integers [begin, end]", name
        )
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        _invalid(
            f"tensor {show(name)} has data_offsets {show(offsets)}; they must satisfy "
            f"0 <= begin <= end <= {data_len}, the size of the data buffer",
            name,
        )
    # Python ints cannot overflow, and comparing with end - begin (at most the body's size) bounds any shape.
    nbytes = math.prod(shape) * dtype.itemsize
    if end - begin != nbytes:
        # nbytes is not printed: a hostile shape can make it too long for int -> str.
        _invalid(
            f"tensor {show(name)} has shape {show(shape)} of {st_dtype} ({dtype.itemsize} bytes each), which "
            f"does not match its data_offsets [{begin}, {end}] spanning {end - begin} bytes",
            name,
        )
    return dtype, tuple(shape), begin, end


@functools.lru_cache(maxsize=16)
def _safetensors_names(allowed_dtypes: frozenset[str]) -> frozenset[str]:
    """The safetensors dtype names of numpy dtype names (cached: dtype.name is slow on the step path)."""
    return frozenset(st for st, dtype in _TO_NUMPY.items() if dtype.name in allowed_dtypes)


Entry = tuple[np.dtype[Any], tuple[int, ...], int, int]  # dtype, shape, begin, end (in the data buffer)


def header_end(body: bytes | bytearray | memoryview) -> int:
    """Where the header ends and the data begins, from the 8-byte length prefix (checked, not parsed)."""
    buf = memoryview(body).cast("B")
    if len(buf) < 8:
        _unparsable(f"it is {len(buf)} bytes long, shorter than the 8-byte header length that starts it")
    header_len: int = _PREFIX.unpack_from(buf)[0]
    if header_len > MAX_HEADER_BYTES:
        _unparsable(f"the header length is {header_len} bytes; at most {MAX_HEADER_BYTES} are allowed")
    if 8 + header_len > len(buf):
        _unparsable(
            f"the header length is {header_len} bytes but only {len(buf) - 8} follow the length prefix"
        )
    return 8 + header_len


def read_header(
    header: bytes | bytearray | memoryview,
    data_len: int,
    allowed_dtypes: Collection[str] = FLOAT_DTYPES,
    max_tensors: int | None = None,
) -> tuple[dict[str, Entry], dict[str, str]]:
    """The header's tensor entries and metadata, every entry checked against a data buffer of `data_len`
    bytes: the part of decoding that costs in proportion to the header (a long one is parsed off the
    event loop). More than `max_tensors` tensors are refused before any is looked at."""
    parsed = _canonical_header(header)
    if parsed is None:
        try:
            text = str(header, "utf-8")
        except UnicodeDecodeError as exc:
            _unparsable(f"the header is not valid UTF-8 ({exc.reason} at byte {exc.start})")
        parsed = _parse_header(text)
    metadata = _parse_metadata(parsed.pop(_METADATA_KEY, None))
    if max_tensors is not None and len(parsed) > max_tensors:
        _invalid(f"the header describes {len(parsed)} tensors; at most {max_tensors} are allowed here")
    allowed_st = _safetensors_names(frozenset(allowed_dtypes))
    entries = {name: _parse_entry(name, entry, data_len, allowed_st) for name, entry in parsed.items()}

    # As the reference reader does, require the tensors to tile the data buffer exactly: no overlap (two
    # tensors aliasing the same bytes), no gap and no trailing bytes (data nobody declared).
    position, previous = 0, None
    tiles = entries.items() if len(entries) == 1 else sorted(entries.items(), key=lambda item: item[1][2:])
    for name, (_, _, begin, end) in tiles:
        if begin < position:
            _invalid(f"tensors {show(previous)} and {show(name)} have overlapping data_offsets", name)
        if begin > position:
            _invalid(
                f"no tensor covers bytes [{position}, {begin}) of the data buffer before {show(name)}", name
            )
        position, previous = end, name
    if position != data_len:
        _invalid(f"the data buffer has {data_len - position} trailing bytes that no tensor covers")
    return entries, metadata


def tensors_at(
    body: bytes | bytearray | memoryview, data_start: int, entries: dict[str, Entry]
) -> dict[str, Array]:
    """The tensors `entries` describe, as views into `body` (a misaligned one is copied: numpy handles
    unaligned arrays, but every operation on them takes a slow path)."""
    buf = memoryview(body).cast("B")
    tensors: dict[str, Array] = {}
    for name, (dtype, shape, begin, end) in entries.items():
        array = np.frombuffer(
            buf, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=data_start + begin
        )
        if not array.flags.aligned:
            array = array.copy()
            array.flags.writeable = not buf.readonly
        tensors[name] = array if len(shape) == 1 else array.reshape(shape)  # frombuffer's is 1-D
    return tensors


def decode(
    body: bytes | bytearray | memoryview, allowed_dtypes: Collection[str] = FLOAT_DTYPES
) -> tuple[dict[str, Array], dict[str, str]]:
    """Parse a safetensors body into `({name: array}, metadata)`, validating everything.

    `allowed_dtypes` holds numpy names (`float16`, `float32`, `float64`). Arrays are views into `body`
    (read-only when `body` is read-only), except that a misaligned tensor is copied. `body` must be
    C-contiguous. Every failure is a `WireError`: 400 when the framing or the JSON cannot be read, 422 when
    the header describes an invalid or unsupported content.
    """
    start = header_end(body)
    buf = memoryview(body).cast("B")
    entries, metadata = read_header(buf[8:start], len(buf) - start, allowed_dtypes)
    return tensors_at(buf, start, entries), metadata


def _le_contiguous(name: object, array: npt.ArrayLike) -> Array:
    if not isinstance(name, str) or name == _METADATA_KEY:
        raise ValueError(f"tensor names must be strings other than {_METADATA_KEY!r}, not {show(name)}")
    arr = np.asarray(array)
    # Dict lookups, not dtype.name, which is slow enough to matter with thousands of tensors.
    if arr.dtype not in _ST_NAMES:
        if arr.dtype.kind != "f" or arr.dtype.itemsize not in (2, 4, 8):
            raise ValueError(
                f"tensor {show(name)} has dtype {arr.dtype}; only {describe(FLOAT_DTYPES)} can be encoded"
            )
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    if not arr.flags.c_contiguous:
        arr = np.array(arr, order="C")
    return arr


def encode(
    tensors: Mapping[str, npt.ArrayLike], metadata: Mapping[str, str] | None = None
) -> list[bytes | memoryview]:
    """Serialize to parts a server can stream without joining: the length prefix and header, then each
    tensor's bytes as a zero-copy view of the array (copied only if it is not C-contiguous little-endian).

    Order and header bytes follow the reference writer: tensors sorted by descending dtype size then by
    name (which keeps every tensor aligned for its dtype), `__metadata__` first, the header padded with
    spaces to a multiple of 8 bytes. Empty tensors contribute no part.
    """
    arrays = {name: _le_contiguous(name, array) for name, array in tensors.items()}
    order = list(arrays) if len(arrays) < 2 else sorted(arrays, key=lambda n: (-arrays[n].dtype.itemsize, n))

    header: dict[str, Any] = {}
    if metadata is not None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("safetensors metadata must map strings to strings")
        header[_METADATA_KEY] = dict(metadata)
    offset = 0
    parts: list[bytes | memoryview] = []
    for name in order:
        arr = arrays[name]
        header[name] = {
            "dtype": _ST_NAMES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
        if arr.nbytes:
            parts.append(arr.reshape(-1).view(np.uint8).data)

    header_bytes = orjson.dumps(header)
    header_bytes += b" " * (-len(header_bytes) % 8)
    parts.insert(0, _PREFIX.pack(len(header_bytes)) + header_bytes)
    return parts


def encode_bytes(tensors: Mapping[str, npt.ArrayLike], metadata: Mapping[str, str] | None = None) -> bytes:
    """The whole body as one `bytes` (copying the data once); prefer `encode` when parts can be streamed."""
    return b"".join(encode(tensors, metadata))


def encoded_size(parts: list[bytes | memoryview]) -> int:
    """Total byte length of `encode`'s parts, for a Content-Length."""
    return sum(part.nbytes if isinstance(part, memoryview) else len(part) for part in parts)
