"""Content negotiation tables: Content-Type to request format, Accept (RFC 9110) to response format."""

from __future__ import annotations

import contextlib
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.wire.errors import WireError
from app.wire.negotiate import (
    JSON,
    MEDIA_TYPES,
    OCTET,
    PROBLEM_JSON,
    SAFETENSORS,
    Format,
    NotAcceptable,
    UnsupportedMediaType,
    request_format,
    response_format,
)


def test_media_types() -> None:
    assert JSON == "application/json"
    assert SAFETENSORS == "application/vnd.safetensors"
    assert OCTET == "application/octet-stream"
    assert PROBLEM_JSON == "application/problem+json"
    assert MEDIA_TYPES == {"json": JSON, "safetensors": SAFETENSORS}


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        (None, "json"),
        ("", "json"),
        ("  ", "json"),
        ("application/json", "json"),
        ("application/json; charset=utf-8", "json"),
        ("Application/JSON;charset=UTF-8", "json"),
        ("  application/json  ", "json"),
        ("application/vnd.safetensors", "safetensors"),
        ("APPLICATION/VND.SAFETENSORS", "safetensors"),
        ("application/octet-stream", "safetensors"),
        ("application/octet-stream; foo=bar", "safetensors"),
    ],
)
def test_request_format(content_type: str | None, expected: Format) -> None:
    assert request_format(content_type) == expected


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/xml", "multipart/form-data; boundary=x", "application/jsonx", "json", "*/*"],
)
def test_request_format_unsupported(content_type: str) -> None:
    with pytest.raises(UnsupportedMediaType) as info:
        request_format(content_type)
    assert isinstance(info.value, WireError)
    assert info.value.status == 415
    assert repr(content_type) in info.value.detail
    assert JSON in info.value.detail
    assert SAFETENSORS in info.value.detail


J, S = "json", "safetensors"


@pytest.mark.parametrize(
    ("accept", "sent", "expected"),
    [
        # No Accept: the request's format, else JSON.
        (None, J, J),
        (None, S, S),
        (None, None, J),
        ("", S, S),
        ("   ", S, S),
        # Exact types.
        (JSON, S, J),
        (SAFETENSORS, J, S),
        (SAFETENSORS, None, S),
        ("Application/Vnd.Safetensors", J, S),
        # Octet-stream is a synonym of safetensors when named explicitly.
        (OCTET, J, S),
        ("application/octet-stream;q=0.5, application/json;q=0.4", J, S),
        # Wildcards: ties go to the request's format, then JSON.
        ("*/*", S, S),
        ("*/*", J, J),
        ("*/*", None, J),
        ("application/*", S, S),
        ("application/*", None, J),
        (f"{JSON}, {SAFETENSORS}", S, S),
        (f"{JSON}, {SAFETENSORS}", None, J),
        ("text/html, application/xhtml+xml, application/xml;q=0.9, */*;q=0.8", S, S),
        # q-values.
        (f"{JSON};q=0.5, {SAFETENSORS}", J, S),
        (f"{JSON}, {SAFETENSORS};q=0.999", S, J),
        (f"{JSON};q=0.001, {SAFETENSORS};q=0.002", J, S),
        (f"{JSON};q=1.000, {SAFETENSORS};q=1", None, J),
        (f"{JSON};Q=0.2, {SAFETENSORS};q=0.3", J, S),
        (f"{JSON} ; q=0.2 , {SAFETENSORS} ; q=0.3", J, S),
        # q=0 excludes, and the most specific range wins.
        (f"*/*, {JSON};q=0", J, S),
        (f"*/*, {SAFETENSORS};q=0", S, J),
        (f"application/*;q=0, {SAFETENSORS}", J, S),
        (f"{SAFETENSORS};q=0, */*", None, J),
        (f"{SAFETENSORS};q=0, {OCTET}", None, S),
        (f"*/*;q=0.1, application/*;q=0.5, {JSON};q=0.2", None, S),
        # Media type parameters must be ones we produce: JSON is UTF-8.
        (f"{JSON};charset=utf-8", S, J),
        (f'{JSON};charset="UTF-8";q=0.7, {SAFETENSORS};q=0.6', S, J),
        (f"{JSON};charset=latin-1, {SAFETENSORS};q=0.1", J, S),
        (f"{JSON};charset=utf-8;q=0, {JSON};q=1, {SAFETENSORS};q=0.1", J, S),
        # Quoted strings may hold commas, semicolons and escapes.
        (f'{JSON};x="a,b;c";q=0.9, {SAFETENSORS};q=0.8', None, S),
        (f'text/plain;x="a, {JSON}", {SAFETENSORS};q=0.1', J, S),
        (f'text/plain;x="\\"", {JSON};q=0.5', S, J),
        # Malformed elements are skipped; a header with no valid element is disregarded.
        ("garbage", S, S),
        ("json", None, J),
        (f"{JSON};q=2", S, S),
        (f"{JSON};q=0.5000, {SAFETENSORS};q=0.1", J, S),
        (f"*/json, {SAFETENSORS};q=0.1", J, S),
        (f",,, {SAFETENSORS} ,", J, S),
        (f'text/plain;x="unterminated, {SAFETENSORS}', J, J),
        # Accept-extensions after the weight are not media type parameters.
        (f"{SAFETENSORS};q=0.5;ext=1, {JSON};q=0.4", J, S),
    ],
)
def test_response_format(accept: str | None, sent: Format | None, expected: Format) -> None:
    assert response_format(accept, sent) == expected


@pytest.mark.parametrize(
    "accept",
    [
        "text/html",
        "text/*",
        "*/*;q=0",
        f"{JSON};q=0, {SAFETENSORS};q=0",
        "application/*;q=0",
        f"image/png, {JSON};q=0.0",
        f"{JSON};charset=latin-1",
        f"{JSON};charset=utf-8;q=0, {JSON};q=1",
        "application/xml, text/csv;q=0.5",
    ],
)
def test_not_acceptable(accept: str) -> None:
    with pytest.raises(NotAcceptable) as info:
        response_format(accept, "json")
    assert isinstance(info.value, WireError)
    assert info.value.status == 406
    assert JSON in info.value.detail
    assert SAFETENSORS in info.value.detail


@pytest.mark.parametrize(
    "accept",
    [
        "a/b" + " ;" * 30_000 + "x",
        "a/b" + "; " * 30_000 + "x",
        '"' + '\\"' * 30_000,
        "a/b;x=" + '"\\' * 30_000,
        "a/b" + " " * 60_000 + "x",
        "a/b;" + "x=y;" * 15_000 + "=",
        ", ".join(["text/html;q=0.1"] * 5_000),
    ],
)
def test_hostile_accept_headers_take_linear_time(accept: str) -> None:
    start = time.perf_counter()
    with contextlib.suppress(NotAcceptable):
        response_format(accept, "json")
    assert time.perf_counter() - start < 1.0


@settings(max_examples=500, deadline=None)
@given(
    st.text(alphabet=st.sampled_from(list('application/jsonvd.safetensor*;q=0.5,"\\ \t')), max_size=60),
    st.sampled_from([None, "json", "safetensors"]),
)
def test_fuzz_accept_gives_a_format_or_not_acceptable(accept: str, sent: Format | None) -> None:
    # NotAcceptable is the only exception allowed to escape.
    with contextlib.suppress(NotAcceptable):
        assert response_format(accept, sent) in ("json", "safetensors")
