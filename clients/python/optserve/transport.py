"""HTTP/1.1 keep-alive transports for httpx, tuned for the large bodies of optserve steps: `FastTransport`
(blocking, for `httpx.Client`) and `AsyncFastTransport` (asyncio, for `httpx.AsyncClient`). `Client` and
`AsyncClient` use them for `http://` URLs unless given a `transport` or an `http_client`.

Why: httpx's own transport (httpcore and h11) sends a body by slicing what is left of it after every partial
`send` (a copy of the rest each time) and receives one in 64 KiB pieces that go through h11's state machine
and are then joined into a new bytes object; for the 40 MB that a 1e7-parameter step carries each way, that
costs more than the step itself. These transports speak the same HTTP/1.1 with less in between:

- the request head is sent, then each body buffer as it is (`BufferStream` holds memoryviews of the arrays,
  never joined);
- the answer's head is read into a small scratch buffer, and a body with a Content-Length straight into one
  buffer of that size with `recv_into` (chunked and close-delimited answers are read too). A request that
  asks with `extensions={"optserve.body": True}` gets a body over 64 KiB handed over as it is, in
  `response.extensions["optserve.body"]`: a writable memoryview that nothing else references (`content`
  would copy it). The buffer is received into again for a later answer of the same size once nothing
  references it any more;
- sockets have TCP_NODELAY and 4 MiB send and receive buffers;
- connections are kept alive in a small pool. An idle connection the server has closed is noticed before it
  is used; a request whose first byte could not be sent on a reused connection is sent once more on a fresh
  one. Once bytes have left, a broken exchange raises `httpx.ReadError`, `httpx.WriteError` or
  `httpx.RemoteProtocolError`, for the caller's retry logic (the SDK resends only what is safe to resend);
- timeouts (httpx's `connect`, `read`, `write`, each bounding one wait) raise `httpx.ConnectTimeout`,
  `httpx.ReadTimeout`, `httpx.WriteTimeout`; failing to connect raises `httpx.ConnectError`;
- if the server answers before it has read the whole request (a 413, say), sending stops and the answer is
  returned.

Only plain `http://` is spoken: other schemes go to httpx's default transport. No proxies, no HTTP/2, no
`Expect: 100-continue`, no upgrades. `AsyncFastTransport` needs asyncio (or uvloop) with readiness callbacks;
under another async library, or Windows' proactor loop, it hands requests to httpx's default transport.
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
import sys
import threading
from collections.abc import AsyncIterator, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import httpx
import numpy as np
import numpy.typing as npt

__all__ = ["BODY_EXTENSION", "AsyncFastTransport", "BufferStream", "FastTransport"]

Buffer: TypeAlias = bytes | bytearray | memoryview

BODY_EXTENSION = "optserve.body"
SOCKET_BUFFER = 4 << 20
SCRATCH = 1 << 16  # the per-connection receive buffer for heads and small bodies
SMALL = 1 << 16  # bodies up to this many bytes are plain bytes; larger ones get a buffer of their own
MAX_HEAD = 1 << 20  # an answer's status line and headers
MAX_LINE = 1 << 16  # a chunk-size line or a trailer
MAX_IDLE = 8  # idle connections kept per host and port

_Origin = tuple[str, int]
# The receive side is written once, as generators that yield a writable memoryview to receive into and are
# sent back how many bytes arrived (0: the peer closed); the blocking and asyncio drivers do the I/O.
_Recv = Generator[memoryview, int, Any]


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


class _Received(httpx.SyncByteStream, httpx.AsyncByteStream):
    """An answer's body, already received whole; let go of when the response is closed (httpx's responses
    live in a reference cycle, until the garbage collector's next pass)."""

    def __init__(self, body: Buffer) -> None:
        self.body = body

    def close(self) -> None:
        self.body = b""

    async def aclose(self) -> None:
        self.body = b""

    def __iter__(self) -> Iterator[bytes]:
        if self.body:
            yield self.body if isinstance(self.body, bytes) else bytes(self.body)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for part in self:
            yield part


class _Closed(Exception):
    """The peer closed the connection."""


class _Unsent(Exception):
    """Not one byte of the request was taken by the connection; `error` is what to raise if it is not sent
    again on a fresh one."""

    def __init__(self, error: httpx.TransportError) -> None:
        self.error = error


# -- receiving ------------------------------------------------------------------------------------------


class _Buffers:
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


class _Receiver:
    """A connection's received bytes not yet consumed (`buf[start:end]`), and the readers of an answer."""

    def __init__(self, buffers: _Buffers) -> None:
        self.buffers = buffers
        self.buf = bytearray(SCRATCH)
        self.start = self.end = 0

    @property
    def pending(self) -> int:
        return self.end - self.start

    def _fill(self) -> _Recv:
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
            raise _Closed
        self.end += n

    def _find(self, delimiter: bytes, limit: int, what: str) -> _Recv:
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

    def head(self) -> _Recv:
        return (yield from self._find(b"\r\n\r\n", MAX_HEAD, "the answer's head"))

    def line(self) -> _Recv:
        return (yield from self._find(b"\r\n", MAX_LINE, "a line of a chunked body"))

    def exact(self, length: int) -> _Recv:
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
                raise _Closed
            got += n
        return view

    def chunked(self) -> _Recv:
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

    def until_closed(self) -> _Recv:
        parts: list[Buffer] = []
        try:
            while True:
                yield from self._fill()
                parts.append(bytes(self.buf[self.start : self.end]))
                self.start = self.end
        except _Closed:
            return self._joined(parts)

    def answer(self, method: str) -> _Recv:
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
        return _Answer(status, reason, headers, body, keep)

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
class _Answer:
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


def _response(answer: _Answer, request: httpx.Request) -> httpx.Response:
    extensions: dict[str, Any] = {"http_version": b"HTTP/1.1", "reason_phrase": answer.reason}
    body = answer.body
    # A body that needs decoding (gzip...) must go through httpx's decoders: only `content` has it right.
    encoded = any(n.lower() == b"content-encoding" and v.lower() != b"identity" for n, v in answer.headers)
    if request.extensions.get(BODY_EXTENSION) and isinstance(body, memoryview) and not encoded:
        extensions[BODY_EXTENSION] = body
    return httpx.Response(
        answer.status, headers=answer.headers, stream=_Received(body), extensions=extensions
    )


# -- sending --------------------------------------------------------------------------------------------


@dataclass
class _Outgoing:
    """A request as the transports send it: its head, and its body as buffers when known up front (else the
    request's stream is iterated as it is sent)."""

    head: bytes
    parts: Sequence[Buffer] | None
    chunked: bool
    keep: bool

    def small(self) -> bytes | None:
        """Head and body in one piece, when the body is known and small: one send."""
        if self.parts is None or self.chunked or sum(len(p) for p in self.parts) > SMALL:
            return None
        return b"".join([self.head, *self.parts])


def _outgoing(request: httpx.Request) -> _Outgoing:
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
    return _Outgoing(b"\r\n".join(lines) + b"\r\n\r\n", parts, chunked, keep)


LAST_CHUNK = b"0\r\n\r\n"


def _chunk(part: Buffer) -> list[Buffer]:
    """One part of a chunked request body, framed (nothing for an empty part, which would end the body)."""
    return [b"%x\r\n" % len(part), part, b"\r\n"] if len(part) else []


def _framed(parts: Iterable[Buffer], chunked: bool) -> Iterator[Buffer]:
    if not chunked:
        yield from parts
        return
    for part in parts:
        yield from _chunk(part)
    yield LAST_CHUNK


if hasattr(select, "poll"):

    def _readable(sock: socket.socket) -> bool:
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))

    def _room_or_answer(sock: socket.socket, timeout: float | None) -> bool:
        """Waits until `sock` takes more (False) or has something to read (True: the server answers, or
        closed, before it took the whole request); TimeoutError after `timeout` seconds of neither."""
        poller = select.poll()
        poller.register(sock, select.POLLIN | select.POLLOUT)
        events = poller.poll(None if timeout is None else max(0, int(timeout * 1000)))
        if not events:
            raise TimeoutError("timed out")
        return bool(events[0][1] & (select.POLLIN | select.POLLHUP | select.POLLERR))

else:  # pragma: no cover - Windows

    def _readable(sock: socket.socket) -> bool:
        return bool(select.select([sock], [], [], 0)[0])

    def _room_or_answer(sock: socket.socket, timeout: float | None) -> bool:
        readable, writable, _ = select.select([sock], [sock], [], timeout)
        if not readable and not writable:
            raise TimeoutError("timed out")
        return bool(readable)


class _Connection:
    def __init__(self, sock: socket.socket, origin: _Origin, buffers: _Buffers) -> None:
        self.sock = sock
        self.origin = origin
        self.receiver = _Receiver(buffers)
        self.reused = False
        self.sent = False  # some byte of the current request was taken by the socket
        self.partial = False  # a send took less than it was given: watch for an early answer from then on
        self.cut = False  # the request was not sent whole (an early answer, a failed send): do not reuse

    def usable(self) -> bool:
        """An idle connection has nothing to read: readable means the server closed it (or sent junk)."""
        try:
            return self.sock.fileno() >= 0 and not _readable(self.sock)
        except (OSError, ValueError):
            return False

    def close(self) -> None:
        self.sock.close()


def _tune(sock: socket.socket, buffer_size: int | None) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if buffer_size:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_size)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_size)


def _timeouts(request: httpx.Request) -> tuple[float | None, float | None, float | None]:
    timeout = request.extensions.get("timeout") or {}
    return timeout.get("connect"), timeout.get("read"), timeout.get("write")


def _origin(request: httpx.Request) -> _Origin:
    return request.url.host, request.url.port or 80


class _Pool:
    """Idle connections per origin, most recent first out; forgotten in a forked child."""

    def __init__(self, max_idle: int) -> None:
        self.max_idle = max_idle
        self.idle: dict[_Origin, list[_Connection]] = {}
        self.lock = threading.Lock()
        self.pid = os.getpid()

    def take(self, origin: _Origin) -> _Connection | None:
        with self.lock:
            if self.pid != os.getpid():
                self.idle, self.pid = {}, os.getpid()
            idle = self.idle.get(origin)
            while idle:
                conn = idle.pop()
                if conn.usable():
                    conn.reused, conn.sent, conn.partial, conn.cut = True, False, False, False
                    return conn
                conn.close()
        return None

    def give(self, conn: _Connection) -> None:
        with self.lock:
            idle = self.idle.setdefault(conn.origin, [])
            if len(idle) < self.max_idle:
                idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self.lock:
            idle, self.idle = self.idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()


# -- the blocking transport -----------------------------------------------------------------------------


class _Core:
    """What the blocking and the asyncio transports share: the pool, the answer buffers, their settings."""

    def __init__(self, socket_buffer: int | None, max_idle: int) -> None:
        self.socket_buffer = socket_buffer
        self._pool = _Pool(max_idle)
        self._buffers = _Buffers()
        self.connections_opened = 0

    def _opened(self, sock: socket.socket, origin: _Origin) -> _Connection:
        self.connections_opened += 1
        return _Connection(sock, origin, self._buffers)

    def _settle(
        self, conn: _Connection, outgoing: _Outgoing, answer: _Answer, request: httpx.Request
    ) -> httpx.Response:
        """Keeps the connection for the next request when both sides allow it, and makes the response."""
        if answer.keep and outgoing.keep and not conn.cut:
            self._pool.give(conn)
        else:
            conn.close()
        return _response(answer, request)

    def _release(self) -> None:
        self._pool.close()
        self._buffers.clear()


class FastTransport(_Core, httpx.BaseTransport):
    """A blocking HTTP/1.1 keep-alive transport for large bodies; see the module's description.

    `socket_buffer`: SO_SNDBUF and SO_RCVBUF in bytes (None keeps the system's). `max_idle`: idle connections
    kept per host. `fallback`: the transport for other schemes than http (default: `httpx.HTTPTransport()`).
    """

    def __init__(
        self,
        *,
        socket_buffer: int | None = SOCKET_BUFFER,
        max_idle: int = MAX_IDLE,
        fallback: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(socket_buffer, max_idle)
        self._fallback = fallback

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.scheme != "http":
            if self._fallback is None:
                self._fallback = httpx.HTTPTransport()
            return self._fallback.handle_request(request)
        connect_timeout, read_timeout, write_timeout = _timeouts(request)
        outgoing = _outgoing(request)
        origin = _origin(request)
        conn = self._pool.take(origin) or self._connect(request, origin, connect_timeout)
        while True:
            try:
                answer = self._exchange(conn, request, outgoing, read_timeout, write_timeout)
            except _Unsent as unsent:
                conn.close()
                if not conn.reused:
                    raise unsent.error from unsent.error.__cause__
                # The server closed it while it was idle: once more, on a fresh connection.
                conn = self._connect(request, origin, connect_timeout)
                continue
            except BaseException:
                conn.close()
                raise
            return self._settle(conn, outgoing, answer, request)

    def _connect(self, request: httpx.Request, origin: _Origin, timeout: float | None) -> _Connection:
        host, port = origin
        error: OSError | None = None
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise httpx.ConnectError(f"cannot resolve {host}: {exc}", request=request) from exc
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            try:
                _tune(sock, self.socket_buffer)  # before connecting: the window scale is agreed then
                sock.settimeout(timeout)
                sock.connect(address)
            except TimeoutError as exc:
                sock.close()
                raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out", request=request) from exc
            except OSError as exc:
                sock.close()
                error = exc
                continue
            return self._opened(sock, origin)
        raise httpx.ConnectError(f"cannot connect to {host}:{port}: {error}", request=request) from error

    def _exchange(
        self,
        conn: _Connection,
        request: httpx.Request,
        outgoing: _Outgoing,
        read_timeout: float | None,
        write_timeout: float | None,
    ) -> _Answer:
        sock = conn.sock
        try:
            sock.settimeout(write_timeout)
            self._send_request(conn, request, outgoing, write_timeout)
        except TimeoutError as exc:
            raise httpx.WriteTimeout("sending the request timed out", request=request) from exc
        except OSError as exc:
            error = httpx.WriteError(f"sending the request failed: {exc}", request=request)
            error.__cause__ = exc
            if not conn.sent:
                raise _Unsent(error) from exc
            conn.cut = True
            try:  # the server may have answered, then closed, before it read the whole request
                return self._receive(conn, request, read_timeout)
            except httpx.TransportError:
                raise error from exc
        return self._receive(conn, request, read_timeout)

    def _send_request(
        self, conn: _Connection, request: httpx.Request, outgoing: _Outgoing, timeout: float | None
    ) -> None:
        small = outgoing.small()
        if small is not None:
            self._send(conn, small, timeout)
            return
        if self._send(conn, outgoing.head, timeout):
            return
        body: Iterable[Buffer]
        if outgoing.parts is not None:
            body = outgoing.parts
        else:
            assert isinstance(request.stream, httpx.SyncByteStream)
            body = request.stream
        for part in _framed(body, outgoing.chunked):
            if self._send(conn, part, timeout):
                return

    @staticmethod
    def _send(conn: _Connection, data: Buffer, timeout: float | None) -> bool:
        """Sends `data`; True when the server has started answering (or closed) before the request was
        whole: then sending stops. Once the socket's buffer has been full, each send waits for room or an
        answer, whichever comes first."""
        view = memoryview(data).cast("B")
        sock = conn.sock
        while view:
            if conn.partial and _room_or_answer(sock, timeout):
                conn.cut = True
                return True
            n = sock.send(view)
            conn.sent = True
            if n < len(view):
                conn.partial = True
            view = view[n:]
        return False

    @staticmethod
    def _receive(conn: _Connection, request: httpx.Request, timeout: float | None) -> _Answer:
        sock = conn.sock
        got = 0
        reader = conn.receiver.answer(request.method)
        try:
            sock.settimeout(timeout)
            view = next(reader)
            while True:
                n = sock.recv_into(view)
                got += n
                view = reader.send(n)
        except StopIteration as done:
            answer: _Answer = done.value
            return answer
        except TimeoutError as exc:
            raise httpx.ReadTimeout("reading the answer timed out", request=request) from exc
        except OSError as exc:
            raise httpx.ReadError(f"reading the answer failed: {exc}", request=request) from exc
        except _Closed:
            raise _closed(request, got) from None

    def close(self) -> None:
        self._release()
        if self._fallback is not None:
            self._fallback.close()


def _closed(request: httpx.Request, got: int) -> httpx.RemoteProtocolError:
    if got:
        return httpx.RemoteProtocolError(
            "the server closed the connection before the whole answer arrived", request=request
        )
    return httpx.RemoteProtocolError("the server closed the connection without answering", request=request)


# -- the asyncio transport ------------------------------------------------------------------------------

_READ, _WRITE, _TIMEOUT = 1, 2, 3


async def _ready(sock: socket.socket, read: bool, write: bool, timeout: float | None) -> int:
    """Waits until `sock` is readable (`_READ`) or writable (`_WRITE`), or `timeout` passes (`_TIMEOUT`)."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[int] = loop.create_future()

    def wake(what: int) -> None:
        if not waiter.done():
            waiter.set_result(what)

    fd = sock.fileno()
    if read:
        loop.add_reader(fd, wake, _READ)
    if write:
        loop.add_writer(fd, wake, _WRITE)
    timer = loop.call_later(timeout, wake, _TIMEOUT) if timeout is not None else None
    try:
        return await waiter
    finally:
        if read:
            loop.remove_reader(fd)
        if write:
            loop.remove_writer(fd)
        if timer is not None:
            timer.cancel()


class AsyncFastTransport(_Core, httpx.AsyncBaseTransport):
    """`FastTransport` on asyncio (uvloop too): non-blocking sockets driven by the running loop. Same
    arguments; `fallback` is async, and also takes requests made under another async library than asyncio."""

    def __init__(
        self,
        *,
        socket_buffer: int | None = SOCKET_BUFFER,
        max_idle: int = MAX_IDLE,
        fallback: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(socket_buffer, max_idle)
        self._fallback = fallback

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            loop = asyncio.get_running_loop()
            # Readiness callbacks (add_reader): not on Windows' default proactor loop.
            usable = sys.platform != "win32" or isinstance(loop, asyncio.SelectorEventLoop)
        except RuntimeError:  # trio, say
            usable = False
        if request.url.scheme != "http" or not usable:
            if self._fallback is None:
                self._fallback = httpx.AsyncHTTPTransport()
            return await self._fallback.handle_async_request(request)
        connect_timeout, read_timeout, write_timeout = _timeouts(request)
        outgoing = _outgoing(request)
        origin = _origin(request)
        conn = self._pool.take(origin) or await self._connect(request, origin, connect_timeout)
        while True:
            try:
                answer = await self._exchange(conn, request, outgoing, read_timeout, write_timeout)
            except _Unsent as unsent:
                conn.close()
                if not conn.reused:
                    raise unsent.error from unsent.error.__cause__
                conn = await self._connect(request, origin, connect_timeout)
                continue
            except BaseException:
                conn.close()
                raise
            return self._settle(conn, outgoing, answer, request)

    async def _connect(self, request: httpx.Request, origin: _Origin, timeout: float | None) -> _Connection:
        loop = asyncio.get_running_loop()
        host, port = origin
        error: OSError | None = None
        try:
            async with asyncio.timeout(timeout):
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                for family, kind, proto, _, address in infos:
                    sock = socket.socket(family, kind, proto)
                    try:
                        _tune(sock, self.socket_buffer)
                        sock.setblocking(False)
                        await loop.sock_connect(sock, address)
                    except OSError as exc:
                        sock.close()
                        error = exc
                        continue
                    except BaseException:
                        sock.close()
                        raise
                    return self._opened(sock, origin)
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out", request=request) from exc
        except OSError as exc:
            raise httpx.ConnectError(f"cannot connect to {host}:{port}: {exc}", request=request) from exc
        raise httpx.ConnectError(f"cannot connect to {host}:{port}: {error}", request=request) from error

    async def _exchange(
        self,
        conn: _Connection,
        request: httpx.Request,
        outgoing: _Outgoing,
        read_timeout: float | None,
        write_timeout: float | None,
    ) -> _Answer:
        try:
            await self._send_request(conn, request, outgoing, write_timeout)
        except OSError as exc:
            error = httpx.WriteError(f"sending the request failed: {exc}", request=request)
            error.__cause__ = exc
            if not conn.sent:
                raise _Unsent(error) from exc
            conn.cut = True
            try:
                return await self._receive(conn, request, read_timeout)
            except httpx.TransportError:
                raise error from exc
        return await self._receive(conn, request, read_timeout)

    async def _send_request(
        self, conn: _Connection, request: httpx.Request, outgoing: _Outgoing, timeout: float | None
    ) -> None:
        small = outgoing.small()
        if small is not None:
            await self._send(conn, request, small, timeout)
            return
        if await self._send(conn, request, outgoing.head, timeout):
            return
        if outgoing.parts is not None:
            for part in _framed(outgoing.parts, outgoing.chunked):
                if await self._send(conn, request, part, timeout):
                    return
            return
        assert isinstance(request.stream, httpx.AsyncByteStream)
        async for part in request.stream:
            for piece in _chunk(part) if outgoing.chunked else [part]:
                if await self._send(conn, request, piece, timeout):
                    return
        if outgoing.chunked:
            await self._send(conn, request, LAST_CHUNK, timeout)

    @staticmethod
    async def _send(conn: _Connection, request: httpx.Request, data: Buffer, timeout: float | None) -> bool:
        view = memoryview(data).cast("B")
        sock = conn.sock
        while view:
            try:
                n = sock.send(view)
            except (BlockingIOError, InterruptedError):
                n = 0
            if n:
                conn.sent = True
                view = view[n:]
                if not view:
                    break
            conn.partial = True
            # Writable: go on; readable first: the server answers (or closed) before taking it all.
            what = await _ready(sock, read=conn.sent, write=True, timeout=timeout)
            if what == _TIMEOUT:
                raise httpx.WriteTimeout("sending the request timed out", request=request)
            if what == _READ:
                conn.cut = True
                return True
        return False

    @staticmethod
    async def _receive(conn: _Connection, request: httpx.Request, timeout: float | None) -> _Answer:
        sock = conn.sock
        got = 0
        reader = conn.receiver.answer(request.method)
        try:
            view = next(reader)
            while True:
                try:
                    n = sock.recv_into(view)
                except (BlockingIOError, InterruptedError):
                    if await _ready(sock, read=True, write=False, timeout=timeout) == _TIMEOUT:
                        raise httpx.ReadTimeout("reading the answer timed out", request=request) from None
                    continue
                got += n
                view = reader.send(n)
        except StopIteration as done:
            answer: _Answer = done.value
            return answer
        except OSError as exc:
            raise httpx.ReadError(f"reading the answer failed: {exc}", request=request) from exc
        except _Closed:
            raise _closed(request, got) from None

    async def aclose(self) -> None:
        self._release()
        if self._fallback is not None:
            await self._fallback.aclose()
