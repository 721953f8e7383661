"""`redis://host:port/db` (or `rediss://`, password in the URL): one store shared by many server processes.

Layout. Every key of a session carries the session id as its hash tag, so on Redis Cluster a session lives
in one slot and one Lua script may touch all of it:

    optserve:{<sid>}:meta       hash: tenant, created_at, updated_at, metadata, version, step, lr, engine,
                                writer (the nonce of the write that made this state)
    optserve:{<sid>}:tensors    string: every tensor of the session as one safetensors blob (binary)
    optserve:{<sid>}:history    list: compact JSON rows, newest last, trimmed to `history_limit`
    optserve:{<sid>}:idem       hash: Idempotency-Key -> compact JSON record of the first answer
    optserve:{<sid>}:idemsteps  sorted set: Idempotency-Key scored by its step (for pruning)
    optserve:{<sid>}:writes     list: nonces of the last writes (a retried write is recognised, not redone)
    optserve:tenant:{<tenant>}:sessions   sorted set: the tenant's session ids, scored by Redis server time

The commit is ONE Lua script: it compare-and-sets on `version`, then writes the meta, the blob, the history
row (+ trim), the idempotency record (+ pruning of records older than 1,000 steps) and the session TTL.
Redis runs a script atomically and (with AOF) logs its effects as one MULTI/EXEC, so a step is either all
there or not at all. The tenant index lives in another slot and is kept a superset of the live sessions:
ids are added before a session is created and removed after it is deleted; `sessions_of` skips ids whose
session is gone (deleted, expired) and drops them from the index once they are older than a grace period
(so a session being created right now is never dropped).

Expiry (`OPTSERVE_SESSION_TTL`) is Redis's: the create and commit scripts (re)set `PEXPIRE` on every key of
the session, so `expire()` has nothing to do and returns 0.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import anyio
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from app.store.base import (
    IDEMPOTENCY_STEPS,
    HistoryRow,
    IdempotencyRecord,
    Quota,
    QuotaExceeded,
    SessionMeta,
    SessionRecord,
    StoreError,
    decode,
    encode,
)

PREFIX = "optserve"
WRITES_KEPT = 64
"""Nonces of this many last writes are kept: a write retried after a lost reply is recognised as done."""
INDEX_GRACE_SECONDS = 60.0
"""An index entry without a session is dropped only once it is this old (creation adds it first)."""
PRUNE_CHUNK = 500
SEEN_LIMIT = 100_000
"""Sessions whose last known write (version, nonce) this process remembers, least recently used out."""
SUFFIXES = ("meta", "tensors", "history", "idem", "idemsteps", "writes")
META_FIELDS = ("tenant", "created_at", "updated_at", "metadata", "version", "step", "lr")
# Ids the service makes are "s_" + url-safe base64; anything else (e.g. braces, which would change the
# hash tag) cannot name a session and is simply not found.
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")

_TTL_LUA = """
local function apply_ttl(ms)
  for i = 1, #KEYS do
    if ms > 0 then redis.call('PEXPIRE', KEYS[i], ms) else redis.call('PERSIST', KEYS[i]) end
  end
end
"""

# KEYS: the six session keys. ARGV: nonce, ttl_ms, writes_kept, tenant, created_at, updated_at,
# metadata, version, step, lr, engine, blob. Returns 1 (created, or this very create already ran), 0 (the
# id is taken).
CREATE_LUA = (
    _TTL_LUA
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then
  if redis.call('LPOS', KEYS[6], ARGV[1]) then return 1 end
  return 0
end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6])
redis.call('HSET', KEYS[1], 'tenant', ARGV[4], 'created_at', ARGV[5], 'updated_at', ARGV[6],
  'metadata', ARGV[7], 'version', ARGV[8], 'step', ARGV[9], 'lr', ARGV[10], 'engine', ARGV[11],
  'writer', ARGV[1])
redis.call('SET', KEYS[2], ARGV[12])
redis.call('LPUSH', KEYS[6], ARGV[1])
redis.call('LTRIM', KEYS[6], 0, tonumber(ARGV[3]) - 1)
apply_ttl(tonumber(ARGV[2]))
return 1
"""
)

# KEYS: the six session keys. ARGV: nonce, ttl_ms, writes_kept, expected_version, version, updated_at,
# metadata, step, lr, engine, blob, has_history ('1'/'0'), history_row, history_limit, has_idem ('1'/'0'),
# idem_key, idem_record, idem_step, idem_horizon, expected_writer ('' = unknown). Returns 1 (committed, or
# this very commit already was), 0 (stale: nothing written), -1 (no such session: nothing written).
# `writer` is the nonce of the write that made the current state: when the caller knows which write its
# state came from, a state with the same version number made by another write (Redis lost acknowledged
# writes in a crash or a failover, and others wrote since) is stale too.
COMMIT_LUA = (
    _TTL_LUA
    + """
local current = redis.call('HGET', KEYS[1], 'version')
if not current then return -1 end
if redis.call('LPOS', KEYS[6], ARGV[1]) then return 1 end
if tonumber(current) ~= tonumber(ARGV[4]) then return 0 end
if ARGV[20] ~= '' and redis.call('HGET', KEYS[1], 'writer') ~= ARGV[20] then return 0 end
redis.call('HSET', KEYS[1], 'version', ARGV[5], 'updated_at', ARGV[6], 'metadata', ARGV[7],
  'step', ARGV[8], 'lr', ARGV[9], 'engine', ARGV[10], 'writer', ARGV[1])
redis.call('SET', KEYS[2], ARGV[11])
if ARGV[12] == '1' then
  redis.call('RPUSH', KEYS[3], ARGV[13])
  redis.call('LTRIM', KEYS[3], -tonumber(ARGV[14]), -1)
end
if ARGV[15] == '1' then
  redis.call('HSET', KEYS[4], ARGV[16], ARGV[17])
  redis.call('ZADD', KEYS[5], tonumber(ARGV[18]), ARGV[16])
end
local horizon = '(' .. ARGV[19]
while true do
  local old = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', horizon, 'LIMIT', 0, 500)
  if #old == 0 then break end
  redis.call('HDEL', KEYS[4], unpack(old))
  redis.call('ZREM', KEYS[5], unpack(old))
end
redis.call('LPUSH', KEYS[6], ARGV[1])
redis.call('LTRIM', KEYS[6], 0, tonumber(ARGV[3]) - 1)
apply_ttl(tonumber(ARGV[2]))
return 1
"""
)

# KEYS: the six session keys. Returns the tenant of the deleted session, or nil when there was none.
DELETE_LUA = """
local tenant = redis.call('HGET', KEYS[1], 'tenant')
redis.call('DEL', unpack(KEYS))
return tenant
"""

# KEYS: a tenant index. ARGV: session id. Scored by the server's clock, so replicas' clocks do not matter.
INDEX_ADD_LUA = """
local now = redis.call('TIME')
return redis.call('ZADD', KEYS[1], tonumber(now[1]), ARGV[1])
"""

# KEYS: a tenant index and its sizes. ARGV: grace seconds, then ids whose session is gone. Drops those
# older than grace.
INDEX_PRUNE_LUA = """
local now = tonumber(redis.call('TIME')[1])
local grace = tonumber(ARGV[1])
local removed = 0
for i = 2, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) <= now - grace then
    removed = removed + redis.call('ZREM', KEYS[1], ARGV[i])
    redis.call('HDEL', KEYS[2], ARGV[i])
  end
end
return removed
"""

# KEYS: a tenant index and its sizes (one slot). ARGV: session id, its bytes, the quota's sessions and
# bytes. Adds the id to the index, sized, if the tenant stays within the quota: 1; else 0 (sessions) or -1
# (bytes), and returns the tenant's count and bytes. Every replica's creates meet here, one at a time.
INDEX_RESERVE_LUA = """
local held = redis.call('ZCARD', KEYS[1])
local bytes = 0
for _, size in ipairs(redis.call('HVALS', KEYS[2])) do bytes = bytes + tonumber(size) end
if held + 1 > tonumber(ARGV[3]) then return {0, held, bytes} end
if bytes + tonumber(ARGV[2]) > tonumber(ARGV[4]) then return {-1, held, bytes} end
local now = redis.call('TIME')
redis.call('ZADD', KEYS[1], tonumber(now[1]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return {1, held, bytes}
"""


def session_keys(session_id: str) -> list[str]:
    """Every key of a session, all under the hash tag `{session_id}` (one Redis Cluster slot)."""
    return [f"{PREFIX}:{{{session_id}}}:{suffix}" for suffix in SUFFIXES]


def tenant_key(tenant: str) -> str:
    return f"{PREFIX}:tenant:{{{tenant}}}:sessions"


def tenant_sizes_key(tenant: str) -> str:
    """The bytes of each of the tenant's sessions, beside its index (same slot): what quotas count."""
    return f"{PREFIX}:tenant:{{{tenant}}}:bytes"


def _valid(session_id: str) -> bool:
    return _SESSION_ID.fullmatch(session_id) is not None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _meta(session_id: str, row: dict[str, Any]) -> SessionMeta:
    return SessionMeta(
        session_id,
        _text(row["tenant"]),
        float(row["created_at"]),
        float(row["updated_at"]),
        json.loads(row["metadata"]),
        int(row["version"]),
    )


@contextlib.contextmanager
def _errors(what: str) -> Iterator[None]:
    """Anything Redis or the network throws becomes a StoreError (503 + Retry-After), never a 500."""
    try:
        yield
    except StoreError:
        raise
    except (RedisError, OSError) as exc:  # OSError covers asyncio's TimeoutError and refused connections
        raise StoreError(f"Redis {what}: {type(exc).__name__}: {exc}") from exc


class RedisStore:
    shared = True
    replicas = True

    def __init__(
        self,
        client: aioredis.Redis,
        history_limit: int = 10_000,
        ttl: float | None = None,
        index_grace: float = INDEX_GRACE_SECONDS,
    ) -> None:
        if history_limit < 1:
            raise ValueError("history_limit must be >= 1")
        self.history_limit = history_limit
        self.ttl_ms = 0 if ttl is None else max(1, round(ttl * 1000))
        self.index_grace = index_grace
        self._client = client
        # (version, writer nonce) of the state of each session this process last loaded or wrote: what
        # the service's cache holds. See `version` and the commit script.
        self._seen: OrderedDict[str, tuple[int, bytes]] = OrderedDict()
        self._create = client.register_script(CREATE_LUA)
        self._commit = client.register_script(COMMIT_LUA)
        self._delete = client.register_script(DELETE_LUA)
        self._index_add = client.register_script(INDEX_ADD_LUA)
        self._index_reserve = client.register_script(INDEX_RESERVE_LUA)
        self._index_prune = client.register_script(INDEX_PRUNE_LUA)

    @classmethod
    def from_url(cls, url: str, history_limit: int = 10_000, ttl: float | None = None) -> RedisStore:
        """`redis://[[user]:password@]host:port/db` or `rediss://...`; query options as redis-py's
        (e.g. `?socket_timeout=30`). Connections are opened on first use, not here."""
        if not url.startswith(("redis://", "rediss://")):
            raise ValueError(f"invalid Redis URL {url!r}; expected redis://host:port/db")
        client = aioredis.Redis.from_url(
            url,
            decode_responses=False,  # tensors travel as raw bytes
            socket_connect_timeout=3.0,
            socket_timeout=10.0,  # per socket operation, not per value: large sessions are fine
            health_check_interval=30,
            # A few quick retries when a connection breaks or is refused, then 503. Safe for writes too: a
            # write script recognises its own nonce and answers "done" instead of writing twice. A timeout
            # is not retried (a stalled Redis would only stall the request longer): 503 at once.
            retry=Retry(
                ExponentialWithJitterBackoff(cap=0.5, base=0.05),
                retries=3,
                supported_errors=(RedisConnectionError,),
            ),
        )
        return cls(client, history_limit, ttl)

    def _note(self, session_id: str, version: int, writer: bytes) -> None:
        self._seen[session_id] = (version, writer)
        self._seen.move_to_end(session_id)
        while len(self._seen) > SEEN_LIMIT:
            self._seen.popitem(last=False)

    # -- sessions ---------------------------------------------------------------------------------

    async def create(self, record: SessionRecord, quota: Quota | None = None) -> None:
        meta = record.meta
        if not _valid(meta.id):
            raise ValueError(f"session id {meta.id!r} is not [A-Za-z0-9_-]{{1,128}}")
        engine_json, blob = await anyio.to_thread.run_sync(encode, record)
        nonce = secrets.token_hex(8)
        with _errors("create"):
            # index first: it may name a session that is not (yet, or any longer) there, never miss one
            if quota is None:
                await self._index_add(keys=[tenant_key(meta.tenant)], args=[meta.id])
            else:
                await self._reserve(meta.tenant, meta.id, record.nbytes, quota)
            created = await self._create(
                keys=session_keys(meta.id),
                args=[
                    nonce,
                    self.ttl_ms,
                    WRITES_KEPT,
                    meta.tenant,
                    repr(meta.created_at),
                    repr(meta.updated_at),
                    json.dumps(meta.metadata),
                    meta.version,
                    record.step,
                    json.dumps(record.lr),
                    engine_json,
                    blob,
                ],
            )
        if created != 1:
            raise StoreError(f"session id {meta.id!r} already exists")
        self._note(meta.id, meta.version, nonce.encode())

    async def _reserve(self, tenant: str, session_id: str, nbytes: int, quota: Quota) -> None:
        """The session's place in its tenant's index, within the quota; QuotaExceeded past it. Ids of
        sessions that expired or were deleted meanwhile are pruned first, when they are in the way."""
        keys = [tenant_key(tenant), tenant_sizes_key(tenant)]
        for attempt in range(2):
            taken, held, held_bytes = await self._index_reserve(
                keys=keys, args=[session_id, nbytes, quota.sessions, quota.nbytes]
            )
            if taken == 1:
                return
            if attempt == 0:
                await self.sessions_of(tenant)  # drops the index entries of sessions that are gone
        refusal = quota.refusal(int(held), int(held_bytes), nbytes)
        raise refusal or QuotaExceeded("over quota")

    async def load(self, session_id: str) -> SessionRecord | None:
        if not _valid(session_id):
            return None
        keys = session_keys(session_id)
        with _errors("load"):
            # one MULTI/EXEC: the meta and the tensors of the same version (and of the same expiry)
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.hgetall(keys[0])
                pipe.get(keys[1])
                fields, blob = await pipe.execute()
        if not fields or blob is None:
            return None
        row = {_text(k): v for k, v in fields.items()}
        meta = _meta(session_id, row)
        engine, tensors = await anyio.to_thread.run_sync(decode, session_id, row["engine"], blob)
        self._note(session_id, meta.version, row.get("writer", b""))
        return SessionRecord(meta, engine, tensors)

    async def meta(self, session_id: str) -> SessionMeta | None:
        if not _valid(session_id):
            return None
        with _errors("load"):
            values = await self._client.hmget(session_keys(session_id)[0], list(META_FIELDS[:5]))
        if values[0] is None:
            return None
        return _meta(
            session_id, {k: v for k, v in zip(META_FIELDS[:5], values, strict=True) if v is not None}
        )

    async def version(self, session_id: str) -> int | None:
        """The stored version; -1 when it is the version this process knows but written by another write
        (Redis lost acknowledged writes, then others wrote): the caller's cached state is not current."""
        if not _valid(session_id):
            return None
        with _errors("version"):
            value, writer = await self._client.hmget(session_keys(session_id)[0], ["version", "writer"])
        if value is None:
            return None
        version, seen = int(value), self._seen.get(session_id)
        if seen is not None and seen[0] == version and seen[1] != (writer or b""):
            return -1
        return version

    async def commit(
        self,
        record: SessionRecord,
        expected_version: int,
        history: HistoryRow | None,
        idempotency: IdempotencyRecord | None,
    ) -> bool:
        meta, step = record.meta, record.step
        if not _valid(meta.id):
            return False
        engine_json, blob = await anyio.to_thread.run_sync(encode, record)
        nonce = secrets.token_hex(8)
        seen = self._seen.get(meta.id)
        args: list[str | int | bytes] = [
            nonce,
            self.ttl_ms,
            WRITES_KEPT,
            expected_version,
            meta.version,
            repr(meta.updated_at),
            json.dumps(meta.metadata),
            step,
            json.dumps(record.lr),
            engine_json,
            blob,
            "0" if history is None else "1",
            "" if history is None else _history_json(history),
            self.history_limit,
            "0" if idempotency is None else "1",
            "" if idempotency is None else idempotency.key,
            "" if idempotency is None else _record_json(idempotency),
            0 if idempotency is None else idempotency.step,
            step - IDEMPOTENCY_STEPS,
            seen[1] if seen is not None and seen[0] == expected_version else b"",
        ]
        if await self._run_commit(meta.id, args) != 1:
            return False
        self._note(meta.id, meta.version, nonce.encode())
        return True

    async def _run_commit(self, session_id: str, args: Sequence[str | int | bytes]) -> int:
        """The commit script; `args[0]` is the write's nonce (running it twice writes once)."""
        with _errors("commit"):
            result = await self._commit(keys=session_keys(session_id), args=list(args))
        return int(result)

    async def idempotency(self, session_id: str, key: str) -> IdempotencyRecord | None:
        if not _valid(session_id):
            return None
        with _errors("idempotency lookup"):
            raw = await self._client.hget(session_keys(session_id)[3], key)
        if raw is None:
            return None
        fingerprint, step, lr, skipped, grad_norm = json.loads(raw)
        return IdempotencyRecord(key, fingerprint, step, lr, skipped, grad_norm)

    async def history(self, session_id: str, limit: int) -> list[HistoryRow]:
        count = min(limit, self.history_limit)
        if not _valid(session_id) or count <= 0:
            return []
        with _errors("history"):
            rows = await self._client.lrange(session_keys(session_id)[2], -count, -1)
        return [HistoryRow(*json.loads(r)) for r in rows]

    async def sessions_of(self, tenant: str) -> list[tuple[SessionMeta, int, list[float]]]:
        index = tenant_key(tenant)
        with _errors("list"):
            members = await self._client.zrange(index, 0, -1)
            ids = [_text(i) for i in members if isinstance(i, bytes | str)]
            async with self._client.pipeline(transaction=False) as pipe:
                for session_id in ids:
                    pipe.hmget(session_keys(session_id)[0], list(META_FIELDS))
                rows: list[list[bytes | None]] = await pipe.execute() if ids else []
        found: list[tuple[SessionMeta, int, list[float]]] = []
        gone: list[str] = []
        for session_id, row in zip(ids, rows, strict=True):
            if any(v is None for v in row):  # deleted or expired (or being created right now)
                gone.append(session_id)
                continue
            values = [v for v in row if v is not None]
            t, created, updated, metadata, version, step, lr = values
            if _text(t) != tenant:
                continue
            meta = SessionMeta(
                session_id, tenant, float(created), float(updated), json.loads(metadata), int(version)
            )
            found.append((meta, int(step), json.loads(lr)))
        for start in range(0, len(gone), PRUNE_CHUNK):
            with _errors("list"):
                await self._index_prune(
                    keys=[index, tenant_sizes_key(tenant)],
                    args=[self.index_grace, *gone[start : start + PRUNE_CHUNK]],
                )
        return found

    async def delete(self, session_id: str) -> bool:
        if not _valid(session_id):
            return False
        with _errors("delete"):
            tenant = await self._delete(keys=session_keys(session_id))
        self._seen.pop(session_id, None)
        if tenant is None:
            return False
        # the session is gone; an index entry left behind (Redis failing right now) is dropped by listings
        with contextlib.suppress(RedisError, OSError):
            await self._client.zrem(tenant_key(_text(tenant)), session_id)
            await self._client.hdel(tenant_sizes_key(_text(tenant)), session_id)
        return True

    async def expire(self, idle_seconds: float, now: float) -> int:
        """Nothing to do: every key of a session carries a Redis TTL, (re)set by each write. Returns 0."""
        return 0

    async def ping(self) -> None:
        with _errors("ping"):
            await self._client.ping()

    async def close(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self._client.aclose()


def _history_json(row: HistoryRow) -> str:
    return json.dumps([row.step, row.lr, row.loss, row.grad_norm, row.skipped, row.time])


def _record_json(record: IdempotencyRecord) -> str:
    return json.dumps([record.fingerprint, record.step, record.lr, record.skipped, record.grad_norm])
