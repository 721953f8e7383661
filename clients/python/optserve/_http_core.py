"""The fast transports' exchange (`optserve.transport`), written once for the blocking and the asyncio one:
connecting, sending a request and receiving its answer, as coroutines that make the non-blocking socket
calls themselves and await a `Driver` only for what must be waited for. The blocking driver's awaits never
suspend, so `FastTransport` runs an exchange to its end in one step; `AsyncFastTransport` awaits it."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from contextlib import aclosing
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import httpx

from optserve._http_answer import Answer, Buffers, Closed, response
from optserve._http_pool import MAX_IDLE, READ, SOCKET_BUFFER, TIMEOUT, Connection, Origin, Pool, tune
from optserve._http_request import LAST_CHUNK, Buffer, Outgoing, framed, outgoing

F = TypeVar("F", httpx.BaseTransport, httpx.AsyncBaseTransport)


class Driver(Protocol):
    """What an exchange waits for: done by blocking the thread, or on the running event loop."""

    async def wait(self, sock: socket.socket, read: bool, write: bool, timeout: float | None) -> int:
        """Until `sock` has something to read (when `read`) or takes more (when `write`), at most `timeout`
        seconds: `_http_pool.READ` (which wins when both are), `WRITE` or `TIMEOUT`."""

    async def resolve(self, host: str, port: int, timeout: float | None) -> list[tuple[Any, ...]]:
        """The addresses of `host`:`port` to connect to; `OSError` when there are none, `TimeoutError` after
        `timeout` seconds where the lookup can be bounded."""

    def parts(self, stream: httpx.SyncByteStream | httpx.AsyncByteStream) -> AsyncIterator[bytes]:
        """The parts of a request body that the caller streams, as they come."""


class _Unsent(Exception):
    """Not one byte of the request was taken by the connection; `error` is what to raise if it is not sent
    again on a fresh one."""

    def __init__(self, error: httpx.TransportError) -> None:
        self.error = error


class Core(Generic[F]):
    """What the blocking and the asyncio transports share: their settings, the pool, the answer buffers, the
    fallback transport for other schemes (`F`, sync or async), and the exchange, which awaits their `_driver`.
    """

    _driver: ClassVar[Driver]

    def __init__(
        self,
        *,
        socket_buffer: int | None = SOCKET_BUFFER,
        max_idle: int = MAX_IDLE,
        fallback: F | None = None,
    ) -> None:
        self.socket_buffer = socket_buffer
        self._pool = Pool(max_idle)
        self._buffers = Buffers()
        self._fallback: F | None = fallback
        self.connections_opened = 0

    def _other(self, default: Callable[[], F]) -> F:
        """The transport for requests this one does not carry, `default()` unless one was given."""
        if self._fallback is None:
            self._fallback = default()
        return self._fallback

    def _release(self) -> None:
        self._pool.close()
        self._buffers.clear()

    async def _exchange(self, request: httpx.Request) -> httpx.Response:
        """The answer to `request`, over an idle connection of the pool or a fresh one."""
        timeouts = request.extensions.get("timeout") or {}
        out = outgoing(request)
        origin = request.url.host, request.url.port or 80
        conn = self._pool.take(origin) or await self._connect(request, origin, timeouts.get("connect"))
        while True:
            try:
                answer = await self._attempt(conn, request, out, timeouts)
            except _Unsent as unsent:
                conn.close()
                if not conn.reused:
                    raise unsent.error from unsent.error.__cause__
                # The server closed it while it was idle: once more, on a fresh connection.
                conn = await self._connect(request, origin, timeouts.get("connect"))
                continue
            except BaseException:  # a cancelled task too
                conn.close()
                raise
            # Kept for the next request when both sides allow it.
            if answer.keep and out.keep and not conn.cut:
                self._pool.give(conn)
            else:
                conn.close()
            return response(answer, request)

    async def _connect(self, request: httpx.Request, origin: Origin, timeout: float | None) -> Connection:
        """A connection to the first of the origin's addresses that takes one; `timeout` bounds each wait."""
        host, port = origin
        try:
            infos = await self._driver.resolve(host, port, timeout)
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"resolving {host} timed out", request=request) from exc
        except OSError as exc:
            raise httpx.ConnectError(f"cannot resolve {host}: {exc}", request=request) from exc
        error: OSError | None = None
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            try:
                tune(sock, self.socket_buffer)
                try:
                    sock.connect(address)
                except (BlockingIOError, InterruptedError):  # under way: done (or failed) once writable
                    if await self._driver.wait(sock, False, True, timeout) == TIMEOUT:
                        raise httpx.ConnectTimeout(
                            f"connecting to {host}:{port} timed out", request=request
                        ) from None
                    if code := sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                        raise OSError(code, os.strerror(code)) from None
            except OSError as exc:
                sock.close()
                error = exc
                continue
            except BaseException:
                sock.close()
                raise
            self.connections_opened += 1
            return Connection(sock, origin, self._buffers)
        raise httpx.ConnectError(f"cannot connect to {host}:{port}: {error}", request=request) from error

    async def _attempt(
        self, conn: Connection, request: httpx.Request, out: Outgoing, timeouts: Mapping[str, float | None]
    ) -> Answer:
        """One try of the request on `conn` (`timeouts`: httpx's, each bounding one wait); `_Unsent` when not
        one byte of it left."""
        read_timeout = timeouts.get("read")
        try:
            await self._send_request(conn, request, out, timeouts.get("write"))
        except OSError as exc:
            error = httpx.WriteError(f"sending the request failed: {exc}", request=request)
            error.__cause__ = exc
            if not conn.sent:
                raise _Unsent(error) from exc
            conn.cut = True
            try:  # the server may have answered, then closed, before it read the whole request
                return await self._receive(conn, request, read_timeout)
            except httpx.TransportError:
                raise error from exc
        return await self._receive(conn, request, read_timeout)

    async def _send_request(
        self, conn: Connection, request: httpx.Request, out: Outgoing, timeout: float | None
    ) -> None:
        if await self._send(conn, request, out.head, timeout):
            return
        async with aclosing(_parts(request, out, self._driver)) as parts:
            async for part in parts:
                for piece in framed(part, out.chunked):
                    if await self._send(conn, request, piece, timeout):
                        return
        if out.chunked:
            await self._send(conn, request, LAST_CHUNK, timeout)

    async def _send(
        self, conn: Connection, request: httpx.Request, data: Buffer, timeout: float | None
    ) -> bool:
        """Sends `data`; True when the server has started answering (or closed) before the request was whole:
        then sending stops. Whenever the socket takes less than it is given, it is waited on for room or for
        an answer, whichever comes first."""
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
            # Writable: go on; readable first: the server answers (or closed) before taking it all.
            ready = await self._driver.wait(sock, conn.sent, True, timeout)
            if ready == TIMEOUT:
                raise httpx.WriteTimeout("sending the request timed out", request=request)
            if ready == READ:
                conn.cut = True
                return True
        return False

    async def _receive(self, conn: Connection, request: httpx.Request, timeout: float | None) -> Answer:
        """The answer, parsed by the connection's receiver (`_http_answer`) from what the socket has."""
        sock = conn.sock
        got = 0
        reader = conn.receiver.answer(request.method)
        try:
            view = next(reader)
            while True:
                try:
                    n = sock.recv_into(view)
                except (BlockingIOError, InterruptedError):
                    if await self._driver.wait(sock, True, False, timeout) == TIMEOUT:
                        raise httpx.ReadTimeout("reading the answer timed out", request=request) from None
                    continue
                got += n
                view = reader.send(n)
        except StopIteration as done:
            answer: Answer = done.value
            return answer
        except OSError as exc:
            raise httpx.ReadError(f"reading the answer failed: {exc}", request=request) from exc
        except Closed:
            if got:
                message = "the server closed the connection before the whole answer arrived"
            else:
                message = "the server closed the connection without answering"
            raise httpx.RemoteProtocolError(message, request=request) from None


async def _parts(request: httpx.Request, out: Outgoing, driver: Driver) -> AsyncGenerator[Buffer, None]:
    """The body's parts: known up front, or taken from the caller's stream as they are sent."""
    if out.parts is not None:
        for part in out.parts:
            yield part
    else:
        async for part in driver.parts(request.stream):
            yield part
