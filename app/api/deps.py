"""Dependencies shared by the routers: the session service, the caller's tenant, the bounded body."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from typing import Annotated, Any

import numpy as np
import numpy.typing as npt
from fastapi import Depends, Request
from starlette.requests import ClientDisconnect
from starlette.types import Receive

from app.api.errors import ApiError
from app.api.offload import Offload
from app.metrics import content_length
from app.sessions import SessionService
from app.settings import Settings
from app.wire.negotiate import JSON, NotAcceptable, UnsupportedMediaType, request_format, response_format

OPEN_TENANT = ""
Buffer = bytes | bytearray | memoryview


def tenant_of(key: str) -> str:
    """A stable id for a key that does not reveal it (sessions are stored under this, not the key)."""
    return hashlib.sha256(key.encode()).hexdigest()[:24]


async def get_service(request: Request) -> SessionService:
    service: SessionService = request.app.state.service
    return service


async def get_offload(request: Request) -> Offload:
    offload: Offload = request.app.state.offload
    return offload


async def get_tenant(request: Request) -> str:
    """The caller's tenant (`tenant_for`). (The OpenAPI document declares the key as a bearer security
    scheme, not as a header parameter.)"""
    return tenant_for(request.app.state.api_keys, request.headers.get("authorization"))


def tenant_for(keys: list[bytes], authorization: str | None) -> str:
    """The caller's tenant: open mode has one; otherwise the Bearer key must match a configured key."""
    if not keys:
        return OPEN_TENANT
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(
            401, "Unauthorized", "send `Authorization: Bearer <key>`", {"WWW-Authenticate": "Bearer"}
        )
    given = token.strip().encode()
    match = None
    for key in keys:  # every key is compared, so timing does not tell which prefix matched
        if hmac.compare_digest(given, key):
            match = key
    if match is None:
        raise ApiError(401, "Unauthorized", "unknown API key", {"WWW-Authenticate": "Bearer"})
    return tenant_of(match.decode())


class InflightBytes:
    """The bytes reserved by request bodies being received, against `OPTSERVE_MAX_INFLIGHT_BYTES`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def reserve(self, nbytes: int) -> None:
        if self.used + nbytes > self.limit:
            raise ApiError(
                503,
                "Busy",
                f"bodies being received already hold {self.used} bytes; this one needs {nbytes} more, past "
                f"OPTSERVE_MAX_INFLIGHT_BYTES={self.limit}: retry",
                {"Retry-After": "1"},
            )
        self.used += nbytes

    def release(self, nbytes: int) -> None:
        self.used -= nbytes


class BodyDeadlines:
    """The requests whose body must arrive by a time, watched by one check every `PERIOD` seconds for all
    of them: asyncio's own timeout costs every request a timer of its own (about 8 us of a small step);
    this costs a dict entry, and a late body is refused within `PERIOD` seconds of its deadline."""

    PERIOD = 0.25

    def __init__(self) -> None:
        self._due: dict[asyncio.Task[Any], float] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def watch(self, task: asyncio.Task[Any], seconds: float) -> None:
        loop = asyncio.get_running_loop()
        self._due[task] = loop.time() + seconds
        if self._timer is None or self._loop is not loop:  # none yet, or one of a loop gone since
            self._loop = loop
            self._timer = loop.call_later(self.PERIOD, self._check)

    def release(self, task: asyncio.Task[Any]) -> bool:
        """Stops watching `task`; whether its deadline passed (and `_check` cancelled it)."""
        self._due.pop(task, None)
        if task in self._expired:
            self._expired.discard(task)
            return True
        return False

    def _check(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        for task, due in list(self._due.items()):
            if due <= now and task not in self._expired:
                self._expired.add(task)
                task.cancel()  # raised where the task waits: at its `receive()` in `receive_body`
        self._timer = self._loop.call_later(self.PERIOD, self._check) if self._due else None


async def read_body(request: Request) -> Buffer:
    """The request body, bounded before it costs anything (`receive_body`)."""
    state = request.app.state
    headers = request.headers
    return await receive_body(
        request.receive,
        state.settings,
        state.inflight,
        state.deadlines,
        headers.get("content-type"),
        headers.get("content-length"),
    )


async def receive_body(
    receive: Receive,
    settings: Settings,
    inflight: InflightBytes,
    deadlines: BodyDeadlines,
    content_type: str | None,
    declared: str | None,
) -> Buffer:
    """The request body, bounded before it costs anything.

    Larger than `OPTSERVE_MAX_BODY_BYTES` (declared or received): 413. Not complete within
    `OPTSERVE_BODY_TIMEOUT` seconds, however slowly it trickles: 408. Memory is taken as bytes arrive,
    never on a Content-Length's word: nothing is reserved before the body's first bytes are there, and the
    buffer then reserved for the declared size is uninitialized memory, whose pages the system provides
    only as bytes are written into them (a client that declares 1 GB and sends 2 bytes costs 2 bytes).
    Reservations of the bodies being received count against `OPTSERVE_MAX_INFLIGHT_BYTES` (503 with
    Retry-After past it). A body that arrives in one piece is used as it is, without a copy; a longer
    one is received straight into its buffer, so the large step keeps its speed.
    """
    limit: int = settings.max_body_bytes
    setting = "OPTSERVE_MAX_BODY_BYTES"
    if _is_json(content_type) and settings.max_json_bytes < limit:
        # parsing JSON holds the interpreter for the whole document: ~5 ms per MB here
        limit, setting = settings.max_json_bytes, "OPTSERVE_MAX_JSON_BYTES"
    expected = content_length(declared)
    if expected is not None and expected > limit:
        raise _too_large(f"a body of {expected} bytes", setting, limit)
    reserved = 0
    first = b""
    buffer: npt.NDArray[np.uint8] | None = None
    size = 0
    task = asyncio.current_task()
    assert task is not None
    deadlines.watch(task, settings.body_timeout)
    expired = False
    try:
        more = True
        while more:
            message = await receive()  # the one wait: where a passed deadline cancels the request
            if message["type"] != "http.request":  # http.disconnect: nobody waits for an answer
                raise ClientDisconnect()
            chunk = message.get("body", b"")
            more = message.get("more_body", False)
            if not chunk:
                continue
            end = size + len(chunk)
            if end > limit:
                raise _too_large("the body", setting, limit)
            if not first and buffer is None:
                first, size = chunk, end
                continue
            if buffer is None or end > len(buffer):
                # the declared size, or (without one, or past it) twice what has arrived
                capacity = min(limit, max(end, expected or 0, 2 * size))
                inflight.reserve(capacity - reserved)
                reserved = capacity
                grown = np.empty(capacity, np.uint8)
                grown[:size] = np.frombuffer(first, np.uint8) if buffer is None else buffer[:size]
                buffer = grown
            buffer[size:end] = np.frombuffer(chunk, np.uint8)
            size = end
    except asyncio.CancelledError:
        expired = deadlines.release(task)
        if not expired:
            raise  # cancelled by someone else (the server, a disconnect): not ours to answer
        task.uncancel()
        raise ApiError(
            408,
            "Request timeout",
            f"the body did not arrive within OPTSERVE_BODY_TIMEOUT={settings.body_timeout} seconds",
            {"Connection": "close"},
        ) from None
    finally:
        if not expired:
            deadlines.release(task)
        inflight.release(reserved)
    if buffer is None:
        return first
    return buffer[:size].data


def _too_large(what: str, setting: str, limit: int) -> ApiError:
    hint = "; send large tensors as safetensors" if setting == "OPTSERVE_MAX_JSON_BYTES" else ""
    return ApiError(413, "Body too large", f"{what} exceeds {setting}={limit}{hint}")


def _is_json(content_type: str | None) -> bool:
    """Whether a body will be parsed as JSON (a missing Content-Type is read as JSON)."""
    try:
        return request_format(content_type) == "json"
    except UnsupportedMediaType:
        return False


async def json_only(request: Request) -> None:
    """406 unless `Accept` admits JSON: for the operations that answer only in JSON."""
    if response_format(request.headers.get("accept"), "json") != "json":
        raise NotAcceptable(f"this operation answers only in {JSON}")


Service = Annotated[SessionService, Depends(get_service)]
Tenant = Annotated[str, Depends(get_tenant)]
Offloader = Annotated[Offload, Depends(get_offload)]
Body = Annotated[Buffer, Depends(read_body)]
JsonAnswer = Depends(json_only)
