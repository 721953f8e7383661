"""`sqlite:///path`: the embedded durable default. One transaction per step, WAL, synchronous=FULL.

A session row holds its JSON metadata; its tensors (params and optimizer state: most of the bytes) live
in two slot files in `<path>.tensors/`, `<id>.0.safetensors` and `<id>.1.safetensors`: version v is
written over slot v % 2, the slot of version v - 2, and made durable (fdatasync) before the transaction
that names it commits. The committed version's slot is never written, so a crash mid-write leaves the
row naming an intact file. A step's new state, step count, history row and idempotency record commit
together, compare-and-set on `version`, so several processes may share one database.

A writer holds an exclusive lock (flock) on the slot it writes from before it checks the version until
after its commit: a writer that lost the race finds the version moved and writes nothing. A reader holds
a shared lock on the slot it reads and checks under it that the row still names that version.

Why slots: a 12 MB state written into SQLite's pages went through the WAL and again into the database
(auto-checkpoint), 24 MB and three fsyncs per step, about 40 ms for 1e6 Adam parameters; as a new file
per version, 6 ms of fsync plus 3 ms to unlink the old one. Overwriting a file of the same size in place
needs no block allocation nor journaled metadata: about 1 ms to write and 2.5 ms to fdatasync here.
Rows of before (the tensors inline, `tensors_file` NULL) are read as they are and move to a slot at
their next write.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import anyio

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
    decode,
)
from app.wire import safetensors

T = TypeVar("T")
PRUNE_EVERY = 100
ORPHAN_SECONDS = 600.0
"""A tensors file no row names is removed once it is this old (younger ones may be a commit under way)."""
READ_ATTEMPTS = 5
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


class SessionExists(StoreError):
    """A create of an id that is taken (nothing was written)."""


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
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(sessions)")}
        for column, kind in (("tensors_file", "TEXT"), ("nbytes", "INTEGER")):
            if column not in columns:  # a database of before: its rows keep their tensors inline
                with contextlib.suppress(sqlite3.OperationalError):  # another process added it meanwhile
                    self._db.execute(f"ALTER TABLE sessions ADD COLUMN {column} {kind}")
        self.files = path.with_name(path.name + ".tensors")
        self.files.mkdir(exist_ok=True)
        self._sweep_orphans()

    @classmethod
    def from_url(cls, url: str, history_limit: int = 10_000) -> SqliteStore:
        """`sqlite:///relative/path.db` or `sqlite:////absolute/path.db`."""
        raw = url.removeprefix("sqlite://")
        if not raw.startswith("/") or len(raw) < 2:
            raise ValueError(f"invalid SQLite URL {url!r}; expected sqlite:///path/to/file.db")
        return cls(Path(raw[1:]), history_limit)

    # -- tensors slots ------------------------------------------------------------------------------

    def slot(self, session_id: str, version: int) -> str:
        return f"{session_id}.{version % 2}.safetensors"

    def _write_slot(self, fd: int, tensors: Mapping[str, Any]) -> int:
        """The tensors over the slot open at `fd`, from the arrays' own memory, then fdatasync (which also
        makes a changed length durable). Returns the size."""
        parts = safetensors.encode(tensors, None)
        size = safetensors.encoded_size(parts)
        views = [memoryview(part).cast("B") for part in parts]
        offset = 0
        while views:
            written = os.pwritev(fd, views[:1024], offset)
            offset += written
            while written and views:  # a partial write: drop what went, go on from there
                if written >= len(views[0]):
                    written -= len(views[0])
                    views.pop(0)
                else:
                    views[0] = views[0][written:]
                    written = 0
        if os.fstat(fd).st_size != size:
            os.ftruncate(fd, size)
        os.fdatasync(fd)
        return size

    def _open_slot(self, name: str) -> int:
        """The slot file, made (and its name made durable) when it is not there yet."""
        path = self.files / name
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return os.open(path, os.O_RDWR)
        directory = os.open(self.files, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        return fd

    def _remove(self, name: str | None) -> None:
        if name:
            with contextlib.suppress(FileNotFoundError):
                (self.files / name).unlink()

    def _sweep_orphans(self) -> None:
        """Removes the slots of sessions that are gone (a delete whose removal did not happen, or a writer
        that raced a delete), once they are older than ORPHAN_SECONDS."""
        live = {row[0] for row in self._db.execute("SELECT id FROM sessions")}
        horizon = time.time() - ORPHAN_SECONDS
        for entry in os.scandir(self.files):
            if entry.name.split(".")[0] not in live and entry.stat().st_mtime < horizon:
                self._remove(entry.name)

    def _write(
        self,
        record: SessionRecord,
        expected_version: int | None,
        in_transaction: Callable[[sqlite3.Connection, str, int], bool],
    ) -> bool:
        """Writes the record's tensors into its slot under the slot's exclusive lock, then (still under
        it) runs `in_transaction` in one transaction. With `expected_version`, nothing is written unless
        the row is at that version (checked under the lock, so no other writer can be mid-way)."""
        meta = record.meta
        name = self.slot(meta.id, meta.version)
        fd = self._open_slot(name)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with self._lock:
                row = self._select("SELECT version FROM sessions WHERE id = ?", meta.id)
            if expected_version is None and row is not None:  # a create: the slot is another session's
                raise SessionExists(f"session id {meta.id!r} already exists")
            if expected_version is not None and (row is None or row[0] != expected_version):
                return False  # the slot may hold the version that won: it is not touched
            size = self._write_slot(fd, record.tensors)

            def run(db: sqlite3.Connection) -> bool:
                return in_transaction(db, name, size)

            return self._run_transaction(run)
        finally:
            os.close(fd)  # and with it the lock

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
        return await anyio.to_thread.run_sync(self._run_transaction, fn)

    def _run_transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
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

        with self._lock:
            try:
                return run(self._db)
            except sqlite3.Error as exc:
                raise StoreError(f"SQLite: {exc}") from exc

    async def create(self, record: SessionRecord, quota: Quota | None = None) -> None:
        meta = record.meta
        engine_json = json.dumps(record.engine)

        def insert(db: sqlite3.Connection, name: str, size: int) -> bool:
            if quota is not None:  # inside the write transaction: other processes wait for it
                held, nbytes = db.execute(
                    "SELECT count(*), coalesce(sum(coalesce(nbytes, length(tensors))), 0) FROM sessions "
                    "WHERE tenant = ?",
                    (meta.tenant,),
                ).fetchone()
                refusal = quota.refusal(held, nbytes, size)
                if refusal is not None:
                    raise refusal
            db.execute(
                "INSERT INTO sessions (id, tenant, created_at, updated_at, metadata, version, step, lr, "
                "engine, tensors, tensors_file, nbytes) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
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
                    b"",
                    name,
                    size,
                ),
            )
            return True

        try:
            await anyio.to_thread.run_sync(self._write, record, None, insert)
        except SessionExists:
            raise  # the slot is that session's: left alone
        except BaseException as exc:
            # nothing names the new session's slot (refused over quota, or the store failed): it goes
            await anyio.to_thread.run_sync(self._remove, self.slot(meta.id, meta.version))
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"SQLite: {exc}") from exc
            raise

    async def load(self, session_id: str) -> SessionRecord | None:
        row = await anyio.to_thread.run_sync(self._read, session_id)
        if row is None:
            return None
        engine, tensors = await anyio.to_thread.run_sync(decode, session_id, row[6], row[7])
        return SessionRecord(_meta(row), engine, tensors)

    def _read(self, session_id: str) -> tuple[Any, ...] | None:
        """The row with its tensors' bytes: from its slot, read under the slot's shared lock once the row
        is seen, under that lock, to still name that version (a writer of the slot waits meanwhile)."""
        query = f"SELECT {_META}, engine, tensors, tensors_file FROM sessions WHERE id = ?"
        for _ in range(READ_ATTEMPTS):
            with self._lock:
                row = self._select(query, session_id)
            if row is None or row[8] is None:
                return None if row is None else tuple(row)
            try:
                fd = os.open(self.files / row[8], os.O_RDONLY)
            except FileNotFoundError:
                continue  # the session went meanwhile: look again
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)
                with self._lock:
                    again = self._select(query, session_id)
                if again is None or again[5] != row[5]:
                    continue  # another version was committed meanwhile: read that one
                size = os.fstat(fd).st_size
                blob = bytearray(size)
                view = memoryview(blob)
                done = 0
                while done < size:
                    got = os.preadv(fd, [view[done:]], done)
                    if got == 0:
                        break
                    done += got
                return (*row[:7], bytes(view[:done]) if done < size else blob, row[8])
            finally:
                os.close(fd)
        raise StoreError(f"session {session_id!r}: its tensors kept moving while being read; retry")

    def _select(self, query: str, session_id: str) -> Any:
        try:
            return self._db.execute(query, (session_id,)).fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite: {exc}") from exc

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
        logged: LoggedStep | None = None,
    ) -> bool:
        meta, step = record.meta, record.step
        engine_json = json.dumps(record.engine)

        def update(db: sqlite3.Connection, name: str, size: int) -> bool:
            cursor = db.execute(
                "UPDATE sessions SET updated_at=?, metadata=?, version=?, step=?, lr=?, engine=?, tensors=?, "
                "tensors_file=?, nbytes=? WHERE id=? AND version=?",
                (
                    meta.updated_at,
                    json.dumps(meta.metadata),
                    meta.version,
                    step,
                    json.dumps(record.lr),
                    engine_json,
                    b"",
                    name,
                    size,
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

        return await anyio.to_thread.run_sync(self._write, record, expected_version, update)

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
        def run(db: sqlite3.Connection) -> tuple[bool, str | None]:
            row = db.execute("SELECT tensors_file FROM sessions WHERE id = ?", (session_id,)).fetchone()
            deleted = db.execute("DELETE FROM sessions WHERE id = ?", (session_id,)).rowcount
            db.execute("DELETE FROM history WHERE session_id = ?", (session_id,))
            db.execute("DELETE FROM idempotency WHERE session_id = ?", (session_id,))
            return bool(deleted), None if row is None else row[0]

        deleted, _ = await self._transaction(run)
        for version in (0, 1):  # unlinking a large file takes milliseconds: not on the event loop
            await anyio.to_thread.run_sync(self._remove, self.slot(session_id, version))
        return deleted

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
