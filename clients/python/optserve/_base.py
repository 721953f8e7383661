"""What `Client` and `AsyncClient` share: settings, request building, and the exchange with its retries,
written once as a generator that yields what to do (send this request, sleep this long) to a sync or async
driver."""

from __future__ import annotations

import random
import time
from collections.abc import Generator
from typing import Any, TypeVar

import httpx

from optserve._calls import Call
from optserve._policy import NOT_SENT, RetryPolicy, Timeout, error_delay, status_delay
from optserve._version import __version__
from optserve._wire import Wire
from optserve.errors import TransportError, UnexpectedResponse, error_from_response

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

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base_url!r}, wire={self.wire!r})"

    def _build(self, http: httpx.Client | httpx.AsyncClient, call: Call[Any]) -> httpx.Request:
        headers = {**self._headers, "Accept": call.accept}
        if call.content_type is not None:
            headers["Content-Type"] = call.content_type
        if call.idempotency_key is not None:
            headers["Idempotency-Key"] = call.idempotency_key
        size = max(len(call.content or b""), call.size_hint)
        return http.build_request(
            call.method,
            self.base_url + call.path,
            content=call.content,
            params=call.query,
            headers=headers,
            timeout=self.timeout.for_size(size),
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


def own_http_client(cls: type[H], injected: H | None, transport: Any) -> tuple[H, bool]:
    """The httpx client to use, and whether it is ours to close (an injected one belongs to its owner)."""
    if injected is None:
        return cls(transport=transport), True
    if transport is not None:
        raise ValueError("pass transport= or http_client=, not both")
    return injected, False
