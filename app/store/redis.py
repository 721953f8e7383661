"""`redis://host:port/db` (or `rediss://`, password in the URL): one store shared by many server processes.
`redis+cluster://host:port` (or `rediss+cluster://`): the same on a Redis Cluster.

Layout. Every key of a session carries the session id as its hash tag, so on Redis Cluster a session lives
in one slot and one Lua script may touch all of it:

    optserve:{<sid>}:meta       hash: tenant, created_at, updated_at, metadata, version, step, lr, engine,
                                writer (the nonce of the write that made this state), snap (the version
                                whose state `tensors` holds), snapengine (that version's engine, when
                                older than `version`), ls:<v> (the bytes of the step logged for version v)
    optserve:{<sid>}:tensors    list: the session's whole state as of version `snap`, one safetensors blob
                                in chunks of 1 MiB (a string, whole, in sessions created by a create)
    optserve:{<sid>}:log:<v>    list: the step that made version v (snap < v <= version): its prepared
                                gradients as a safetensors blob in chunks, loss, norm, staleness in its
                                metadata; redoing these steps on the state of `snap` gives the session
    optserve:{<sid>}:staging:<nonce>  list: a write's payload, staged before its script runs, which renames
                                it (to `tensors` or to a log key) or deletes it; expires within 60 s
    optserve:{<sid>}:history    list: compact JSON rows, newest last, trimmed to `history_limit`
    optserve:{<sid>}:idem       hash: Idempotency-Key -> compact JSON record of the first answer
    optserve:{<sid>}:idemsteps  sorted set: Idempotency-Key scored by its step (for pruning)
    optserve:{<sid>}:writes     list: nonces of the last writes (a retried write is recognised, not redone)
    optserve:{<sid>}:round      hash: the synchronous round open now: step, rid (its id), opened (ms, Redis
                                clock), state (open | closing), owner and lease (who closes it, until
                                when), n, bytes, and per worker f:<w> (its request's fingerprint), w:<w>
                                (weight), l:<w> (loss)
    optserve:{<sid>}:roundgrads hash: worker -> its gradients (opaque bytes) for the open round
    optserve:{<sid>}:rounds     hash: rid -> how that round ended (JSON), step:<t> -> rid of round t applied
    optserve:{<sid>}:roundorder list: the fields of `rounds`, newest first, trimmed to the last ROUNDS_KEPT
    optserve:tenant:{<tenant>}:sessions   sorted set: the tenant's session ids, scored by Redis server time

The commit is ONE Lua script, after its payload is staged (RPUSHed in 1 MiB chunks onto a list of its
own, which expires unless renamed): the script checks the staging holds every chunk, compare-and-sets on
`version` and writes the meta, the payload (renamed into place: no copy through Lua), the history row
(+ trim), the idempotency record (+ pruning of records older than 1,000 steps) and the session TTL. Redis
runs a script atomically and (with AOF) logs its effects as one MULTI/EXEC, so a step is either all there
or not at all.

What a step stores: its prepared gradients (cast, clipped: `LoggedStep`), which redo it exactly (every
optimizer but Muon, whose matrix products follow the CPU's BLAS, is elementwise arithmetic and fixed-order
sums), instead of the whole state: for Adam a third of the bytes through Redis' AOF. Once the steps logged
since the last state hold LOG_RATIO times its bytes (or LOG_STEPS steps), the state is written behind the
answer (`_snapshot`: staged, then one script, which drops the steps it covers); at twice that, a step
writes the state itself. Every other write (create, restore, parameters, a round's step) writes the
state. A load reads the state, the steps since, and redoes them (`app.sessions.rebuild`).

The tenant index lives in another slot and is kept a superset of the live sessions: ids are added before a
session is created and removed after it is deleted; `sessions_of` skips ids whose session is gone (deleted,
expired) and drops them from the index once they are older than a grace period (so a session being
created right now is never dropped).

Synchronous rounds across replicas: a contribution joins the round in Redis (one script: the session's
step, the worker's request, the round's byte budget); whoever completes the round, or finds its timeout
passed, claims it under a lease and applies it: the step commits with the round's outcome in one script
(COMMIT_LUA), which also deletes the contributions and publishes the end on the channel `optserve:rounds`.
Every replica subscribes to that channel once and wakes its own waiters; a claim whose lease runs out (its
replica died) is taken over by the next waiter, and the version compare-and-set keeps the step once.

Expiry (`OPTSERVE_SESSION_TTL`) is Redis's: the create and commit scripts (re)set `PEXPIRE` on every key of
the session, so `expire()` has nothing to do and returns 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import anyio
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from app.store.base import (
    IDEMPOTENCY_STEPS,
    Claim,
    CorruptRecord,
    HistoryRow,
    IdempotencyRecord,
    Joined,
    LoggedStep,
    Quota,
    QuotaExceeded,
    RoundOutcome,
    RoundPart,
    SessionMeta,
    SessionRecord,
    SessionRow,
    StoreError,
    decode,
    encode,
    names_of,
)
from app.wire import safetensors

PREFIX = "optserve"
WRITES_KEPT = 64
"""Nonces of this many last writes are kept: a write retried after a lost reply is recognised as done."""
INDEX_GRACE_SECONDS = 60.0
"""An index entry without a session is dropped only once it is this old (creation adds it first)."""
PRUNE_CHUNK = 500
RECHECK_SECONDS = 0.5
"""How often a round's waiter looks at Redis itself while this process's subscription is down."""
SEEN_LIMIT = 100_000
"""Sessions whose last known write (version, nonce) this process remembers, least recently used out."""
SUFFIXES = (
    "meta",
    "tensors",
    "history",
    "idem",
    "idemsteps",
    "writes",
    "round",
    "roundgrads",
    "rounds",
    "roundorder",
)
ROUNDS_KEPT = 16
"""How the last this many rounds of a session ended is kept (a late waiter or a resend reads it there)."""
ROUND_GRACE_SECONDS = 60.0
"""A round's contributions expire this long after its timeout (or its closer's lease): an abandoned round
(every contributor gone, nobody to close it) does not hold Redis' memory for longer."""
LOG_RATIO = 2.0
"""A step writes its prepared gradients (for Adam a third of the state's bytes), not the whole state, while
the steps logged since the state in `tensors` hold fewer bytes than this many times the state; past that
the state is written in the background (off the request path), and past twice that the step writes the
whole state itself. So Redis holds at most 1 + 2 * LOG_RATIO times a session's state (1 + LOG_RATIO while
the background keeps up). At 1.0 the state's writes (every 3 steps of Adam) doubled what a 1e7 step put
through Redis' AOF and the step took 2-3.5x memory://'s; at 2.0, 1.6-1.7x."""
LOG_STEPS = 32
"""...and while they are fewer than this many steps (twice this: the step writes the whole state). A load
(another replica, a restart) redoes at most that many steps: for a 1e7 float32 Adam session, 11 steps and
about 4 s on the machine of bench/RESULTS.md."""
CHUNK_BYTES = 1 << 20
"""Large values go to Redis as lists of chunks of about this size, one RPUSH each: Redis (7.0, AOF on)
takes several times longer per byte for one 40 MB argument than for forty of 1 MB."""
STAGE_BATCH = 4
"""Chunks staged per round trip (see `_stage`). Fewer in flight keep what Redis copies (from the socket into
its query buffer, into the AOF) in the CPU's cache: 40 chunks of 1 MiB to a Redis with `appendfsync always`
took 84-110 ms at 4 per round trip against 113-115 ms at 16 (the least of 6 each, alternating, on the
machine of bench/RESULTS.md), and 22 against 26 ms without the AOF."""
STAGING_MS = 60_000
"""A staged write that never committed (its writer died, or its connection broke, first) expires."""
ROUND_CHANNEL = "optserve:rounds"
"""Classic pub/sub (a Redis Cluster carries it to every node): "<sid> <rid>" when a round is claimed or
ends, "<sid> *" when the session goes."""
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
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function same_ttl(...)
  local ms = redis.call('PTTL', KEYS[1])
  if ms > 0 then for _, key in ipairs({...}) do redis.call('PEXPIRE', key, ms) end end
end
local function keep_results(kept)
  local dropped = redis.call('LRANGE', KEYS[10], kept, -1)
  if #dropped > 0 then
    redis.call('HDEL', KEYS[9], unpack(dropped))
    redis.call('LTRIM', KEYS[10], 0, kept - 1)
  end
end
"""

# The steps logged after the state in `tensors` (see COMMIT_LUA): versions snap+1 .. v, one list each,
# named by the prefix in ARGV[21] (commit) or ARGV[4] (snapshot) and the version.
_LOG_LUA = """
local function log_prefix()
  if #KEYS == 4 then return ARGV[4] end
  return ARGV[21]
end
local function log_bytes(snap, v)
  local total = 0
  for i = snap + 1, v do total = total + tonumber(redis.call('HGET', KEYS[1], 'ls:' .. i) or 0) end
  return total
end
local function drop_log(snap, v)
  for i = snap + 1, v do
    redis.call('DEL', log_prefix() .. i)
    redis.call('HDEL', KEYS[1], 'ls:' .. i)
  end
end
local function log_ttl(snap, v, ms)
  for i = snap + 1, v do
    local key = log_prefix() .. i
    if ms > 0 then redis.call('PEXPIRE', key, ms) else redis.call('PERSIST', key) end
  end
end
"""

# KEYS: the session keys. ARGV: nonce, ttl_ms, writes_kept, tenant, created_at, updated_at,
# metadata, version, step, lr, engine, blob. Returns 1 (created, or this very create already ran), 0 (the
# id is taken).
CREATE_LUA = (
    _TTL_LUA
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then
  if redis.call('LPOS', KEYS[6], ARGV[1]) then return 1 end
  return 0
end
for i = 2, #KEYS do redis.call('DEL', KEYS[i]) end
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

# KEYS: the session keys, then the staging key (a list: the chunks of what this write stores, pushed there
# just before). ARGV: nonce, ttl_ms, writes_kept, expected_version, version, updated_at, metadata, step,
# lr, engine, kind ('full': the staging list is the whole state; 'log': it is the step that made this
# version), has_history ('1'/'0'), history_row, history_limit, has_idem ('1'/'0'), idem_key, idem_record,
# idem_step, idem_horizon, expected_writer ('' = unknown), the log keys' prefix, the staged bytes, the
# staged chunks (a staging that does not hold exactly these is not used), then for a round's step
# (has_round '1'/'0'): rid, its outcome, the round, results kept, channel, message.
# Returns {1 (committed, or this very commit already was) | 0 (stale, or the staging incomplete: nothing
# written) | -1 (no such session: nothing written), steps logged since the state in `tensors`, their
# bytes}.
# `writer` is the nonce of the write that made the current state: when the caller knows which write its
# state came from, a state with the same version number made by another write (Redis lost acknowledged
# writes in a crash or a failover, and others wrote since) is stale too.
# The whole state is in `tensors` as of version `snap`; each later version v has its step in the list
# `<prefix>v` (and its size in the meta field `ls:<v>`), and `snapengine` is the engine of version `snap`.
COMMIT_LUA = (
    _TTL_LUA
    + _LOG_LUA
    + """
local current = redis.call('HGET', KEYS[1], 'version')
if not current then redis.call('DEL', KEYS[11]); return {-1, 0, 0} end
current = tonumber(current)
local snap = tonumber(redis.call('HGET', KEYS[1], 'snap') or current)
if redis.call('LPOS', KEYS[6], ARGV[1]) then
  redis.call('DEL', KEYS[11])
  return {1, current - snap, log_bytes(snap, current)}
end
if current ~= tonumber(ARGV[4]) then redis.call('DEL', KEYS[11]); return {0, 0, 0} end
if ARGV[20] ~= '' and redis.call('HGET', KEYS[1], 'writer') ~= ARGV[20] then
  redis.call('DEL', KEYS[11]); return {0, 0, 0}
end
if redis.call('LLEN', KEYS[11]) ~= tonumber(ARGV[23]) then redis.call('DEL', KEYS[11]); return {0, 0, 0} end
local version = tonumber(ARGV[5])
if ARGV[11] == 'log' then
  if snap == current then redis.call('HSET', KEYS[1], 'snapengine', redis.call('HGET', KEYS[1], 'engine')) end
  redis.call('RENAME', KEYS[11], ARGV[21] .. version)
  redis.call('HSET', KEYS[1], 'ls:' .. version, ARGV[22])
else
  redis.call('RENAME', KEYS[11], KEYS[2])
  drop_log(snap, current)
  redis.call('HDEL', KEYS[1], 'snapengine')
  snap = version
end
redis.call('HSET', KEYS[1], 'version', version, 'updated_at', ARGV[6], 'metadata', ARGV[7],
  'step', ARGV[8], 'lr', ARGV[9], 'engine', ARGV[10], 'writer', ARGV[1], 'snap', snap)
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
if ARGV[24] == '1' then
  redis.call('DEL', KEYS[7], KEYS[8])
  redis.call('HSET', KEYS[9], ARGV[25], ARGV[26], 'step:' .. ARGV[27], ARGV[25])
  redis.call('LPUSH', KEYS[10], ARGV[25], 'step:' .. ARGV[27])
  keep_results(tonumber(ARGV[28]))
  redis.call('PUBLISH', ARGV[29], ARGV[30])
end
local ms = tonumber(ARGV[2])
apply_ttl(ms)
log_ttl(snap, version, ms)
return {1, version - snap, log_bytes(snap, version)}
"""
)

# KEYS: meta, tensors, writes, staging (the whole state of version v, in chunks). ARGV: v, the nonce of the
# write that made v, the engine of v, the log keys' prefix, the number of chunks staged. Makes the staged
# state the session's `tensors` and drops the steps logged up to v, if the staging holds every chunk, v is
# newer than `tensors` and was written in this session's line of writes (not lost in a crash, and still
# among the last writes kept): 1; else 0, nothing changed (the staging goes).
SNAPSHOT_LUA = (
    _LOG_LUA
    + """
local current = redis.call('HGET', KEYS[1], 'version')
local v = tonumber(ARGV[1])
if not current or not redis.call('LPOS', KEYS[3], ARGV[2]) then redis.call('DEL', KEYS[4]); return 0 end
if redis.call('LLEN', KEYS[4]) ~= tonumber(ARGV[5]) then redis.call('DEL', KEYS[4]); return 0 end
current = tonumber(current)
local snap = tonumber(redis.call('HGET', KEYS[1], 'snap') or current)
if v <= snap or v > current then redis.call('DEL', KEYS[4]); return 0 end
redis.call('RENAME', KEYS[4], KEYS[2])
local ms = redis.call('PTTL', KEYS[1])
if ms > 0 then redis.call('PEXPIRE', KEYS[2], ms) else redis.call('PERSIST', KEYS[2]) end
drop_log(snap, v)
if v == current then
  redis.call('HDEL', KEYS[1], 'snapengine')
else
  redis.call('HSET', KEYS[1], 'snapengine', ARGV[3])
end
redis.call('HSET', KEYS[1], 'snap', v)
return 1
"""
)

# KEYS: meta, tensors. ARGV: the log keys' prefix. Returns {} (no session), or {the meta as HGETALL gives
# it, the chunks of `tensors` (one when it is a string, as sessions created before the log are), then the
# chunks of each logged step after `snap`, oldest first}: one consistent read.
LOAD_LUA = """
local fields = redis.call('HGETALL', KEYS[1])
if #fields == 0 then return {} end
local kind = redis.call('TYPE', KEYS[2])['ok']
local state = {}
if kind == 'string' then state = {redis.call('GET', KEYS[2])}
elseif kind == 'list' then state = redis.call('LRANGE', KEYS[2], 0, -1) end
local out = {fields, state}
local current = tonumber(redis.call('HGET', KEYS[1], 'version'))
local snap = tonumber(redis.call('HGET', KEYS[1], 'snap') or current)
for v = snap + 1, current do out[#out + 1] = redis.call('LRANGE', ARGV[1] .. v, 0, -1) end
return out
"""

# KEYS: the session keys. ARGV: channel, message, the log keys' prefix. Returns the tenant of the deleted
# session, or nil when there was none; wakes the waiters of its round.
DELETE_LUA = """
local tenant = redis.call('HGET', KEYS[1], 'tenant')
local current = tonumber(redis.call('HGET', KEYS[1], 'version') or 0)
local snap = tonumber(redis.call('HGET', KEYS[1], 'snap') or current)
for v = snap + 1, current do redis.call('DEL', ARGV[3] .. v) end
redis.call('DEL', unpack(KEYS))
if tenant then redis.call('PUBLISH', ARGV[1], ARGV[2]) end
return tenant
"""

# KEYS: the session keys. ARGV: step, worker, fingerprint, weight, loss ('' = none), gradients, max bytes,
# the id of a new round, how long after its opening an abandoned round goes (ms), the round's workers (a
# full round takes no more, even before it is claimed). Returns {kind, round id,
# the session's step, outcome}; see `Joined`.
ROUND_JOIN_LUA = (
    _TTL_LUA
    + """
local current = redis.call('HGET', KEYS[1], 'step')
if not current then return {'gone', '', 0, ''} end
local done = redis.call('HGET', KEYS[9], 'step:' .. ARGV[1])
if done then return {'done', done, current, redis.call('HGET', KEYS[9], done) or ''} end
if tonumber(current) ~= tonumber(ARGV[1]) then return {'stale', '', current, ''} end
local open = redis.call('HGET', KEYS[7], 'step')
if open and tonumber(open) ~= tonumber(ARGV[1]) then redis.call('DEL', KEYS[7], KEYS[8]); open = false end
local rid, bytes = ARGV[8], 0
if open then
  rid = redis.call('HGET', KEYS[7], 'rid')
  local fp = redis.call('HGET', KEYS[7], 'f:' .. ARGV[2])
  if fp == ARGV[3] then return {'resent', rid, current, ''} end
  if fp then return {'other', rid, current, ''} end
  local full = tonumber(redis.call('HGET', KEYS[7], 'n')) >= tonumber(ARGV[10])
  if full or redis.call('HGET', KEYS[7], 'state') ~= 'open' then return {'closed', rid, current, ''} end
  bytes = tonumber(redis.call('HGET', KEYS[7], 'bytes'))
end
bytes = bytes + string.len(ARGV[6])
if bytes > tonumber(ARGV[7]) then return {'full', rid, current, ''} end
if not open then
  redis.call('HSET', KEYS[7], 'step', ARGV[1], 'rid', rid, 'opened', now_ms(), 'state', 'open', 'n', 0)
end
redis.call('HSET', KEYS[7], 'f:' .. ARGV[2], ARGV[3], 'w:' .. ARGV[2], ARGV[4], 'l:' .. ARGV[2], ARGV[5],
  'bytes', bytes)
redis.call('HINCRBY', KEYS[7], 'n', 1)
redis.call('HSET', KEYS[8], ARGV[2], ARGV[6])
local expiry = tonumber(redis.call('HGET', KEYS[7], 'opened')) + tonumber(ARGV[9])
redis.call('PEXPIREAT', KEYS[7], expiry)
redis.call('PEXPIREAT', KEYS[8], expiry)
return {'joined', rid, current, ''}
"""
)

# KEYS: the session keys. ARGV: round id, owner, workers, timeout_ms, lease_ms, channel, message, grace_ms.
# Claims the round for `owner` when it is full or past its timeout, or its closer's lease ran out (and
# keeps the round at least until the lease's end + grace). Returns {kind,
# wait_ms, contributions}; see `Claim`.
ROUND_CLAIM_LUA = (
    _TTL_LUA
    + """
if redis.call('HGET', KEYS[7], 'rid') ~= ARGV[1] then return {'gone', 0, 0} end
local now = now_ms()
local n = tonumber(redis.call('HGET', KEYS[7], 'n'))
if redis.call('HGET', KEYS[7], 'state') == 'open' then
  local left = tonumber(redis.call('HGET', KEYS[7], 'opened')) + tonumber(ARGV[4]) - now
  if n < tonumber(ARGV[3]) and left > 0 then return {'wait', left, n} end
else
  local left = tonumber(redis.call('HGET', KEYS[7], 'lease')) - now
  if left > 0 then return {'busy', left, n} end
end
redis.call('HSET', KEYS[7], 'state', 'closing', 'owner', ARGV[2], 'lease', now + tonumber(ARGV[5]))
local expiry = now + tonumber(ARGV[5]) + tonumber(ARGV[8])
if now + redis.call('PTTL', KEYS[7]) < expiry then
  redis.call('PEXPIREAT', KEYS[7], expiry)
  redis.call('PEXPIREAT', KEYS[8], expiry)
end
redis.call('PUBLISH', ARGV[6], ARGV[7])
return {'claimed', 0, n}
"""
)

# KEYS: the session keys. ARGV: round id, owner, outcome, results kept, channel, message. Ends the round
# unapplied if `owner` holds its claim: 1, else 0.
ROUND_FAIL_LUA = (
    _TTL_LUA
    + """
if redis.call('HGET', KEYS[7], 'rid') ~= ARGV[1] or redis.call('HGET', KEYS[7], 'owner') ~= ARGV[2] then
  return 0
end
redis.call('DEL', KEYS[7], KEYS[8])
redis.call('HSET', KEYS[9], ARGV[1], ARGV[3])
redis.call('LPUSH', KEYS[10], ARGV[1])
keep_results(tonumber(ARGV[4]))
same_ttl(KEYS[9], KEYS[10])
redis.call('PUBLISH', ARGV[5], ARGV[6])
return 1
"""
)

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
    """Every key of a session, all under the hash tag `{session_id}` (one Redis Cluster slot), but the
    logged steps' (`log_prefix`) and staged writes'."""
    return [f"{PREFIX}:{{{session_id}}}:{suffix}" for suffix in SUFFIXES]


def log_prefix(session_id: str) -> str:
    """`log_prefix(sid) + str(v)` is the list holding the step that made version v."""
    return f"{PREFIX}:{{{session_id}}}:log:"


def staging_key(session_id: str, nonce: str) -> str:
    return f"{PREFIX}:{{{session_id}}}:staging:{nonce}"


def chunks(parts: Sequence[bytes | memoryview]) -> list[bytes | memoryview]:
    """`parts` (safetensors.encode's) as pieces of at most CHUNK_BYTES: large parts cut into views, small
    ones (headers, small tensors) joined, so that thousands of small tensors do not make thousands of
    commands."""
    out: list[bytes | memoryview] = []
    pending = bytearray()
    for part in parts:
        view = memoryview(part).cast("B")
        if len(view) < CHUNK_BYTES // 16:
            pending += view
            if len(pending) >= CHUNK_BYTES:
                out.append(bytes(pending))
                pending.clear()
            continue
        if pending:
            out.append(bytes(pending))
            pending.clear()
        out.extend(view[start : start + CHUNK_BYTES] for start in range(0, len(view), CHUNK_BYTES))
    if pending or not out:
        out.append(bytes(pending))
    return out


OPEN_TAG = "open"
"""The hash tag of the open tenant (""), whose keys had the empty tag `{}` before, which Redis Cluster
ignores (the whole key is hashed then, so its index and sizes fell in two slots). Tenants are hex digests,
so no tenant's tag is this one."""


def tenant_key(tenant: str) -> str:
    return f"{PREFIX}:tenant:{{{tenant or OPEN_TAG}}}:sessions"


def tenant_sizes_key(tenant: str) -> str:
    """The bytes of each of the tenant's sessions, beside its index (same slot): what quotas count."""
    return f"{PREFIX}:tenant:{{{tenant or OPEN_TAG}}}:bytes"


LEGACY_OPEN_KEYS = (f"{PREFIX}:tenant:{{}}:sessions", f"{PREFIX}:tenant:{{}}:bytes")


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
        client: aioredis.Redis | RedisCluster,
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
        # With it, how many steps (and bytes) are logged after the state in `tensors`.
        self._seen: OrderedDict[str, tuple[int, bytes, int, int]] = OrderedDict()
        self._snapshots: dict[str, asyncio.Task[None]] = {}
        self._create = client.register_script(CREATE_LUA)
        self._commit = client.register_script(COMMIT_LUA)
        self._delete = client.register_script(DELETE_LUA)
        self._load = client.register_script(LOAD_LUA)
        self._snapshot_script = client.register_script(SNAPSHOT_LUA)
        self._index_add = client.register_script(INDEX_ADD_LUA)
        self._index_reserve = client.register_script(INDEX_RESERVE_LUA)
        self._index_prune = client.register_script(INDEX_PRUNE_LUA)
        self._round_join = client.register_script(ROUND_JOIN_LUA)
        self._round_claim = client.register_script(ROUND_CLAIM_LUA)
        self._round_fail = client.register_script(ROUND_FAIL_LUA)
        self._signals = _Signals(client)
        self._legacy_checked = False

    @classmethod
    def from_url(cls, url: str, history_limit: int = 10_000, ttl: float | None = None) -> RedisStore:
        """`redis://[[user]:password@]host:port/db` or `rediss://...`; query options as redis-py's
        (e.g. `?socket_timeout=30`). `redis+cluster://[[user]:password@]host:port` (or `rediss+cluster://`)
        is a Redis Cluster, found from that one node. Connections are opened on first use, not here."""
        scheme, sep, rest = url.partition("://")
        if not sep or scheme not in ("redis", "rediss", "redis+cluster", "rediss+cluster"):
            raise ValueError(
                f"invalid Redis URL {url!r}; expected redis://host:port/db or redis+cluster://host:port"
            )
        options: dict[str, Any] = {
            "decode_responses": False,  # tensors travel as raw bytes
            "socket_connect_timeout": 3.0,
            "socket_timeout": 10.0,  # per socket operation, not per value: large sessions are fine
            # A few quick retries when a connection breaks or is refused, then 503. Safe for writes too: a
            # write script recognises its own nonce and answers "done" instead of writing twice. A timeout
            # is not retried (a stalled Redis would only stall the request longer): 503 at once.
            "retry": Retry(
                ExponentialWithJitterBackoff(cap=0.5, base=0.05),
                retries=3,
                supported_errors=(RedisConnectionError,),
            ),
        }
        if scheme.endswith("+cluster"):
            client: Any = RedisCluster.from_url(scheme.removesuffix("+cluster") + "://" + rest, **options)
        else:
            client = aioredis.Redis.from_url(url, health_check_interval=30, **options)
        return cls(client, history_limit, ttl)

    def _note(
        self, session_id: str, version: int, writer: bytes, logged: int = 0, log_bytes: int = 0
    ) -> None:
        self._seen[session_id] = (version, writer, logged, log_bytes)
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
        await self._adopt_legacy_open_index(tenant)
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
            # one script: the meta, the state and the steps logged since, all of the same version
            answer = await self._load(keys=keys[:2], args=[log_prefix(session_id)])
        if not answer or not answer[1]:
            return None
        flat = answer[0]
        row = {_text(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}
        meta = _meta(session_id, row)
        snap = int(row.get("snap", meta.version))
        if len(answer) - 2 != meta.version - snap:
            raise CorruptRecord(session_id, f"{len(answer) - 2} logged steps, not {meta.version - snap}")
        engine_json = row["snapengine"] if snap != meta.version else row["engine"]

        def read() -> tuple[dict[str, Any], dict[str, Any], tuple[LoggedStep, ...]]:
            engine, tensors = decode(session_id, engine_json, b"".join(answer[1]))
            log = tuple(LoggedStep.decode(session_id, b"".join(step)) for step in answer[2:])
            return engine, tensors, log

        engine, tensors, log = await anyio.to_thread.run_sync(read)
        log_bytes = sum(int(row.get(f"ls:{v}", 0)) for v in range(snap + 1, meta.version + 1))
        self._note(session_id, meta.version, row.get("writer", b""), len(log), log_bytes)
        return SessionRecord(meta, engine, tensors, log)

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
        logged: LoggedStep | None = None,
    ) -> bool:
        return await self._commit_with(record, expected_version, history, idempotency, ["0"], logged)

    async def commit_round(
        self, record: SessionRecord, expected_version: int, history: HistoryRow, outcome: RoundOutcome
    ) -> bool:
        """The round's one step, its outcome, and the end of its contributions: one script."""
        sid = record.meta.id
        ending: list[str | int] = [
            "1",
            outcome.round_id,
            outcome.to_json(),
            outcome.step,
            2 * ROUNDS_KEPT,
            ROUND_CHANNEL,
            f"{sid} {outcome.round_id}",
        ]
        return await self._commit_with(record, expected_version, history, None, ending, None)

    async def _commit_with(
        self,
        record: SessionRecord,
        expected_version: int,
        history: HistoryRow | None,
        idempotency: IdempotencyRecord | None,
        ending: list[str | int],
        logged: LoggedStep | None,
    ) -> bool:
        """The commit script after the write's payload is staged: the step alone (`logged`)
        while the log is short, else the whole state."""
        meta, step = record.meta, record.step
        if not _valid(meta.id):
            return False
        seen = self._seen.get(meta.id)
        known = seen if seen is not None and seen[0] == expected_version else None
        state_bytes = record.nbytes
        parts = None if logged is None else logged.encode()
        if parts is not None and known is not None:
            logged_bytes = known[3] + safetensors.encoded_size(parts)
            if known[2] >= 2 * LOG_STEPS or logged_bytes > 2 * LOG_RATIO * state_bytes:
                parts = logged = None  # the background snapshots fell behind: this step writes the state
        if parts is None:
            parts = safetensors.encode(record.tensors, None)
        staged = chunks(parts)
        size = safetensors.encoded_size(parts)
        nonce = secrets.token_hex(8)
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
            json.dumps(record.engine),
            "full" if logged is None else "log",
            "0" if history is None else "1",
            "" if history is None else _history_json(history),
            self.history_limit,
            "0" if idempotency is None else "1",
            "" if idempotency is None else idempotency.key,
            "" if idempotency is None else _record_json(idempotency),
            0 if idempotency is None else idempotency.step,
            step - IDEMPOTENCY_STEPS,
            known[1] if known is not None else b"",
            log_prefix(meta.id),
            size,
            len(staged),
            *ending,
        ]
        status, count, log_bytes = await self._run_commit(meta.id, args, staged)
        if status != 1:
            return False
        self._note(meta.id, meta.version, nonce.encode(), count, log_bytes)
        if count >= LOG_STEPS or log_bytes > LOG_RATIO * state_bytes:
            self._snapshot_later(record, nonce)
        return True

    async def _run_commit(
        self, session_id: str, args: Sequence[str | int | bytes], staged: Sequence[bytes | memoryview]
    ) -> tuple[int, int, int]:
        """`staged` pushed into the staging list, then the commit script, which uses the staging only if it
        holds exactly those chunks; `args[0]` is the write's nonce (running it twice writes once). The
        script's answer: status, steps logged, their bytes.

        Not one MULTI: Redis queues a transaction's commands whole and writes its AOF after EXEC, while
        plain commands are appended and written as they arrive, taking half the time for 40 MB (a 1e7
        step's gradients). The script alone is atomic, and what it commits is checked whole."""
        staging = staging_key(session_id, _text(args[0]) if isinstance(args[0], bytes | str) else "")
        with _errors("commit"):
            await self._stage(staging, staged)
            result = await self._commit(keys=[*session_keys(session_id), staging], args=list(args))
        status, count, log_bytes = (int(v) for v in result)
        return status, count, log_bytes

    async def _stage(self, staging: str, staged: Sequence[bytes | memoryview]) -> None:
        """The chunks pushed onto `staging` (a list that expires unless a script renames it), a few per
        round trip, in plain commands that Redis interleaves with other clients'."""
        for start in range(0, len(staged), STAGE_BATCH):
            async with self._client.pipeline(transaction=False) as pipe:
                for chunk in staged[start : start + STAGE_BATCH]:
                    pipe.rpush(staging, chunk)
                pipe.pexpire(staging, STAGING_MS)
                await pipe.execute()

    def _snapshot_later(self, record: SessionRecord, nonce: str) -> None:
        """Writes the record's whole state in the background (one at a time per session), so that the log
        since the last one is dropped; a failure leaves the log as it was, to the next try."""
        sid = record.meta.id
        if sid in self._snapshots:
            return
        task = asyncio.get_running_loop().create_task(self._snapshot(record, nonce))
        self._snapshots[sid] = task

        def done(finished: asyncio.Task[None]) -> None:
            self._snapshots.pop(sid, None)
            if not finished.cancelled():
                finished.exception()  # retrieved: a failed snapshot only means a longer log

        task.add_done_callback(done)

    async def _snapshot(self, record: SessionRecord, nonce: str) -> None:
        """The state staged a few chunks per round trip, outside any MULTI, then put in place by one
        script: Redis runs other clients' commands (other sessions' steps, this session's next) between
        those chunks, instead of stalling them all behind one write of the whole state."""
        sid = record.meta.id
        staging = staging_key(sid, secrets.token_hex(8))
        keys = session_keys(sid)
        staged = chunks(safetensors.encode(record.tensors, None))
        await self._stage(staging, staged)
        args: list[str | int] = [
            record.meta.version,
            nonce,
            json.dumps(record.engine),
            log_prefix(sid),
            len(staged),
        ]
        done = await self._snapshot_script(keys=[keys[0], keys[1], keys[5], staging], args=args)
        seen = self._seen.get(sid)
        if done == 1 and seen is not None and seen[0] == record.meta.version:
            self._note(sid, seen[0], seen[1])

    async def idempotency(self, session_id: str, key: str) -> IdempotencyRecord | None:
        if not _valid(session_id):
            return None
        with _errors("idempotency lookup"):
            raw = await self._client.hget(session_keys(session_id)[3], key)
        if raw is None:
            return None
        fingerprint, step, lr, skipped, grad_norm = json.loads(raw)
        return IdempotencyRecord(key, fingerprint, step, lr, skipped, grad_norm)

    async def history(self, session_id: str, limit: int, since: int | None = None) -> list[HistoryRow]:
        count = min(limit, self.history_limit)
        if not _valid(session_id) or count <= 0:
            return []
        key = session_keys(session_id)[2]
        if since is None:
            with _errors("history"):
                rows = await self._client.lrange(key, -count, -1)
            return [HistoryRow(*json.loads(r)) for r in rows]
        # rows are in step order: read back from the newest, a chunk at a time, to the first after `since`
        after: list[HistoryRow] = []
        end = -1
        while True:
            with _errors("history"):
                chunk = [HistoryRow(*json.loads(r)) for r in await self._client.lrange(key, end - 255, end)]
            newer = [r for r in chunk if r.step > since]
            after = newer + after
            if len(newer) < len(chunk) or len(chunk) < 256:
                return after[:count]
            end -= 256

    async def _adopt_legacy_open_index(self, tenant: str) -> None:
        """Moves the open tenant's index from its keys of before (`{}`) to today's, once per process (a
        no-op when there are none, as on a cluster, where they never worked)."""
        if tenant or self._legacy_checked:
            return
        old_index, old_sizes = LEGACY_OPEN_KEYS
        with _errors("list"):
            members: list[Any] = await self._client.zrange(old_index, 0, -1, withscores=True)
            sizes: dict[Any, Any] = await self._client.hgetall(old_sizes)
            if members:
                await self._client.zadd(tenant_key(""), dict(members), nx=True)
            if sizes:
                await self._client.hset(tenant_sizes_key(""), mapping=sizes)
            await self._client.delete(old_index)
            await self._client.delete(old_sizes)
        self._legacy_checked = True

    async def sessions_of(self, tenant: str) -> list[SessionRow]:
        await self._adopt_legacy_open_index(tenant)
        index = tenant_key(tenant)
        with _errors("list"):
            members = await self._client.zrange(index, 0, -1)
            ids = [_text(i) for i in members if isinstance(i, bytes | str)]
            async with self._client.pipeline(transaction=False) as pipe:
                for session_id in ids:
                    keys = session_keys(session_id)
                    pipe.hmget(keys[0], [*META_FIELDS, "engine"])
                    pipe.lindex(keys[2], -1)
                answers: list[Any] = await pipe.execute() if ids else []
        found: list[SessionRow] = []
        gone: list[str] = []
        for session_id, row, newest in zip(ids, answers[0::2], answers[1::2], strict=True):
            if any(v is None for v in row):  # deleted or expired (or being created right now)
                gone.append(session_id)
                continue
            t, created, updated, metadata, version, step, lr, engine = row
            if _text(t) != tenant:
                continue
            meta = SessionMeta(
                session_id, tenant, float(created), float(updated), json.loads(metadata), int(version)
            )
            loss = None if newest is None else HistoryRow(*json.loads(newest)).loss
            found.append(SessionRow(meta, int(step), json.loads(lr), *names_of(json.loads(engine)), loss))
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
            tenant = await self._delete(
                keys=session_keys(session_id), args=[ROUND_CHANNEL, f"{session_id} *", log_prefix(session_id)]
            )
        self._seen.pop(session_id, None)
        if tenant is None:
            return False
        # the session is gone; an index entry left behind (Redis failing right now) is dropped by listings
        with contextlib.suppress(RedisError, OSError):
            await self._client.zrem(tenant_key(_text(tenant)), session_id)
            await self._client.hdel(tenant_sizes_key(_text(tenant)), session_id)
        return True

    # -- synchronous rounds across replicas (RoundStore) --------------------------------------------

    async def round_join(
        self, session_id: str, step: int, part: RoundPart, max_bytes: int, timeout: float, workers: int
    ) -> Joined:
        if not _valid(session_id):
            return Joined("gone")
        args: list[str | int | bytes] = [
            step,
            part.worker,
            part.fingerprint,
            repr(part.weight),
            "" if part.loss is None else repr(part.loss),
            part.blob,
            max_bytes,
            secrets.token_hex(8),
            round((timeout + ROUND_GRACE_SECONDS) * 1000),
            workers,
        ]
        with _errors("round"):
            kind, rid, current, outcome = await self._round_join(keys=session_keys(session_id), args=args)
        return Joined(
            _text(kind), _text(rid), int(current), RoundOutcome.from_json(outcome) if outcome else None
        )

    async def round_claim(
        self, session_id: str, round_id: str, owner: str, workers: int, timeout: float, lease: float
    ) -> Claim:
        args: list[str | int] = [
            round_id,
            owner,
            workers,
            round(timeout * 1000),
            max(1, round(lease * 1000)),
            ROUND_CHANNEL,
            f"{session_id} {round_id}",
            round(ROUND_GRACE_SECONDS * 1000),
        ]
        with _errors("round"):
            kind, wait_ms, count = await self._round_claim(keys=session_keys(session_id), args=args)
        return Claim(_text(kind), int(wait_ms), int(count))

    async def round_parts(self, session_id: str, round_id: str) -> list[RoundPart]:
        keys = session_keys(session_id)
        with _errors("round"):
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.hgetall(keys[6])
                pipe.hgetall(keys[7])
                fields, blobs = await pipe.execute()
        row = {_text(k): _text(v) for k, v in fields.items()}
        if row.get("rid") != round_id:
            return []
        parts = []
        for worker, blob in blobs.items():
            name = _text(worker)
            loss = row.get(f"l:{name}", "")
            parts.append(
                RoundPart(
                    name, row[f"f:{name}"], float(row[f"w:{name}"]), float(loss) if loss else None, blob
                )
            )
        return parts

    async def round_fail(self, session_id: str, owner: str, outcome: RoundOutcome) -> bool:
        args: list[str | int] = [
            outcome.round_id,
            owner,
            outcome.to_json(),
            2 * ROUNDS_KEPT,
            ROUND_CHANNEL,
            f"{session_id} {outcome.round_id}",
        ]
        with _errors("round"):
            return int(await self._round_fail(keys=session_keys(session_id), args=args)) == 1

    async def round_outcome(self, session_id: str, round_id: str) -> RoundOutcome | None:
        with _errors("round"):
            raw = await self._client.hget(session_keys(session_id)[8], round_id)
        return None if raw is None else RoundOutcome.from_json(raw)

    def round_signal(self, session_id: str, round_id: str) -> _Signal:
        return self._signals.signal(session_id, round_id)

    async def expire(self, idle_seconds: float, now: float) -> int:
        """Nothing to do: every key of a session carries a Redis TTL, (re)set by each write. Returns 0."""
        return 0

    async def ping(self) -> None:
        with _errors("ping"):
            await self._client.ping()

    async def close(self) -> None:
        for task in list(self._snapshots.values()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, RedisError, OSError):
                await task
        await self._signals.close()
        with contextlib.suppress(RedisError, OSError):
            await self._client.aclose()


class _Signal:
    """One waiter's wake-up for one round (see `RoundSignal`)."""

    def __init__(self, signals: _Signals, key: tuple[str, str]) -> None:
        self._signals = signals
        self.key = key
        self.event = asyncio.Event()

    async def wait(self, timeout: float) -> None:
        if not self._signals.connected:  # a message may be missed meanwhile: look again soon
            timeout = min(timeout, RECHECK_SECONDS)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.event.wait(), max(0.0, timeout))
        self.event.clear()

    def close(self) -> None:
        self._signals.drop(self)


class _Signals:
    """This process's one subscription to ROUND_CHANNEL, started with the first waiter, and the waiters it
    wakes. While it is not connected (starting, or Redis away), waiters look again every RECHECK_SECONDS;
    when it (re)connects, every waiter looks again, for it may have missed messages."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self._waiting: dict[tuple[str, str], set[_Signal]] = {}
        self._task: asyncio.Task[None] | None = None
        self.connected = False

    def signal(self, session_id: str, round_id: str) -> _Signal:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._listen())
        signal = _Signal(self, (session_id, round_id))
        self._waiting.setdefault(signal.key, set()).add(signal)
        return signal

    def drop(self, signal: _Signal) -> None:
        waiting = self._waiting.get(signal.key)
        if waiting is not None:
            waiting.discard(signal)
            if not waiting:
                del self._waiting[signal.key]

    def _wake(self, message: str) -> None:
        session_id, _, round_id = message.partition(" ")
        if round_id == "*":
            keys = [key for key in self._waiting if key[0] == session_id]
        else:
            keys = [(session_id, round_id)]
        for key in keys:
            for signal in self._waiting.get(key, ()):
                signal.event.set()

    def _wake_all(self) -> None:
        for waiting in self._waiting.values():
            for signal in waiting:
                signal.event.set()

    async def _listen(self) -> None:
        pause = 0.05
        while True:
            try:
                pubsub = self._client.pubsub()
                try:
                    await pubsub.subscribe(ROUND_CHANNEL)
                    while True:
                        message = await pubsub.get_message(ignore_subscribe_messages=False, timeout=30.0)
                        if message is None:
                            continue
                        if message["type"] == "subscribe":
                            self.connected, pause = True, 0.05
                            self._wake_all()
                        elif message["type"] == "message":
                            self._wake(_text(message["data"]))
                finally:
                    self.connected = False
                    self._wake_all()
                    with contextlib.suppress(RedisError, OSError):
                        await pubsub.aclose()
            except (RedisError, OSError):
                await asyncio.sleep(pause)
                pause = min(1.0, pause * 2)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def _history_json(row: HistoryRow) -> str:
    return json.dumps([row.step, row.lr, row.loss, row.grad_norm, row.skipped, row.time])


def _record_json(record: IdempotencyRecord) -> str:
    return json.dumps([record.fingerprint, record.step, record.lr, record.skipped, record.grad_norm])
