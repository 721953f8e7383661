"""The fast transports' outgoing side (`optserve.transport`): request bodies as buffers, and a request's head
and body framing as they are sent."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeAlias

import httpx

Buffer: TypeAlias = bytes | bytearray | memoryview

ONE_SEND = 1 << 16  # a known body up to this many bytes is joined to the head (a copy costs less than a send)
LAST_CHUNK = b"0\r\n\r\n"


class BufferStream(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A request body as a sequence of buffers (bytes, memoryviews of arrays). The fast transports send each
    buffer as it is; any other transport iterates the stream and gets them joined, once: the join is kept for
    resends. The buffers are read when the request is sent: leave them unchanged until the call returns."""

    def __init__(self, parts: Iterable[Buffer]) -> None:
        self.parts = [view for view in (memoryview(p).cast("B") for p in parts) if view.nbytes]
        self.nbytes = sum(view.nbytes for view in self.parts)
        self._joined: bytes | None = None

    def joined(self) -> bytes:
        if self._joined is None:
            self._joined = b"".join(self.parts)
        return self._joined

    def __iter__(self) -> Iterator[bytes]:
        if self.nbytes:
            yield self.joined()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self.nbytes:
            yield self.joined()


@dataclass
class Outgoing:
    """A request as the transports send it: its head (with a small known body joined to it: one send), and
    its body's buffers when known up front (else the request's stream is iterated as it is sent)."""

    head: bytes
    parts: Sequence[Buffer] | None
    chunked: bool
    keep: bool


def outgoing(request: httpx.Request) -> Outgoing:
    stream = request.stream
    parts: Sequence[Buffer] | None = None
    if isinstance(stream, BufferStream):
        parts = stream.parts
    elif isinstance(stream, httpx.ByteStream):  # bytes content: replayable, iterating it costs nothing
        parts = list(stream)
    headers = request.headers
    lines = [f"{request.method} ".encode("ascii") + request.url.raw_path + b" HTTP/1.1"]
    if "host" not in headers:
        lines.append(b"Host: " + request.url.netloc)
    lines += [name + b": " + value for name, value in headers.raw]
    chunked = "chunked" in headers.get("transfer-encoding", "").lower()
    if not chunked and "content-length" not in headers:
        if parts is None:
            lines.append(b"Transfer-Encoding: chunked")
            chunked = True
        elif any(parts) or request.method in ("POST", "PUT", "PATCH"):
            lines.append(b"Content-Length: %d" % sum(len(p) for p in parts))
    elif not chunked and parts is not None:
        declared, total = headers["content-length"], sum(len(p) for p in parts)
        if not declared.isdigit() or int(declared) != total:
            raise httpx.LocalProtocolError(
                f"Content-Length {declared} but the body has {total} bytes", request=request
            )
    keep = "close" not in headers.get("connection", "").lower()
    head = b"\r\n".join(lines) + b"\r\n\r\n"
    if parts is not None and not chunked and sum(len(p) for p in parts) <= ONE_SEND:
        head, parts = b"".join([head, *parts]), []
    return Outgoing(head, parts, chunked, keep)


def framed(part: Buffer, chunked: bool) -> list[Buffer]:
    """One part of a request body as sent: itself, or as a chunk (nothing for an empty part, which would end
    a chunked body)."""
    if not chunked:
        return [part]
    return [b"%x\r\n" % len(part), part, b"\r\n"] if len(part) else []
