"""Shared fixtures: an app per test on a chosen store, and an in-process HTTP client for it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.main import create_app
from app.settings import Settings
from tests.system.redis_cluster import RedisCluster
from tests.system.redis_server import RedisServer

AppClient = Callable[..., Any]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the whole run (tests flush the database they use)."""
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """One real 3-master Redis Cluster for the whole run, started when a test first asks for it."""
    with RedisCluster(tmp_path_factory.mktemp("redis-cluster")) as cluster:
        yield cluster


@pytest.fixture
async def make_client(tmp_path: Path) -> AsyncIterator[AppClient]:
    """`await make_client(store=..., api_keys=...)` -> an httpx.AsyncClient bound to a fresh app."""
    async with AsyncExitStack() as stack:

        async def make(**overrides: Any) -> httpx.AsyncClient:
            overrides.setdefault("store", "memory://")
            if overrides["store"] == "sqlite":
                overrides["store"] = f"sqlite:///{tmp_path}/test-{len(stack._exit_callbacks)}.db"
            app = create_app(Settings(**overrides))
            await stack.enter_async_context(app.router.lifespan_context(app))
            transport = httpx.ASGITransport(app=app)
            client = httpx.AsyncClient(transport=transport, base_url="http://optserve.test")
            await stack.enter_async_context(client)
            client.app = app  # type: ignore[attr-defined]
            return client

        yield make


@pytest.fixture(params=["memory", "sqlite"])
async def client(request: pytest.FixtureRequest, make_client: AppClient) -> httpx.AsyncClient:
    """An open-mode client on each store."""
    store = "memory://" if request.param == "memory" else "sqlite"
    result: httpx.AsyncClient = await make_client(store=store)
    return result
