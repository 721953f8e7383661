"""The session use cases without HTTP: idle expiry, the live-engine cache, store failures."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from app.sessions import NotFound, SessionService
from app.store.base import StoreError
from app.store.memory import MemoryStore
from app.store.sqlite import SqliteStore

SPEC = {"optimizer": {"name": "sgd", "lr": 0.5}}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def render(outcome: Any, params: Any, replayed: bool) -> tuple[int, np.ndarray]:
    return outcome.step, params["w"].copy()


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_idle_sessions_expire_after_the_ttl(kind: str, tmp_path: Any) -> None:
    clock = Clock()
    store = MemoryStore() if kind == "memory" else SqliteStore(tmp_path / "ttl.db")
    service = SessionService(store, ttl=60, clock=clock)
    idle = await service.create("t", SPEC, {"w": np.zeros(2)}, {})
    busy = await service.create("t", SPEC, {"w": np.zeros(2)}, {})
    clock.now += 45
    await service.step("t", busy.meta.id, {"w": np.ones(2)}, render)
    clock.now += 30
    assert await service.expire() == 1
    with pytest.raises(NotFound):
        await service.get("t", idle.meta.id)
    assert (await service.get("t", busy.meta.id)).step == 1
    clock.now += 61
    with pytest.raises(NotFound):  # expired on access even before the sweeper runs
        await service.step("t", busy.meta.id, {"w": np.ones(2)}, render)
    assert await service.list_sessions("t") == []
    await store.close()


async def test_sqlite_cache_eviction_reloads_the_same_state(tmp_path: Any) -> None:
    store = SqliteStore(tmp_path / "cache.db")
    service = SessionService(store, cache_bytes=1)  # every other session is evicted
    a = await service.create("t", SPEC, {"w": np.zeros(2)}, {})
    b = await service.create("t", SPEC, {"w": np.zeros(2)}, {})
    for _ in range(3):
        await service.step("t", a.meta.id, {"w": np.ones(2)}, render)
        await service.step("t", b.meta.id, {"w": np.full(2, 2.0)}, render)
    assert service.cached_sessions == 1
    step, w = await service.step("t", a.meta.id, {"w": np.ones(2)}, render)
    assert step == 4
    np.testing.assert_array_equal(w, [-2.0, -2.0])
    await store.close()


class FailingStore(SqliteStore):
    fail = False

    async def commit(self, *args: Any, **kwargs: Any) -> bool:
        if self.fail:
            raise StoreError("disk on fire")
        return await super().commit(*args, **kwargs)


async def test_a_failed_commit_is_not_applied_and_not_answered(tmp_path: Any) -> None:
    store = FailingStore(tmp_path / "failing.db")
    service = SessionService(store)
    info = await service.create("t", SPEC, {"w": np.zeros(2)}, {})
    await service.step("t", info.meta.id, {"w": np.ones(2)}, render)
    store.fail = True
    with pytest.raises(StoreError):
        await service.step("t", info.meta.id, {"w": np.ones(2)}, render)
    store.fail = False
    # the cached engine ran ahead of the store; it must be dropped and the stored state reloaded
    step, w = await service.step("t", info.meta.id, {"w": np.ones(2)}, render)
    assert step == 2
    np.testing.assert_array_equal(w, [-1.0, -1.0])
    await store.close()
