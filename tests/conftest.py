"""Shared fixtures: an app per test on a chosen store, and an in-process HTTP client for it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.main import create_app
from app.settings import Settings

AppClient = Callable[..., Any]


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
