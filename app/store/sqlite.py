"""`sqlite:///path`: the embedded durable default. One transaction per step, WAL, synchronous=FULL.

A session row holds its JSON metadata and all its tensors as one safetensors blob; a step's new state,
step count, history row and idempotency record commit together, compare-and-set on `version`, so
several processes may share one file.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio

from app.store.base import (
    IDEMPOTENCY_STEPS,
    HistoryRow,
    IdempotencyRecord,
    Quota,
    SessionMeta,
    SessionRecord,
    SessionRow,
    StoreError,
    decode,
    encode,
)

T = TypeVar("T")
PRUNE_EVERY = 100
_META = "id, tenant, created_at, updated_at, metadata, version"

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    metadata TEXT NOT NULL,
    version INTEGER NOT NULL,
    step INTEGER NOT NULL,
    lr TEXT NOT NULL,
    engine TEXT NOT NULL,
    tensors BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_tenant ON sessions (tenant);
CREATE TABLE IF NOT EXISTS history (
    session_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    lr TEXT NOT NULL,
    loss REAL,
    grad_norm REAL,
    skipped INTEGER NOT NULL,
    time REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS history_session ON history (session_id);
CREATE TABLE IF NOT EXISTS idempotency (
    session_id TEXT NOT NULL,
    key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    step INTEGER NOT NULL,
    lr TEXT NOT NULL,
    skipped INTEGER NOT NULL,
    grad_norm REAL,
    PRIMARY KEY (session_id, key)
);
"""


def _meta(row: Any) -> SessionMeta:
    return SessionMeta(row[0], row[1], row[2], row[3], json.loads(row[4]), row[5])


class SqliteStore:
    shared = True
    replicas = False

    def __init__(self, path: Path, history_limit: int = 10_000) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.history_limit = history_limit
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30.0)
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    @classmethod
    def from_url(cls, url: str, history_limit: int = 10_000) -> SqliteStore:
        """`sqlite:///relative/path.db` or `sqlite:////absolute/path.db`."""
        raw = url.removeprefix("sqlite://")
        if not raw.startswith("/") or len(raw) < 2:
            raise ValueError(f"invalid SQLite URL {url!r}; expected sqlite:///path/to/file.db")
        return cls(Path(raw[1:]), history_limit)

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """`fn` on the connection, off the event loop; any SQLite error is a StoreError."""

        def locked() -> T:
            with self._lock:
                try:
                    return fn(self._db)
                except sqlite3.Error as exc:
                    raise StoreError(f"SQLite: {exc}") from exc

        return await anyio.to_thread.run_sync(locked)

    async def _transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """`fn` inside one write transaction, the only place one begins and ends: whatever `fn` raises,
        of any kind, rolls it back before it goes on, so no transaction outlives its request."""

        def run(db: sqlite3.Connection) -> T:
            db.execute("BEGIN IMMEDIATE")
            try:
                result = fn(db)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # COMMIT itself may fail, and leave it open
                    db.execute("ROLLBACK")
                raise
            return result

        return await self._call(run)

    async def create(self, record: SessionRecord, quota: Quota | None = None) -> None:
        engine_json, blob = await anyio.to_thread.run_sync(encode, record)
        meta = record.meta

        def run(db: sqlite3.Connection) -> None:
            if quota is not None:  # inside the write transaction: other processes wait for it
                held, nbytes = db.execute(
                    "SELECT count(*), coalesce(sum(length(tensors)), 0) FROM sessions WHERE tenant = ?",
                    (meta.tenant,),
                ).fetchone()
                refusal = quota.refusal(held, nbytes, len(blob))
                if refusal is not None:
                    raise refusal
            db.execute(
                "INSERT INTO sessions VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    meta.id,
                    meta.tenant,
                    meta.created_at,
                    meta.updated_at,
                    json.dumps(meta.metadata),
                    meta.version,
                    record.step,
                    json.dumps(record.lr),
                    engine_json,
                    blob,
                ),
            )

        await self._transaction(run)

    async def load(self, session_id: str) -> SessionRecord | None:
        def run(db: sqlite3.Connection) -> Any:
            return db.execute(
                f"SELECT {_META}, engine, tensors FROM sessions WHERE id = ?", (session_id,)
            ).fetchone()

        row = await self._call(run)
        if row is None:
            return None
        engine, tensors = await anyio.to_thread.run_sync(decode, session_id, row[6], row[7])
        return SessionRecord(_meta(row), engine, tensors)

    async def meta(self, session_id: str) -> SessionMeta | None:
        def run(db: sqlite3.Connection) -> Any:
            return db.execute(f"SELECT {_META} FROM sessions WHERE id = ?", (session_id,)).fetchone()

        row = await self._call(run)
        return None if row is None else _meta(row)

    async def version(self, session_id: str) -> int | None:
        def run(db: sqlite3.Connection) -> Any:
            return db.execute("SELECT version FROM sessions WHERE id = ?", (session_id,)).fetchone()

        row = await self._call(run)
        return None if row is None else int(row[0])

    async def commit(
        self,
        record: SessionRecord,
        expected_version: int,
        history: HistoryRow | None,
        idempotency: IdempotencyRecord | None,
    ) -> bool:
        engine_json, blob = await anyio.to_thread.run_sync(encode, record)
        meta, step = record.meta, record.step

        def run(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                "UPDATE sessions SET updated_at=?, metadata=?, version=?, step=?, lr=?, engine=?, tensors=? "
                "WHERE id=? AND version=?",
                (
                    meta.updated_at,
                    json.dumps(meta.metadata),
                    meta.version,
                    step,
                    json.dumps(record.lr),
                    engine_json,
                    blob,
                    meta.id,
                    expected_version,
                ),
            )
            if cursor.rowcount != 1:
                return False
            if history is not None:
                db.execute(
                    "INSERT INTO history VALUES (?,?,?,?,?,?,?)",
                    (
                        meta.id,
                        history.step,
                        json.dumps(history.lr),
                        history.loss,
                        history.grad_norm,
                        history.skipped,
                        history.time,
                    ),
                )
            if idempotency is not None:
                db.execute(
                    "INSERT OR REPLACE INTO idempotency VALUES (?,?,?,?,?,?,?)",
                    (
                        meta.id,
                        idempotency.key,
                        idempotency.fingerprint,
                        idempotency.step,
                        json.dumps(idempotency.lr),
                        idempotency.skipped,
                        idempotency.grad_norm,
                    ),
                )
            if meta.version % PRUNE_EVERY == 0:
                self._prune(db, meta.id, step)
            return True

        return await self._transaction(run)

    def _prune(self, db: sqlite3.Connection, session_id: str, step: int) -> None:
        db.execute(
            "DELETE FROM idempotency WHERE session_id = ? AND step < ?",
            (session_id, step - IDEMPOTENCY_STEPS),
        )
        db.execute(
            "DELETE FROM history WHERE session_id = ? AND rowid <= ("
            "SELECT rowid FROM history WHERE session_id = ? ORDER BY rowid DESC LIMIT 1 OFFSET ?)",
            (session_id, session_id, self.history_limit),
        )

    async def idempotency(self, session_id: str, key: str) -> IdempotencyRecord | None:
        def run(db: sqlite3.Connection) -> Any:
            return db.execute(
                "SELECT key, fingerprint, step, lr, skipped, grad_norm FROM idempotency "
                "WHERE session_id = ? AND key = ?",
                (session_id, key),
            ).fetchone()

        row = await self._call(run)
        if row is None:
            return None
        return IdempotencyRecord(row[0], row[1], row[2], json.loads(row[3]), bool(row[4]), row[5])

    async def history(self, session_id: str, limit: int, since: int | None = None) -> list[HistoryRow]:
        count = min(limit, self.history_limit)

        def run(db: sqlite3.Connection) -> list[Any]:
            columns = "SELECT step, lr, loss, grad_norm, skipped, time FROM history WHERE session_id = ?"
            if since is None:
                newest = db.execute(f"{columns} ORDER BY rowid DESC LIMIT ?", (session_id, count)).fetchall()
                return list(reversed(newest))
            # within the newest history_limit rows (older ones wait for the next prune)
            return db.execute(
                "SELECT step, lr, loss, grad_norm, skipped, time FROM ("
                "SELECT rowid AS r, * FROM history WHERE session_id = ? ORDER BY rowid DESC LIMIT ?"
                ") WHERE step > ? ORDER BY r LIMIT ?",
                (session_id, self.history_limit, since, count),
            ).fetchall()

        rows = await self._call(run)
        return [HistoryRow(r[0], json.loads(r[1]), r[2], r[3], bool(r[4]), r[5]) for r in rows]

    async def sessions_of(self, tenant: str) -> list[SessionRow]:
        def run(db: sqlite3.Connection) -> list[Any]:
            return db.execute(
                f"SELECT {_META}, step, lr, json_extract(engine, '$.options.optimizer.name'), "
                "json_extract(engine, '$.options.scheduler.name'), "
                "(SELECT loss FROM history h WHERE h.session_id = s.id ORDER BY h.rowid DESC LIMIT 1) "
                "FROM sessions s WHERE tenant = ?",
                (tenant,),
            ).fetchall()

        rows = await self._call(run)
        return [SessionRow(_meta(r), r[6], json.loads(r[7]), r[8] or "", r[9], r[10]) for r in rows]

    async def delete(self, session_id: str) -> bool:
        def run(db: sqlite3.Connection) -> bool:
            deleted = db.execute("DELETE FROM sessions WHERE id = ?", (session_id,)).rowcount
            db.execute("DELETE FROM history WHERE session_id = ?", (session_id,))
            db.execute("DELETE FROM idempotency WHERE session_id = ?", (session_id,))
            return bool(deleted)

        return await self._transaction(run)

    async def expire(self, idle_seconds: float, now: float) -> int:
        def run(db: sqlite3.Connection) -> list[str]:
            rows = db.execute(
                "SELECT id FROM sessions WHERE updated_at < ?", (now - idle_seconds,)
            ).fetchall()
            return [r[0] for r in rows]

        stale = await self._call(run)
        for session_id in stale:
            await self.delete(session_id)
        return len(stale)

    async def ping(self) -> None:
        await self._call(lambda db: db.execute("SELECT 1").fetchone())

    async def close(self) -> None:
        with self._lock:
            self._db.close()
