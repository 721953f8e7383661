"""The `Store` contract, one table of tests run against every backend: memory, SQLite, Redis."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import numpy as np
import pytest

from app.optim.checkpoint import restore
from app.optim.engine import Engine
from app.sessions import rebuild, record_of
from app.store.base import (
    HistoryRow,
    IdempotencyRecord,
    LoggedStep,
    Quota,
    QuotaExceeded,
    SessionMeta,
    SessionRecord,
    Store,
    StoreError,
)
from tests.store.conftest import STORES, MakeStore

pytestmark = pytest.mark.parametrize("kind", STORES)

SPEC = {"optimizer": {"name": "sgd", "lr": 0.5}}


def new_engine(values: list[float] | None = None) -> Engine:
    return Engine.create(SPEC, {"w": np.array(values or [0.0, 0.0]), "b": np.zeros(1, np.float32)})


def clone(engine: Engine) -> Engine:
    return restore(*engine.snapshot())


def as_record(meta: SessionMeta, engine: Engine) -> SessionRecord:
    return record_of(meta, engine)


def engine_of(record: SessionRecord) -> Engine:
    return restore(record.tensors, record.engine)


def new_meta(session_id: str = "s_contract", tenant: str = "t1", **fields: object) -> SessionMeta:
    now = time.time()
    return replace(SessionMeta(session_id, tenant, now, now, {"run": "a"}), **fields)  # type: ignore[arg-type]


def stepped(engine: Engine, grad: float = 1.0) -> Engine:
    return engine.step({"w": np.full(2, grad)})[0]


def row(step: int) -> HistoryRow:
    return HistoryRow(step, [0.5], 0.25 * step, 1.5, False, 1000.0 + step)


def record(key: str, step: int) -> IdempotencyRecord:
    return IdempotencyRecord(key, f"fp-{key}", step, [0.5], False, 2.0)


async def commit_steps(
    store: Store, meta: SessionMeta, engine: Engine, n: int, keyed: bool = False
) -> tuple[SessionMeta, Engine]:
    for _ in range(n):
        engine = stepped(engine)
        new = replace(meta, version=meta.version + 1, updated_at=meta.updated_at + 1)
        rec = record(f"k{engine.step_count}", engine.step_count) if keyed else None
        assert await store.commit(as_record(new, engine), meta.version, row(engine.step_count), rec)
        meta = new
    return meta, engine


async def test_create_then_load_round_trips(make_store: MakeStore, kind: str) -> None:
    store = await make_store(kind)
    meta, engine = new_meta(metadata={"run": "a", "ü": "ß"}), new_engine([1.25, -2.5])
    await store.create(as_record(meta, clone(engine)))
    loaded = await store.load(meta.id)
    assert loaded is not None
    got_meta, got = loaded.meta, engine_of(loaded)
    assert got_meta == meta
    assert got.step_count == 0
    assert got.lr == [0.5]
    np.testing.assert_array_equal(got.params["w"], [1.25, -2.5])
    assert got.params["w"].dtype == np.float64
    assert got.params["b"].dtype == np.float32
    assert await store.version(meta.id) == 0


async def test_unknown_sessions_are_absent_everywhere(make_store: MakeStore, kind: str) -> None:
    store = await make_store(kind)
    assert await store.load("s_nope") is None
    assert await store.version("s_nope") is None
    assert await store.history("s_nope", 10) == []
    assert await store.idempotency("s_nope", "k") is None
    assert await store.delete("s_nope") is False
    assert not await store.commit(as_record(new_meta("s_nope", version=1), new_engine()), 0, row(1), None)
    assert await store.load("s_nope") is None
    assert await store.sessions_of("t1") == []


async def test_commit_is_compare_and_set_on_the_version(make_store: MakeStore, kind: str) -> None:
    store = await make_store(kind)
    meta, engine = new_meta(), new_engine()
    await store.create(as_record(meta, clone(engine)))
    meta, engine = await commit_steps(store, meta, engine, 1, keyed=True)
    assert await store.version(meta.id) == 1
    # a writer that loaded version 0 lost the race: nothing of its step may land
    stale = stepped(stepped(engine, 100.0), 100.0)
    ok = await store.commit(
        as_record(replace(meta, version=1), stale),
        0,
        row(99),
        IdempotencyRecord("late", "x", 99, [0.5], False, 1.0),
    )
    assert not ok
    loaded = await store.load(meta.id)
    assert loaded is not None
    assert loaded.meta.version == 1
    assert engine_of(loaded).step_count == 1
    np.testing.assert_array_equal(engine_of(loaded).params["w"], [-0.5, -0.5])
    assert [h.step for h in await store.history(meta.id, 100)] == [1]
    assert await store.idempotency(meta.id, "late") is None
    assert await store.idempotency(meta.id, "k1") == record("k1", 1)


async def test_a_commit_carries_meta_state_history_and_key_together(make_store: MakeStore, kind: str) -> None:
    store = await make_store(kind)
    meta, engine = new_meta(), new_engine()
    await store.create(as_record(meta, clone(engine)))
    new = replace(meta, version=1, updated_at=meta.updated_at + 5, metadata={"run": "b"})
    after = stepped(engine)
    assert await store.commit(as_record(new, clone(after)), 0, row(1), record("key-1", 1))
    loaded = await store.load(meta.id)
    assert loaded is not None
    assert loaded.meta == new
    np.testing.assert_array_equal(engine_of(loaded).params["w"], after.params["w"])
    assert engine_of(loaded).step_count == 1
    assert await store.history(meta.id, 10) == [row(1)]
    assert await store.idempotency(meta.id, "key-1") == record("key-1", 1)
    assert await store.idempotency(meta.id, "key-2") is None
    # a commit without a history row or key (PUT params) writes neither
    assert await store.commit(as_record(replace(new, version=2), clone(after)), 1, None, None)
    assert await store.history(meta.id, 10) == [row(1)]


async def test_only_one_of_concurrent_writers_of_a_version_wins(make_store: MakeStore, kind: str) -> None:
    store = await make_store(kind)
    meta, engine = new_meta(), new_engine()
    await store.create(as_record(meta, clone(engine)))
    new = replace(meta, version=1)
    results = await asyncio.gather(
        *(
            store.commit(as_record(new, stepped(engine, float(i))), 0, row(1), record(f"k{i}", 1))
            for i in range(8)
        )
    )
    assert sorted(results) == [False] * 7 + [True]
    assert len(await store.history(meta.id, 100)) == 1
    assert await store.version(meta.id) == 1


async def test_history_is_newest_last_limited_and_trimmed(make_store: MakeStore, kind: str) -> None:
    store = await make_store(kind, history_limit=5)
    meta, engine = new_meta(), new_engine()
    await store.create(as_record(meta, clone(engine)))
    await commit_steps(store, meta, engine, 12)
    assert [h.step for h in await store.history(meta.id, 100)] == [8, 9, 10, 11, 12]
    assert [h.step for h in await store.history(meta.id, 2)] == [11, 12]
    assert await store.history(meta.id, 0) == []
    assert (await store.history(meta.id, 1))[0] == row(12)
    # since: the first rows after a step, oldest first (what a live view polls for)
    assert [h.step for h in await store.history(meta.id, 100, since=9)] == [10, 11, 12]
    assert [h.step for h in await store.history(meta.id, 2, since=0)] == [8, 9]
    assert await store.history(meta.id, 100, since=12) == []
    assert await store.history("s_nothing", 100, since=0) == []


async def test_history_since_reads_back_across_many_rows(make_store: MakeStore, kind: str) -> None:
    store = await make_store(kind, history_limit=1000)
    meta, engine = new_meta(), new_engine()
    await store.create(as_record(meta, clone(engine)))
    await commit_steps(store, meta, engine, 700)
    assert [h.step for h in await store.history(meta.id, 1000, since=100)] == list(range(101, 701))
    assert [h.step for h in await store.history(meta.id, 3, since=100)] == [101, 102, 103]


async def test_idempotency_records_last_1000_steps_then_go(make_store: MakeStore, kind: str) -> None:
    store = await make_store(kind)
    meta, engine = new_meta(), new_engine()
    await store.create(as_record(meta, clone(engine)))
    # 100 commits whose step counts leap by 20 (SQLite prunes every 100 versions)
    for version in range(1, 101):
        step = 20 * version
        engine.step_count = step
        key = {1: "old", 60: "recent"}.get(version)
        rec = None if key is None else record(key, step)
        new = replace(meta, version=version)
        assert await store.commit(as_record(new, clone(engine)), version - 1, row(step), rec)
        meta = new
    assert await store.idempotency(meta.id, "old") is None  # step 20 < 2000 - 1000
    assert await store.idempotency(meta.id, "recent") == record("recent", 1200)


async def test_sessions_of_lists_a_tenants_sessions_with_step_and_lr(
    make_store: MakeStore, kind: str
) -> None:
    store = await make_store(kind)
    a, b, c = new_meta("s_a"), new_meta("s_b"), new_meta("s_c", tenant="t2")
    for meta in (a, b, c):
        await store.create(as_record(meta, new_engine()))
    await commit_steps(store, b, new_engine(), 3)
    listed = {r.meta.id: r for r in await store.sessions_of("t1")}
    assert set(listed) == {"s_a", "s_b"}
    assert listed["s_a"] == (a, 0, [0.5], SPEC["optimizer"]["name"], None, None)  # no step: no loss
    assert listed["s_b"][1:] == (3, [0.5], SPEC["optimizer"]["name"], None, 0.75)  # the newest row's loss
    assert listed["s_b"].meta.version == 3
    assert [r.meta.id for r in await store.sessions_of("t2")] == ["s_c"]
    assert await store.sessions_of("nobody") == []
    assert await store.delete("s_a")
    assert [r.meta.id for r in await store.sessions_of("t1")] == ["s_b"]


async def test_delete_removes_everything_of_the_session(make_store: MakeStore, kind: str) -> None:
    store = await make_store(kind)
    meta, engine = new_meta(), new_engine()
    await store.create(as_record(meta, clone(engine)))
    other = new_meta("s_other")
    await store.create(as_record(other, clone(engine)))
    await commit_steps(store, meta, engine, 3, keyed=True)
    assert await store.delete(meta.id) is True
    assert await store.load(meta.id) is None
    assert await store.version(meta.id) is None
    assert await store.history(meta.id, 100) == []
    assert await store.idempotency(meta.id, "k1") is None
    assert await store.delete(meta.id) is False
    assert not await store.commit(as_record(replace(meta, version=4), new_engine()), 3, row(4), None)
    assert await store.load("s_other") is not None


async def test_ping_answers(make_store: MakeStore, kind: str) -> None:
    store = await make_store(kind)
    await store.ping()


async def test_creates_stay_within_the_tenants_quota(make_store: MakeStore, kind: str) -> None:
    store = await make_store(kind)
    one = as_record(new_meta("s_q0"), new_engine())
    quota = Quota(sessions=3, nbytes=10 * one.nbytes + 1000)
    for i in range(3):
        await store.create(as_record(new_meta(f"s_q{i}"), new_engine()), quota)
    await store.create(as_record(new_meta("s_other", tenant="t2"), new_engine()), quota)  # its own quota
    with pytest.raises(QuotaExceeded, match="OPTSERVE_MAX_SESSIONS_PER_KEY=3"):
        await store.create(as_record(new_meta("s_q3"), new_engine()), quota)
    assert await store.load("s_q3") is None
    assert await store.delete("s_q1")
    await store.create(as_record(new_meta("s_q3"), new_engine()), quota)  # a deleted session frees its place
    tight = Quota(sessions=100, nbytes=3 * one.nbytes + 200)
    with pytest.raises(QuotaExceeded, match="OPTSERVE_MAX_BYTES_PER_KEY"):
        await store.create(as_record(new_meta("s_big"), new_engine([0.0] * 1000)), tight)
    assert {r.meta.id for r in await store.sessions_of("t1")} == {"s_q0", "s_q2", "s_q3"}


async def test_concurrent_creates_never_pass_the_quota_together(make_store: MakeStore, kind: str) -> None:
    """On Redis, two stores stand for two replicas: the quota holds across them."""
    stores = [await make_store(kind)] * 2 if kind != "redis" else [await make_store(kind) for _ in range(2)]
    quota = Quota(sessions=3, nbytes=1 << 30)

    async def attempt(i: int) -> bool:
        try:
            await stores[i % 2].create(as_record(new_meta(f"s_race{i}"), new_engine()), quota)
        except QuotaExceeded:
            return False
        return True

    results = await asyncio.gather(*(attempt(i) for i in range(10)))
    assert sum(results) == 3
    assert len(await stores[0].sessions_of("t1")) == 3


async def test_a_create_of_a_taken_id_fails_and_leaves_that_session_whole(
    make_store: MakeStore, kind: str
) -> None:
    store = await make_store(kind)
    meta = new_meta("s_taken")
    await store.create(as_record(meta, new_engine([1.0, 2.0])))
    with pytest.raises(StoreError):
        await store.create(as_record(meta, new_engine([7.0, 7.0])))
    kept = await store.load("s_taken")
    assert kept is not None
    np.testing.assert_array_equal(engine_of(kept).params["w"], [1.0, 2.0])


def logged_step(engine: Engine, t: int) -> tuple[Engine, LoggedStep]:
    """The engine after step t (float32 Adam, a skipped NaN step at t == 3) and that step as logged."""
    grads = {"w": np.random.default_rng(t).standard_normal(64).astype(np.float32)}
    if t == 3:
        grads["w"][5] = np.nan
    prepared = engine.prepare(grads, loss=float(t))
    following, _ = engine.advance(prepared)
    return following, LoggedStep(
        prepared.grads, prepared.loss, prepared.grad_norm, prepared.skipped, prepared.staleness
    )


async def test_a_record_committed_with_its_logged_steps_loads_as_that_record(
    make_store: MakeStore, kind: str
) -> None:
    """A store may keep the steps instead of the state (Redis does): whatever it keeps, what it loads is
    the state the last commit named, bit for bit, after every kind of write in between."""
    store = await make_store(kind)
    spec = {"optimizer": {"name": "adam", "lr": 0.01}, "nonfinite": "skip"}
    engine = Engine.create(spec, {"w": np.linspace(-1, 1, 64, dtype=np.float32), "b": np.ones(3)})
    meta = new_meta("s_logged")
    await store.create(as_record(meta, engine))
    for t in range(12):
        if t == 7:  # a write that is not a step: the whole state
            following, logged = engine.with_params({"b": np.full(3, 2.0)}), None
        else:
            following, logged = logged_step(engine, t)
        new = replace(meta, version=meta.version + 1)
        assert await store.commit(as_record(new, following), meta.version, row(t + 1), None, logged)
        meta, engine = new, following
        loaded = await store.load("s_logged")
        assert loaded is not None
        assert loaded.meta.version == meta.version
        rebuilt = rebuild(loaded)
        want, want_meta = engine.snapshot()
        got, got_meta = rebuilt.snapshot()
        assert got_meta == want_meta
        assert {k: v.tobytes() for k, v in got.items()} == {k: v.tobytes() for k, v in want.items()}
