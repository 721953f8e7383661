"""Content negotiation: the request's format from Content-Type, the response's from Accept (RFC 9110 §12),
as the contract's §2 says: Accept first, then the request's format, then JSON."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Literal

from app.wire.common import show
from app.wire.errors import WireError

Format = Literal["json", "safetensors"]

JSON = "application/json"
SAFETENSORS = "application/vnd.safetensors"
OCTET = "application/octet-stream"  # SAFETENSORS in Content-Type, and in Accept when named explicitly
PROBLEM_JSON = "application/problem+json"

MEDIA_TYPES: dict[Format, str] = {"json": JSON, "safetensors": SAFETENSORS}
_OFFERED = f"{JSON} or {SAFETENSORS}"


class UnsupportedMediaType(WireError):
    """415: the request body's Content-Type is not one we read."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail, status=415)


class NotAcceptable(WireError):
    """406: Accept excludes every format we can answer with."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail, status=406)


@functools.lru_cache(maxsize=256)  # clients repeat the same few headers on every step
def request_format(content_type: str | None) -> Format:
    """The format of a request body. Parameters (`; charset=utf-8`) and case are ignored; a missing or empty
    Content-Type is read as JSON. Anything else raises `UnsupportedMediaType`."""
    if content_type is None or not content_type.strip():
        return "json"
    media = content_type.split(";", 1)[0].strip().lower()
    if media == JSON:
        return "json"
    if media in (SAFETENSORS, OCTET):
        return "safetensors"
    raise UnsupportedMediaType(
        f"Content-Type {show(content_type)} is not supported; send {_OFFERED} "
        f"({OCTET} is read as safetensors)"
    )


# RFC 9110 §5.6.2 tokens, §5.6.4 quoted strings, §12.4.2 qvalues; whitespace is OWS.
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED = r'"(?:[^"\\]|\\.)*"'
# Hostile headers must take linear time: the range and parameter patterns are unambiguous (no two ways to
# match the same text), and the splitting one never backtracks (its closing quote is optional, so that an
# unterminated quote cannot make it quadratic).
_ELEMENTS = re.compile(r'(?:[^",]|"(?:[^"\\]|\\.)*"?)+', re.S)
_RANGE = re.compile(
    rf"[ \t]*(?P<type>{_TOKEN})/(?P<subtype>{_TOKEN})[ \t]*"
    rf"(?P<params>(?:;[ \t]*(?:{_TOKEN}=(?:{_TOKEN}|{_QUOTED})[ \t]*)?)*)",
    re.S,
)
_PARAM = re.compile(rf";[ \t]*(?P<name>{_TOKEN})=(?P<value>{_TOKEN}|{_QUOTED})", re.S)
_QVALUE = re.compile(r"0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?")
_UNESCAPE = re.compile(r"\\(.)", re.S)


@dataclass(frozen=True)
class _Range:
    type: str
    subtype: str
    params: frozenset[tuple[str, str]]
    q: int  # thousandths, so that comparisons are exact

    def specificity(self) -> tuple[int, int, int]:
        return (self.type != "*", self.subtype != "*", len(self.params))


def _parse_element(element: str) -> _Range | None:
    match = _RANGE.fullmatch(element)
    if match is None:
        return None
    type_, subtype = match["type"].lower(), match["subtype"].lower()
    if type_ == "*" and subtype != "*":
        return None
    params: set[tuple[str, str]] = set()
    q = 1000
    for param in _PARAM.finditer(match["params"]):
        name, value = param["name"].lower(), param["value"]
        if name == "q":
            if not _QVALUE.fullmatch(value):
                return None
            q = round(float(value) * 1000)
            break  # what follows the weight are extension parameters, not media type parameters
        if value.startswith('"'):
            value = _UNESCAPE.sub(r"\1", value[1:-1])
        # Case-insensitive values: the only parameter we offer, charset, is compared that way.
        params.add((name, value.lower()))
    return _Range(type_, subtype, frozenset(params), q)


def _parse_accept(accept: str) -> list[_Range]:
    # Malformed elements are skipped, as most servers do, rather than failing the whole request.
    return [r for element in _ELEMENTS.findall(accept) if (r := _parse_element(element)) is not None]


def _quality(
    ranges: list[_Range], media: str, params: frozenset[tuple[str, str]], exact_only: bool = False
) -> int:
    """The q of the most specific range matching `media` (ties: the highest q); 0 when none matches."""
    type_, subtype = media.split("/")
    best: tuple[tuple[int, int, int], int] | None = None
    for r in ranges:
        if exact_only and (r.type, r.subtype) != (type_, subtype):
            continue
        if r.type not in ("*", type_) or r.subtype not in ("*", subtype) or not r.params <= params:
            continue
        candidate = (r.specificity(), r.q)
        if best is None or candidate > best:
            best = candidate
    return 0 if best is None else best[1]


# What we answer with, as media type parameters a range may ask for: JSON is always UTF-8.
_JSON_PARAMS = frozenset({("charset", "utf-8")})


@functools.lru_cache(maxsize=256)
def response_format(accept: str | None, request_format: Format | None = None) -> Format:
    """The format of the answer: the one `accept` prefers (ties go to the request's format, then JSON);
    without an Accept (or with one that holds no valid media range), the request's format; else JSON.

    `application/octet-stream` in Accept asks for safetensors too, but only when named explicitly: a
    wildcard that matches it must not override an explicit `application/vnd.safetensors;q=0`. Raises
    `NotAcceptable` when Accept excludes both formats.
    """
    ranges = _parse_accept(accept) if accept else []
    if not ranges:
        return request_format or "json"
    quality: dict[Format, int] = {
        "json": _quality(ranges, JSON, _JSON_PARAMS),
        "safetensors": max(
            _quality(ranges, SAFETENSORS, frozenset()), _quality(ranges, OCTET, frozenset(), exact_only=True)
        ),
    }
    best = max(quality.values())
    if best == 0:
        raise NotAcceptable(
            f"Accept {show(accept)} excludes every format this service answers with: {_OFFERED}"
        )
    preference: list[Format] = [request_format] if request_format else []
    return next(fmt for fmt in [*preference, "json", "safetensors"] if quality[fmt] == best)
