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

The exchange is written once (`_http_core`, on `_http_request`, `_http_answer` and `_http_pool`), and each
class here gives it a driver for its waits: blocking the thread in `poll`, or the event loop's readiness
callbacks. Not on h11 or httpcore, even for heads or the pool: h11 copies every byte of a body through its
buffer, and httpcore's streams send and receive bytes objects, the copies this transport exists to avoid.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import AsyncIterator, Coroutine
from typing import Any, cast

import httpx

from optserve._http_answer import BODY_EXTENSION
from optserve._http_core import Core
from optserve._http_pool import READ, TIMEOUT, WRITE, poll
from optserve._http_pool import Connection as _Connection  # noqa: F401  (tests stub its idle check)
from optserve._http_request import BufferStream

__all__ = ["BODY_EXTENSION", "AsyncFastTransport", "BufferStream", "FastTransport"]


class _Blocking:
    """The blocking driver: it waits in `poll` and looks names up with getaddrinfo, blocking the thread, so
    its awaits never suspend (see `_run`)."""

    async def wait(self, sock: socket.socket, read: bool, write: bool, timeout: float | None) -> int:
        return poll(sock, read, write, timeout)

    async def resolve(self, host: str, port: int, timeout: float | None) -> list[tuple[Any, ...]]:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)  # unbounded: it takes no timeout

    async def parts(self, stream: httpx.SyncByteStream | httpx.AsyncByteStream) -> AsyncIterator[bytes]:
        assert isinstance(stream, httpx.SyncByteStream)
        for part in stream:
            yield part


class FastTransport(Core[httpx.BaseTransport], httpx.BaseTransport):
    """A blocking HTTP/1.1 keep-alive transport for large bodies; see the module's description.

    `socket_buffer`: SO_SNDBUF and SO_RCVBUF in bytes (None keeps the system's). `max_idle`: idle connections
    kept per host. `fallback`: the transport for other schemes than http (default: `httpx.HTTPTransport()`).
    """

    _driver = _Blocking()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.scheme != "http":
            return self._other(httpx.HTTPTransport).handle_request(request)
        return _run(self._exchange(request))

    def close(self) -> None:
        self._release()
        if self._fallback is not None:
            self._fallback.close()


def _run(exchange: Coroutine[Any, Any, httpx.Response]) -> httpx.Response:
    """Runs an exchange under the blocking driver to its end, in one step: nothing in it suspends."""
    try:
        exchange.send(None)
    except StopIteration as done:
        return cast(httpx.Response, done.value)
    raise AssertionError("an exchange under the blocking driver suspended")


class _Asyncio:
    """The asyncio driver: readiness callbacks and lookups on the running loop."""

    async def wait(self, sock: socket.socket, read: bool, write: bool, timeout: float | None) -> int:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[int] = loop.create_future()

        def wake(what: int) -> None:
            if not waiter.done():
                waiter.set_result(what)

        fd = sock.fileno()
        if read:
            loop.add_reader(fd, wake, READ)
        if write:
            loop.add_writer(fd, wake, WRITE)
        timer = loop.call_later(timeout, wake, TIMEOUT) if timeout is not None else None
        try:
            return await waiter
        finally:
            loop.remove_reader(fd)  # False when there is none
            loop.remove_writer(fd)
            if timer is not None:
                timer.cancel()

    async def resolve(self, host: str, port: int, timeout: float | None) -> list[tuple[Any, ...]]:
        async with asyncio.timeout(timeout):
            return await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)

    def parts(self, stream: httpx.SyncByteStream | httpx.AsyncByteStream) -> AsyncIterator[bytes]:
        assert isinstance(stream, httpx.AsyncByteStream)
        return aiter(stream)


class AsyncFastTransport(Core[httpx.AsyncBaseTransport], httpx.AsyncBaseTransport):
    """`FastTransport` on asyncio (uvloop too): non-blocking sockets driven by the running loop. Same
    arguments; `fallback` is async, and also takes requests made under another async library than asyncio."""

    _driver = _Asyncio()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            loop = asyncio.get_running_loop()
            # Readiness callbacks (add_reader): not on Windows' default proactor loop.
            usable = sys.platform != "win32" or isinstance(loop, asyncio.SelectorEventLoop)
        except RuntimeError:  # trio, say
            usable = False
        if request.url.scheme != "http" or not usable:
            return await self._other(httpx.AsyncHTTPTransport).handle_async_request(request)
        return await self._exchange(request)

    async def aclose(self) -> None:
        self._release()
        if self._fallback is not None:
            await self._fallback.aclose()
