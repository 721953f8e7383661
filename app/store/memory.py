"""`memory://`: session records kept in this process. Fastest; nothing survives a restart.

A record shares its arrays with the engine it was taken from (no step ever writes an array in place), so
keeping one costs no copy.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from app.store.base import (
    IDEMPOTENCY_STEPS,
    HistoryRow,
    IdempotencyRecord,
    LoggedStep,
    Quota,
    SessionMeta,
    SessionRecord,
    SessionRow,
    StoreError,
    names_of,
    rows_since,
)


@dataclass
class _Entry:
    record: SessionRecord
    history: deque[HistoryRow]
    keys: OrderedDict[str, IdempotencyRecord] = field(default_factory=OrderedDict)


class MemoryStore:
    shared = False
    replicas = False

    def __init__(self, history_limit: int = 10_000) -> None:
        self._entries: dict[str, _Entry] = {}
        self._history_limit = history_limit

    async def create(self, record: SessionRecord, quota: Quota | None = None) -> None:
        if record.meta.id in self._entries:
            raise StoreError(f"session id {record.meta.id!r} already exists")
        if quota is not None:
            held = [e.record for e in self._entries.values() if e.record.meta.tenant == record.meta.tenant]
            refusal = quota.refusal(len(held), sum(r.nbytes for r in held), record.nbytes)
            if refusal is not None:
                raise refusal
        self._entries[record.meta.id] = _Entry(_own(record), deque(maxlen=self._history_limit))

    async def load(self, session_id: str) -> SessionRecord | None:
        entry = self._entries.get(session_id)
        return None if entry is None else _own(entry.record)

    async def meta(self, session_id: str) -> SessionMeta | None:
        entry = self._entries.get(session_id)
        return None if entry is None else entry.record.meta.copy()

    async def version(self, session_id: str) -> int | None:
        entry = self._entries.get(session_id)
        return None if entry is None else entry.record.meta.version

    async def commit(
        self,
        record: SessionRecord,
        expected_version: int,
        history: HistoryRow | None,
        idempotency: IdempotencyRecord | None,
        logged: LoggedStep | None = None,
    ) -> bool:
        entry = self._entries.get(record.meta.id)
        if entry is None or entry.record.meta.version != expected_version:
            return False
        entry.record = _own(record)
        if history is not None:
            entry.history.append(history)
        if idempotency is not None:
            entry.keys[idempotency.key] = idempotency
            horizon = record.step - IDEMPOTENCY_STEPS
            while entry.keys and next(iter(entry.keys.values())).step < horizon:
                entry.keys.popitem(last=False)
        return True

    async def idempotency(self, session_id: str, key: str) -> IdempotencyRecord | None:
        entry = self._entries.get(session_id)
        return None if entry is None else entry.keys.get(key)

    async def history(self, session_id: str, limit: int, since: int | None = None) -> list[HistoryRow]:
        entry = self._entries.get(session_id)
        if entry is None:
            return []
        return rows_since(list(entry.history), limit, since)

    async def sessions_of(self, tenant: str) -> list[SessionRow]:
        return [
            SessionRow(
                e.record.meta.copy(),
                e.record.step,
                e.record.lr,
                *names_of(e.record.engine),
                e.history[-1].loss if e.history else None,
            )
            for e in self._entries.values()
            if e.record.meta.tenant == tenant
        ]

    async def delete(self, session_id: str) -> bool:
        return self._entries.pop(session_id, None) is not None

    async def expire(self, idle_seconds: float, now: float) -> int:
        stale = [sid for sid, e in self._entries.items() if now - e.record.meta.updated_at > idle_seconds]
        for sid in stale:
            del self._entries[sid]
        return len(stale)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._entries.clear()


def _own(record: SessionRecord) -> SessionRecord:
    """The record with a meta of its own: SessionMeta is mutable, its arrays and description are not."""
    return SessionRecord(record.meta.copy(), record.engine, record.tensors)
