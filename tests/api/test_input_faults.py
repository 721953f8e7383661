"""Inputs that once broke a step half-way or the database: each is now a 4xx that names the field and
changes nothing, and whatever the service accepted stays loadable, steppable and deletable."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import httpx
import numpy as np
import pytest
import redis

from app.optim.engine import MAX_STEP
from app.optim.schedulers import MAX_DEPTH
from app.store.redis import session_keys
from app.wire import safetensors
from tests.api.helpers import ST, create, params_of, step
from tests.conftest import AppClient
from tests.system.redis_server import RedisServer

SGD = {"optimizer": {"name": "sgd", "lr": 0.1}}
W = {"w": np.ones(3, np.float32)}


def nested(depth: int) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": "exponential_lr", "gamma": 0.9}
    for _ in range(depth - 1):
        spec = {"name": "sequential_lr", "schedulers": [spec], "milestones": []}
    return spec


async def state_of(client: httpx.AsyncClient, sid: str) -> tuple[bytes, Any]:
    checkpoint = await client.get(f"/v1/sessions/{sid}/checkpoint")
    history = await client.get(f"/v1/sessions/{sid}/history")
    return checkpoint.content, history.json()


def assert_problem(answer: httpx.Response, status: int, field: str) -> None:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    assert field in answer.json()["detail"], answer.json()


# (scheduler, good steps before the refusal, the field named): the scheduler's arithmetic fails at the
# next advance, or sets an lr that makes the step after it leave the finite numbers
FAILING_SCHEDULES = {
    "multi_step_lr overflows": (
        {"name": "multi_step_lr", "gamma": 10.0, "milestones": [1] * 400},
        0,
        "scheduler",
    ),
    "one_cycle_lr past its end": ({"name": "one_cycle_lr", "max_lr": 0.1, "total_steps": 3}, 3, "scheduler"),
    "cyclic_lr exp_range to 4.5e295": (
        {"name": "cyclic_lr", "base_lr": 0.01, "max_lr": 0.1, "mode": "exp_range", "gamma": 1e300},
        1,
        "params.w",
    ),
    "sequential_lr into polynomial_lr of 0 iterations": (
        {
            "name": "sequential_lr",
            "schedulers": [{"name": "constant_lr"}, {"name": "polynomial_lr", "total_iters": 0}],
            "milestones": [1],
        },
        0,
        "scheduler",
    ),
    "polynomial_lr with power -1": (
        {"name": "polynomial_lr", "power": -1.0, "total_iters": 2},
        1,
        "scheduler",
    ),
}


@pytest.mark.parametrize("case", FAILING_SCHEDULES, ids=str)
async def test_a_schedule_that_cannot_advance_is_a_422_that_changes_nothing(
    client: httpx.AsyncClient, case: str
) -> None:
    scheduler, good, field = FAILING_SCHEDULES[case]
    sid = await create(client, W, **SGD, scheduler=scheduler)
    for _ in range(good):
        assert (await step(client, sid, {"w": np.ones(3)})).status_code == 200
    before = await state_of(client, sid)
    for _ in range(2):  # and again: a refused step is refused the same way every time
        answer = await step(client, sid, {"w": np.ones(3)}, headers={"Idempotency-Key": "k"})
        assert_problem(answer, 422, field)
        assert "nothing was applied" in answer.json()["detail"]
        assert await state_of(client, sid) == before


async def test_one_cycle_lr_says_where_its_schedule_ends(client: httpx.AsyncClient) -> None:
    sid = await create(client, W, **SGD, scheduler={"name": "one_cycle_lr", "max_lr": 0.1, "total_steps": 2})
    for _ in range(2):
        await step(client, sid, {"w": np.ones(3)})
    answer = await step(client, sid, {"w": np.ones(3)})
    assert "total steps is 2" in answer.json()["detail"]


@pytest.mark.parametrize("fmt", ["json", "safetensors"])
async def test_a_step_to_infinity_is_refused_skipped_or_applied_as_the_session_says(
    client: httpx.AsyncClient, fmt: str
) -> None:
    spec = {"optimizer": {"name": "sgd", "lr": 1e30}}
    headers = {"Accept": ST} if fmt == "safetensors" else None
    refusing = await create(client, W, **spec)
    before = await state_of(client, refusing)
    assert_problem(await step(client, refusing, {"w": np.full(3, 1e30)}, fmt, headers), 422, "params.w")
    assert await state_of(client, refusing) == before

    skipping = await create(client, W, **spec, nonfinite="skip")
    answer = await step(client, skipping, {"w": np.full(3, 1e30)}, fmt, headers)
    assert answer.status_code == 200
    np.testing.assert_array_equal(params_of(answer)["w"], W["w"])
    assert (await client.get(f"/v1/sessions/{skipping}")).json()["step"] == 0

    allowing = await create(client, W, **spec, nonfinite="allow")
    answer = await step(client, allowing, {"w": np.full(3, 1e30)}, fmt, headers)
    assert answer.status_code == 200
    assert not np.isfinite(params_of(answer)["w"]).any()  # torch's own -inf (JSON: null)
    assert (await client.get(f"/v1/sessions/{allowing}")).json()["step"] == 1


@pytest.mark.parametrize("fmt", ["json", "safetensors"])
@pytest.mark.parametrize("weight", [0.0, -2.225073858507e-311, -1.0])
async def test_a_weight_is_a_number_above_zero_whatever_the_session(
    client: httpx.AsyncClient, fmt: str, weight: float
) -> None:
    """Found by schemathesis: a step with a negative (subnormal) weight and no worker was answered 200."""
    sid = await create(client, W, **SGD)
    before = await state_of(client, sid)
    answer = await step(client, sid, {"w": np.ones(3)}, fmt, weight=weight)
    assert_problem(answer, 422, "weight")
    assert await state_of(client, sid) == before


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({**SGD, "params": {"__metadata__": [1.0]}}, "__metadata__"),
        ({**SGD, "params": {"x" * 257: [1.0]}}, "256"),
        ({**SGD, "params": {"": [1.0]}}, "empty"),
        ({**SGD, "scheduler": nested(MAX_DEPTH + 1)}, "nest at most"),
        ({**SGD, "scheduler": {"name": "cosine_annealing_lr", "T_max": 1e300}}, "scheduler.T_max"),
        ({**SGD, "scheduler": {"name": "multi_step_lr", "milestones": list(range(10_001))}}, "at most 10000"),
        ({**SGD, "steps_per_epoch": 2**60}, "steps_per_epoch"),
    ],
    ids=[
        "reserved name",
        "long name",
        "empty name",
        "deep nesting",
        "huge T_max",
        "many milestones",
        "epoch",
    ],
)
async def test_out_of_bounds_specs_are_refused_and_store_nothing(
    client: httpx.AsyncClient, spec: dict[str, Any], field: str
) -> None:
    body = {"params": {"w": [1.0]}, **spec}
    assert_problem(await client.post("/v1/sessions", json=body), 422, field)
    preview = await client.post(
        "/v1/schedules/preview", json={"lr": 0.1, "scheduler": spec.get("scheduler", {}), "steps": 3}
    )
    if "scheduler" in spec:
        assert_problem(preview, 422, field)
    assert (await client.get("/v1/sessions")).json()["sessions"] == []


async def test_a_restored_step_count_is_bounded(client: httpx.AsyncClient) -> None:
    sid = await create(client, W, **SGD)
    checkpoint = (await client.get(f"/v1/sessions/{sid}/checkpoint")).content
    tensors, metadata = safetensors.decode(checkpoint)
    saved = json.loads(metadata["optserve.checkpoint"])
    for step_count in (2**63 - 1, MAX_STEP + 1, -1):
        saved["engine"]["step"] = step_count
        forged = safetensors.encode_bytes(tensors, {**metadata, "optserve.checkpoint": json.dumps(saved)})
        answer = await client.post("/v1/sessions", content=forged, headers={"Content-Type": ST})
        assert_problem(answer, 422, "checkpoint.step")
    saved["engine"]["step"] = MAX_STEP
    forged = safetensors.encode_bytes(tensors, {**metadata, "optserve.checkpoint": json.dumps(saved)})
    last = (await client.post("/v1/sessions", content=forged, headers={"Content-Type": ST})).json()["id"]
    assert_problem(await step(client, last, {"w": np.ones(3)}), 422, "step")
    assert (await client.get(f"/v1/sessions/{last}")).json()["step"] == MAX_STEP


EDGE_SPECS = {
    "deepest nesting": {**SGD, "scheduler": nested(MAX_DEPTH)},
    "longest name": {**SGD, "param_groups": None},
    "many milestones": {**SGD, "scheduler": {"name": "multi_step_lr", "milestones": list(range(1, 10_001))}},
    "one_cycle at its end": {**SGD, "scheduler": {"name": "one_cycle_lr", "max_lr": 0.1, "total_steps": 1}},
}


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_everything_accepted_stays_usable_after_a_restart(
    make_client: AppClient, tmp_path: Any, kind: str, request: pytest.FixtureRequest
) -> None:
    """Sessions at every edge the spec allows are loaded, stepped (or refused with a 4xx), checkpointed,
    restored and deleted by a fresh server on the same durable store."""
    if kind == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        store = server.url()
        flushed = redis.Redis.from_url(store)
        flushed.flushdb()
        flushed.close()
    else:
        store = f"sqlite:///{tmp_path}/edges.db"
    first = await make_client(store=store)
    made = {}
    for label, spec in EDGE_SPECS.items():
        params = {"x" * 256: [1.0, 2.0]} if label == "longest name" else {"w": [1.0, 2.0]}
        answer = await first.post(
            "/v1/sessions", json={"params": params, **{k: v for k, v in spec.items() if v is not None}}
        )
        assert answer.status_code == 201, answer.text
        made[label] = (answer.json()["id"], next(iter(params)))
    restarted = await make_client(store=store)
    for label, (sid, name) in made.items():
        assert (await restarted.get(f"/v1/sessions/{sid}")).status_code == 200, label
        for _ in range(2):
            stepped = await step(restarted, sid, {name: np.ones(2)})
            assert stepped.status_code in (200, 422), (label, stepped.text)
        checkpoint = await restarted.get(f"/v1/sessions/{sid}/checkpoint")
        assert checkpoint.status_code == 200, label
        params = await restarted.get(f"/v1/sessions/{sid}/params", headers={"Accept": ST})
        assert params.status_code == 200, label
        restored = await restarted.post(
            "/v1/sessions", content=checkpoint.content, headers={"Content-Type": ST}
        )
        assert restored.status_code == 201, (label, restored.text)
        for gone in (sid, restored.json()["id"]):
            assert (await restarted.delete(f"/v1/sessions/{gone}")).status_code == 204, label
    assert (await restarted.get("/v1/sessions")).json()["sessions"] == []


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_a_stored_session_that_cannot_be_read_is_named_and_can_be_deleted(
    make_client: AppClient, tmp_path: Any, kind: str, request: pytest.FixtureRequest
) -> None:
    """One session's stored tensors are damaged, another's description comes from a future version."""
    newer = json.dumps({"format": 99})
    if kind == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        store = server.url()
        db = redis.Redis.from_url(store)
        db.flushdb()
        first = await make_client(store=store)
        broken, future, fine = [await create(first, W, **SGD) for _ in range(3)]
        db.set(session_keys(broken)[1], b"\x00garbage")
        db.hset(session_keys(future)[0], "engine", newer)
        db.close()
    else:
        store = f"sqlite:///{tmp_path}/corrupt.db"
        first = await make_client(store=store)
        broken, future, fine = [await create(first, W, **SGD) for _ in range(3)]
        with sqlite3.connect(tmp_path / "corrupt.db") as sql:
            (name,) = sql.execute("SELECT tensors_file FROM sessions WHERE id = ?", (broken,)).fetchone()
            (tmp_path / "corrupt.db.tensors" / name).write_bytes(b"\x00garbage")  # its tensors' file
            sql.execute("UPDATE sessions SET engine = ? WHERE id = ?", (newer, future))
        sql.close()
    restarted = await make_client(store=store)
    for sid in (broken, future):
        for answer in (
            await restarted.get(f"/v1/sessions/{sid}"),
            await step(restarted, sid, {"w": np.ones(3)}),
            await restarted.get(f"/v1/sessions/{sid}/checkpoint"),
        ):
            assert_problem(answer, 422, sid)
            assert answer.json()["session_id"] == sid
            assert "DELETE" in answer.json()["detail"]
        assert (await restarted.delete(f"/v1/sessions/{sid}")).status_code == 204
        assert (await restarted.get(f"/v1/sessions/{sid}")).status_code == 404
    assert (await step(restarted, fine, {"w": np.ones(3)})).status_code == 200


async def test_a_session_past_the_byte_limit_is_refused_before_its_state_exists(
    make_client: AppClient,
) -> None:
    client = await make_client(max_session_bytes=10_000)
    body = {"optimizer": {"name": "adam"}, "params": {"w": [0.0] * 1000}}  # 4 kB of float32, 8 kB of state
    answer = await client.post("/v1/sessions", json=body)
    assert_problem(answer, 422, "OPTSERVE_MAX_SESSION_BYTES=10000")
    assert "12008 bytes" in answer.json()["detail"]
    body["optimizer"] = {"name": "sgd"}  # no state beside the 1-element step counter
    assert (await client.post("/v1/sessions", json=body)).status_code == 201


async def test_a_preview_is_bounded_in_steps_times_groups(client: httpx.AsyncClient) -> None:
    spec = {"name": "step_lr", "step_size": 10}
    answer = await client.post(
        "/v1/schedules/preview", json={"lr": [0.1] * 2, "scheduler": spec, "steps": 50_001}
    )
    assert_problem(answer, 422, "at most 100000")
    answer = await client.post(
        "/v1/schedules/preview", json={"lr": [0.1] * 2, "scheduler": spec, "steps": 50_000}
    )
    assert answer.status_code == 200
    assert len(answer.json()["lr"][1]) == 50_000


async def test_a_preview_of_millions_of_numbers_is_refused_before_it_is_parsed(
    client: httpx.AsyncClient,
) -> None:
    spec = {"name": "reduce_lr_on_plateau"}
    losses = [0.5] * 100_000  # the most a preview takes
    answer = await client.post(
        "/v1/schedules/preview", json={"lr": 0.1, "scheduler": spec, "steps": 3, "losses": losses}
    )
    assert answer.status_code == 200, answer.text
    body = (
        b'{"lr": [' + b"0," * 2_000_000 + b'0], "scheduler": {"name": "step_lr", "step_size": 1}, "steps": 1}'
    )
    answer = await client.post(
        "/v1/schedules/preview", content=body, headers={"Content-Type": "application/json"}
    )
    assert_problem(answer, 413, "at most 100,000 losses")


async def test_each_key_has_its_quota_of_sessions(make_client: AppClient) -> None:
    client = await make_client(api_keys="alice,bob", max_sessions_per_key=2)
    body = {"optimizer": {"name": "sgd"}, "params": {"w": [0.0]}}
    alice, bob = ({"Authorization": f"Bearer {key}"} for key in ("alice", "bob"))
    for _ in range(2):
        assert (await client.post("/v1/sessions", json=body, headers=alice)).status_code == 201
    refused = await client.post("/v1/sessions", json=body, headers=alice)
    assert_problem(refused, 429, "OPTSERVE_MAX_SESSIONS_PER_KEY=2")
    assert "retry-after" not in refused.headers  # waiting does not lift a quota
    assert (await client.post("/v1/sessions", json=body, headers=bob)).status_code == 201
    listed = (await client.get("/v1/sessions", headers=alice)).json()["sessions"]
    assert len(listed) == 2
    await client.delete(f"/v1/sessions/{listed[0]['id']}", headers=alice)
    assert (await client.post("/v1/sessions", json=body, headers=alice)).status_code == 201


async def test_json_bodies_have_a_limit_of_their_own(make_client: AppClient) -> None:
    """Parsing JSON holds the interpreter for the whole document: past OPTSERVE_MAX_JSON_BYTES, 413 with
    the advice to send safetensors, which has no such cost and only the general limit."""
    client = await make_client(max_json_bytes=2_000)
    values = np.zeros(1_000, np.float32)
    answer = await client.post(
        "/v1/sessions", json={"optimizer": {"name": "sgd"}, "params": {"w": values.tolist()}}
    )
    assert_problem(answer, 413, "OPTSERVE_MAX_JSON_BYTES=2000")
    assert "safetensors" in answer.json()["detail"]
    # the same 1,000 values as a safetensors restore: only the general limit applies
    sid = await create(client, {"w": np.zeros(1, np.float32)}, optimizer={"name": "sgd"})
    tensors, metadata = safetensors.decode((await client.get(f"/v1/sessions/{sid}/checkpoint")).content)
    grown = {k: np.zeros(1_000, v.dtype) if v.shape == (1,) else np.asarray(v) for k, v in tensors.items()}
    body = safetensors.encode_bytes(grown, metadata)
    assert len(body) > 2_000
    restored = await client.post("/v1/sessions", content=body, headers={"Content-Type": ST})
    assert restored.status_code == 201, restored.text
