"""Dependencies shared by the routers: the session service, the caller's tenant, the bounded body."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Header, Request

from app.api.errors import ApiError
from app.sessions import SessionService
from app.wire.negotiate import JSON, NotAcceptable, response_format

OPEN_TENANT = ""


def tenant_of(key: str) -> str:
    """A stable id for a key that does not reveal it (sessions are stored under this, not the key)."""
    return hashlib.sha256(key.encode()).hexdigest()[:24]


async def get_service(request: Request) -> SessionService:
    service: SessionService = request.app.state.service
    return service


async def get_tenant(request: Request, authorization: Annotated[str | None, Header()] = None) -> str:
    """The caller's tenant: open mode has one; otherwise the Bearer key must match a configured key."""
    keys: list[bytes] = request.app.state.api_keys
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


async def read_body(request: Request) -> bytes | bytearray:
    """The request body, refused with 413 as soon as it is known to exceed the limit.

    With a Content-Length the body is received straight into one buffer of that size (no regrowth);
    a body that arrives in a single message is used as it is, without any copy.
    """
    limit: int = request.app.state.settings.max_body_bytes
    declared = request.headers.get("content-length")
    expected = int(declared) if declared is not None and declared.isdigit() else None
    if expected is not None and expected > limit:
        raise ApiError(413, "Body too large", f"body of {expected} bytes exceeds the limit of {limit} bytes")
    first = b""
    buffer: bytearray | None = None
    size = 0
    async for chunk in request.stream():
        if not chunk:
            continue
        if not first and buffer is None:
            first = chunk
            size = len(chunk)
        else:
            if buffer is None:
                buffer = bytearray(max(expected or 0, size + len(chunk)))
                buffer[:size] = first
            end = size + len(chunk)
            if end > len(buffer):
                buffer.extend(bytes(end - len(buffer)))
            buffer[size:end] = chunk
            size = end
        if size > limit:
            raise ApiError(413, "Body too large", f"body exceeds the limit of {limit} bytes")
    if buffer is None:
        return first
    del buffer[size:]
    return buffer


async def json_only(request: Request) -> None:
    """406 unless `Accept` admits JSON: for the operations that answer only in JSON."""
    if response_format(request.headers.get("accept"), "json") != "json":
        raise NotAcceptable(f"this operation answers only in {JSON}")


Service = Annotated[SessionService, Depends(get_service)]
Tenant = Annotated[str, Depends(get_tenant)]
Body = Annotated[bytes | bytearray, Depends(read_body)]
JsonAnswer = Depends(json_only)
