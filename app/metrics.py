"""Prometheus metrics and the pure-ASGI middleware that records them (requests, latency, bytes)."""

from __future__ import annotations

import bisect
import itertools
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LARGE_BYTES = 1 << 20


METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BOUNDS = [floatToGoString(b) for b in LATENCY_BUCKETS]  # type: ignore[no-untyped-call]


class RequestStats:
    """What every request adds to the metrics, kept as plain numbers and read by Prometheus only when
    /metrics is scraped: prometheus_client's own counters take a lock per increment, which (4 per request)
    cost a small step 5% of its time. Everything here runs on the event loop, one request at a time."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = {}
        # (method, route) -> per-bucket counts (the last one +Inf) and the sum of the durations
        self.latency: dict[tuple[str, str], tuple[list[int], list[float]]] = {}
        self.bytes_in = 0
        self.bytes_out = 0
        self.steps = {False: 0, True: 0}  # applied steps by whether they were skipped

    def record(self, method: str, route: str, status: int, seconds: float, received: int, sent: int) -> None:
        key = (method, route, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        latency = self.latency.get(key[:2])
        if latency is None:
            latency = self.latency[key[:2]] = ([0] * (len(LATENCY_BUCKETS) + 1), [0.0])
        latency[0][bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        latency[1][0] += seconds
        self.bytes_in += received
        self.bytes_out += sent

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "optserve_requests", "HTTP requests", labels=["method", "route", "status"]
        )
        for (method, route, status), count in self.requests.items():
            requests.add_metric([method, route, str(status)], count)
        latency = HistogramMetricFamily(
            "optserve_request_duration_seconds", "request latency", labels=["method", "route"]
        )
        for labels, (counts, total) in self.latency.items():
            cumulative = list(itertools.accumulate(counts))
            bounds = [*_BOUNDS, "+Inf"]
            latency.add_metric(list(labels), list(zip(bounds, cumulative, strict=True)), total[0])
        steps = CounterMetricFamily("optserve_steps", "optimizer steps applied", labels=["skipped"])
        for skipped, count in self.steps.items():
            steps.add_metric([str(skipped).lower()], count)
        yield requests
        yield latency
        yield CounterMetricFamily("optserve_request_bytes", "request body bytes", value=self.bytes_in)
        yield CounterMetricFamily("optserve_response_bytes", "response body bytes", value=self.bytes_out)
        yield steps


class Metrics:
    """One registry per app, so that several apps in one process (tests) do not collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.stats = RequestStats()
        self.registry.register(self.stats)
        self.sessions = Gauge(
            "optserve_sessions_cached", "live sessions in this process", registry=self.registry
        )
        # large requests (a body or an answer of LARGE_BYTES or more) being handled now, and when the last
        # one ended: when freed memory may go back to the system without a large step paying for it
        self.large_in_flight = 0
        self.last_large_done = time.monotonic()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def started(self, declared: int) -> bool:
        """Counts a request in, by the body length it declares; whether it is large (LARGE_BYTES or more)."""
        large = declared >= LARGE_BYTES
        self.large_in_flight += large
        return large

    def ended(
        self, method: str, route: str, large: bool, start: float, status: int, received: int, sent: int
    ) -> None:
        """Counts a request out: `start` is when it began (`time.perf_counter`), `received` and `sent` its
        body bytes each way, `status` the one it was answered with (500 when it was not answered)."""
        self.large_in_flight -= large
        if large or received + sent >= LARGE_BYTES:
            self.last_large_done = time.monotonic()
        self.stats.record(method, route, status, time.perf_counter() - start, received, sent)


HUGE_LENGTH = 10**18
"""What a Content-Length of more than 18 digits reads as: past any limit (and int() refuses 4,301)."""


def content_length(value: str | bytes | None) -> int | None:
    """A Content-Length header's number, or None when it is not one (ASCII digits only: latin-1's
    superscripts are digits to `str.isdigit` that int() refuses)."""
    if value is None or not value.isascii() or not value.isdigit():
        return None
    return int(value) if len(value) <= 18 else HUGE_LENGTH


def _declared_length(scope: Scope) -> int:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return content_length(value) or 0
    return 0


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        received = sent = 0
        large = self.metrics.started(_declared_length(scope))

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            return message

        async def counting_send(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counting_receive, counting_send)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            method = scope["method"]
            if method not in METHODS:  # any token is a method to uvicorn: labels stay a bounded set
                method = "OTHER"
            self.metrics.ended(method, route, large, start, status, received, sent)
