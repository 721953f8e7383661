"""The store protocol and the records it keeps, shared by every backend.

A store keeps records, not engines: a session is its `SessionMeta`, a JSON-ready description of its
numerics (`engine`: spec, step, groups, scheduler state) and its named arrays (`tensors`). What a record
means is the engine's business; how it is laid out in bytes (`encode`/`decode`) is shared here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from app.values import immutable
from app.wire import safetensors
from app.wire.common import PARAM_DTYPES
from app.wire.errors import WireError

Array = npt.NDArray[Any]
IDEMPOTENCY_STEPS = 1_000
"""Idempotency records are kept for at least the session's last this many steps."""


@dataclass
class SessionMeta:
    """What a session is apart from its numerics; `version` bumps on every write (the CAS token)."""

    id: str
    tenant: str
    created_at: float
    updated_at: float
    metadata: dict[str, str] = field(default_factory=dict)
    version: int = 0

    def written(self, at: float) -> SessionMeta:
        """The meta of the next version, written at `at` (a step's hot path: no dataclasses.replace)."""
        return SessionMeta(self.id, self.tenant, self.created_at, at, self.metadata, self.version + 1)

    def copy(self) -> SessionMeta:
        return SessionMeta(
            self.id, self.tenant, self.created_at, self.updated_at, dict(self.metadata), self.version
        )


@immutable
class HistoryRow:
    step: int
    lr: list[float]
    loss: float | None
    grad_norm: float | None
    skipped: bool
    time: float

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "lr": self.lr,
            "loss": self.loss,
            "grad_norm": self.grad_norm,
            "skipped": self.skipped,
            "time": self.time,
        }


@immutable
class IdempotencyRecord:
    """The first answer to a keyed step: enough to replay it without applying anything."""

    key: str
    fingerprint: str
    step: int
    lr: list[float]
    skipped: bool
    grad_norm: float | None


@immutable
class LoggedStep:
    """A step as the engine applied it (a prepared step: gradients cast and clipped, the norm, the staleness):
    what redoes the step exactly from the state before it. A store may keep these instead of writing the
    whole state at every step (see `SessionRecord.log`)."""

    grads: Mapping[str, Array]
    loss: float | None
    grad_norm: float
    skipped: bool
    staleness: int

    @property
    def nbytes(self) -> int:
        return sum(int(g.nbytes) for g in self.grads.values())

    def encode(self) -> list[bytes | memoryview]:
        """As safetensors parts (the arrays' own memory, no copy), its scalars in the metadata."""
        scalars = [self.loss, self.grad_norm, self.skipped, self.staleness]
        return safetensors.encode(self.grads, {"step": json.dumps(scalars)})

    @classmethod
    def decode(cls, session_id: str, blob: bytes) -> LoggedStep:
        try:
            grads, metadata = safetensors.decode(blob, PARAM_DTYPES)
            loss, grad_norm, skipped, staleness = json.loads(metadata["step"])
        except (ValueError, KeyError, TypeError, WireError) as exc:
            raise CorruptRecord(session_id, f"a logged step: {exc}") from None
        return cls(grads, loss, float(grad_norm), bool(skipped), int(staleness))


@immutable
class SessionRecord:
    """A session as stored. The arrays are never written after they are recorded (a step makes new ones),
    so a record may share them with the live engine it was taken from.

    `log`: the steps taken since the state `engine` and `tensors` describe, oldest first; the session is
    that state with these steps redone (`meta` is the session's now). Empty unless the store keeps steps
    (commit's `logged`)."""

    meta: SessionMeta
    engine: Mapping[str, Any]
    tensors: Mapping[str, Array]
    log: tuple[LoggedStep, ...] = ()

    @property
    def step(self) -> int:
        return int(self.engine["step"])

    @property
    def lr(self) -> list[float]:
        return [float(group["lr"]) for group in self.engine["groups"]]

    @property
    def nbytes(self) -> int:
        """What the session's arrays take: what a key's byte quota counts."""
        return sum(int(v.nbytes) for v in self.tensors.values())


@dataclass(frozen=True)
class Quota:
    """What one key's sessions may hold together (`OPTSERVE_MAX_SESSIONS_PER_KEY`, `..._BYTES_PER_KEY`)."""

    sessions: int
    nbytes: int

    def refusal(self, sessions: int, nbytes: int, adding: int) -> QuotaExceeded | None:
        """Why one more session of `adding` bytes does not fit beside `sessions` holding `nbytes`."""
        if sessions + 1 > self.sessions:
            return QuotaExceeded(
                f"this key holds {sessions} sessions, the most OPTSERVE_MAX_SESSIONS_PER_KEY={self.sessions} "
                "allows: delete one first"
            )
        if nbytes + adding > self.nbytes:
            return QuotaExceeded(
                f"this key's sessions hold {nbytes} bytes and this one needs {adding} more, past "
                f"OPTSERVE_MAX_BYTES_PER_KEY={self.nbytes}"
            )
        return None


class QuotaExceeded(Exception):
    """A create or restore past the caller's key's quota (429); nothing was stored."""


class StoreError(RuntimeError):
    """The store is unreachable or failed; the request is not applied (503)."""


class CorruptRecord(ValueError):
    """A stored session that this server cannot read (damaged, or written by a newer version)."""

    def __init__(self, session_id: str, reason: str) -> None:
        self.session_id = session_id
        self.reason = reason
        super().__init__(f"session {session_id!r} is stored in a form this server cannot read: {reason}")


def encode(record: SessionRecord) -> tuple[str, bytes]:
    """The record's engine description as JSON text and its arrays as one safetensors blob."""
    return json.dumps(record.engine), safetensors.encode_bytes(record.tensors, None)


def decode(session_id: str, engine_json: str | bytes, blob: bytes) -> tuple[dict[str, Any], dict[str, Array]]:
    """`encode`'s inverse; CorruptRecord when the bytes are not what `encode` writes."""
    try:
        engine = json.loads(engine_json)
        tensors, _ = safetensors.decode(blob, PARAM_DTYPES)
    except (ValueError, RecursionError, WireError) as exc:
        raise CorruptRecord(session_id, str(exc)) from None
    if not isinstance(engine, dict):
        raise CorruptRecord(session_id, "the engine description is not a JSON object")
    return engine, {name: np.asarray(value) for name, value in tensors.items()}


class SessionRow(NamedTuple):
    """A session as a listing shows it."""

    meta: SessionMeta
    step: int
    lr: list[float]
    optimizer: str
    scheduler: str | None
    loss: float | None
    """The loss of the newest history row (None when it reported none, or there is none)."""


def names_of(engine: Mapping[str, Any]) -> tuple[str, str | None]:
    """The optimizer's and the scheduler's names in a record's engine description."""
    options = engine.get("options") or {}
    scheduler = options.get("scheduler")
    return str(options.get("optimizer", {}).get("name", "")), scheduler.get("name") if scheduler else None


def rows_since(rows: list[HistoryRow], limit: int, since: int | None) -> list[HistoryRow]:
    """`Store.history`'s answer from rows oldest first: the newest `limit`, or the first `limit` after
    step `since`."""
    if since is None:
        return rows[-limit:] if limit else []
    return [r for r in rows if r.step > since][:limit]


@dataclass(frozen=True)
class RoundOutcome:
    """How a synchronous round ended, as a store shared by replicas keeps it for every contributor: applied
    (the step it made: `next_step`, lr, skipped, grad_norm, who contributed with which request) or not
    (`message`, and the session stayed at `step`)."""

    round_id: str
    step: int
    applied: bool
    message: str = ""
    next_step: int = 0
    lr: list[float] = field(default_factory=list)
    skipped: bool = False
    grad_norm: float = 0.0
    fingerprints: dict[str, str] = field(default_factory=dict)
    error_field: str = ""
    """With `message`, when the round's step was refused (a 422 naming this input): every contributor
    gets that refusal."""

    def to_json(self) -> str:
        return json.dumps(
            [
                self.round_id,
                self.step,
                self.applied,
                self.message,
                self.next_step,
                self.lr,
                self.skipped,
                self.grad_norm,
                self.fingerprints,
                self.error_field,
            ]
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> RoundOutcome:
        return cls(*json.loads(raw))

    @property
    def workers(self) -> tuple[str, ...]:
        return tuple(sorted(self.fingerprints))


@dataclass(frozen=True)
class RoundPart:
    """One worker's contribution as a shared store keeps it: its request's fingerprint, weight, loss and
    gradients (`blob`, opaque bytes to the store)."""

    worker: str
    fingerprint: str
    weight: float
    loss: float | None
    blob: bytes


@dataclass(frozen=True)
class Joined:
    """What joining a round found. `kind`: "joined" (added), "resent" (this worker's same request is in
    already), "done" (the round `step` was applied: `outcome`), "stale" (the session is at `current`,
    another step), "other" (the worker is in with another request), "closed" (the round is being
    applied), "full" (past the round's byte budget), "gone" (no session)."""

    kind: str
    round_id: str = ""
    current: int = 0
    outcome: RoundOutcome | None = None


@dataclass(frozen=True)
class Claim:
    """Whether this caller now closes the round. `kind`: "claimed" (it does: `count` contributions),
    "wait" (open: its deadline is `wait_ms` away), "busy" (another caller closes it; its lease ends in
    `wait_ms`), "gone" (it ended: see its outcome)."""

    kind: str
    wait_ms: int = 0
    count: int = 0


@runtime_checkable
class RoundStore(Protocol):
    """A store whose replicas run synchronous rounds together: the contributions and how each round ended
    live in the store, every round is closed by one caller at a time under a lease (another takes over
    when the lease runs out: a replica died), and its one step commits with its outcome atomically."""

    async def round_join(
        self, session_id: str, step: int, part: RoundPart, max_bytes: int, timeout: float, workers: int
    ) -> Joined:
        """Adds the part to the round open at `step` (opening it), unless it has its `workers` already; a
        round nobody closes goes some while after its `timeout`, with its contributions."""
        ...

    async def round_claim(
        self, session_id: str, round_id: str, owner: str, workers: int, timeout: float, lease: float
    ) -> Claim: ...

    async def round_parts(self, session_id: str, round_id: str) -> list[RoundPart]: ...

    async def round_fail(self, session_id: str, owner: str, outcome: RoundOutcome) -> bool:
        """Ends the round unapplied, if `owner` still holds its claim; False otherwise."""
        ...

    async def round_outcome(self, session_id: str, round_id: str) -> RoundOutcome | None: ...

    async def commit_round(
        self, record: SessionRecord, expected_version: int, history: HistoryRow, outcome: RoundOutcome
    ) -> bool:
        """`commit`, and with it the round's outcome (the round ends): one transaction."""
        ...

    def round_signal(self, session_id: str, round_id: str) -> RoundSignal:
        """Set when the round's state changes (claimed, ended) or the session goes, in any replica."""
        ...


class RoundSignal(Protocol):
    async def wait(self, timeout: float) -> None:
        """Returns when signalled (then resets) or after `timeout` seconds, whichever is first."""
        ...

    def close(self) -> None: ...


class Store(Protocol):
    """Async persistence of sessions. `commit` is atomic and compare-and-set on `meta.version`."""

    shared: bool
    """True when other processes may write the same sessions (the service then re-checks versions)."""
    replicas: bool
    """True when it is made for replicas: server processes on several machines serving the same sessions
    (what this process alone holds, such as a synchronous round, they would not see)."""

    async def create(self, record: SessionRecord, quota: Quota | None = None) -> None:
        """Stores a new session, atomically with the check that its tenant stays within `quota`
        (QuotaExceeded otherwise, nothing stored), across every process sharing the store."""
        ...

    async def load(self, session_id: str) -> SessionRecord | None:
        """The whole record; CorruptRecord when it is stored but cannot be read."""
        ...

    async def meta(self, session_id: str) -> SessionMeta | None:
        """The record's meta alone, which stays readable when the rest is not."""
        ...

    async def version(self, session_id: str) -> int | None: ...

    async def commit(
        self,
        record: SessionRecord,
        expected_version: int,
        history: HistoryRow | None,
        idempotency: IdempotencyRecord | None,
        logged: LoggedStep | None = None,
    ) -> bool:
        """Writes the record, its history row and idempotency record in one transaction, if the stored
        version is still `expected_version`; False (nothing written) otherwise. `logged`, when given, is
        the step that made the record from the one at `expected_version`: a store may keep that (and write
        the whole state later) instead of the record's arrays."""
        ...

    async def idempotency(self, session_id: str, key: str) -> IdempotencyRecord | None: ...

    async def history(self, session_id: str, limit: int, since: int | None = None) -> list[HistoryRow]:
        """The newest `limit` rows, oldest first; with `since`, the first `limit` rows of steps after it."""
        ...

    async def sessions_of(self, tenant: str) -> list[SessionRow]:
        """The tenant's sessions with their step, lr, optimizer and scheduler names and last loss."""
        ...

    async def delete(self, session_id: str) -> bool: ...

    async def expire(self, idle_seconds: float, now: float) -> int:
        """Deletes sessions idle for longer than `idle_seconds`; returns how many."""
        ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...
