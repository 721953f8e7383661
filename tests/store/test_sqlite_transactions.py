"""SQLite: no write transaction outlives its request. An error at any statement of a commit, of any kind,
rolls the whole commit back and leaves the database free for other sessions and other processes."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.store.base import Quota, QuotaExceeded, SessionMeta, SessionRecord, StoreError, encode
from app.store.sqlite import PRUNE_EVERY, SCHEMA, SqliteStore
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
    """The statements one commit runs: the version check under the slot's lock (before anything is written
    into the slot), then BEGIN, the update, history, idempotency, pruning, COMMIT."""
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
    assert statements[:2] == ["SELECT", "BEGIN"]
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


def test_processes_sharing_the_file_race_on_one_session_and_readers_never_see_a_torn_state(
    tmp_path: Path,
) -> None:
    """Three connections to one file (as three processes): two writers race to commit each next version of
    one session, whose 2 MB tensor holds its version number everywhere, while a reader loads it without
    pause. Every load is whole (its tensor says its own version), every version is committed exactly once,
    and no slot write ever lands on the version that won."""
    path = tmp_path / "shared.db"
    numel = 250_000

    def record_at(version: int) -> SessionRecord:
        meta = SessionMeta("s_race", "t", 0.0, float(version), {}, version)
        engine = {"step": version, "groups": [{"lr": 0.1}]}
        return SessionRecord(meta, engine, {"w": np.full(numel, float(version))})

    asyncio.run(SqliteStore(path).create(record_at(0)))
    wins = [0, 0]
    loads: list[int] = []
    done = threading.Event()

    def writer(i: int) -> None:
        async def run() -> None:
            store = SqliteStore(path)
            for _ in range(40):
                current = await store.load("s_race")
                assert current is not None
                v = current.meta.version
                if await store.commit(record_at(v + 1), v, None, None):
                    wins[i] += 1
            await store.close()

        asyncio.run(run())

    def reader() -> None:
        async def run() -> None:
            store = SqliteStore(path)
            while not done.is_set():
                loaded = await store.load("s_race")
                assert loaded is not None
                assert np.all(loaded.tensors["w"] == loaded.meta.version), "a torn or mismatched state"
                loads.append(loaded.meta.version)
            await store.close()

        asyncio.run(run())

    errors: list[BaseException] = []

    def guarded(fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(writer, i)) for i in range(2)]
    watcher = threading.Thread(target=guarded, args=(reader,))
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    watcher.join()
    assert errors == []
    final = asyncio.run(SqliteStore(path).load("s_race"))
    assert final is not None
    assert final.meta.version == sum(wins)  # each version committed once
    assert 40 <= sum(wins) < 80  # at least one writer wins each race, and they did race
    assert np.all(final.tensors["w"] == final.meta.version)
    assert len(loads) > 10
    assert sorted(p.name for p in (tmp_path / "shared.db.tensors").iterdir()) == [
        "s_race.0.safetensors",
        "s_race.1.safetensors",
    ]


async def test_a_database_of_before_is_read_as_it_is_and_its_rows_move_to_slots_as_they_are_written(
    tmp_path: Path,
) -> None:
    """A database written before the slot files: no tensors_file or nbytes column, every row's tensors
    inline. It opens (the columns are added), its rows load, count for quotas, and move to a slot file at
    their next write; the others stay as they were."""
    path = tmp_path / "before.db"
    old_schema = SCHEMA  # the sessions table of before had exactly these columns
    assert "tensors_file" not in old_schema
    with sqlite3.connect(path) as db:
        db.executescript(old_schema)
        for sid, values in (("s_moving", [1.0, 2.0]), ("s_staying", [3.0, 4.0])):
            rec = as_record(new_meta(sid), new_engine(values))
            engine_json, blob = encode(rec)
            db.execute(
                "INSERT INTO sessions VALUES (?,?,?,?,?,?,?,?,?,?)",
                (sid, "t1", 1.0, 1.0, "{}", 0, rec.step, json.dumps(rec.lr), engine_json, blob),
            )
    db.close()
    store = SqliteStore(path)
    moving = await store.load("s_moving")
    assert moving is not None
    np.testing.assert_array_equal(engine_of(moving).params["w"], [1.0, 2.0])
    refused = await store.sessions_of("t1")
    assert len(refused) == 2
    quota = Quota(sessions=10, nbytes=moving.nbytes * 2)  # the inline rows count by their blobs' length
    with pytest.raises(QuotaExceeded):
        await store.create(as_record(new_meta("s_new"), new_engine([5.0, 6.0])), quota)
    stepped_engine = stepped(engine_of(moving))
    assert await store.commit(as_record(replace(moving.meta, version=1), stepped_engine), 0, row(1), None)
    again = await store.load("s_moving")
    assert again is not None
    np.testing.assert_array_equal(engine_of(again).params["w"], stepped_engine.params["w"])
    staying = await store.load("s_staying")
    assert staying is not None
    np.testing.assert_array_equal(engine_of(staying).params["w"], [3.0, 4.0])
    assert [p.name for p in (tmp_path / "before.db.tensors").iterdir()] == ["s_moving.1.safetensors"]
    await store.close()
