"""The safetensors codec: round trips, byte-compatibility with the reference package, zero copy, and
hostile bodies that must all end in a WireError (400 or 422), never in another exception."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors
import safetensors.numpy as reference
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from app.wire import safetensors as codec
from app.wire.common import PARAM_DTYPES
from app.wire.errors import WireError

DTYPES = [np.float16, np.float32, np.float64]
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def frame(header: Any, data: bytes = b"", *, raw: bytes | None = None) -> bytes:
    """A body with `header` (a JSON value, or `raw` header bytes) and `data`, padded as the reference pads."""
    text = raw if raw is not None else json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def entry(dtype: Any, shape: Any, begin: Any, end: Any) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def decode_or_wire_error(body: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]] | None:
    """Decode, allowing only success or a WireError with a 400/422 status and a message."""
    try:
        return codec.decode(body)
    except WireError as exc:
        error = exc
    assert error.status in (400, 422)
    assert error.detail
    return None


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name


def sample_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "w": rng.standard_normal((3, 4)).astype(np.float32),
        "b": rng.standard_normal(4),
        "h": rng.standard_normal((2, 2, 2)).astype(np.float16),
        "scalar": np.array(2.5, np.float32),
        "empty": np.zeros((0, 3), np.float64),
        "layer.0.weight": np.arange(7, dtype=np.float16),
    }


tensor_dicts = st.dictionaries(
    st.text(min_size=0, max_size=12).filter(lambda s: s != "__metadata__"),
    st.sampled_from(DTYPES).flatmap(
        lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
    ),
    max_size=8,
)


# Round trips and compatibility


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (1,), (5,), (2, 3), (2, 0, 4), (1, 1, 1, 1)])
def test_round_trip_each_dtype_and_shape(dtype: type, shape: tuple[int, ...]) -> None:
    array: np.ndarray = np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)
    tensors, metadata = codec.decode(codec.encode_bytes({"t": array}))
    assert metadata == {}
    assert tensors["t"].dtype == np.dtype(dtype)
    assert tensors["t"].shape == shape
    np.testing.assert_array_equal(tensors["t"], array)


def test_round_trip_many_tensors_and_metadata() -> None:
    rng = np.random.default_rng(1)
    arrays = {f"p{i}": rng.standard_normal(i % 7).astype(DTYPES[i % 3]) for i in range(500)}
    metadata = {"step": "12", "lr": "[0.001, 0.002]", "note": "ünïcode ✓"}
    tensors, meta = codec.decode(codec.encode_bytes(arrays, metadata))
    assert_same(tensors, arrays)
    assert meta == metadata


def test_encode_is_byte_identical_to_reference() -> None:
    arrays = sample_tensors()
    assert codec.encode_bytes(arrays) == reference.save(arrays)
    assert codec.encode_bytes(arrays, {"step": "3"}) == reference.save(arrays, metadata={"step": "3"})
    assert codec.encode_bytes({}) == reference.save({}) == b"\x08" + b"\x00" * 7 + b"{}      "


def test_reference_reads_ours_including_metadata(tmp_path: Path) -> None:
    arrays = sample_tensors()
    metadata = {"step": "7", "loss": "0.25"}
    body = codec.encode_bytes(arrays, metadata)
    assert_same(reference.load(body), arrays)
    path = tmp_path / "ours.safetensors"
    path.write_bytes(body)
    with safetensors.safe_open(str(path), framework="numpy") as f:
        assert f.metadata() == metadata


def test_we_read_the_reference() -> None:
    arrays = sample_tensors()
    tensors, metadata = codec.decode(reference.save(arrays, metadata={"a": "1", "b": "2"}))
    assert_same(tensors, arrays)
    assert metadata == {"a": "1", "b": "2"}


@FUZZ
@given(tensor_dicts)
def test_hypothesis_round_trip_and_compatibility(arrays: dict[str, np.ndarray]) -> None:
    ours = codec.encode_bytes(arrays)
    assert ours == reference.save(arrays)
    assert_same(codec.decode(ours)[0], arrays)
    assert_same(reference.load(ours), arrays)
    parts = codec.encode(arrays)
    assert codec.encoded_size(parts) == len(ours)


def test_encode_orders_by_dtype_size_then_name_and_aligns_every_tensor() -> None:
    arrays: dict[str, np.ndarray] = {
        "a": np.ones(1, np.float16),
        "b": np.ones(3, np.float32),
        "c": np.ones(1, np.float64),
    }
    body = codec.encode_bytes(arrays)
    header_len = struct.unpack_from("<Q", body)[0]
    assert header_len % 8 == 0
    header = json.loads(body[8 : 8 + header_len])
    assert list(header) == ["c", "b", "a"]
    for name, info in header.items():
        assert info["data_offsets"][0] % np.dtype(arrays[name].dtype).itemsize == 0


def test_encode_converts_non_contiguous_and_big_endian_arrays() -> None:
    base = np.arange(24, dtype=np.float64).reshape(4, 6)
    arrays = {
        "strided": base[:, ::2],
        "transposed": base.T,
        "big": np.arange(5, dtype=">f4"),
        "fortran": np.asfortranarray(base.astype(np.float16)),
    }
    tensors, _ = codec.decode(codec.encode_bytes(arrays))
    for name, array in arrays.items():
        np.testing.assert_array_equal(tensors[name], array)
        assert tensors[name].dtype == array.dtype.newbyteorder("<")


@pytest.mark.parametrize(
    ("tensors", "metadata"),
    [
        ({"i": np.arange(3)}, None),
        ({"b": np.ones(2, bool)}, None),
        ({"__metadata__": np.ones(2, np.float32)}, None),
        ({1: np.ones(2, np.float32)}, None),
        ({"x": np.ones(2, np.float32)}, {"step": 3}),
    ],
)
def test_encode_rejects_what_the_format_or_contract_cannot_carry(tensors: Any, metadata: Any) -> None:
    # A programming error on our side, deliberately not a WireError.
    with pytest.raises(ValueError, match=r"dtype|names|metadata") as info:
        codec.encode(tensors, metadata)
    assert not isinstance(info.value, WireError)


# Zero copy


def test_decode_returns_read_only_views_into_a_bytes_body() -> None:
    body = codec.encode_bytes(sample_tensors())
    tensors, _ = codec.decode(body)
    raw = np.frombuffer(body, np.uint8)
    for name, array in tensors.items():
        if array.size:
            assert np.shares_memory(array, raw), name
        assert not array.flags.writeable
        assert array.flags.aligned


def test_decode_returns_writable_views_into_a_bytearray_or_memoryview() -> None:
    body = bytearray(codec.encode_bytes({"w": np.ones(4, np.float32)}))
    for source in (body, memoryview(body)):
        tensors, _ = codec.decode(source)
        assert tensors["w"].flags.writeable
        assert np.shares_memory(tensors["w"], np.frombuffer(body, np.uint8))
    tensors["w"][0] = 5.0
    assert codec.decode(bytes(body))[0]["w"][0] == 5.0


def test_encode_parts_are_views_of_the_arrays() -> None:
    arrays: dict[str, np.ndarray] = {"w": np.ones((64, 64), np.float32), "b": np.zeros(64, np.float64)}
    parts = codec.encode(arrays)
    assert isinstance(parts[0], bytes)
    views = [np.frombuffer(part, np.uint8) for part in parts[1:]]
    assert len(views) == 2
    for array in arrays.values():
        assert sum(np.shares_memory(view, array) for view in views) == 1


def test_unaligned_tensor_is_copied_into_an_aligned_array() -> None:
    # A valid body no reference writer makes: a float64 at data offset 4.
    header = {"a": entry("F32", [1], 0, 4), "b": entry("F64", [2], 4, 20)}
    data = np.array([1.5], "<f4").tobytes() + np.array([2.5, -3.0], "<f8").tobytes()
    body = frame(header, data)
    tensors, _ = codec.decode(body)
    np.testing.assert_array_equal(tensors["b"], [2.5, -3.0])
    assert tensors["b"].flags.aligned
    assert not np.shares_memory(tensors["b"], np.frombuffer(body, np.uint8))
    assert not tensors["b"].flags.writeable  # as read-only as the views of a bytes body
    assert np.shares_memory(tensors["a"], np.frombuffer(body, np.uint8))


def test_allowed_dtypes_restricts_what_is_accepted() -> None:
    body = codec.encode_bytes({"g": np.ones(2, np.float16)})
    with pytest.raises(WireError) as info:
        codec.decode(body, allowed_dtypes=PARAM_DTYPES)
    assert info.value.status == 422
    assert info.value.field == "g"
    assert "F16" in info.value.detail
    assert "F32, F64" in info.value.detail


# Malformed bodies, case by case

F32_4 = b"\x00" * 16  # room for four float32


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"", 400, "shorter than the 8-byte"),
        (b"\x08\x00\x00", 400, "shorter than the 8-byte"),
        (struct.pack("<Q", 64) + b"{}", 400, "only 2 follow"),
        (struct.pack("<Q", 2**64 - 1) + b"{}", 400, "at most 16777216"),
        (struct.pack("<Q", 100_000_001) + b"{}", 400, "at most 16777216"),
        (frame(None, raw=b'{"\xff":1}'), 400, "UTF-8"),
        (frame(None, raw=b"{not json}"), 400, "not valid JSON"),
        (frame(None, raw=b'{"a":NaN}'), 400, "not valid JSON"),
        (frame(None, raw=b"{}x"), 400, "not valid JSON"),
        (frame(None, raw=b"\x00" * 8), 400, "not valid JSON"),
        (frame(None, raw=b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"), 400, "nested too deeply"),
        (frame(None, raw=b'{"a":{"shape":[' + b"9" * 5000 + b"]}}"), 400, "not valid JSON"),
        (frame([1, 2]), 422, "must be a JSON object"),
        (frame({"a": [1]}), 422, "must be an object"),
        (frame({"a": {"dtype": "F32", "shape": [4]}}, F32_4), 422, "missing: ['data_offsets']"),
        (frame({"a": {**entry("F32", [4], 0, 16), "x": 1}}, F32_4), 422, "unexpected: ['x']"),
        (frame({"a": entry("BF16", [8], 0, 16)}, F32_4), 422, "'BF16'"),
        (frame({"a": entry("I64", [2], 0, 16)}, F32_4), 422, "'I64'"),
        (frame({"a": entry("F128", [1], 0, 16)}, F32_4), 422, "'F128'"),
        (frame({"a": entry("f32", [4], 0, 16)}, F32_4), 422, "'f32'"),
        (frame({"a": entry(["F32"], [4], 0, 16)}, F32_4), 422, "unsupported dtype"),
        (frame({"a": entry("F32", [-4], 0, 16)}, F32_4), 422, "non-negative integers"),
        (frame({"a": entry("F32", [4.0], 0, 16)}, F32_4), 422, "non-negative integers"),
        (frame({"a": entry("F32", [True], 0, 4)}, F32_4[:4]), 422, "non-negative integers"),
        (frame({"a": entry("F32", "4", 0, 16)}, F32_4), 422, "non-negative integers"),
        (frame({"a": entry("F32", [1] * 65, 0, 4)}, F32_4[:4]), 422, "at most 64"),
        (frame({"a": entry("F32", [2**62, 2**62], 0, 16)}, F32_4), 422, "too large"),
        (frame({"a": entry("F32", [2**30, 2**30], 0, 16)}, F32_4), 422, "does not match"),
        (frame({"a": entry("F32", [2**40, 2**40, 0], 0, 0)}), 422, "too large"),
        (frame({"a": entry("F32", [2**64, 0], 0, 0)}), 422, "too large"),
        (frame({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0]}}, F32_4), 422, "two integers"),
        (
            frame({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16, 32]}}, F32_4),
            422,
            "two integers",
        ),
        (frame({"a": entry("F32", [1], False, True)}, F32_4[:4]), 422, "two integers"),
        (frame({"a": entry("F32", [4], 0.0, 16)}, F32_4), 422, "two integers"),
        (frame({"a": entry("F32", [4], -16, 0)}, F32_4), 422, "0 <= begin <= end"),
        (frame({"a": entry("F32", [0], 16, 8)}, F32_4), 422, "0 <= begin <= end"),
        (frame({"a": entry("F32", [8], 0, 32)}, F32_4), 422, "0 <= begin <= end <= 16"),
        (frame({"a": entry("F32", [2**50], 0, 2**52)}, F32_4), 422, "0 <= begin <= end"),
        (frame({"a": entry("F32", [3], 0, 16)}, F32_4), 422, "does not match"),
        (frame({"a": entry("F64", [4], 0, 16)}, F32_4), 422, "does not match"),
        (frame({"a": entry("F32", [4], 0, 16), "b": entry("F32", [2], 8, 16)}, F32_4), 422, "overlapping"),
        (frame({"a": entry("F32", [2], 0, 8), "b": entry("F32", [4], 0, 16)}, F32_4), 422, "overlapping"),
        (
            frame({"a": entry("F32", [2], 0, 8), "b": entry("F32", [1], 12, 16)}, F32_4),
            422,
            "covers bytes [8, 12)",
        ),
        (frame({"a": entry("F32", [2], 8, 16)}, F32_4), 422, "covers bytes [0, 8)"),
        (frame({"a": entry("F32", [2], 0, 8)}, F32_4), 422, "8 trailing bytes"),
        (frame({}, b"\x00"), 422, "1 trailing bytes"),
        (frame({"__metadata__": ["a"]}), 422, "__metadata__"),
        (frame({"__metadata__": {"step": 3}}), 422, "__metadata__"),
        (
            frame(None, raw=b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{}}'),
            422,
            "repeats the key 'a'",
        ),
        (
            frame(None, raw=b'{"a":{"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]}}'),
            422,
            "'dtype'",
        ),
    ],
)
def test_malformed_body(body: bytes, status: int, needle: str) -> None:
    with pytest.raises(WireError) as info:
        codec.decode(body)
    assert info.value.status == status
    assert needle in info.value.detail
    assert len(info.value.detail) < 400  # untrusted values are quoted, not dumped


def test_errors_name_the_tensor() -> None:
    with pytest.raises(WireError) as info:
        codec.decode(frame({"grad.w": entry("BF16", [2], 0, 4)}, b"\x00" * 4))
    assert info.value.field == "grad.w"
    assert "'grad.w'" in info.value.detail
    assert "F16, F32, F64" in info.value.detail


def test_null_metadata_is_accepted_as_the_reference_does() -> None:
    tensors, metadata = codec.decode(frame({"__metadata__": None, "a": entry("F32", [1], 0, 4)}, b"\x00" * 4))
    assert metadata == {}
    assert tensors["a"].shape == (1,)


def test_zero_size_tensors_may_sit_anywhere_in_the_tiling() -> None:
    header = {"e0": entry("F32", [0], 0, 0), "a": entry("F32", [1], 0, 4), "e1": entry("F64", [3, 0], 4, 4)}
    tensors, _ = codec.decode(frame(header, b"\x00" * 4))
    assert tensors["e1"].shape == (3, 0)


# Fuzzing: nothing but WireError, ever


@FUZZ
@given(st.binary(max_size=200))
def test_fuzz_random_bytes(body: bytes) -> None:
    decode_or_wire_error(body)


@FUZZ
@given(tensor_dicts, st.data())
def test_fuzz_truncated_and_extended_bodies(arrays: dict[str, np.ndarray], data: st.DataObject) -> None:
    body = codec.encode_bytes(arrays)
    cut = data.draw(st.integers(0, len(body) - 1))
    assert decode_or_wire_error(body[:cut]) is None
    assert decode_or_wire_error(body + data.draw(st.binary(min_size=1, max_size=16))) is None


@FUZZ
@given(tensor_dicts.filter(bool), st.data())
def test_fuzz_byte_flips(arrays: dict[str, np.ndarray], data: st.DataObject) -> None:
    body = bytearray(codec.encode_bytes(arrays, {"step": "1"}))
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(body) - 1))
        body[position] ^= data.draw(st.integers(1, 255))
    decode_or_wire_error(bytes(body))


@FUZZ
@given(tensor_dicts, st.integers(0, 2**64 - 1))
def test_fuzz_header_length(arrays: dict[str, np.ndarray], value: int) -> None:
    decode_or_wire_error(struct.pack("<Q", value) + codec.encode_bytes(arrays)[8:])


json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.text(max_size=5)
)
dims = st.one_of(st.integers(0, 6), st.integers(-3, 2**66), json_scalars)
offsets = st.one_of(st.integers(0, 64), st.integers(-(2**65), 2**65), json_scalars)
hostile_entries = st.one_of(
    st.fixed_dictionaries(
        {
            "dtype": st.one_of(
                st.sampled_from(["F16", "F32", "F64", "BF16", "I64", "BOOL", "U8"]), json_scalars
            ),
            "shape": st.one_of(st.lists(dims, max_size=4), json_scalars),
            "data_offsets": st.one_of(st.lists(offsets, min_size=0, max_size=3), json_scalars),
        },
        optional={"extra": json_scalars},
    ),
    json_scalars,
    st.lists(json_scalars, max_size=3),
)


@FUZZ
@given(
    st.dictionaries(st.text(max_size=4), hostile_entries, max_size=5),
    st.one_of(
        st.none(),
        st.dictionaries(st.text(max_size=3), st.text(max_size=3)),
        st.dictionaries(st.text(max_size=3), json_scalars, min_size=1),
    ),
    st.integers(0, 96),
)
def test_fuzz_hostile_headers(header: dict[str, Any], metadata: Any, data_len: int) -> None:
    if metadata is not None:
        header["__metadata__"] = metadata
    result = decode_or_wire_error(frame(header, bytes(data_len)))
    if result is not None:
        tensors, _ = result
        for name, array in tensors.items():
            info = header[name]
            assert list(array.shape) == info["shape"]
            begin, end = info["data_offsets"]
            assert array.nbytes == end - begin


valid_entries = st.tuples(st.sampled_from(["F16", "F32", "F64"]), st.lists(st.integers(0, 4), max_size=3))


@FUZZ
@given(
    st.lists(st.tuples(st.text(min_size=1, max_size=4), valid_entries), max_size=5, unique_by=lambda t: t[0]),
    st.lists(st.integers(-8, 8), min_size=5, max_size=5),
    st.integers(-8, 8),
)
def test_fuzz_we_accept_exactly_what_the_reference_accepts(
    specs: list[tuple[str, tuple[str, list[int]]]], shifts: list[int], extra: int
) -> None:
    # Well-formed entries whose offsets are nudged off the exact tiling; both readers must agree.
    header, position = {}, 0
    for (name, (dtype, shape)), shift in zip(specs, shifts, strict=False):
        size = int(np.prod(shape)) * {"F16": 2, "F32": 4, "F64": 8}[dtype]
        begin = max(0, position + shift)
        header[name] = entry(dtype, shape, begin, begin + size)
        position = begin + size
    body = frame(header, bytes(max(0, position + extra)))
    try:
        expected = reference.load(body)
    except Exception:
        expected = None
    ours = decode_or_wire_error(body)
    assert (ours is None) == (expected is None)
    if ours is not None and expected is not None:
        assert_same(ours[0], expected)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)


def _strict(raw: bytes) -> dict[str, Any] | None:
    try:
        return codec._parse_header(raw.decode("utf-8"))
    except (WireError, UnicodeDecodeError):
        return None


@FUZZ
@given(st.dictionaries(st.text(max_size=6), _JSON, max_size=5), st.data())
def test_the_canonical_header_fast_path_reads_what_the_strict_parser_reads(
    header: dict[str, Any], data: st.DataObject
) -> None:
    """`_canonical_header` answers only for headers the strict parser reads the same way (None for the rest,
    which the strict parser then judges): compact or spaced, ASCII-escaped or not, with a key repeated,
    padded with spaces, and NaN or Infinity, which the strict parser refuses."""
    text = json.dumps(
        header,
        separators=data.draw(st.sampled_from([(",", ":"), (", ", ": ")])),
        ensure_ascii=data.draw(st.booleans()),
    )
    if header and data.draw(st.booleans()):  # the first key again, at the end
        first = json.dumps(next(iter(header)), ensure_ascii=False)
        text = text[:-1] + f",{first}:1}}"
    raw = text.encode("utf-8") + b" " * data.draw(st.integers(0, 7))
    fast = codec._canonical_header(raw)
    if fast is not None:
        assert fast == _strict(raw)
        assert json.dumps(fast) == json.dumps(_strict(raw))  # the same order of keys too


def test_the_canonical_fast_path_takes_the_reference_writers_headers() -> None:
    body = safetensors.numpy.save({"w": np.zeros(3, np.float32)}, metadata={"loss": "0.5"})
    start = codec.header_end(body)
    assert codec._canonical_header(body[8:start]) is not None
