"""What `Client` and `AsyncClient` share: settings, request building, and the exchange with its retries,
written once as a generator that yields what to do (send this request, sleep this long) to a sync or async
driver."""

from __future__ import annotations

import random
import time
import urllib.request
from collections.abc import Generator
from typing import Any, TypeVar

import httpx

from optserve._calls import Call
from optserve._policy import NOT_SENT, RetryPolicy, Timeout, error_delay, status_delay
from optserve._version import __version__
from optserve._wire import Wire, handed_over
from optserve.errors import TransportError, UnexpectedResponse, error_from_response
from optserve.transport import BODY_EXTENSION, AsyncFastTransport, BufferStream, FastTransport

T = TypeVar("T")
H = TypeVar("H", httpx.Client, httpx.AsyncClient)

# What the exchange asks its driver for: send a request (and hand back the response, or throw the
# transport error into the generator), or sleep this many seconds.
Action = httpx.Request | float
Exchange = Generator[Action, httpx.Response | None, T]


class BaseClient:
    """Settings and the exchange; subclasses own an httpx client and drive `_exchange` with its I/O."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        timeout: float | Timeout | None,
        retries: int | RetryPolicy | None,
        wire: Wire,
    ) -> None:
        if wire not in ("safetensors", "json"):
            raise ValueError(f"wire must be 'safetensors' or 'json', not {wire!r}")
        self.base_url = base_url.rstrip("/")
        self.wire: Wire = wire
        self.timeout = _timeout(timeout)
        self.retries = _retries(retries)
        self._headers = {"User-Agent": f"optserve-python/{__version__}"}
        if api_key is not None:
            self._headers["Authorization"] = f"Bearer {api_key}"
        # Set by subclasses: the transport sends a `BufferStream` as it is (else it is joined first, so that
        # an injected transport sees a plain bytes request, `request.content` included).
        self._zero_copy = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base_url!r}, wire={self.wire!r})"

    def _build(self, http: httpx.Client | httpx.AsyncClient, call: Call[Any]) -> httpx.Request:
        headers = {**self._headers, "Accept": call.accept}
        if call.content_type is not None:
            headers["Content-Type"] = call.content_type
        if call.idempotency_key is not None:
            headers["Idempotency-Key"] = call.idempotency_key
        body = call.content
        size = max(body.nbytes if isinstance(body, BufferStream) else len(body or b""), call.size_hint)
        timeout = self.timeout.for_size(size, call.wait)
        url = self.base_url + call.path
        if not self._zero_copy:
            content = body.joined() if isinstance(body, BufferStream) else body
            return http.build_request(
                call.method, url, content=content, params=call.query, headers=headers, timeout=timeout
            )
        # Ask the transport to hand the answer's body over (`_wire.content`).
        extensions = {BODY_EXTENSION: True}
        if not isinstance(body, BufferStream):
            return http.build_request(
                call.method,
                url,
                content=body,
                params=call.query,
                headers=headers,
                timeout=timeout,
                extensions=extensions,
            )
        # The client's defaults merged in as for any request, then the body as a stream of its buffers.
        headers["Content-Length"] = str(body.nbytes)
        request = http.build_request(
            call.method, url, params=call.query, headers=headers, timeout=timeout, extensions=extensions
        )
        return httpx.Request(
            request.method, request.url, headers=request.headers, stream=body, extensions=request.extensions
        )

    def _exchange(self, http: httpx.Client | httpx.AsyncClient, call: Call[T]) -> Exchange[T]:
        """Sends `call` until it gets a final answer: its parsed body, or a typed exception."""
        attempt = 0
        reached = False  # an earlier try may have been received (and acted on) by the server
        while True:
            delay: float | None
            try:
                response = yield self._build(http, call)
            except httpx.TransportError as exc:
                reached = reached or not isinstance(exc, NOT_SENT)
                delay = error_delay(self.retries, attempt, exc, call.resendable, random.random())
                if delay is None:
                    raise TransportError(
                        f"{call.method} {self.base_url}{call.path} failed after {attempt + 1} "
                        f"attempt(s): {type(exc).__name__}: {exc}",
                        attempts=attempt + 1,
                    ) from exc
            else:
                assert response is not None
                retry_after = response.headers.get("retry-after")
                delay = status_delay(
                    self.retries,
                    attempt,
                    response.status_code,
                    retry_after,
                    call.resendable,
                    random.random(),
                    time.time(),
                )
                if delay is None:
                    return _answer(call, response, reached)
            yield delay
            attempt += 1


def _answer(call: Call[T], response: httpx.Response, reached: bool) -> T:
    if response.status_code == 404 and call.gone_means_done and reached:
        return call.parse(response)
    if response.is_error:
        raise error_from_response(response)
    try:
        return call.parse(response)
    except (KeyError, TypeError, ValueError) as exc:
        raise UnexpectedResponse(
            f"{call.method} {call.path} answered {response.status_code} with a body this SDK cannot read "
            f"({type(exc).__name__}: {exc}); is this an optserve v1 server?"
        ) from exc


def _timeout(value: float | Timeout | None) -> Timeout:
    """A number is the base read/write timeout; the connect timeout and the per-MiB allowance keep their
    defaults."""
    if value is None:
        return Timeout()
    return value if isinstance(value, Timeout) else Timeout(base=float(value))


def _retries(value: int | RetryPolicy | None) -> RetryPolicy:
    if value is None:
        return RetryPolicy()
    policy = value if isinstance(value, RetryPolicy) else RetryPolicy(retries=value)
    if policy.retries < 0:
        raise ValueError(f"retries must be >= 0, not {policy.retries}")
    return policy


def own_http_client(cls: type[H], base_url: str, injected: H | None, transport: Any) -> tuple[H, bool, bool]:
    """The httpx client to use, whether it is ours to close (an injected one belongs to its owner), and
    whether its transport sends `BufferStream` bodies as they are. Without an injected transport or client,
    `http://` URLs get a fast transport (`optserve.transport`), unless the environment names a proxy for
    them (httpx honours it only with its default transport); others get httpx's default."""
    if injected is not None:
        if transport is not None:
            raise ValueError("pass transport= or http_client=, not both")
        return injected, False, False
    if transport is None and base_url.lower().startswith("http://") and not _proxied(base_url):
        transport = FastTransport() if cls is httpx.Client else AsyncFastTransport()
    return cls(transport=transport), True, isinstance(transport, FastTransport | AsyncFastTransport)


def _proxied(url: str) -> bool:
    """Whether HTTP_PROXY/ALL_PROXY (and NO_PROXY) send plain http requests to `url` through a proxy."""
    proxies = urllib.request.getproxies()
    if not (proxies.get("http") or proxies.get("all")):
        return False
    return not urllib.request.proxy_bypass(httpx.URL(url).host)


def needs_reading(response: httpx.Response) -> bool:
    """Whether the answer's body must still be read: not when a fast transport handed over a successful
    answer's body (`_wire.content` finds it; reading `content` would copy it)."""
    return response.is_error or handed_over(response) is None


def let_go(response: httpx.Response) -> None:
    """Drops the response's reference to a handed-over body once it is parsed: the arrays made from it are
    then its only users, and when they go, the transport may receive into it again."""
    response.extensions.pop(BODY_EXTENSION, None)
