"""SQLite: no write transaction outlives its request. An error at any statement of a commit, of any kind,
rolls the whole commit back and leaves the database free for other sessions and other processes."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.store.base import StoreError
from app.store.sqlite import PRUNE_EVERY, SqliteStore
from tests.store.test_contract import as_record, engine_of, new_engine, new_meta, record, row, stepped


class FailingAt:
    """The store's connection, raising `error` at the `n`-th statement (0 = BEGIN) once armed."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self.armed: tuple[int, BaseException] | None = None
        self.seen: list[str] = []

    def execute(self, sql: str, *args: Any) -> Any:
        if self.armed is not None:
            self.seen.append(sql.split()[0])
            n, error = self.armed
            if len(self.seen) - 1 == n:
                raise error
        return self._db.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


async def statements_of_a_commit(path: Path, version: int) -> list[str]:
    """The statements one commit runs: BEGIN, the update, history, idempotency, pruning, COMMIT."""
    store = SqliteStore(path)
    spy = FailingAt(store._db)
    store._db = spy  # type: ignore[assignment]
    meta, engine = new_meta("s_spy"), new_engine()
    await store.create(as_record(meta, engine))
    spy.armed = (10**6, RuntimeError())
    new = replace(meta, version=version)
    assert await store.commit(as_record(new, stepped(engine)), 0, row(1), record("k", 1))
    await store.close()
    return spy.seen


@pytest.mark.parametrize("error", [sqlite3.OperationalError("disk I/O error"), OverflowError("int too big")])
@pytest.mark.parametrize("pruning", [False, True], ids=["commit", "commit that prunes"])
async def test_an_error_at_any_statement_rolls_the_commit_back(
    tmp_path: Path, error: BaseException, pruning: bool
) -> None:
    version = PRUNE_EVERY if pruning else 1
    statements = await statements_of_a_commit(tmp_path / "spy.db", version)
    assert statements[0] == "BEGIN"
    assert statements[-1] == "COMMIT"
    assert ("DELETE" in statements) == pruning
    for n in range(len(statements)):
        path = tmp_path / f"fail-{n}.db"
        store = SqliteStore(path)
        failing = FailingAt(store._db)
        store._db = failing  # type: ignore[assignment]
        meta, other = new_meta("s_a", version=version - 1), new_meta("s_b")
        engine = new_engine([1.0, 2.0])
        await store.create(as_record(meta, engine))
        await store.create(as_record(other, engine))
        failing.armed = (n, error)
        with pytest.raises((StoreError, type(error))):
            await store.commit(
                as_record(replace(meta, version=version), stepped(engine)),
                version - 1,
                row(1),
                record("k", 1),
            )
        failing.armed = None
        assert not failing.in_transaction, f"statement {n} ({statements[n]}) left a transaction open"
        loaded = await store.load("s_a")
        assert loaded is not None
        assert loaded.meta.version == version - 1
        np.testing.assert_array_equal(engine_of(loaded).params["w"], [1.0, 2.0])
        assert await store.history("s_a", 10) == []
        assert await store.idempotency("s_a", "k") is None
        # the other session, and another process on the same file, write at once
        assert await store.commit(as_record(replace(other, version=1), stepped(engine)), 0, row(1), None)
        neighbour = SqliteStore(path)
        neighbour._db.execute("PRAGMA busy_timeout = 0")  # "database is locked" at once if anyone holds it
        assert await neighbour.commit(as_record(replace(other, version=2), stepped(engine)), 1, row(2), None)
        await neighbour.close()
        await store.close()
