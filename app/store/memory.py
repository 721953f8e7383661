"""`memory://`: sessions as live objects in this process. Fastest; nothing survives a restart."""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field, replace

from app.optim.engine import Engine
from app.store.base import HistoryRow, IdempotencyRecord, SessionMeta

IDEMPOTENCY_STEPS = 1_000


@dataclass
class _Entry:
    meta: SessionMeta
    engine: Engine
    history: deque[HistoryRow]
    keys: OrderedDict[str, IdempotencyRecord] = field(default_factory=OrderedDict)


class MemoryStore:
    shared = False

    def __init__(self, history_limit: int = 10_000) -> None:
        self._entries: dict[str, _Entry] = {}
        self._history_limit = history_limit

    async def create(self, meta: SessionMeta, engine: Engine) -> None:
        self._entries[meta.id] = _Entry(replace(meta), engine, deque(maxlen=self._history_limit))

    async def load(self, session_id: str) -> tuple[SessionMeta, Engine] | None:
        entry = self._entries.get(session_id)
        return None if entry is None else (replace(entry.meta), entry.engine)

    async def version(self, session_id: str) -> int | None:
        entry = self._entries.get(session_id)
        return None if entry is None else entry.meta.version

    async def commit(
        self,
        meta: SessionMeta,
        engine: Engine,
        expected_version: int,
        history: HistoryRow | None,
        idempotency: IdempotencyRecord | None,
    ) -> bool:
        entry = self._entries.get(meta.id)
        if entry is None or entry.meta.version != expected_version:
            return False
        entry.meta = replace(meta)
        entry.engine = engine
        if history is not None:
            entry.history.append(history)
        if idempotency is not None:
            entry.keys[idempotency.key] = idempotency
            horizon = engine.step_count - IDEMPOTENCY_STEPS
            while entry.keys and next(iter(entry.keys.values())).step < horizon:
                entry.keys.popitem(last=False)
        return True

    async def idempotency(self, session_id: str, key: str) -> IdempotencyRecord | None:
        entry = self._entries.get(session_id)
        return None if entry is None else entry.keys.get(key)

    async def history(self, session_id: str, limit: int) -> list[HistoryRow]:
        entry = self._entries.get(session_id)
        if entry is None:
            return []
        rows = list(entry.history)
        return rows[-limit:] if limit else []

    async def sessions_of(self, tenant: str) -> list[tuple[SessionMeta, int, list[float]]]:
        return [
            (replace(e.meta), e.engine.step_count, e.engine.lr)
            for e in self._entries.values()
            if e.meta.tenant == tenant
        ]

    async def delete(self, session_id: str) -> bool:
        return self._entries.pop(session_id, None) is not None

    async def expire(self, idle_seconds: float, now: float) -> int:
        stale = [sid for sid, e in self._entries.items() if now - e.meta.updated_at > idle_seconds]
        for sid in stale:
            del self._entries[sid]
        return len(stale)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._entries.clear()
