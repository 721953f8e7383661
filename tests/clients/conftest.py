"""Clients of both flavours on a fresh in-process app, fault-injecting transports, a real server process."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from typing import Any, TypeVar

import httpx
import optserve
import pytest
import torch
from anyio.from_thread import BlockingPortal, start_blocking_portal

from app.main import create_app
from app.settings import Settings
from tests.system.server import Server

T = TypeVar("T")
BASE_URL = "http://optserve.test"
AnyClient = optserve.Client | optserve.AsyncClient
Connect = Callable[..., Awaitable[Any]]


async def resolve(value: T | Awaitable[T]) -> T:
    """The value of a sync call, or the awaited value of an async one: one test body drives both clients."""
    if inspect.isawaitable(value):
        return await value
    return value


def backward(loss: torch.Tensor) -> None:
    loss.backward()  # type: ignore[no-untyped-call]  # torch leaves it unannotated


class PortalTransport(httpx.BaseTransport):
    """Drives an async transport from blocking code, through an anyio portal running the app's event loop in
    another thread. httpx's sync client cannot drive `httpx.ASGITransport` itself; this lets the sync
    `Client` run in-process against the real app, behind the same fault-injecting async transports as the
    `AsyncClient`."""

    def __init__(self, inner: httpx.AsyncBaseTransport, portal: BlockingPortal) -> None:
        self.inner = inner
        self.portal = portal

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        async def exchange() -> tuple[int, list[tuple[bytes, bytes]], bytes]:
            response = await self.inner.handle_async_request(request)
            return response.status_code, response.headers.raw, await response.aread()

        status, headers, content = self.portal.call(exchange)
        return httpx.Response(status, headers=headers, content=content)


class Recorder(httpx.AsyncBaseTransport):
    """Forwards to `inner` (the app's transport, set by `connect`) and keeps every request it saw; subclasses
    inject faults in `handle`."""

    inner: httpx.AsyncBaseTransport

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return await self.handle(request)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()

    def sent(self, method: str, path_end: str) -> list[httpx.Request]:
        return [r for r in self.requests if r.method == method and r.url.path.endswith(path_end)]


class RefuseConnections(Recorder):
    """The first `failures` requests fail to connect (nothing reaches the app), then all go through."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if len(self.requests) <= self.failures:
            raise httpx.ConnectError("connection refused", request=request)
        return await self.inner.handle_async_request(request)


class DropAnswers(Recorder):
    """The first `drops` requests matching `method` and `path_end` reach the app and complete there; then the
    connection breaks before the client reads the answer: the case a retried POST must survive."""

    def __init__(self, method: str, path_end: str, drops: int = 1) -> None:
        super().__init__()
        self.method, self.path_end, self.drops = method, path_end, drops

    async def handle(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        await response.aread()
        matches = request.method == self.method and request.url.path.endswith(self.path_end)
        if matches and self.drops > 0:
            self.drops -= 1
            raise httpx.ReadError("connection reset by peer", request=request)
        return response


class Answer503(Recorder):
    """The first `count` requests get a 503 problem with `Retry-After` without reaching the app."""

    def __init__(self, count: int, retry_after: str | None = "1") -> None:
        super().__init__()
        self.count, self.retry_after = count, retry_after

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if len(self.requests) <= self.count:
            headers = {"Retry-After": self.retry_after} if self.retry_after is not None else {}
            problem = {"type": "about:blank", "title": "Store unavailable", "status": 503, "detail": "busy"}
            return httpx.Response(503, json=problem, headers=headers)
        return await self.inner.handle_async_request(request)


@pytest.fixture(params=["sync", "async"])
async def connect(request: pytest.FixtureRequest) -> AsyncIterator[Connect]:
    """`await connect(faults, settings={...}, **client_kwargs)`: a `Client` or `AsyncClient` (by the test's
    parameter) on a fresh in-process app, its requests passing through `faults` when given."""
    async with AsyncExitStack() as stack:

        async def make(
            faults: Recorder | None = None, settings: dict[str, Any] | None = None, **kwargs: Any
        ) -> AnyClient:
            app = create_app(Settings(**{"store": "memory://", **(settings or {})}))
            transport: httpx.AsyncBaseTransport = httpx.ASGITransport(app=app)
            if faults is not None:
                faults.inner, transport = transport, faults
            if request.param == "async":
                await stack.enter_async_context(app.router.lifespan_context(app))
                return await stack.enter_async_context(
                    optserve.AsyncClient(BASE_URL, transport=transport, **kwargs)
                )
            portal = stack.enter_context(start_blocking_portal())
            stack.enter_context(portal.wrap_async_context_manager(app.router.lifespan_context(app)))
            client = optserve.Client(BASE_URL, transport=PortalTransport(transport, portal), **kwargs)
            return stack.enter_context(client)

        yield make


@pytest.fixture
def sync_client() -> Iterator[optserve.Client]:
    """A blocking `Client` on a fresh in-process app (what `RemoteOptimizer` needs)."""
    app = create_app(Settings(store="memory://"))
    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(app.router.lifespan_context(app)),
        optserve.Client(BASE_URL, transport=PortalTransport(httpx.ASGITransport(app=app), portal)) as client,
    ):
        yield client


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """A real `optserve serve` process on the memory store, shared by a module's tests."""
    with Server("memory://") as running:
        yield running
