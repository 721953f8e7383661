"""Lean HTTP/1.1 over raw sockets, to tell the cost of an HTTP library from the cost of HTTP itself.

- `serve_echo()`: a minimal keep-alive echo server (asyncio on uvloop, one `Protocol` per connection, no
  framework): it answers each POST with its body and content type. Run it with `python -m bench.rawhttp`;
  it prints its port.
- `RawClient`: a blocking keep-alive client (`sendall` the head and the body, `recv_into` a preallocated
  buffer), the HTTP analogue of `floor.TcpEcho`.
- `AsyncRawClient`: the same on asyncio, for the load generator (`load.py`): one connection, one request in
  flight at a time, the response head parsed just enough to find Content-Length.

Only what these benches send is supported: Content-Length bodies (no chunked encoding), no pipelining.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from typing import cast

HEAD_END = b"\r\n\r\n"
SOCKET_BUFFER = 4 << 20


class HttpError(RuntimeError):
    pass


def request_head(method: str, path: str, host: str, headers: dict[str, str], length: int) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {length}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def parse_head(head: bytes) -> tuple[int, int, bytes]:
    """(status or 0 for a request, content length, content type) of a message head (without \\r\\n\\r\\n)."""
    first, *lines = head.split(b"\r\n")
    status = int(first.split(b" ", 2)[1]) if first.startswith(b"HTTP/") else 0
    length, ctype = -1, b""
    for line in lines:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"content-type":
            ctype = value.strip()
        elif name == b"transfer-encoding":
            raise HttpError("chunked bodies are not supported here")
    if length < 0:
        raise HttpError(f"no Content-Length in {head[:200]!r}")
    return status, length, ctype


# -- the echo server ------------------------------------------------------------------------------------


class _Protocol(asyncio.Protocol):
    """A buffer of what arrived, `need` (-1 while the head is incomplete), and a TCP_NODELAY socket."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.need = -1
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass, but alike
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _EchoProtocol(_Protocol):
    def __init__(self) -> None:
        super().__init__()
        self.body_start = 0
        self.ctype = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            if self.need < 0:
                end = self.buf.find(HEAD_END)
                if end < 0:
                    return
                _, length, self.ctype = parse_head(bytes(self.buf[:end]))
                self.body_start = end + 4
                self.need = self.body_start + length
            if len(self.buf) < self.need:
                return
            length = self.need - self.body_start
            head = f"HTTP/1.1 200 OK\r\nContent-Length: {length}\r\ncontent-type: ".encode()
            assert self.transport is not None
            self.transport.write(head + self.ctype + HEAD_END)
            if len(self.buf) == self.need:  # the usual case: hand the buffer over whole, copy nothing
                self.transport.write(memoryview(self.buf)[self.body_start :])
                self.buf = bytearray()
            else:
                self.transport.write(bytes(self.buf[self.body_start : self.need]))
                del self.buf[: self.need]
            self.need = -1


async def _serve() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_EchoProtocol, "127.0.0.1", 0, backlog=256)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


def serve_echo() -> None:
    import uvloop

    uvloop.run(_serve())


# -- the blocking client --------------------------------------------------------------------------------


class RawClient:
    """`post(path, body)` -> the response body (a view of a buffer reused by the next call)."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.host = f"{host}:{port}"
        self.sock = socket.create_connection((host, port))
        for opt, value in ((socket.SO_SNDBUF, SOCKET_BUFFER), (socket.SO_RCVBUF, SOCKET_BUFFER)):
            self.sock.setsockopt(socket.SOL_SOCKET, opt, value)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.scratch = bytearray(1 << 16)
        self.buffer = bytearray(1 << 16)

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> memoryview:
        self.sock.sendall(request_head("POST", path, self.host, headers, len(body)))
        self.sock.sendall(body)
        got = 0
        scratch = memoryview(self.scratch)
        while True:
            n = self.sock.recv_into(scratch[got:])
            if n == 0:
                raise HttpError("connection closed")
            got += n
            end = self.scratch.find(HEAD_END, 0, got)
            if end >= 0:
                break
            if got == len(self.scratch):
                raise HttpError("response head too large")
        status, length, _ = parse_head(bytes(self.scratch[:end]))
        if status != 200:
            raise HttpError(f"status {status}")
        if len(self.buffer) < length:
            self.buffer = bytearray(length)
        view = memoryview(self.buffer)[:length]
        first = got - (end + 4)
        view[:first] = scratch[end + 4 : got]
        while first < length:
            n = self.sock.recv_into(view[first:])
            if n == 0:
                raise HttpError("connection closed")
            first += n
        return view

    def close(self) -> None:
        self.sock.close()


# -- the asyncio client ---------------------------------------------------------------------------------


class _ClientProtocol(_Protocol):
    def __init__(self) -> None:
        super().__init__()
        self.status = 0
        self.waiter: asyncio.Future[int] | None = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.need < 0:
            end = self.buf.find(HEAD_END)
            if end < 0:
                return
            self.status, length, _ = parse_head(bytes(self.buf[:end]))
            self.need = end + 4 + length
        if len(self.buf) >= self.need:
            del self.buf[: self.need]
            self.need = -1
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result(self.status)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc or HttpError("connection closed"))


class AsyncRawClient:
    """One keep-alive connection; `await send(request)` writes a whole pre-built request and returns the
    response's status once its whole body has arrived (the body itself is dropped)."""

    def __init__(self, transport: asyncio.Transport, protocol: _ClientProtocol) -> None:
        self.transport = transport
        self.protocol = protocol

    @classmethod
    async def connect(cls, host: str, port: int) -> AsyncRawClient:
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_connection(_ClientProtocol, host, port)
        return cls(transport, protocol)

    async def send(self, request: bytes) -> int:
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.protocol.waiter = waiter
        self.transport.write(request)
        return await waiter

    def close(self) -> None:
        self.transport.close()


def main() -> int:
    serve_echo()
    return 0


if __name__ == "__main__":
    sys.exit(main())
