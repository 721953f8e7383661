"""Timeouts that grow with the body, and when and how long to wait before a retry: pure functions that
`Client` and `AsyncClient` share."""

from __future__ import annotations

import email.utils
from dataclasses import dataclass

import httpx

MIB = 1 << 20

# Statuses that promise nothing was done and invite a later try.
RETRY_STATUSES = frozenset({429, 503})

# Failures that happen before a byte of the request leaves: resending is always safe.
NOT_SENT: tuple[type[httpx.TransportError], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
)

# Worth another try; the rest (unsupported scheme, proxy refusal, a malformed request) would fail again.
TRANSIENT: tuple[type[httpx.TransportError], ...] = (
    httpx.NetworkError,
    httpx.TimeoutException,
    httpx.RemoteProtocolError,
)


@dataclass(frozen=True)
class Timeout:
    """Seconds. `connect` bounds opening a connection. Reads and writes get `base` plus `per_mib` for every
    MiB the exchange carries (the larger of the request body and the expected answer): httpx's read timeout
    bounds the wait for each chunk, and before its first answer byte the server decodes the body, steps and
    encodes, which takes time in proportion to the size. The defaults allow 60 s + 0.5 s/MiB."""

    connect: float = 10.0
    base: float = 60.0
    per_mib: float = 0.5

    def for_size(self, nbytes: int, wait: float = 0.0) -> httpx.Timeout:
        """`wait`: seconds the server may hold the answer on purpose (a synchronous round filling up)."""
        return httpx.Timeout(self.base + wait + self.per_mib * nbytes / MIB, connect=self.connect)


@dataclass(frozen=True)
class RetryPolicy:
    """Up to `retries` more tries after the first. Between them: exponential backoff from `backoff` seconds,
    doubling, capped at `max_backoff`, each wait drawn from [half, all] of it so that clients that failed
    together do not come back together. A 429/503 with `Retry-After` waits exactly that long, unless it asks
    for more than `max_retry_after` seconds: then the error is raised at once."""

    retries: int = 5
    backoff: float = 0.2
    max_backoff: float = 10.0
    max_retry_after: float = 120.0


def backoff_delay(policy: RetryPolicy, attempt: int, rand: float) -> float:
    """The wait after failed attempt number `attempt` (0 for the first); `rand` is uniform in [0, 1)."""
    return min(policy.max_backoff, policy.backoff * 2.0**attempt) * (0.5 + rand / 2)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds from `now` that a Retry-After header asks for (delay-seconds or an HTTP-date), None if it is
    absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # an HTTP-date is always GMT
        return None
    return max(0.0, when.timestamp() - now)


def status_delay(
    policy: RetryPolicy,
    attempt: int,
    status: int,
    retry_after: str | None,
    resendable: bool,
    rand: float,
    now: float,
) -> float | None:
    """The wait before retrying an answer with `status`, or None when it is final. A request that is not
    `resendable` is never sent twice once it reached the server, whatever the server answered. A 429
    without `Retry-After` is a quota, which waiting does not lift: final."""
    if status not in RETRY_STATUSES or not resendable or attempt >= policy.retries:
        return None
    if status == 429 and retry_after is None:
        return None
    asked = parse_retry_after(retry_after, now)
    if asked is None:
        return backoff_delay(policy, attempt, rand)
    return asked if asked <= policy.max_retry_after else None


def error_delay(
    policy: RetryPolicy, attempt: int, exc: httpx.TransportError, resendable: bool, rand: float
) -> float | None:
    """The wait before retrying after a transport failure, or None when the failure is final: it will not go
    away, the tries are spent, or the request may have reached the server and must not be sent twice."""
    if not isinstance(exc, TRANSIENT) or attempt >= policy.retries:
        return None
    if not resendable and not isinstance(exc, NOT_SENT):
        return None
    return backoff_delay(policy, attempt, rand)
