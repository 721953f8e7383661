"""JSON tensors: both request forms, exact float round trips through orjson, and 422s naming the field."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from app.wire import jsontensor
from app.wire.common import PARAM_DTYPES
from app.wire.errors import WireError
from app.wire.jsontensor import decode_tensor, dumps, encode_tensor, loads

DTYPES = [np.float16, np.float32, np.float64]


def through_json(array: np.ndarray) -> np.ndarray:
    """The full wire trip of a response tensor: encode, bytes, parse, decode."""
    return decode_tensor(loads(dumps({"t": encode_tensor(array)}))["t"], "float64", "t")


def assert_bit_exact(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype
    assert a.shape == b.shape
    assert a.tobytes() == b.tobytes()


# Object form


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 3), (2, 0, 5), (1, 2, 1, 2)])
def test_object_form_round_trip(dtype: type, shape: tuple[int, ...]) -> None:
    array: np.ndarray = (np.arange(int(np.prod(shape))) - 2.75).astype(dtype).reshape(shape)
    assert_bit_exact(through_json(array), array)


def test_encode_tensor_shape_dtype_and_flat_data() -> None:
    encoded = encode_tensor(np.arange(6, dtype=np.float32).reshape(2, 3))
    assert encoded["shape"] == [2, 3]
    assert encoded["dtype"] == "float32"
    assert orjson.loads(dumps(encoded)) == {"shape": [2, 3], "dtype": "float32", "data": [0, 1, 2, 3, 4, 5]}
    scalar = orjson.loads(dumps(encode_tensor(np.float64(0.1))))
    assert scalar == {"shape": [], "dtype": "float64", "data": [0.1]}


def test_encode_tensor_is_a_view_when_it_can_be() -> None:
    array = np.ones((4, 4), np.float32)
    assert np.shares_memory(encode_tensor(array)["data"], array)


def test_encode_tensor_handles_non_contiguous_and_big_endian() -> None:
    base = np.arange(12, dtype=np.float64).reshape(3, 4)
    for array in (base.T, base[:, ::2], base.astype(">f8"), np.asfortranarray(base).astype(">f4")):
        np.testing.assert_array_equal(through_json(array), array)


def test_encode_tensor_rejects_non_float_arrays() -> None:
    with pytest.raises(ValueError, match="int64"):
        encode_tensor(np.arange(3))


def test_dtype_may_be_left_out_of_the_object_form() -> None:
    array = decode_tensor({"shape": [2], "data": [1, 2]}, np.float64, "p")
    assert array.dtype == np.float64


def test_decoded_arrays_are_writable_and_owned() -> None:
    data = [1.0, 2.0, 3.0]
    array = decode_tensor({"shape": [3], "dtype": "float32", "data": data}, "float32", "p")
    array[0] = 9.0
    assert data[0] == 1.0


# Exactness: orjson writes the shortest repr, and it must read back to the same bits


def test_every_float16_round_trips_bit_exactly() -> None:
    bits = np.arange(2**16, dtype=np.uint16)
    values = bits.view(np.float16)
    values = values[np.isfinite(values)]
    assert_bit_exact(through_json(values), values)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_random_bit_patterns_round_trip_bit_exactly(dtype: type[np.floating[Any]]) -> None:
    rng = np.random.default_rng(42)
    bits = rng.bytes(200_000 * np.dtype(dtype).itemsize)
    values: np.ndarray = np.frombuffer(bits, dtype)
    values = values[np.isfinite(values)]
    finfo = np.finfo(dtype)
    edges = np.array(
        [0.0, -0.0, finfo.max, -finfo.max, finfo.tiny, finfo.smallest_subnormal, finfo.eps], dtype
    )
    values = np.concatenate([values, edges])
    assert_bit_exact(through_json(values), values)


def test_orjson_float32_repr_is_the_shortest_that_round_trips() -> None:
    values = np.array([0.1, 1 / 3, 16777217.0, 3.4028235e38], np.float32)
    for value, text in zip(values, orjson.loads(dumps(values)), strict=True):
        assert np.float32(float(repr(text))) == value
        assert repr(text) == repr(float(np.format_float_positional(value, unique=True)))


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(DTYPES).flatmap(
        lambda dt: hnp.arrays(
            dt,
            hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6),
            elements=hnp.from_dtype(np.dtype(dt), allow_nan=False, allow_infinity=False),
        )
    )
)
def test_hypothesis_round_trip(array: np.ndarray) -> None:
    assert_bit_exact(through_json(array), array)


# Bare forms


@pytest.mark.parametrize(
    ("value", "shape"),
    [
        (1.5, ()),
        (3, ()),
        ([], (0,)),
        ([1, 2.5, -3], (3,)),
        ([[1, 2], [3, 4], [5, 6]], (3, 2)),
        ([[]], (1, 0)),
        ([[[1.0]], [[2.0]]], (2, 1, 1)),
    ],
)
@pytest.mark.parametrize("dtype", ["float32", "float64", np.dtype("float16")])
def test_bare_forms_read_as_the_default_dtype(value: Any, shape: tuple[int, ...], dtype: Any) -> None:
    array = decode_tensor(value, dtype, "p")
    assert array.dtype == np.dtype(dtype)
    assert array.shape == shape
    np.testing.assert_array_equal(array, np.array(value, dtype=np.float64))


def test_bare_large_ints_are_read_as_floats() -> None:
    assert decode_tensor([2**64 - 1], "float64", "p")[0] == 2.0**64


# Invalid tensors: always a 422 naming the field


@pytest.mark.parametrize(
    ("value", "field", "needle"),
    [
        ("1.0", "g", "not a string"),
        (True, "g", "not a boolean"),
        (None, "g", "not null"),
        ([1.0, True], "g", "element 1 is a boolean"),
        ([1.0, "2"], "g", "element 1 is a string"),
        ([1.0, None], "g", "element 1 is null"),
        ([{"a": 1}], "g", "element 0 is an object"),
        ([[1.0, 2.0], [3.0]], "g", "regular"),
        ([[1.0], 2.0], "g", "regular"),
        ([[1.0, "x"]], "g", "regular"),
        ([[1.0, True]], "g", "element (in row-major order) 1 is a boolean"),
        ([[1.0], [None]], "g", "element (in row-major order) 1 is null"),
        ([[[[1.0]]], "x"], "g", "element 1 is a string"),
        ([10**400], "g", "out of range for float32"),
        ([1e39], "g", "out of range for float32"),
        ({"shape": [2], "data": [1, 2], "extra": 1}, "g", "keys shape, data and optionally dtype"),
        ({"data": [1, 2]}, "g", "keys shape, data"),
        ({"shape": [2]}, "g", "keys shape, data"),
        ({"shape": [2], "dtype": "int32", "data": [1, 2]}, "g.dtype", "'int32' is not supported"),
        ({"shape": [2], "dtype": "bfloat16", "data": [1, 2]}, "g.dtype", "float16, float32, float64"),
        ({"shape": [2], "dtype": None, "data": [1, 2]}, "g.dtype", "None is not supported"),
        ({"shape": 2, "data": [1, 2]}, "g.shape", "list of non-negative integers"),
        ({"shape": [-2], "data": [1, 2]}, "g.shape", "list of non-negative integers"),
        ({"shape": [2.0], "data": [1, 2]}, "g.shape", "list of non-negative integers"),
        ({"shape": [True, True], "data": [1]}, "g.shape", "list of non-negative integers"),
        ({"shape": [1] * 65, "data": [1]}, "g.shape", "at most 64"),
        ({"shape": [2**62, 2**62, 0], "data": []}, "g.shape", "too large"),
        ({"shape": [2, 3], "data": [1, 2, 3]}, "g.data", "3 numbers but shape [2, 3] needs 6"),
        ({"shape": [], "data": []}, "g.data", "0 numbers but shape [] needs 1"),
        ({"shape": [2], "data": [[1], [2]]}, "g.data", "element 0 is a list"),
        ({"shape": [1], "data": 1.0}, "g.data", "flat list of numbers"),
        ({"shape": [2], "data": [1, False]}, "g.data", "element 1 is a boolean"),
        ({"shape": [1], "dtype": "float16", "data": [70000]}, "g.data", "out of range for float16"),
        ({"shape": [1], "data": [float("inf")]}, "g.data", "NaN and Infinity are not JSON"),
        ({"shape": [1], "data": [float("nan")]}, "g.data", "NaN and Infinity are not JSON"),
    ],
)
def test_invalid_tensor(value: Any, field: str, needle: str) -> None:
    with pytest.raises(WireError) as info:
        decode_tensor(value, "float32", "g")
    assert info.value.status == 422
    assert info.value.field == field
    assert needle in info.value.detail
    assert info.value.detail.startswith(f"{field}: ")


def test_allowed_dtypes_restricts_the_object_form() -> None:
    with pytest.raises(WireError) as info:
        decode_tensor({"shape": [1], "dtype": "float16", "data": [1]}, "float32", "params.w", PARAM_DTYPES)
    assert info.value.field == "params.w.dtype"
    assert "allowed: float32, float64" in info.value.detail


def test_huge_values_are_quoted_briefly() -> None:
    with pytest.raises(WireError) as info:
        decode_tensor({"shape": list(range(10_000)), "data": []}, "float32", "g")
    assert len(info.value.detail) < 300


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=3),
        lambda children: (
            st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
        ),
        max_leaves=20,
    )
)
def test_fuzz_any_json_value_decodes_or_raises_wire_error(value: Any) -> None:
    for candidate in (value, {"shape": [2], "data": value}, {"shape": value, "data": [1.0, 2.0]}):
        try:
            array = decode_tensor(candidate, "float32", "g")
        except WireError as exc:
            error: WireError | None = exc
        else:
            error = None
            assert array.dtype == np.float32
            assert np.isfinite(array).all()
        assert error is None or error.status == 422


# loads / dumps


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"   ",
        b"{",
        b'{"a":}',
        b"NaN",
        b"[Infinity]",
        b"[-Infinity]",
        b"[1e400]",
        b"\xff\xfe",
        b"[1,]",
        "{'a': 1}",
    ],
)
def test_loads_rejects_what_is_not_json_with_400(body: bytes | str) -> None:
    with pytest.raises(WireError) as info:
        loads(body)
    assert info.value.status == 400
    assert "not valid JSON" in info.value.detail


@pytest.mark.parametrize("body", [b'{"a": [1, 2.5]}', bytearray(b"[1]"), memoryview(b"[1]"), '{"a": null}'])
def test_loads_accepts_bytes_like_and_str(body: bytes | bytearray | memoryview | str) -> None:
    loads(body)


def test_dumps_writes_numpy_natively() -> None:
    assert dumps({"lr": [np.float64(0.001)], "step": np.int64(3), "v": np.array([0.5], np.float32)}) == (
        b'{"lr":[0.001],"step":3,"v":[0.5]}'
    )


def test_dumps_writes_non_finite_values_as_null() -> None:
    # Documented orjson behaviour that callers must know about: JSON has no NaN/Infinity.
    assert dumps(np.array([np.nan, np.inf], np.float32)) == b"[null,null]"


_ELEMENT = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0.0, 1.0, -0.0, 0, 1, True, False, None, "1.5", "0", [1.0], [], {}, 10**400, -(2**70)]),
    st.integers(-(2**60), 2**60),
)


# a few of any element among many ordinary numbers: long lists take the path that looks at few elements
_SPARSE = st.tuples(
    st.lists(st.floats(-10, 10).filter(lambda x: x not in (0.0, 1.0)), min_size=16, max_size=80),
    st.lists(st.tuples(st.integers(0, 79), _ELEMENT), max_size=3),
).map(lambda t: [v for i, x in enumerate(t[0]) for v in ([y for j, y in t[1] if j == i] or [x])])


@settings(max_examples=400, deadline=None)
@given(st.lists(_ELEMENT, max_size=12) | _SPARSE, st.sampled_from(["float32", "float64"]))
def test_a_flat_list_is_read_as_when_every_elements_type_was_checked(values: list[Any], dtype: str) -> None:
    """A flat list's numbers are checked without looking at each element's type (jsontensor._numbers); what
    it accepts and refuses, and the values it reads, are those of the strict per-element check."""
    with np.errstate(over="ignore"):
        strict: Any
        try:
            jsontensor._check_types("x.data", values)
            strict = jsontensor._check_finite(
                "x.data", jsontensor._convert("x.data", values, np.dtype(dtype), flat=True)
            )
        except WireError as exc:
            strict = exc.detail
        try:
            fast: Any = decode_tensor({"shape": [len(values)], "dtype": dtype, "data": values}, dtype, "x")
        except WireError as exc:
            fast = exc.detail
        try:
            bare: Any = decode_tensor(values, dtype, "x.data")
        except WireError as exc:
            bare = exc.detail
    # a bare list with lists in it is a nested tensor, read by another path
    for got in (fast, bare) if not any(type(v) is list for v in values) else (fast,):
        if isinstance(strict, str):
            assert isinstance(got, str)
            assert got.split(":", 1)[-1] == strict.split(":", 1)[-1]
        else:
            assert isinstance(got, np.ndarray)
            assert got.dtype == strict.dtype
            assert got.tobytes() == strict.tobytes()
