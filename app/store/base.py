"""The store protocol and the records it keeps, shared by every backend."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from app.optim.engine import Engine


@dataclass
class SessionMeta:
    """What a session is apart from its numerics; `version` bumps on every write (the CAS token)."""

    id: str
    tenant: str
    created_at: float
    updated_at: float
    metadata: dict[str, str] = field(default_factory=dict)
    version: int = 0


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class IdempotencyRecord:
    """The first answer to a keyed step: enough to replay it without applying anything."""

    key: str
    fingerprint: str
    step: int
    lr: list[float]
    skipped: bool
    grad_norm: float | None


class StoreError(RuntimeError):
    """The store is unreachable or failed; the request is not applied (503)."""


class Store(Protocol):
    """Async persistence of sessions. `commit` is atomic and compare-and-set on `meta.version`."""

    shared: bool
    """True when other processes may write the same sessions (the service then re-checks versions)."""

    async def create(self, meta: SessionMeta, engine: Engine) -> None: ...

    async def load(self, session_id: str) -> tuple[SessionMeta, Engine] | None: ...

    async def version(self, session_id: str) -> int | None: ...

    async def commit(
        self,
        meta: SessionMeta,
        engine: Engine,
        expected_version: int,
        history: HistoryRow | None,
        idempotency: IdempotencyRecord | None,
    ) -> bool:
        """Writes the session if its stored version is still `expected_version`; False otherwise."""
        ...

    async def idempotency(self, session_id: str, key: str) -> IdempotencyRecord | None: ...

    async def history(self, session_id: str, limit: int) -> list[HistoryRow]: ...

    async def sessions_of(self, tenant: str) -> list[tuple[SessionMeta, int, list[float]]]:
        """The tenant's sessions with their step and lr."""
        ...

    async def delete(self, session_id: str) -> bool: ...

    async def expire(self, idle_seconds: float, now: float) -> int:
        """Deletes sessions idle for longer than `idle_seconds`; returns how many."""
        ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...
