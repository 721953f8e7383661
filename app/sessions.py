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
import random
import secrets
import time
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import orjson

from app.optim import checkpoint
from app.optim.aggregate import Contribution, mean_loss, reduce
from app.optim.base import Array
from app.optim.engine import Engine, PreparedStep, StepError, StepOutcome
from app.optim.hparams import SpecError
from app.optim.limits import MAX_SCHEDULE_POINTS
from app.store.base import (
    CorruptRecord,
    HistoryRow,
    IdempotencyRecord,
    LoggedStep,
    Quota,
    RoundOutcome,
    RoundStore,
    SessionMeta,
    SessionRecord,
    SessionRow,
    Store,
    StoreError,
)
from app.values import immutable

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
        elif aggregation["mode"] == "sync":
            message = (
                f"round {expected} was applied already; the session is at step {current}, the round open "
                "now: nothing was applied"
            )
        else:
            message = (
                f"a gradient from step {expected} is {current - expected} steps behind the session (at step "
                f"{current}); this session takes at most aggregation.max_staleness="
                f"{aggregation['max_staleness']}: nothing was applied"
            )
        super().__init__(message)


class RoundConflict(Exception):
    """A contribution a synchronous round cannot take (409): its worker sent another body to this round, or
    the round closed with too few contributions."""

    def __init__(self, message: str, current: int) -> None:
        self.current = current
        super().__init__(message)


class RoundsFull(Exception):
    """The contributions this process holds for its rounds would exceed OPTSERVE_MAX_ROUND_BYTES (503)."""


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


@immutable
class Written:
    """What one write leaves behind: the new engine, and the rows that commit with it."""

    engine: Engine
    history: HistoryRow | None = None
    idempotency: IdempotencyRecord | None = None
    round: RoundOutcome | None = None
    """A synchronous round's step on a store of replicas: its outcome commits with it."""
    logged: LoggedStep | None = None
    """The step that made `engine` from the session's state, when it redoes exactly (the store may keep it
    instead of the whole state)."""


@dataclass
class Round:
    """A synchronous round this process holds: the contributions to round `step` (worker -> the part and
    its request's fingerprint), and the future every contributor awaits."""

    tenant: str
    step: int
    done: asyncio.Future[RoundResult]
    parts: dict[str, tuple[Contribution, str]]
    timer: asyncio.Task[None] | None = None
    closing: bool = False


@dataclass(frozen=True)
class RoundResult:
    """A round applied: its one step, the parameters after it, and who contributed with which body (so
    that a contributor's resend is answered again)."""

    step: int
    outcome: StepOutcome
    params: Mapping[str, Array]
    fingerprints: dict[str, str]


def rebuild(record: SessionRecord) -> Engine:
    """The engine a stored record describes: its state, with the steps logged since redone in order."""
    engine = checkpoint.restore(record.tensors, record.engine)
    for logged in record.log:
        prepared = PreparedStep(
            dict(logged.grads), logged.loss, logged.grad_norm, logged.skipped, logged.staleness
        )
        engine, _ = engine.advance(prepared)
    return engine


def record_of(meta: SessionMeta, engine: Engine) -> SessionRecord:
    tensors, description = engine.snapshot()
    return SessionRecord(meta, description, tensors)


@immutable
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


def summary(row: SessionRow) -> dict[str, Any]:
    meta = row.meta
    return {
        "id": meta.id,
        "step": row.step,
        "lr": row.lr,
        "optimizer": row.optimizer,
        "scheduler": row.scheduler,
        "loss": row.loss,
        "created_at": meta.created_at,
        "updated_at": meta.updated_at,
        "metadata": meta.metadata,
    }


async def off_the_loop_if(heavy: bool, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)`, in a worker thread when it is `heavy` (the event loop keeps answering meanwhile)."""
    if not heavy:
        return fn(*args)
    return await anyio.to_thread.run_sync(fn, *args)


def _check_weight(aggregation: Mapping[str, Any], weight: float | None) -> None:
    if aggregation["reduce"] == "weighted_mean":
        if weight is None or not weight > 0:
            raise StepError(
                "weight", f"required with reduce 'weighted_mean': a positive number, got {weight!r}"
            )
    elif weight is not None:
        raise StepError(
            "weight", f"only with reduce 'weighted_mean'; this session's is {aggregation['reduce']!r}"
        )


def too_few(step: int, count: int, aggregation: Mapping[str, Any]) -> str:
    """Why a round that closed at its timeout below min_workers applied nothing."""
    return (
        f"round {step} closed after {aggregation['timeout']} s with {count} of {aggregation['workers']} "
        f"contributions, fewer than min_workers={aggregation['min_workers']}: nothing was applied, and its "
        "gradients are dropped"
    )


def _nbytes(grads: Mapping[str, Array]) -> int:
    return sum(g.nbytes for g in grads.values())


def _retrieve(done: asyncio.Future[Any]) -> None:
    """Marks a round's failure as seen: every contributor who still waits gets it."""
    if not done.cancelled():
        done.exception()


def new_session_id() -> str:
    return "s_" + secrets.token_urlsafe(12)


if TYPE_CHECKING:
    from app.rounds import SharedRounds


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
        max_round_bytes: int = 2 << 30,
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
        # the locks of cached sessions, held strongly: a request finds its session's lock instead of making
        # one (and registering it weakly) each time
        self._cached_locks: dict[str, asyncio.Lock] = {}
        self._rounds: dict[str, Round] = {}
        self._finished: dict[str, RoundResult] = {}
        # the gradients that waiting contributions hold, against OPTSERVE_MAX_ROUND_BYTES
        self.max_round_bytes = max_round_bytes
        self.round_bytes = 0
        self.on_step: Callable[[StepOutcome], None] = lambda _: None
        # rounds in the store when it is made for replicas (Redis), else in this process
        self._shared_rounds: SharedRounds | None = None
        if isinstance(store, RoundStore):
            from app.rounds import SharedRounds

            self._shared_rounds = SharedRounds(self, store)

    @property
    def cached_sessions(self) -> int:
        return len(self._cache)

    # -- plumbing ---------------------------------------------------------------------------------

    def _lock(self, session_id: str) -> asyncio.Lock:
        lock = self._cached_locks.get(session_id)
        if lock is not None:
            return lock
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
        entry = self._cache.pop(meta.id, None)  # and in again, last: the most recently used
        if entry is not None:
            self._cache_bytes -= entry[1].nbytes
        else:
            self._cached_locks[meta.id] = self._lock(meta.id)
        self._cache[meta.id] = (meta, engine)
        self._cache_bytes += engine.nbytes
        while self._cache_bytes > self._cache_limit and len(self._cache) > 1:
            self._forget(next(iter(self._cache)))

    def _forget(self, session_id: str) -> None:
        self._cached_locks.pop(session_id, None)  # a holder or waiter keeps it, and `_locks` finds it
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
                engine = await anyio.to_thread.run_sync(rebuild, record)
            except (SpecError, StepError) as exc:
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
            for attempt in range(MAX_COMMIT_ATTEMPTS):
                meta, engine = await self._load(tenant, session_id)
                written = await write(meta, engine)
                if not isinstance(written, Written):
                    return written
                new_meta = meta.written(self.clock())
                record = record_of(new_meta, written.engine)
                try:
                    if written.round is None:
                        commit = self.store.commit(
                            record, meta.version, written.history, written.idempotency, written.logged
                        )
                    else:
                        assert isinstance(self.store, RoundStore)
                        assert written.history is not None
                        commit = self.store.commit_round(record, meta.version, written.history, written.round)
                    committed = await self._guard(commit)
                except BaseException:
                    self._forget(session_id)  # the store may hold either state now: reload from it
                    raise
                if committed:
                    self._remember(new_meta, written.engine)  # the one line after which the session moved
                    return SessionInfo(new_meta, written.engine.step_count, written.engine.lr, {})
                self._forget(session_id)
                # another replica committed first: back off a random while (0.5 ms doubling to 32 ms), so
                # that replicas racing for one session do not keep colliding in step
                await asyncio.sleep(random.uniform(0.5, 1.0) * min(0.032, 0.0005 * 2**attempt))
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
        self._check_rounds_fit_the_store(engine)
        return await self._insert(tenant, engine, metadata)

    def _check_rounds_fit_the_store(self, engine: Engine) -> None:
        aggregation = engine.options.get("aggregation")
        if (
            aggregation is not None
            and aggregation["mode"] == "sync"
            and self.store.replicas
            and self._shared_rounds is None
        ):
            raise SpecError.one(
                "aggregation.mode",
                "this server's store is made for replicas but cannot hold synchronous rounds: use "
                "'async', or a redis://, memory:// or sqlite:// server",
            )

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
        self._check_rounds_fit_the_store(engine)
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
        live = [r for r in rows if self.ttl is None or now - r.meta.updated_at <= self.ttl]
        return [summary(row) for row in sorted(live, key=lambda r: r.meta.created_at)]

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

            prepared: list[PreparedStep] = []

            def work() -> tuple[Engine, StepOutcome]:
                prepared.append(engine.prepare(grads, loss, staleness))
                return engine.advance(prepared[0])

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
            step_input = prepared[0]
            logged = None
            if engine.replayable:
                logged = LoggedStep(
                    step_input.grads,
                    step_input.loss,
                    step_input.grad_norm,
                    step_input.skipped,
                    step_input.staleness,
                )
            return Written(following, history, keyed, logged=logged)

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

    async def history(
        self, tenant: str, session_id: str, limit: int, since: int | None = None
    ) -> list[dict[str, Any]]:
        """The newest `limit` rows, or with `since` the first `limit` of the steps after it (oldest first)."""
        async with self._lock(session_id):
            await self._meta(tenant, session_id)
            rows = await self._guard(self.store.history(session_id, limit, since))
        return [row.to_json() for row in rows]

    async def schedule(self, tenant: str, session_id: str, steps: int) -> dict[str, Any]:
        async with self._lock(session_id):
            _, engine = await self._load(tenant, session_id)
        groups = len(engine.groups)
        if steps * groups > MAX_SCHEDULE_POINTS:
            raise SpecError.one(
                "steps",
                f"{steps} steps x {groups} groups is {steps * groups} values; at most {MAX_SCHEDULE_POINTS}",
            )
        # groups x steps scheduler advances: a thread when there are many
        lr, knowable = await off_the_loop_if(steps * len(engine.groups) > 2_000, engine.schedule_ahead, steps)
        start = engine.step_count
        return {
            "step": start,
            "steps": list(range(start + 1, start + 1 + len(lr[0]))),
            "lr": lr,
            "depends_on_loss": not knowable,
        }

    async def delete(self, tenant: str, session_id: str) -> None:
        """Needs only the session's meta: a session whose numerics cannot be loaded can still go."""
        async with self._lock(session_id):
            await self._meta(tenant, session_id)
            await self._guard(self.store.delete(session_id))
            self._forget(session_id)
            self._finished.pop(session_id, None)
            pending = self._rounds.get(session_id)
            if pending is not None and not pending.done.done():
                if pending.timer is not None:
                    pending.timer.cancel()
                pending.closing = True
                pending.done.set_exception(NotFound(session_id))
                self._release(session_id, pending)

    # -- synchronous rounds -------------------------------------------------------------------------

    async def contribute(
        self,
        tenant: str,
        session_id: str,
        worker: str,
        grads: Mapping[str, Array],
        render: Render[T],
        *,
        round_step: int | None,
        loss: float | None = None,
        weight: float | None = None,
        fingerprint: str = "",
    ) -> T:
        """One worker's contribution to the synchronous round `round_step`. It waits until the round is
        full (or closes at its timeout), then answers with the round's one step, as every contributor is
        answered. A resend of the same contribution (same body) is answered the same, once or after."""
        async with self._lock(session_id):
            _, engine = await self._load(tenant, session_id)
            aggregation = engine.options.get("aggregation")
            if aggregation is None or aggregation["mode"] != "sync":
                raise StepError(
                    "worker",
                    "this session does not run synchronous rounds (aggregation.mode 'sync'): leave it out",
                )
            if round_step is None:
                raise StepError(
                    "step", "required: the round, the step of the parameters the gradient came from"
                )
            _check_weight(aggregation, weight)
            shared = self._shared_rounds
            if shared is None:
                finished = self._finished.get(session_id)
                if finished is not None and finished.step == round_step and worker in finished.fingerprints:
                    if finished.fingerprints[worker] != fingerprint:
                        raise RoundConflict(
                            f"worker {worker!r} contributed to round {round_step} with another request",
                            engine.step_count,
                        )
                    return await render(finished.outcome, finished.params, True)
                pending, resent = self._join_here(
                    tenant,
                    session_id,
                    engine,
                    aggregation,
                    Contribution(worker, grads, weight or 1.0, loss),
                    round_step,
                    fingerprint,
                )
        if shared is not None:
            return await shared.contribute(
                tenant,
                session_id,
                engine,
                aggregation,
                worker,
                grads,
                render,
                round_step=round_step,
                loss=loss,
                weight=weight,
                fingerprint=fingerprint,
            )
        if len(pending.parts) == aggregation["workers"]:
            await self._close(session_id, pending, aggregation)
        result = await asyncio.shield(pending.done)
        return await render(result.outcome, result.params, resent)

    def _join_here(
        self,
        tenant: str,
        session_id: str,
        engine: Engine,
        aggregation: Mapping[str, Any],
        part: Contribution,
        round_step: int,
        fingerprint: str,
    ) -> tuple[Round, bool]:
        """Adds the contribution to the round this process holds (memory://, sqlite://), under the session's
        lock: the round, and whether this was a resend of the worker's same request."""
        worker = part.worker
        if round_step != engine.step_count:
            raise StepConflict(round_step, engine.step_count, aggregation)
        engine.check_tensors(part.grads, "grads")
        pending = self._rounds.get(session_id)
        if pending is None or pending.step != engine.step_count:
            pending = Round(tenant, engine.step_count, asyncio.get_running_loop().create_future(), {})
            pending.done.add_done_callback(_retrieve)
            pending.timer = asyncio.create_task(self._close_after(session_id, pending, aggregation))
            self._rounds[session_id] = pending
        joined = pending.parts.get(worker)
        if joined is not None:
            if joined[1] != fingerprint:
                raise RoundConflict(
                    f"worker {worker!r} already contributed to round {round_step} with another request",
                    round_step,
                )
            return pending, True
        if pending.closing:
            raise RoundConflict(f"round {round_step} is closed; it is being applied", round_step)
        nbytes = _nbytes(part.grads)
        if self.round_bytes + nbytes > self.max_round_bytes:
            raise RoundsFull(
                f"rounds here hold {self.round_bytes} bytes of contributions; this one needs "
                f"{nbytes} more, past OPTSERVE_MAX_ROUND_BYTES={self.max_round_bytes}: retry"
            )
        self.round_bytes += nbytes
        pending.parts[worker] = (part, fingerprint)
        return pending, False

    async def _close_after(self, session_id: str, pending: Round, aggregation: Mapping[str, Any]) -> None:
        await asyncio.sleep(aggregation["timeout"])
        await self._close(session_id, pending, aggregation)

    async def _close(self, session_id: str, pending: Round, aggregation: Mapping[str, Any]) -> None:
        """Applies the round once (or, below min_workers, fails it) and answers every contributor."""
        if pending.closing:
            return
        pending.closing = True
        if pending.timer is not None and pending.timer is not asyncio.current_task():
            pending.timer.cancel()
        parts = [part for part, _ in pending.parts.values()]
        try:
            if len(parts) < aggregation["min_workers"]:
                raise RoundConflict(too_few(pending.step, len(parts), aggregation), pending.step)
            result = await self._apply_round(session_id, pending, parts, aggregation)
        except Exception as exc:
            if not pending.done.done():
                pending.done.set_exception(exc)
        else:
            self._finished[session_id] = result
            if not pending.done.done():
                pending.done.set_result(result)
            self.on_step(result.outcome)
        finally:
            self._release(session_id, pending)

    def _release(self, session_id: str, pending: Round) -> None:
        """The round's contributions no longer count against OPTSERVE_MAX_ROUND_BYTES."""
        if self._rounds.get(session_id) is pending:
            del self._rounds[session_id]
        self.round_bytes -= sum(_nbytes(part.grads) for part, _ in pending.parts.values())
        pending.parts = {w: (replace(part, grads={}), fp) for w, (part, fp) in pending.parts.items()}

    async def _apply_round(
        self, session_id: str, pending: Round, parts: list[Contribution], aggregation: Mapping[str, Any]
    ) -> RoundResult:
        workers = tuple(sorted(pending.parts))
        loss = mean_loss(parts)
        applied: list[tuple[Engine, StepOutcome]] = []

        async def write(meta: SessionMeta, engine: Engine) -> Written:
            if engine.step_count != pending.step:
                raise StepConflict(pending.step, engine.step_count, aggregation)

            def work() -> tuple[Engine, StepOutcome]:
                reduced = reduce(parts, aggregation["reduce"])
                return engine.advance(engine.prepare(reduced, loss))

            following, outcome = await self._run(engine, work)
            outcome = replace(outcome, workers=workers)
            applied.append((following, outcome))
            grad_norm = None if outcome.skipped else outcome.grad_norm
            return Written(
                following,
                HistoryRow(outcome.step, outcome.lr, loss, grad_norm, outcome.skipped, self.clock()),
            )

        await self._transact(pending.tenant, session_id, write)
        following, outcome = applied[-1]
        fingerprints = {worker: fingerprint for worker, (_, fingerprint) in pending.parts.items()}
        return RoundResult(pending.step, outcome, following.params, fingerprints)

    async def expire(self) -> int:
        """Deletes idle sessions when a TTL is set; the server calls this periodically."""
        if self.ttl is None:
            return 0
        removed = await self._guard(self.store.expire(self.ttl, self.clock()))
        now = self.clock()
        for sid in [s for s, (m, _) in self._cache.items() if now - m.updated_at > self.ttl]:
            self._forget(sid)
        return removed
