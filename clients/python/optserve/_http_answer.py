"""The fast transports' receiving side (`optserve.transport`): an HTTP/1.1 answer read from a connection's
bytes (status line, headers, a body delimited by its length, chunks or the connection's end), with large
bodies received straight into buffers of their own, and the httpx response made of it."""

from __future__ import annotations

import sys
import threading
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt

from optserve._http_request import Buffer, BufferStream

BODY_EXTENSION = "optserve.body"
SCRATCH = 1 << 16  # the per-connection receive buffer for heads and small bodies
SMALL = 1 << 16  # bodies up to this many bytes are plain bytes; larger ones get a buffer of their own
MAX_HEAD = 1 << 20  # an answer's status line and headers
MAX_LINE = 1 << 16  # a chunk-size line or a trailer

# The readers are generators that yield a writable memoryview to receive into and are sent back how many
# bytes arrived (0: the peer closed); the transports' core does the receiving.
Recv = Generator[memoryview, int, Any]


class Closed(Exception):
    """The peer closed the connection."""


class Buffers:
    """Where large bodies are received. Each is a buffer of its own (np.empty, not bytearray: no zeroing pass
    over memory that recv_into writes anyway), handed over with the answer. The last one is kept: once
    nothing else references it (its arrays were dropped, say, after being copied into a model), the next
    answer of the same size is received into it again, which spares the page faults of fresh memory (and the
    compaction that fresh huge pages can cost)."""

    def __init__(self) -> None:
        self.kept: npt.NDArray[np.uint8] | None = None
        self.lock = threading.Lock()

    def get(self, size: int) -> memoryview:
        with self.lock:
            kept = self.kept
            # References: self.kept, `kept`, getrefcount's argument. Any array, memoryview or tensor made
            # from the buffer holds one more, so this is exact. (Not on interpreters without refcounts.)
            if kept is not None and kept.size == size and _REFCOUNT and sys.getrefcount(kept) == 3:
                return kept.data
            self.kept = kept = np.empty(size, np.uint8)
            return kept.data

    def clear(self) -> None:
        with self.lock:
            self.kept = None


_REFCOUNT = hasattr(sys, "getrefcount") and sys.implementation.name == "cpython"


class Receiver:
    """A connection's received bytes not yet consumed (`buf[start:end]`), and the readers of an answer."""

    def __init__(self, buffers: Buffers) -> None:
        self.buffers = buffers
        self.buf = bytearray(SCRATCH)
        self.start = self.end = 0

    @property
    def pending(self) -> int:
        return self.end - self.start

    def _fill(self) -> Recv:
        if self.start == self.end:
            self.start = self.end = 0
        elif self.end == len(self.buf):
            pending = self.end - self.start
            if self.start:  # move what is pending to the front (no resize: the memoryviews lent stay valid)
                self.buf[:pending] = self.buf[self.start : self.end]
            else:  # a head longer than the buffer (bounded by the callers): a larger buffer
                old, self.buf = self.buf, bytearray(len(self.buf) * 2)
                self.buf[:pending] = old
            self.start, self.end = 0, pending
        n = yield memoryview(self.buf)[self.end :]
        if not n:
            raise Closed
        self.end += n

    def _find(self, delimiter: bytes, limit: int, what: str) -> Recv:
        """Bytes up to `delimiter` (consumed with it, not returned)."""
        searched = self.start
        while True:
            at = self.buf.find(delimiter, searched, self.end)
            if at >= 0:
                found = bytes(self.buf[self.start : at])
                self.start = at + len(delimiter)
                return found
            if self.end - self.start > limit:
                raise httpx.RemoteProtocolError(f"{what} longer than {limit} bytes")
            searched = max(self.start, self.end - len(delimiter) + 1)
            offset = self.start
            yield from self._fill()
            searched -= offset - self.start  # the pending bytes may have moved to the front

    def head(self) -> Recv:
        return (yield from self._find(b"\r\n\r\n", MAX_HEAD, "the answer's head"))

    def line(self) -> Recv:
        return (yield from self._find(b"\r\n", MAX_LINE, "a line of a chunked body"))

    def exact(self, length: int) -> Recv:
        """`length` bytes: bytes when small, else a writable memoryview of a buffer of their own."""
        if length <= SMALL:
            while self.pending < length:
                yield from self._fill()
            data = bytes(self.buf[self.start : self.start + length])
            self.start += length
            return data
        view = self.buffers.get(length)
        got = min(length, self.pending)
        view[:got] = self.buf[self.start : self.start + got]
        self.start += got
        while got < length:
            n = yield view[got:]
            if not n:
                raise Closed
            got += n
        return view

    def chunked(self) -> Recv:
        parts: list[Buffer] = []
        while True:
            size_line = yield from self.line()
            size = _chunk_size(size_line)
            if not size:
                break
            parts.append((yield from self.exact(size)))
            if (yield from self.line()) != b"":
                raise httpx.RemoteProtocolError("a chunk of the answer is longer than its size says")
        while (yield from self.line()) != b"":  # trailers, dropped
            pass
        return self._joined(parts)

    def until_closed(self) -> Recv:
        parts: list[Buffer] = []
        try:
            while True:
                yield from self._fill()
                parts.append(bytes(self.buf[self.start : self.end]))
                self.start = self.end
        except Closed:
            return self._joined(parts)

    def answer(self, method: str) -> Recv:
        while True:
            version, status, reason, headers = _parse_head((yield from self.head()))
            if status >= 200:
                break
            if status == 101:
                raise httpx.RemoteProtocolError("the server switched protocols, which this transport cannot")
        framing, length, close = _framing(method, status, headers)
        body: Buffer
        if framing == "none":
            body = b""
        elif framing == "length":
            body = yield from self.exact(length)
        elif framing == "chunked":
            body = yield from self.chunked()
        else:
            body = yield from self.until_closed()
        keep = version == b"HTTP/1.1" and not close and framing != "eof" and not self.pending
        return Answer(status, reason, headers, body, keep)

    def _joined(self, parts: list[Buffer]) -> Buffer:
        if len(parts) == 1:
            return parts[0]
        total = sum(len(p) for p in parts)
        if total <= SMALL:
            return b"".join(parts)
        view = self.buffers.get(total)
        at = 0
        for part in parts:
            view[at : at + len(part)] = part
            at += len(part)
        return view


_HEX = frozenset(b"0123456789abcdefABCDEF")


def _chunk_size(line: bytes) -> int:
    text = line.split(b";", 1)[0].strip(b" \t")
    if not text or not set(text) <= _HEX or len(text) > 16:
        raise httpx.RemoteProtocolError(f"malformed chunk size line {line[:80]!r}")
    return int(text, 16)


@dataclass
class Answer:
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: Buffer
    keep: bool  # the connection may carry another request


def _parse_head(head: bytes) -> tuple[bytes, int, bytes, list[tuple[bytes, bytes]]]:
    first, *lines = head.split(b"\r\n")
    version, _, rest = first.partition(b" ")
    code, _, reason = rest.partition(b" ")
    if not version.startswith(b"HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise httpx.RemoteProtocolError(f"malformed status line {first[:80]!r}")
    headers: list[tuple[bytes, bytes]] = []
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip(b" \t"):
            raise httpx.RemoteProtocolError(f"malformed header line {line[:80]!r}")
        headers.append((name, value.strip(b" \t")))
    return version, int(code), reason, headers


def _framing(method: str, status: int, headers: list[tuple[bytes, bytes]]) -> tuple[str, int, bool]:
    """How the body is delimited (`none`, `length`, `chunked`, or `eof`: until the server closes), its length
    for `length`, and whether the server closes the connection after it."""
    length: int | None = None
    codings: bytes | None = None
    close = False
    for name, value in headers:
        lower = name.lower()
        if lower == b"content-length":
            if not value.isdigit() or (length is not None and int(value) != length):
                raise httpx.RemoteProtocolError(f"malformed Content-Length {value[:40]!r}")
            length = int(value)
        elif lower == b"transfer-encoding":
            codings = value.lower() if codings is None else codings + b"," + value.lower()
        elif lower == b"connection":
            close = close or b"close" in (token.strip() for token in value.lower().split(b","))
    if method == "HEAD" or status in (204, 304):
        return "none", 0, close
    if codings is not None:
        if [c.strip() for c in codings.split(b",")] != [b"chunked"]:
            raise httpx.RemoteProtocolError(f"unsupported Transfer-Encoding {codings[:40]!r}")
        return "chunked", 0, close
    if length is not None:
        return "length", length, close
    return "eof", 0, True


class _Received(BufferStream):
    """An answer's body, already received whole (joined into bytes only if iterated); let go of when the
    response is closed (httpx's responses live in a reference cycle, until the garbage collector's next pass).
    """

    def close(self) -> None:
        self.parts, self.nbytes, self._joined = [], 0, None

    async def aclose(self) -> None:
        self.close()


def response(answer: Answer, request: httpx.Request) -> httpx.Response:
    extensions: dict[str, Any] = {"http_version": b"HTTP/1.1", "reason_phrase": answer.reason}
    body = answer.body
    # A body that needs decoding (gzip...) must go through httpx's decoders: only `content` has it right.
    encoded = any(n.lower() == b"content-encoding" and v.lower() != b"identity" for n, v in answer.headers)
    if request.extensions.get(BODY_EXTENSION) and isinstance(body, memoryview) and not encoded:
        extensions[BODY_EXTENSION] = body
    return httpx.Response(
        answer.status, headers=answer.headers, stream=_Received([body]), extensions=extensions
    )
