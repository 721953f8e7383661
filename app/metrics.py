"""Prometheus metrics and the pure-ASGI middleware that records them (requests, latency, bytes)."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LARGE_BYTES = 1 << 20


class Metrics:
    """One registry per app, so that several apps in one process (tests) do not collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "optserve_requests_total", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "optserve_request_duration_seconds",
            "request latency",
            ["method", "route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.bytes_in = Counter("optserve_request_bytes_total", "request body bytes", registry=self.registry)
        self.bytes_out = Counter(
            "optserve_response_bytes_total", "response body bytes", registry=self.registry
        )
        self.steps = Counter(
            "optserve_steps_total", "optimizer steps applied", ["skipped"], registry=self.registry
        )
        self.sessions = Gauge(
            "optserve_sessions_cached", "live sessions in this process", registry=self.registry
        )
        # large requests (a body or an answer of LARGE_BYTES or more) being handled now, and when the last
        # one ended: when freed memory may go back to the system without a large step paying for it
        self.large_in_flight = 0
        self.last_large_done = time.monotonic()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        received = sent = 0
        declared = dict(scope["headers"]).get(b"content-length", b"")
        large = declared.isdigit() and int(declared) >= LARGE_BYTES
        self.metrics.large_in_flight += large

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
            self.metrics.large_in_flight -= large
            if large or received + sent >= LARGE_BYTES:
                self.metrics.last_large_done = time.monotonic()
            route = getattr(scope.get("route"), "path", "unmatched")
            key = (scope["method"], route, status)
            children = self._children.get(key)
            if children is None:  # a label lookup per request costs more than the counting itself
                m = self.metrics
                children = (m.requests.labels(key[0], route, str(status)), m.latency.labels(key[0], route))
                self._children[key] = children
            children[0].inc()
            children[1].observe(time.perf_counter() - start)
            m = self.metrics
            m.bytes_in.inc(received)
            m.bytes_out.inc(sent)
