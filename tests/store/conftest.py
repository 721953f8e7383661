"""A factory for each store over a clean database: memory, SQLite, a real redis-server, a real Redis
Cluster."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from app.store.base import Store
from app.store.memory import MemoryStore
from app.store.redis import RedisStore
from app.store.sqlite import SqliteStore
from tests.system.redis_cluster import RedisCluster
from tests.system.redis_server import RedisServer

STORES = ["memory", "sqlite", "redis", "redis-cluster"]
MakeStore = Callable[..., Awaitable[Store]]


@pytest.fixture
def redis_db(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A synchronous client on database 0, flushed before the test: to look at what the store wrote."""
    client = redis.Redis.from_url(redis_server.url(), decode_responses=False)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
async def make_store(
    tmp_path: Path, redis_server: RedisServer, request: pytest.FixtureRequest
) -> AsyncIterator[MakeStore]:
    """`await make_store(kind, history_limit=..., ttl=...)` -> a fresh store (Redis: a flushed database)."""
    opened: list[Store] = []
    flush = redis.Redis.from_url(redis_server.url())
    flush.flushdb()
    flush.close()

    async def make(kind: str, history_limit: int = 10_000, **options: Any) -> Store:
        store: Store
        if kind == "memory":
            store = MemoryStore(history_limit)
        elif kind == "sqlite":
            store = SqliteStore(tmp_path / f"contract-{len(opened)}.db", history_limit)
        elif kind == "redis":
            store = RedisStore.from_url(redis_server.url(), history_limit, **options)
        elif kind == "redis-cluster":  # a real 3-master Redis Cluster, every master flushed
            cluster: RedisCluster = request.getfixturevalue("redis_cluster")
            cluster.flush()
            store = RedisStore.from_url(cluster.url(), history_limit, **options)
        else:
            raise ValueError(kind)
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()
