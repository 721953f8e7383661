"""Request envelopes (JSON or safetensors) into domain inputs, and domain results into responses."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import Any, Literal

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from app.api.offload import INLINE_BYTES, INLINE_NUMBERS, Offload
from app.optim.base import Array
from app.optim.engine import StepOutcome
from app.optim.limits import MAX_PARAMETERS
from app.sessions import Render, off_the_loop_if
from app.wire import envelopes, jsontensor, safetensors
from app.wire.common import FLOAT_DTYPES as GRAD_DTYPES
from app.wire.common import PARAM_DTYPES
from app.wire.envelopes import Buffer, StepBody
from app.wire.negotiate import JSON, SAFETENSORS

Format = Literal["json", "safetensors"]


async def decode_safetensors(
    offload: Offload, body: Buffer, allowed: Collection[str], max_tensors: int = MAX_PARAMETERS
) -> tuple[dict[str, Array], dict[str, str]]:
    """A safetensors body's tensors (views into it) and metadata. A long header is read in a worker
    process; many views are made in a thread (a Python loop, which lets the event loop in every few ms)."""
    start = safetensors.header_end(body)
    buf = memoryview(body).cast("B")
    entries, metadata = await offload.run(
        safetensors.read_header,
        buf[8:start],
        len(buf) - start,
        allowed,
        max_tensors,
        heavy=start > INLINE_BYTES,
    )
    tensors = await off_the_loop_if(len(entries) > 1_000, safetensors.tensors_at, buf, start, entries)
    return tensors, metadata


async def read_create_spec(
    offload: Offload, metadata: Mapping[str, str]
) -> tuple[dict[str, Any], dict[str, str]]:
    heavy = len(metadata[envelopes.CREATE_KEY]) > INLINE_BYTES
    return await offload.run(envelopes.parse_create_spec, dict(metadata), heavy=heavy)


async def read_step(offload: Offload, body: Buffer, fmt: Format) -> StepBody:
    if fmt == "safetensors":
        grads, metadata = await decode_safetensors(offload, body, GRAD_DTYPES)
        return envelopes.step_of_metadata(grads, metadata)
    return await offload.parse(envelopes.parse_step, body)


async def read_params(offload: Offload, body: Buffer, fmt: Format) -> dict[str, Array]:
    if fmt == "safetensors":
        tensors, _ = await decode_safetensors(offload, body, PARAM_DTYPES)
        return tensors
    return await offload.parse(envelopes.parse_params, body)


def json_response(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(jsontensor.dumps(data), status_code=status, media_type=JSON, headers=headers)


def _numel(tensors: Mapping[str, Array]) -> int:
    return sum(t.size for t in tensors.values())


async def _json_tensors_response(
    offload: Offload, data: dict[str, Any], tensors: Mapping[str, Array], headers: Mapping[str, str] | None
) -> Response:
    """`data` with `params` (the tensors as JSON objects) added: many numbers render off the loop."""
    data["params"] = {name: jsontensor.encode_tensor(value) for name, value in tensors.items()}
    content = await offload.run(jsontensor.dumps, data, heavy=_numel(tensors) > INLINE_NUMBERS)
    return Response(content, media_type=JSON, headers=headers)


class PartsResponse(Response):
    """A body sent as the parts `safetensors.encode` makes (the header, then each array's own memory), one
    ASGI message each, never joined: a large answer goes to the socket without being copied once more
    (40 MB at 1e7 float32 parameters). The arrays are a session's, which no write ever changes (a step
    makes new ones), so the server may send from them for as long as it takes."""

    def __init__(self, parts: Sequence[Buffer], headers: Mapping[str, str] | None, media_type: str) -> None:
        self.parts = [memoryview(part).cast("B") for part in parts]
        self.status_code = 200
        self.media_type = media_type
        self.background = None
        self.body = b""
        self.init_headers({**(headers or {}), "content-length": str(sum(len(p) for p in self.parts))})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        last = len(self.parts) - 1
        for i, part in enumerate(self.parts):
            await send({"type": "http.response.body", "body": part, "more_body": i < last})


def body_length(response: Response) -> int:
    """The bytes of a response's body: a `PartsResponse`'s parts, any other's `body`."""
    if isinstance(response, PartsResponse):
        return sum(len(part) for part in response.parts)
    return len(response.body)


class HeadedResponse(Response):
    """A whole body with its headers given as the raw (lowercase name, value) pairs they are sent as:
    the step's answer skips `Response.init_headers`' per-header encoding, the same headers in the same
    order otherwise (content-length, then content-type, last)."""

    def __init__(self, body: bytes, raw_headers: list[tuple[bytes, bytes]], media_type: str) -> None:
        self.status_code = 200
        self.media_type = media_type
        self.background = None
        self.body = body
        raw_headers.append((b"content-length", b"%d" % len(body)))
        raw_headers.append((b"content-type", media_type.encode("latin-1")))
        self.raw_headers = raw_headers


async def safetensors_response(
    tensors: Mapping[str, Array], metadata: Mapping[str, str], headers: Mapping[str, str] | None = None
) -> Response:
    """A small answer is joined into one body; a large one is sent from the arrays (`PartsResponse`)."""
    if _numel(tensors) > INLINE_NUMBERS:
        return PartsResponse(safetensors.encode(tensors, metadata), headers, SAFETENSORS)
    return Response(safetensors.encode_bytes(tensors, metadata), media_type=SAFETENSORS, headers=headers)


# the step's metadata keys -> the headers that repeat them (a client reads them whatever the body's format)
STEP_HEADERS = {
    key: f"Optserve-{key.title().replace('_', '-')}"
    for key in ("step", "lr", "skipped", "grad_norm", "staleness", "workers")
}
_RAW_STEP_HEADERS = {key: name.lower().encode("latin-1") for key, name in STEP_HEADERS.items()}


def render_step(fmt: Format, return_params: bool, offload: Offload) -> Render[Response]:
    """The step answer, built from the new engine's parameters (which never change) before the commit."""

    async def render(outcome: StepOutcome, params: Mapping[str, Array], replayed: bool) -> Response:
        grad_norm = None if outcome.skipped or math.isnan(outcome.grad_norm) else outcome.grad_norm
        metadata = {
            "step": str(outcome.step),
            "lr": jsontensor.dumps(outcome.lr).decode(),
            "skipped": "true" if outcome.skipped else "false",
            "grad_norm": "null" if grad_norm is None else repr(grad_norm),
            "staleness": str(outcome.staleness),
        }
        if outcome.workers:
            metadata["workers"] = jsontensor.dumps(list(outcome.workers)).decode()
        shown = params if return_params else {}
        if fmt == "safetensors" and _numel(shown) <= INLINE_NUMBERS:
            raw = [(_RAW_STEP_HEADERS[k], v.encode("latin-1")) for k, v in metadata.items()]
            if replayed:
                raw.append((b"idempotent-replayed", b"true"))
            return HeadedResponse(safetensors.encode_bytes(shown, metadata), raw, SAFETENSORS)
        headers = {STEP_HEADERS[k]: v for k, v in metadata.items()}
        if replayed:
            headers["Idempotent-Replayed"] = "true"
        if fmt == "safetensors":
            return await safetensors_response(shown, metadata, headers)
        body = {
            "step": outcome.step,
            "lr": outcome.lr,
            "skipped": outcome.skipped,
            "grad_norm": grad_norm,
            "staleness": outcome.staleness,
        }
        if outcome.workers:
            body["workers"] = list(outcome.workers)
        if not return_params:
            return json_response(body, headers=headers)
        return await _json_tensors_response(offload, body, shown, headers)

    return render


def render_params(fmt: Format, offload: Offload) -> Callable[[int, Mapping[str, Array]], Awaitable[Response]]:
    async def render(step: int, params: Mapping[str, Array]) -> Response:
        if fmt == "safetensors":
            return await safetensors_response(params, {"step": str(step)})
        return await _json_tensors_response(offload, {"step": step}, params, None)

    return render
