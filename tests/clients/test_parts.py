"""The SDK's pure parts: its safetensors codec against the reference, the retry policy, error mapping."""

from __future__ import annotations

import email.utils
import json
import struct
from typing import Any

import httpx
import numpy as np
import optserve
import pytest
import safetensors.numpy
from optserve import RetryPolicy, Timeout, _safetensors
from optserve._policy import backoff_delay, error_delay, parse_retry_after, status_delay

TENSORS: dict[str, Any] = {
    "w": np.arange(6, dtype=np.float32).reshape(2, 3) / 7,
    "b": np.array([np.pi, -np.e]),
    "h": np.array([0.5, 1e-3, -2.0], np.float16),
    "scalar": np.array(1.25),
    "empty": np.zeros((0, 4), np.float32),
}


def test_safetensors_we_write_are_read_by_the_reference_library() -> None:
    body = _safetensors.encode(TENSORS, {"step": "3"})
    read = safetensors.numpy.load(body)
    assert read.keys() == TENSORS.keys()
    for name, value in TENSORS.items():
        assert read[name].dtype == value.dtype
        np.testing.assert_array_equal(read[name], value)


def test_safetensors_the_reference_library_writes_are_read_back_writable() -> None:
    body = safetensors.numpy.save(TENSORS, metadata={"lr": "[0.1]"})
    tensors, metadata = _safetensors.decode(body)
    assert metadata == {"lr": "[0.1]"}
    for name, value in TENSORS.items():
        assert tensors[name].dtype == value.dtype
        assert tensors[name].flags.writeable
        np.testing.assert_array_equal(tensors[name], value)


def test_safetensors_big_endian_and_strided_arrays_are_written_as_their_values() -> None:
    strided = np.arange(12, dtype=">f8").reshape(3, 4)[:, ::2]
    tensors, _ = _safetensors.decode(_safetensors.encode({"x": strided}))
    assert tensors["x"].dtype == np.dtype("<f8")
    np.testing.assert_array_equal(tensors["x"], strided)


def framed(header: dict[str, Any], data_len: int) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + bytes(data_len)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"\x01", "at least 8 bytes"),
        (b"\xff\x00\x00\x00\x00\x00\x00\x00{}", "header claims"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
        (struct.pack("<Q", 2) + b"{]", "not JSON"),
        (framed({"x": {"dtype": "I32", "shape": [1], "data_offsets": [0, 4]}}, 4), "expected dtype"),
        (framed({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, 4), "do not fit"),
    ],
)
def test_safetensors_malformed_bodies_are_refused(body: bytes, message: str) -> None:
    with pytest.raises(_safetensors.FormatError, match=message):
        _safetensors.decode(body)


def test_backoff_doubles_from_the_base_up_to_the_cap_with_jitter_of_at_most_half() -> None:
    policy = RetryPolicy(backoff=0.2, max_backoff=1.0)
    assert [backoff_delay(policy, n, 0.999999) for n in range(4)] == pytest.approx([0.2, 0.4, 0.8, 1.0])
    assert [backoff_delay(policy, n, 0.0) for n in range(4)] == pytest.approx([0.1, 0.2, 0.4, 0.5])


def test_retry_after_is_read_as_seconds_or_an_http_date() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after("7", now) == 7.0
    assert parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now) == pytest.approx(30.0)
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now) == 0.0
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None


def test_status_delay_retries_429_and_503_of_resendable_requests_within_the_policy() -> None:
    policy = RetryPolicy(retries=2, max_retry_after=60.0)
    assert status_delay(policy, 0, 503, "5", True, 0.5, 0.0) == 5.0
    assert status_delay(policy, 0, 503, None, True, 1.0, 0.0) == pytest.approx(0.2)
    assert status_delay(policy, 0, 429, "2", True, 1.0, 0.0) == 2.0
    assert status_delay(policy, 0, 429, None, True, 1.0, 0.0) is None  # a quota: waiting does not lift it
    assert status_delay(policy, 0, 503, "5", False, 0.5, 0.0) is None
    assert status_delay(policy, 0, 503, "61", True, 0.5, 0.0) is None
    assert status_delay(policy, 2, 503, "1", True, 0.5, 0.0) is None
    assert status_delay(policy, 0, 500, None, True, 0.5, 0.0) is None


def test_error_delay_resends_only_what_cannot_have_been_applied() -> None:
    policy = RetryPolicy(retries=1)
    refused, reset = httpx.ConnectError("refused"), httpx.ReadError("reset")
    assert error_delay(policy, 0, refused, False, 0.5) is not None
    assert error_delay(policy, 0, reset, True, 0.5) is not None
    assert error_delay(policy, 0, reset, False, 0.5) is None
    assert error_delay(policy, 1, refused, True, 0.5) is None
    assert error_delay(policy, 0, httpx.UnsupportedProtocol("ftp"), True, 0.5) is None


def test_timeout_is_connect_plus_base_and_per_mib() -> None:
    timeout = Timeout(connect=3.0, base=10.0, per_mib=2.0).for_size(3 << 20)
    assert (timeout.connect, timeout.read, timeout.write) == (3.0, 16.0, 16.0)


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, optserve.BadRequest),
        (401, optserve.Unauthorized),
        (403, optserve.APIError),
        (404, optserve.NotFound),
        (409, optserve.StepConflict),
        (413, optserve.PayloadTooLarge),
        (415, optserve.UnsupportedMediaType),
        (422, optserve.ValidationError),
        (429, optserve.TooManyRequests),
        (500, optserve.ServerError),
        (502, optserve.ServerError),
        (503, optserve.ServiceUnavailable),
    ],
)
def test_each_error_status_has_its_exception(status: int, cls: type[optserve.APIError]) -> None:
    problem = {"type": "t", "title": "Nope", "status": status, "detail": "why", "errors": []}
    error = optserve.errors.error_from_response(httpx.Response(status, json=problem))
    assert type(error) is cls
    assert (error.status, error.title, error.detail, error.problem) == (status, "Nope", "why", problem)


def test_an_error_that_is_not_problem_json_keeps_its_status_line_and_text() -> None:
    error = optserve.errors.error_from_response(httpx.Response(502, text="<html>bad gateway</html>"))
    assert type(error) is optserve.ServerError
    assert (error.title, error.detail) == ("Bad Gateway", "<html>bad gateway</html>")
