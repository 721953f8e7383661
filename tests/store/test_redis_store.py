"""What is particular to the Redis store: key layout, binary values, TTLs, retried writes, Redis down."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from redis.crc import key_slot

from app.main import open_store
from app.optim.engine import Engine
from app.sessions import rebuild
from app.settings import Settings
from app.store import redis as redis_store
from app.store.base import CorruptRecord, RoundPart, SessionMeta, StoreError
from app.store.redis import COMMIT_LUA, RedisStore, log_prefix, session_keys, tenant_key, tenant_sizes_key
from app.wire import safetensors
from tests.conftest import AppClient
from tests.store.test_contract import (
    as_record,
    clone,
    commit_steps,
    engine_of,
    logged_step,
    new_engine,
    new_meta,
    record,
    row,
    stepped,
)
from tests.system.redis_server import RedisServer
from tests.system.server import free_port


async def open_redis(server: RedisServer, **options: object) -> RedisStore:
    return RedisStore.from_url(server.url(), **options)  # type: ignore[arg-type]


async def test_every_key_of_a_session_shares_one_hash_tag(
    redis_server: RedisServer, redis_db: redis.Redis
) -> None:
    store = await open_redis(redis_server)
    meta = new_meta("s_tagged")
    await store.create(as_record(meta, new_engine()))
    await commit_steps(store, meta, new_engine(), 2, keyed=True)
    keys = sorted(k.decode() for k in redis_db.scan_iter(match="optserve:{s_tagged}*"))
    # all six of a session's own exist once a keyed step is committed (the other four hold rounds)
    assert keys == sorted(session_keys("s_tagged")[:6])
    assert {key_slot(k.encode()) for k in keys} == {key_slot(b"s_tagged")}
    assert all(k.startswith("optserve:{s_tagged}:") for k in keys)
    # the tenant index is elsewhere (its own slot), never mixed into a session's keys
    assert redis_db.zrange(tenant_key("t1"), 0, -1) == [b"s_tagged"]
    await store.close()


async def test_the_open_tenants_index_of_before_is_adopted_and_its_keys_share_a_slot(
    redis_server: RedisServer, redis_db: redis.Redis
) -> None:
    """The open tenant's keys had the empty hash tag `{}`, which Redis Cluster ignores; today's share a slot,
    and an index left under the old names is moved over on first use."""
    assert key_slot(tenant_key("").encode()) == key_slot(tenant_sizes_key("").encode())
    store = await open_redis(redis_server)
    meta = new_meta("s_before", tenant="")
    await store.create(as_record(meta, new_engine()))
    redis_db.rename(tenant_key(""), "optserve:tenant:{}:sessions")  # as a deployment of before left it
    redis_db.hset("optserve:tenant:{}:bytes", "s_before", 100)
    fresh = await open_redis(redis_server)
    assert [r.meta.id for r in await fresh.sessions_of("")] == ["s_before"]
    assert not redis_db.exists("optserve:tenant:{}:sessions", "optserve:tenant:{}:bytes")
    assert redis_db.hget(tenant_sizes_key(""), "s_before") == b"100"
    await store.close()
    await fresh.close()


async def test_tensors_are_one_binary_safetensors_value(
    redis_server: RedisServer, redis_db: redis.Redis
) -> None:
    store = await open_redis(redis_server)
    meta, engine = new_meta("s_bin"), new_engine([3.0, 4.0])
    await store.create(as_record(meta, clone(engine)))
    meta_key, tensors_key = session_keys("s_bin")[:2]
    assert redis_db.type(tensors_key) == b"string"
    assert redis_db.type(meta_key) == b"hash"
    blob = redis_db.get(tensors_key)
    assert isinstance(blob, bytes)
    tensors, _ = safetensors.decode(blob)
    np.testing.assert_array_equal(tensors["params/w"], [3.0, 4.0])
    assert redis_db.hget(meta_key, "version") == b"0"
    assert b'"optimizer"' in (redis_db.hget(meta_key, "engine") or b"")
    await store.close()


async def test_ttl_is_set_on_every_key_by_create_and_each_commit(
    redis_server: RedisServer, redis_db: redis.Redis
) -> None:
    store = await open_redis(redis_server, ttl=60.0)
    meta, engine = new_meta("s_ttl"), new_engine()
    await store.create(as_record(meta, clone(engine)))
    existing = [k for k in session_keys("s_ttl") if redis_db.exists(k)]
    assert len(existing) >= 2
    assert all(0 < redis_db.pttl(k) <= 60_000 for k in existing)
    redis_db.pexpire(session_keys("s_ttl")[0], 5_000)  # a commit renews the TTL of every key
    await commit_steps(store, meta, engine, 1, keyed=True)
    ttls = [redis_db.pttl(k) for k in session_keys("s_ttl")[:6]]  # round keys exist in rounds only
    assert all(55_000 < t <= 60_000 for t in ttls), ttls
    assert await store.expire(60.0, time.time() + 3600) == 0  # Redis expires; nothing to sweep
    await store.close()

    # without a TTL the keys persist (a commit also clears a TTL left by an earlier setting)
    plain = await open_redis(redis_server)
    await plain.create(as_record(new_meta("s_forever"), new_engine()))
    assert all(redis_db.pttl(k) == -1 for k in session_keys("s_forever") if redis_db.exists(k))
    await commit_steps(plain, replace(meta, version=1), stepped(engine), 1, keyed=True)
    assert [redis_db.pttl(k) for k in session_keys("s_ttl")[:6]] == [-1] * 6
    await plain.close()


async def test_an_expired_session_is_gone_and_leaves_the_index(
    redis_server: RedisServer, redis_db: redis.Redis
) -> None:
    store = await open_redis(redis_server, ttl=0.2)
    store.index_grace = 0.0
    await store.create(as_record(new_meta("s_brief"), new_engine()))
    await store.create(as_record(new_meta("s_other", tenant="t2"), new_engine()))
    assert [r.meta.id for r in await store.sessions_of("t1")] == ["s_brief"]
    await asyncio.sleep(0.35)
    assert await store.load("s_brief") is None
    assert await store.version("s_brief") is None
    assert not [k for k in session_keys("s_brief") if redis_db.exists(k)]
    assert await store.sessions_of("t1") == []
    assert redis_db.zcard(tenant_key("t1")) == 0
    await store.close()


async def test_listing_keeps_young_index_entries_of_missing_sessions(
    redis_server: RedisServer, redis_db: redis.Redis
) -> None:
    """An id is indexed just before its session is written: a listing in between must not drop it."""
    store = await open_redis(redis_server)
    redis_db.zadd(tenant_key("t1"), {"s_being_created": int(time.time())})
    assert await store.sessions_of("t1") == []
    assert redis_db.zscore(tenant_key("t1"), "s_being_created") is not None
    redis_db.zadd(tenant_key("t1"), {"s_being_created": int(time.time()) - 3600})  # an old orphan
    assert await store.sessions_of("t1") == []
    assert redis_db.zcard(tenant_key("t1")) == 0
    await store.close()


async def test_a_retried_commit_is_recognised_not_applied_twice(
    redis_server: RedisServer, redis_db: redis.Redis
) -> None:
    """redis-py retries a write whose reply was lost; the script sees its own nonce and does nothing."""
    store = await open_redis(redis_server)
    meta, engine = new_meta("s_retry"), new_engine()
    await store.create(as_record(meta, clone(engine)))
    tensors, engine_meta = stepped(engine).snapshot()
    blob = safetensors.encode_bytes(tensors, None)

    def args(nonce: str, expected: int, step: int) -> list[str | int | bytes]:
        return [
            nonce, 0, 64, expected, expected + 1, repr(time.time()), "{}", step, "[0.5]",
            json.dumps(engine_meta), "full", "1", '[1, [0.5], null, 1.0, false, 1.0]', 10_000,
            "1", "key", '["fp", 1, [0.5], false, 1.0]', step, step - 1000, "", log_prefix("s_retry"),
            len(blob), 1, "0",
        ]  # fmt: skip

    async def commit(nonce: str, expected: int, step: int) -> int:
        return (await store._run_commit("s_retry", args(nonce, expected, step), [blob]))[0]

    assert await commit("nonce-a", 0, 1) == 1
    assert await commit("nonce-a", 0, 1) == 1  # the retry: already done
    assert await store.version("s_retry") == 1
    assert len(await store.history("s_retry", 100)) == 1
    assert await commit("nonce-b", 0, 1) == 0  # another writer: stale
    # even after other writers moved on, the late retry is still recognised
    assert await commit("nonce-c", 1, 2) == 1
    assert await commit("nonce-a", 0, 1) == 1
    assert await store.version("s_retry") == 2
    assert len(await store.history("s_retry", 100)) == 2
    assert redis_db.llen(session_keys("s_retry")[5]) == 3  # create + two commits
    await store.close()


async def test_a_state_rolled_back_by_redis_and_rewritten_is_not_taken_for_current(
    redis_server: RedisServer, redis_db: redis.Redis
) -> None:
    """Redis may lose acknowledged writes (everysec + machine crash, failover to a lagging replica). If
    others then write the same version numbers again, a replica whose cache holds the lost state must not
    see its version as current, nor commit on top of it."""
    a, b = await open_redis(redis_server), await open_redis(redis_server)
    meta, engine = new_meta("s_rollback"), new_engine()
    await a.create(as_record(meta, clone(engine)))
    saved = {k: v for k in session_keys("s_rollback") if isinstance(v := redis_db.dump(k), bytes)}
    lost = stepped(engine, 1.0)
    assert await a.commit(
        as_record(replace(meta, version=1), clone(lost)), 0, row(1), None
    )  # a caches version 1
    for key in session_keys("s_rollback"):  # Redis comes back without that write...
        redis_db.delete(key)
    for key, value in saved.items():
        redis_db.restore(key, 0, value)
    loaded = await b.load("s_rollback")  # ...and another replica writes a different version 1
    assert loaded is not None
    assert await b.commit(
        as_record(replace(meta, version=1), stepped(engine_of(loaded), 7.0)), 0, row(1), None
    )
    assert await a.version("s_rollback") == -1  # not 1: a's cached state is not the stored one
    assert not await a.commit(as_record(replace(meta, version=2), stepped(lost)), 1, row(2), None)
    reloaded = await a.load("s_rollback")
    assert reloaded is not None
    np.testing.assert_array_equal(engine_of(reloaded).params["w"], [-3.5, -3.5])
    assert await a.version("s_rollback") == 1
    assert await a.commit(as_record(replace(meta, version=2), stepped(engine_of(reloaded))), 1, row(2), None)
    assert await b.version("s_rollback") == 2
    await a.close()
    await b.close()


async def test_scripts_are_reloaded_after_a_script_flush(
    redis_server: RedisServer, redis_db: redis.Redis
) -> None:
    store = await open_redis(redis_server)
    meta = new_meta("s_flush")
    await store.create(as_record(meta, new_engine()))
    redis_db.script_flush()
    assert not redis_db.script_exists(store._commit.sha)[0]
    await commit_steps(store, meta, new_engine(), 1)
    assert await store.version("s_flush") == 1
    assert "redis.call" in COMMIT_LUA
    await store.close()


async def test_idempotency_records_are_pruned_on_every_commit(
    redis_server: RedisServer, redis_db: redis.Redis
) -> None:
    store = await open_redis(redis_server, history_limit=3)
    meta, engine = new_meta("s_prune"), new_engine()
    await store.create(as_record(meta, clone(engine)))
    for version in range(1, 51):
        engine.step_count = 100 * version
        new = replace(meta, version=version)
        rec = record(f"k{version}", 100 * version)
        assert await store.commit(as_record(new, clone(engine)), version - 1, row(100 * version), rec)
        meta = new
    kept = sorted(
        int(str(k, "ascii")[1:]) for k in redis_db.hkeys(session_keys("s_prune")[3]) if isinstance(k, bytes)
    )
    assert kept == list(range(40, 51))  # steps 4,000..5,000: the last 1,000 steps, the older ones went
    assert redis_db.zcard(session_keys("s_prune")[4]) == len(kept)
    assert redis_db.llen(session_keys("s_prune")[2]) == 3
    await store.close()


async def test_ids_that_could_change_the_hash_tag_name_no_session(redis_server: RedisServer) -> None:
    store = await open_redis(redis_server)
    for bad in ("a}b", "{x}", "", "s" * 200, "a:b"):
        assert await store.load(bad) is None
        assert await store.version(bad) is None
        assert await store.delete(bad) is False
        assert await store.history(bad, 5) == []
        assert await store.idempotency(bad, "k") is None
    with pytest.raises(ValueError, match="session id"):
        await store.create(as_record(new_meta("a}b"), new_engine()))
    await store.close()


async def test_urls_password_and_database(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "auth", None, "--requirepass", "s3cret") as server:
        port = server.port
        good = RedisStore.from_url(f"redis://:s3cret@127.0.0.1:{port}/3")
        await good.ping()
        await good.create(as_record(new_meta("s_db3"), new_engine()))
        assert await good.load("s_db3") is not None
        other_db = RedisStore.from_url(f"redis://:s3cret@127.0.0.1:{port}/0")
        assert await other_db.load("s_db3") is None
        wrong = RedisStore.from_url(f"redis://:nope@127.0.0.1:{port}/0")
        with pytest.raises(StoreError, match="Redis ping"):
            await wrong.ping()
        for store in (good, other_db, wrong):
            await store.close()
    RedisStore.from_url("rediss://:pw@redis.example:6380/1")  # TLS: parsed, connected on first use
    with pytest.raises(ValueError, match="redis://"):
        RedisStore.from_url("http://127.0.0.1:6379/0")


async def test_open_store_wires_url_history_limit_and_ttl(redis_server: RedisServer) -> None:
    store = open_store(Settings(store=redis_server.url(), history_limit=7, session_ttl=30))
    assert isinstance(store, RedisStore)
    assert (store.history_limit, store.ttl_ms, store.shared) == (7, 30_000, True)
    await store.ping()
    await store.close()


async def test_every_operation_raises_store_error_when_redis_is_down() -> None:
    store = RedisStore.from_url(f"redis://127.0.0.1:{free_port()}/0")
    meta, engine = new_meta("s_down"), new_engine()
    calls = [
        store.ping(),
        store.create(as_record(meta, engine)),
        store.load("s_down"),
        store.version("s_down"),
        store.commit(as_record(replace(meta, version=1), engine), 0, row(1), record("k", 1)),
        store.idempotency("s_down", "k"),
        store.history("s_down", 10),
        store.sessions_of("t1"),
        store.delete("s_down"),
    ]
    start = time.monotonic()
    for call in calls:
        with pytest.raises(StoreError, match="Redis"):
            await call
    assert time.monotonic() - start < 10, "a dead Redis must be reported quickly (503), not hang"
    assert await store.expire(1.0, time.time()) == 0
    await store.close()


async def test_a_killed_redis_fails_requests_then_comes_back_with_its_data(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "restart") as server:
        store = RedisStore.from_url(server.url())
        meta, engine = new_meta("s_back"), new_engine()
        await store.create(as_record(meta, clone(engine)))
        meta, engine = await commit_steps(store, meta, engine, 3, keyed=True)
        server.kill()
        with pytest.raises(StoreError):
            await store.load("s_back")
        with pytest.raises(StoreError):
            await store.commit(as_record(replace(meta, version=4), stepped(engine)), 3, row(4), None)
        server.start()  # same dir, same port: the AOF is replayed
        loaded = await store.load("s_back")  # the client reconnects by itself
        assert loaded is not None
        assert (loaded.meta.version, engine_of(loaded).step_count) == (3, 3)
        np.testing.assert_array_equal(engine_of(loaded).params["w"], engine.params["w"])
        assert await store.idempotency("s_back", "k3") == record("k3", 3)
        await commit_steps(store, meta, engine, 1)
        await store.close()


async def test_the_api_answers_503_with_retry_after_when_redis_is_down(make_client: AppClient) -> None:
    client: httpx.AsyncClient = await make_client(store=f"redis://127.0.0.1:{free_port()}/0")
    spec = {"optimizer": {"name": "sgd", "lr": 0.1}, "params": {"w": [0.0, 0.0]}}
    r = await client.post("/v1/sessions", json=spec)
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "1"
    assert r.headers["content-type"].startswith("application/problem+json")
    assert (await client.get("/v1/sessions/s_x")).status_code == 503
    assert (await client.get("/v1/sessions")).status_code == 503
    assert (await client.get("/readyz")).status_code == 503


async def test_the_api_on_redis(
    make_client: AppClient, redis_server: RedisServer, redis_db: redis.Redis
) -> None:
    client: httpx.AsyncClient = await make_client(store=redis_server.url())
    assert (await client.get("/readyz")).json() == {"status": "ready", "store": "redis"}
    spec = {"optimizer": {"name": "sgd", "lr": 1.0}, "params": {"w": [0.0, 0.0]}}
    sid = (await client.post("/v1/sessions", json=spec)).json()["id"]
    for _ in range(3):
        r = await client.post(
            f"/v1/sessions/{sid}/step", json={"grads": {"w": [1.0, 2.0]}}, headers={"Idempotency-Key": "same"}
        )
        assert r.status_code == 200
    assert r.json()["step"] == 1
    assert r.headers.get("idempotent-replayed") == "true"
    assert [s["id"] for s in (await client.get("/v1/sessions")).json()["sessions"]] == [sid]
    assert (await client.delete(f"/v1/sessions/{sid}")).status_code == 204
    assert (await client.get(f"/v1/sessions/{sid}")).status_code == 404
    assert not list(redis_db.scan_iter(match=f"optserve:{{{sid}}}*"))


async def test_joining_a_round_in_redis(redis_server: RedisServer, redis_db: redis.Redis) -> None:
    """The join script's answers: a new worker joins, the same request is a resend, another request of
    the same worker is refused, a full round takes no more even before anyone claimed it, the byte budget
    holds, another step is stale, and a session that is not there is gone."""
    store = await open_redis(redis_server)
    meta = new_meta("s_round")
    await store.create(as_record(meta, new_engine()))

    def part(worker: str, fingerprint: str = "f", size: int = 10) -> RoundPart:
        return RoundPart(worker, fingerprint, 1.0, None, b"x" * size)

    async def join(p: RoundPart, step: int = 0, session: str = "s_round", max_bytes: int = 100) -> str:
        return (await store.round_join(session, step, p, max_bytes, 30.0, 2)).kind

    assert await join(part("a")) == "joined"
    assert await join(part("a")) == "resent"
    assert await join(part("a", "g")) == "other"
    assert await join(part("b", size=95)) == "full"  # 10 + 95 bytes > 100
    assert await join(part("b")) == "joined"
    assert await join(part("c")) == "closed"  # two of two: no third, claimed or not
    assert await join(part("c"), step=1) == "stale"
    assert await join(part("c"), session="s_nothing") == "gone"
    assert int(redis_db.hget("optserve:{s_round}:round", "n")) == 2
    assert sorted(redis_db.hkeys("optserve:{s_round}:roundgrads")) == [b"a", b"b"]
    await store.close()


async def commit_logged(
    store: RedisStore, meta: SessionMeta, engine: Engine, steps: range
) -> tuple[SessionMeta, Engine]:
    for t in steps:
        following, logged = logged_step(engine, t)
        new = replace(meta, version=meta.version + 1)
        assert await store.commit(as_record(new, following), meta.version, row(t + 1), None, logged)
        meta, engine = new, following
    return meta, engine


def log_keys(redis_db: redis.Redis, session_id: str) -> list[int]:
    prefix = log_prefix(session_id).encode()
    return sorted(int(k[len(prefix) :]) for k in redis_db.scan_iter(match=prefix + b"*"))


def adam_session(session_id: str) -> tuple[SessionMeta, Engine]:
    spec = {"optimizer": {"name": "adam", "lr": 0.01}, "nonfinite": "skip"}
    return new_meta(session_id), Engine.create(spec, {"w": np.linspace(-1, 1, 64, dtype=np.float32)})


async def test_steps_are_logged_then_folded_into_a_snapshot_in_the_background(
    redis_server: RedisServer, redis_db: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each step stores its prepared gradients (one list per version), not the state; once LOG_STEPS are
    logged the state is written behind the answer and the log up to it dropped. No staged write lingers."""
    monkeypatch.setattr(redis_store, "LOG_STEPS", 4)
    monkeypatch.setattr(redis_store, "LOG_RATIO", 100.0)  # the count decides here
    store = await open_redis(redis_server)
    meta, engine = adam_session("s_log")
    await store.create(as_record(meta, engine))
    meta, engine = await commit_logged(store, meta, engine, range(3))
    assert log_keys(redis_db, "s_log") == [1, 2, 3]
    assert int(redis_db.hget(session_keys("s_log")[0], "snap") or -1) == 0
    meta, engine = await commit_logged(store, meta, engine, range(3, 4))  # the 4th: a snapshot follows
    await asyncio.gather(*store._snapshots.values())
    assert log_keys(redis_db, "s_log") == []
    assert int(redis_db.hget(session_keys("s_log")[0], "snap") or -1) == 4
    assert not [f for f in redis_db.hkeys(session_keys("s_log")[0]) if f.startswith(b"ls:")]
    assert redis_db.hget(session_keys("s_log")[0], "snapengine") is None
    meta, engine = await commit_logged(store, meta, engine, range(4, 6))
    assert log_keys(redis_db, "s_log") == [5, 6]
    # a stale commit (another writer) stages nothing that stays
    following, logged = logged_step(engine, 99)
    assert not await store.commit(as_record(replace(meta, version=9), following), 8, row(9), None, logged)
    assert not list(redis_db.scan_iter(match=b"*staging*"))
    # another process loads the snapshot and redoes the two logged steps to the same bits
    other = await open_redis(redis_server)
    loaded = await other.load("s_log")
    assert loaded is not None
    assert len(loaded.log) == 2
    assert rebuild(loaded).snapshot()[1] == engine.snapshot()[1]
    assert await store.delete("s_log")
    assert not list(redis_db.scan_iter(match=b"*s_log*"))
    await store.close()
    await other.close()


async def test_a_log_the_snapshots_did_not_keep_up_with_is_cut_by_a_step_writing_the_state(
    redis_server: RedisServer, redis_db: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The log is bounded even when no snapshot gets written (they fail, or the process dies before):
    at twice LOG_STEPS the step itself writes the whole state."""
    monkeypatch.setattr(redis_store, "LOG_STEPS", 3)
    monkeypatch.setattr(redis_store, "LOG_RATIO", 100.0)
    monkeypatch.setattr(RedisStore, "_snapshot_later", lambda self, record, nonce: None)
    store = await open_redis(redis_server)
    meta, engine = adam_session("s_cut")
    await store.create(as_record(meta, engine))
    meta, engine = await commit_logged(store, meta, engine, range(6))
    assert log_keys(redis_db, "s_cut") == [1, 2, 3, 4, 5, 6]
    meta, engine = await commit_logged(store, meta, engine, range(6, 7))
    assert log_keys(redis_db, "s_cut") == []
    assert int(redis_db.hget(session_keys("s_cut")[0], "snap") or -1) == 7
    loaded = await store.load("s_cut")
    assert loaded is not None
    assert loaded.log == ()
    await store.close()


async def test_the_log_is_bounded_by_bytes_too(
    redis_server: RedisServer, redis_db: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past LOG_RATIO times the state's bytes a snapshot is written behind the answer; past twice that, by
    the step itself: Redis never holds more than 1 + 2 * LOG_RATIO times the state."""
    monkeypatch.setattr(RedisStore, "_snapshot_later", lambda self, record, nonce: None)
    store = await open_redis(redis_server)
    meta, engine = adam_session("s_bytes")  # 768 bytes of state, 256 of gradients per step
    await store.create(as_record(meta, engine))
    sizes = []
    for t in range(12):
        meta, engine = await commit_logged(store, meta, engine, range(t, t + 1))
        fields = redis_db.hgetall(session_keys("s_bytes")[0])
        sizes.append(sum(int(v) for k, v in fields.items() if k.startswith(b"ls:")))
    assert max(sizes) <= 2 * redis_store.LOG_RATIO * engine.nbytes
    assert 0 in sizes[1:]  # a step wrote the state and dropped the log
    await store.close()


async def test_logged_steps_expire_with_their_session(
    redis_server: RedisServer, redis_db: redis.Redis
) -> None:
    store = await open_redis(redis_server, ttl=60.0)
    meta, engine = adam_session("s_log_ttl")
    await store.create(as_record(meta, engine))
    await commit_logged(store, meta, engine, range(3))
    keys = [log_prefix("s_log_ttl") + str(v) for v in (1, 2, 3)]
    assert all(55_000 < redis_db.pttl(k) <= 60_000 for k in keys)
    assert 55_000 < redis_db.pttl(session_keys("s_log_ttl")[1]) <= 60_000
    await store.close()


async def test_a_log_that_does_not_match_its_versions_is_an_unreadable_record(
    redis_server: RedisServer, redis_db: redis.Redis
) -> None:
    store = await open_redis(redis_server)
    meta, engine = adam_session("s_log_gap")
    await store.create(as_record(meta, engine))
    await commit_logged(store, meta, engine, range(3))
    redis_db.delete(log_prefix("s_log_gap") + "2")
    with pytest.raises(CorruptRecord):
        await store.load("s_log_gap")
    await store.close()
