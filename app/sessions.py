"""The use cases: create, step (ordering, idempotency, atomic commit), params, checkpoint, restore.

No HTTP here: failures are domain errors that `app.api.errors` maps to problem+json. Every write runs
under the session's lock in this process and commits compare-and-set in the store, so with one process
or many sharing a store, steps apply one at a time, none lost, none twice.

A write is one transaction (`_transact`): everything that can fail (validation, the update, the
scheduler, rendering the answer) runs on a new engine built beside the cached one, which no step ever
changes; the store then commits the new record, history row and idempotency record together; and only
then does the cache swap to the new engine. A failure at any stage leaves the session as it was, in the
store and in the cache, so a retry applies the step once.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import anyio
import orjson

from app.optim import checkpoint
from app.optim.base import Array
from app.optim.engine import Engine, StepOutcome
from app.optim.hparams import SpecError
from app.store.base import (
    CorruptRecord,
    HistoryRow,
    IdempotencyRecord,
    Quota,
    SessionMeta,
    SessionRecord,
    Store,
    StoreError,
)

T = TypeVar("T")
Render = Callable[[StepOutcome, Mapping[str, Array], bool], Awaitable[T]]

CHECKPOINT_KEY = "optserve.checkpoint"
MAX_COMMIT_ATTEMPTS = 50
# Below this many parameters a step is cheaper than a thread hop; above it, math leaves the event loop.
INLINE_NUMEL = 1 << 16


class NotFound(LookupError):
    """No such session for this tenant (foreign sessions are indistinguishable from missing ones)."""

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        super().__init__(f"session {session_id!r} not found")


class StepConflict(Exception):
    """The request expected another step number than the session's."""

    def __init__(self, expected: int, current: int, aggregation: Mapping[str, Any] | None = None) -> None:
        self.expected = expected
        self.current = current
        if aggregation is None:
            message = f"expected step {expected}, but the session is at step {current}"
        elif expected > current:
            message = f"step {expected} is ahead of the session, which is at step {current}"
        else:
            message = (
                f"a gradient from step {expected} is {current - expected} steps behind the session (at step "
                f"{current}); this session takes at most aggregation.max_staleness="
                f"{aggregation['max_staleness']}: nothing was applied"
            )
        super().__init__(message)


class IdempotencyConflict(ValueError):
    """An Idempotency-Key was reused with a different request body."""


class UnreadableSession(Exception):
    """A stored session this server cannot load (damaged, or from a newer version); it can be deleted."""

    def __init__(self, session_id: str, reason: str) -> None:
        self.session_id = session_id
        super().__init__(
            f"session {session_id!r} is stored but cannot be loaded by this server ({reason}); "
            "DELETE removes it"
        )


@dataclass(frozen=True)
class Written:
    """What one write leaves behind: the new engine, and the rows that commit with it."""

    engine: Engine
    history: HistoryRow | None = None
    idempotency: IdempotencyRecord | None = None


def record_of(meta: SessionMeta, engine: Engine) -> SessionRecord:
    tensors, description = engine.snapshot()
    return SessionRecord(meta, description, tensors)


@dataclass(frozen=True)
class SessionInfo:
    meta: SessionMeta
    step: int
    lr: list[float]
    description: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.meta.id,
            "step": self.step,
            "lr": self.lr,
            **self.description,
            "created_at": self.meta.created_at,
            "updated_at": self.meta.updated_at,
            "metadata": self.meta.metadata,
        }


def summary(meta: SessionMeta, step: int, lr: list[float]) -> dict[str, Any]:
    return {
        "id": meta.id,
        "step": step,
        "lr": lr,
        "created_at": meta.created_at,
        "updated_at": meta.updated_at,
        "metadata": meta.metadata,
    }


async def off_the_loop_if(heavy: bool, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)`, in a worker thread when it is `heavy` (the event loop keeps answering meanwhile)."""
    if not heavy:
        return fn(*args)
    return await anyio.to_thread.run_sync(fn, *args)


def new_session_id() -> str:
    return "s_" + secrets.token_urlsafe(12)


class SessionService:
    """Sessions of every tenant over one store, with a bounded cache of live engines."""

    def __init__(
        self,
        store: Store,
        *,
        ttl: float | None = None,
        cache_bytes: int = 1 << 30,
        max_session_bytes: int | None = None,
        quota: Quota | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.max_session_bytes = max_session_bytes
        self.quota = quota
        self.ttl = ttl
        self.clock = clock
        self._cache: OrderedDict[str, tuple[SessionMeta, Engine]] = OrderedDict()
        self._cache_limit = cache_bytes
        self._cache_bytes = 0
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self.on_step: Callable[[StepOutcome], None] = lambda _: None

    @property
    def cached_sessions(self) -> int:
        return len(self._cache)

    # -- plumbing ---------------------------------------------------------------------------------

    def _lock(self, session_id: str) -> asyncio.Lock:
        lock = self._locks.get(session_id)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[session_id] = lock
        return lock

    async def _run(self, engine: Engine, fn: Callable[[], T]) -> T:
        if engine.numel < INLINE_NUMEL:
            return fn()
        return await anyio.to_thread.run_sync(fn)

    def _remember(self, meta: SessionMeta, engine: Engine) -> None:
        """Caches a live engine; least recently used ones go when the cache outgrows its budget."""
        self._forget(meta.id)
        self._cache[meta.id] = (meta, engine)
        self._cache_bytes += engine.nbytes
        while self._cache_bytes > self._cache_limit and len(self._cache) > 1:
            self._forget(next(iter(self._cache)))

    def _forget(self, session_id: str) -> None:
        entry = self._cache.pop(session_id, None)
        if entry is not None:
            self._cache_bytes -= entry[1].nbytes

    async def _guard(self, awaitable: Awaitable[T]) -> T:
        try:
            return await awaitable
        except StoreError:
            raise
        except (OSError, RuntimeError) as exc:
            raise StoreError(f"store failed: {exc}") from exc

    async def _load(self, tenant: str, session_id: str) -> tuple[SessionMeta, Engine]:
        """The session's current meta and engine, from the cache when it is still current."""
        cached = self._cache.get(session_id)
        if cached is not None and self.store.shared:
            version = await self._guard(self.store.version(session_id))
            if version != cached[0].version:
                cached = None
        if cached is None:
            try:
                record = await self._guard(self.store.load(session_id))
            except CorruptRecord as exc:
                meta = await self._meta(tenant, session_id)
                raise UnreadableSession(meta.id, exc.reason) from None
            if record is None:
                self._forget(session_id)
                raise NotFound(session_id)
            await self._check_owner(tenant, record.meta)
            try:
                engine = await anyio.to_thread.run_sync(checkpoint.restore, record.tensors, record.engine)
            except SpecError as exc:
                raise UnreadableSession(session_id, str(exc)) from None
            cached = (record.meta, engine)
            self._remember(*cached)
        meta, engine = cached
        await self._check_owner(tenant, meta)
        return meta, engine

    async def _check_owner(self, tenant: str, meta: SessionMeta) -> None:
        """NotFound for another tenant's session, and for one idle past the TTL (which goes now)."""
        if meta.tenant != tenant:
            raise NotFound(meta.id)
        if self.ttl is not None and self.clock() - meta.updated_at > self.ttl:
            await self._guard(self.store.delete(meta.id))
            self._forget(meta.id)
            raise NotFound(meta.id)

    async def _meta(self, tenant: str, session_id: str) -> SessionMeta:
        """The session's meta alone, checked for its owner: what works even when the rest cannot load."""
        meta = await self._guard(self.store.meta(session_id))
        if meta is None:
            raise NotFound(session_id)
        await self._check_owner(tenant, meta)
        return meta

    async def _transact(
        self, tenant: str, session_id: str, write: Callable[[SessionMeta, Engine], Awaitable[Written | T]]
    ) -> T | SessionInfo:
        """One write of a session: `write` computes it from the current meta and engine without changing
        them (or returns an answer instead, e.g. an idempotent replay); the store commits it compare-and-
        set; then, and only then, the cache moves to the new engine. Another process committing first
        means reload and redo; any exception leaves the session as it was in the cache."""
        async with self._lock(session_id):
            for _ in range(MAX_COMMIT_ATTEMPTS):
                meta, engine = await self._load(tenant, session_id)
                written = await write(meta, engine)
                if not isinstance(written, Written):
                    return written
                new_meta = meta.written(self.clock())
                record = record_of(new_meta, written.engine)
                try:
                    committed = await self._guard(
                        self.store.commit(record, meta.version, written.history, written.idempotency)
                    )
                except BaseException:
                    self._forget(session_id)  # the store may hold either state now: reload from it
                    raise
                if committed:
                    self._remember(new_meta, written.engine)  # the one line after which the session moved
                    return SessionInfo(new_meta, written.engine.step_count, written.engine.lr, {})
                self._forget(session_id)
            raise StoreError(f"session {session_id!r}: too much contention, nothing was written")

    # -- use cases --------------------------------------------------------------------------------

    async def create(
        self,
        tenant: str,
        options: Mapping[str, Any],
        params: Mapping[str, Array],
        metadata: Mapping[str, str],
    ) -> SessionInfo:
        numel = sum(p.size for p in params.values())
        engine = await off_the_loop_if(
            numel >= INLINE_NUMEL or len(params) > 100, Engine.create, options, params, self.max_session_bytes
        )
        return await self._insert(tenant, engine, metadata)

    async def restore(
        self, tenant: str, tensors: Mapping[str, Array], metadata: Mapping[str, str]
    ) -> SessionInfo:
        """A new session continuing exactly where a checkpoint was."""
        raw = metadata.get(CHECKPOINT_KEY)
        if raw is None:
            raise SpecError.one(
                "checkpoint", f"metadata has no {CHECKPOINT_KEY!r}: not an optserve checkpoint"
            )
        try:
            saved = json.loads(raw)
        except (ValueError, RecursionError):
            raise SpecError.one("checkpoint", f"metadata {CHECKPOINT_KEY!r} is not JSON") from None
        if not isinstance(saved, dict) or not isinstance(saved.get("engine"), dict):
            raise SpecError.one("checkpoint", "metadata does not describe a session")
        numel = sum(t.size for t in tensors.values())
        engine = await off_the_loop_if(
            numel >= INLINE_NUMEL or len(tensors) > 100, checkpoint.restore, tensors, saved["engine"]
        )
        limit = self.max_session_bytes
        if limit is not None and engine.nbytes > limit:
            raise SpecError.one(
                "checkpoint",
                f"the session takes {engine.nbytes} bytes, past OPTSERVE_MAX_SESSION_BYTES={limit}",
            )
        user_meta = saved.get("metadata") or {}
        if not isinstance(user_meta, dict) or not all(isinstance(v, str) for v in user_meta.values()):
            raise SpecError.one("checkpoint", "metadata `metadata` must be an object of string -> string")
        return await self._insert(tenant, engine, user_meta)

    async def _insert(self, tenant: str, engine: Engine, metadata: Mapping[str, str]) -> SessionInfo:
        """Stores a new session and answers it, or (on any failure) stores nothing: the answer is made
        before the store is written."""
        now = self.clock()
        meta = SessionMeta(new_session_id(), tenant, now, now, dict(metadata), version=0)
        info = SessionInfo(meta, engine.step_count, engine.lr, engine.describe())
        orjson.dumps(info.to_json())  # every float in it is finite and every key a string, or ValueError now
        await self._guard(self.store.create(record_of(meta, engine), self.quota))
        self._remember(meta, engine)
        return info

    async def get(self, tenant: str, session_id: str) -> SessionInfo:
        async with self._lock(session_id):
            meta, engine = await self._load(tenant, session_id)
            return SessionInfo(meta, engine.step_count, engine.lr, engine.describe())

    async def list_sessions(self, tenant: str) -> list[dict[str, Any]]:
        rows = await self._guard(self.store.sessions_of(tenant))
        now = self.clock()
        live = [r for r in rows if self.ttl is None or now - r[0].updated_at <= self.ttl]
        return [summary(*row) for row in sorted(live, key=lambda r: r[0].created_at)]

    async def step(
        self,
        tenant: str,
        session_id: str,
        grads: Mapping[str, Array],
        render: Render[T],
        *,
        loss: float | None = None,
        expected_step: int | None = None,
        idempotency_key: str | None = None,
        fingerprint: str = "",
    ) -> T:
        """Applies one step and renders the answer from the new engine before anything is committed."""

        async def write(meta: SessionMeta, engine: Engine) -> Written | T:
            if idempotency_key is not None:
                record = await self._guard(self.store.idempotency(session_id, idempotency_key))
                if record is not None:
                    if record.fingerprint != fingerprint:
                        raise IdempotencyConflict(
                            f"Idempotency-Key {idempotency_key!r} was first used with a different body"
                        )
                    # the same body, so the same `step`: its staleness then was the step count it met
                    met = record.step - (0 if record.skipped else 1)
                    late = 0 if expected_step is None else met - expected_step
                    replayed = StepOutcome(
                        record.step, record.lr, record.skipped, record.grad_norm or 0.0, late
                    )
                    return await render(replayed, engine.params, True)
            staleness = engine.staleness(expected_step)
            if staleness is None:
                assert expected_step is not None
                raise StepConflict(expected_step, engine.step_count, engine.options.get("aggregation"))

            def work() -> tuple[Engine, StepOutcome]:
                return engine.advance(engine.prepare(grads, loss, staleness))

            following, outcome = await self._run(engine, work)
            answer = await render(outcome, following.params, False)
            answers.append((outcome, answer))
            grad_norm = None if outcome.skipped else outcome.grad_norm
            history = HistoryRow(outcome.step, outcome.lr, loss, grad_norm, outcome.skipped, self.clock())
            keyed = None
            if idempotency_key is not None:
                keyed = IdempotencyRecord(
                    idempotency_key, fingerprint, outcome.step, outcome.lr, outcome.skipped, grad_norm
                )
            return Written(following, history, keyed)

        answers: list[tuple[StepOutcome, T]] = []
        result = await self._transact(tenant, session_id, write)
        if not isinstance(result, SessionInfo):
            return result  # replayed
        outcome, answer = answers[-1]
        self.on_step(outcome)
        return answer

    async def params(
        self, tenant: str, session_id: str, render: Callable[[int, Mapping[str, Array]], Awaitable[T]]
    ) -> T:
        async with self._lock(session_id):
            _, engine = await self._load(tenant, session_id)
        # an engine never changes: it renders outside the lock
        return await render(engine.step_count, engine.params)

    async def put_params(self, tenant: str, session_id: str, values: Mapping[str, Array]) -> SessionInfo:
        async def write(meta: SessionMeta, engine: Engine) -> Written:
            engine.check_tensors(values, "params")
            return Written(await self._run(engine, lambda: engine.with_params(values)))

        info = await self._transact(tenant, session_id, write)
        assert isinstance(info, SessionInfo)
        _, engine = self._cache[session_id]
        return replace(info, description=engine.describe())

    async def checkpoint(
        self,
        tenant: str,
        session_id: str,
        render: Callable[[Mapping[str, Array], dict[str, str]], Awaitable[T]],
    ) -> T:
        async with self._lock(session_id):
            meta, engine = await self._load(tenant, session_id)
        tensors, engine_meta = engine.snapshot()
        saved = {"engine": engine_meta, "metadata": meta.metadata, "source": meta.id}
        metadata = {CHECKPOINT_KEY: json.dumps(saved), "step": str(engine.step_count)}
        return await render(tensors, metadata)

    async def history(self, tenant: str, session_id: str, limit: int) -> list[dict[str, Any]]:
        async with self._lock(session_id):
            await self._load(tenant, session_id)
            rows = await self._guard(self.store.history(session_id, limit))
        return [row.to_json() for row in rows]

    async def delete(self, tenant: str, session_id: str) -> None:
        """Needs only the session's meta: a session whose numerics cannot be loaded can still go."""
        async with self._lock(session_id):
            await self._meta(tenant, session_id)
            await self._guard(self.store.delete(session_id))
            self._forget(session_id)

    async def expire(self) -> int:
        """Deletes idle sessions when a TTL is set; the server calls this periodically."""
        if self.ttl is None:
            return 0
        removed = await self._guard(self.store.expire(self.ttl, self.clock()))
        now = self.clock()
        for sid in [s for s, (m, _) in self._cache.items() if now - m.updated_at > self.ttl]:
            self._forget(sid)
        return removed
