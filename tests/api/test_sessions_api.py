"""The session endpoints' behaviour: defaults, negotiation, errors that change nothing, retries, restore."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import pytest

from app.wire import safetensors
from tests.api.helpers import ST, create, params_of, step, tensor_json

W = np.arange(6, dtype=np.float32).reshape(2, 3) / 10
B = np.zeros(3, dtype=np.float32)
GW = np.full((2, 3), 0.5, dtype=np.float32)
GB = np.ones(3, dtype=np.float32)


async def snapshot(
    client: httpx.AsyncClient, sid: str
) -> tuple[dict[str, Any], dict[str, np.ndarray], list[Any]]:
    info = (await client.get(f"/v1/sessions/{sid}")).json()
    params = params_of(await client.get(f"/v1/sessions/{sid}/params"))
    history = (await client.get(f"/v1/sessions/{sid}/history")).json()["steps"]
    return info, params, history


async def test_create_fills_every_default_and_reports_lr_per_group(client: httpx.AsyncClient) -> None:
    sid = await create(client, {"w": W, "b": B}, optimizer={"name": "adam"}, metadata={"run": "a"})
    info = (await client.get(f"/v1/sessions/{sid}")).json()
    assert info["optimizer"] == {
        "name": "adam",
        "lr": 0.001,
        "betas": [0.9, 0.999],
        "eps": 1e-08,
        "weight_decay": 0.0,
        "amsgrad": False,
        "maximize": False,
        "decoupled_weight_decay": False,
    }
    assert info["step"] == 0
    assert info["lr"] == [0.001]
    assert info["params"] == {
        "w": {"shape": [2, 3], "dtype": "float32"},
        "b": {"shape": [3], "dtype": "float32"},
    }
    assert info["metadata"] == {"run": "a"}
    assert info["scheduler"] is None
    assert info["steps_per_epoch"] == 1
    listed = (await client.get("/v1/sessions")).json()["sessions"]
    assert [s["id"] for s in listed] == [sid]


async def test_bare_nested_lists_are_read_as_float32_params(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/sessions", json={"optimizer": {"name": "sgd", "lr": 0.1}, "params": {"w": [[1, 2]]}}
    )
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    answer = await client.post(f"/v1/sessions/{sid}/step", json={"grads": {"w": [[1.0, -1.0]]}})
    assert answer.json()["params"]["w"] == {"shape": [1, 2], "dtype": "float32", "data": [0.9, 2.1]}


async def test_parameter_without_gradient_is_left_alone(client: httpx.AsyncClient) -> None:
    sid = await create(client, {"w": W, "b": B}, optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9})
    params = params_of(await step(client, sid, {"w": GW}))
    np.testing.assert_array_equal(params["b"], B)
    np.testing.assert_allclose(params["w"], W - 0.1 * GW)


async def test_safetensors_answer_carries_step_lr_and_norm_in_metadata(client: httpx.AsyncClient) -> None:
    sid = await create(client, {"w": W, "b": B}, optimizer={"name": "sgd", "lr": 0.1})
    r = await step(client, sid, {"w": GW, "b": GB}, "safetensors", loss=0.5)
    assert r.headers["content-type"] == ST
    tensors, meta = safetensors.decode(r.content)
    assert meta["step"] == "1"
    assert meta["lr"] == "[0.1]"
    assert meta["skipped"] == "false"
    assert float(meta["grad_norm"]) == pytest.approx(np.sqrt((GW**2).sum() + (GB**2).sum()), rel=1e-6)
    assert set(tensors) == {"w", "b"}


async def test_return_params_false_leaves_params_out(client: httpx.AsyncClient) -> None:
    sid = await create(client, {"w": W}, optimizer={"name": "sgd"})
    r = await client.post(f"/v1/sessions/{sid}/step?return_params=false", json={"grads": {"w": GW.tolist()}})
    assert r.status_code == 200
    assert "params" not in r.json()
    assert r.json()["step"] == 1


async def test_params_endpoint_negotiates_format(client: httpx.AsyncClient) -> None:
    sid = await create(client, {"w": W}, optimizer={"name": "sgd"})
    r = await client.get(f"/v1/sessions/{sid}/params", headers={"Accept": ST})
    tensors, meta = safetensors.decode(r.content)
    np.testing.assert_array_equal(tensors["w"], W)
    assert meta == {"step": "0"}
    assert (await client.get(f"/v1/sessions/{sid}/params", headers={"Accept": "text/csv"})).status_code == 406


BAD_STEPS = [
    ({"grads": {"nope": [1.0]}}, 422, "grads.nope"),
    ({"grads": {"w": [1.0, 2.0]}}, 422, "grads.w"),
    ({"grads": {"w": {"shape": [2, 3], "dtype": "int8", "data": [1, 2, 3, 4, 5, 6]}}}, 422, "grads.w"),
    ({"grads": {"w": [[1, 2, 3], [4, 5]]}}, 422, "grads.w"),
    ({"grads": "w"}, 422, "grads"),
    ({"grads": {"w": GW.tolist()}, "loss": "low"}, 422, "loss"),
    ({"grads": {"w": GW.tolist()}, "extra": 1}, 422, "extra"),
    ({}, 422, "grads"),
]


@pytest.mark.parametrize(("body", "status", "field"), BAD_STEPS)
async def test_bad_step_is_a_problem_naming_the_field_and_changes_nothing(
    client: httpx.AsyncClient, body: dict[str, Any], status: int, field: str
) -> None:
    sid = await create(client, {"w": W, "b": B}, optimizer={"name": "adam"})
    await step(client, sid, {"w": GW})
    before = await snapshot(client, sid)
    r = await client.post(f"/v1/sessions/{sid}/step", json=body)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    problem = r.json()
    assert problem["status"] == status
    assert field in problem["detail"]
    after = await snapshot(client, sid)
    assert after[0] == before[0]
    assert after[2] == before[2]
    for name in before[1]:
        np.testing.assert_array_equal(after[1][name], before[1][name])


async def test_unparsable_json_is_400_and_unknown_media_type_415(client: httpx.AsyncClient) -> None:
    sid = await create(client, {"w": W}, optimizer={"name": "sgd"})
    r = await client.post(
        f"/v1/sessions/{sid}/step", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 400
    r = await client.post(f"/v1/sessions/{sid}/step", content=b"a,b", headers={"Content-Type": "text/csv"})
    assert r.status_code == 415
    assert "application/vnd.safetensors" in r.json()["detail"]


async def test_nonfinite_gradient_is_rejected_or_skipped_by_option(client: httpx.AsyncClient) -> None:
    bad = GW.copy()
    bad[0, 0] = np.nan
    strict = await create(client, {"w": W}, optimizer={"name": "sgd"})
    r = await step(client, strict, {"w": bad}, "safetensors")
    assert r.status_code == 422
    assert "grads.w" in r.json()["detail"]
    lenient = await create(client, {"w": W}, optimizer={"name": "sgd"}, nonfinite="skip")
    r = await step(client, lenient, {"w": bad}, "safetensors", headers={"Accept": "application/json"})
    assert r.status_code == 200
    assert r.json()["skipped"] is True
    assert r.json()["step"] == 0
    assert r.json()["grad_norm"] is None
    np.testing.assert_array_equal(params_of(r)["w"], W)


async def test_invalid_spec_lists_every_bad_field(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/sessions",
        json={
            "optimizer": {"name": "adam", "lr": -1, "betas": [0.9, 1.5]},
            "params": {"w": [1.0]},
            "steps_per_epoch": 0,
        },
    )
    assert r.status_code == 422
    fields = {e["field"] for e in r.json()["errors"]}
    assert {"optimizer.lr", "optimizer.betas"} <= fields
    r = await client.post("/v1/sessions", json={"optimizer": {"name": "adamm"}, "params": {"w": [1.0]}})
    assert r.status_code == 422
    assert "adam" in r.json()["detail"]


async def test_expected_step_mismatch_is_409_with_current_step(client: httpx.AsyncClient) -> None:
    sid = await create(client, {"w": W}, optimizer={"name": "sgd"})
    assert (await step(client, sid, {"w": GW}, step=0)).status_code == 200
    r = await step(client, sid, {"w": GW}, step=0)
    assert r.status_code == 409
    assert r.json()["current_step"] == 1
    assert (await step(client, sid, {"w": GW}, "safetensors", step=1)).status_code == 200


async def test_idempotency_key_replays_without_applying(client: httpx.AsyncClient) -> None:
    sid = await create(client, {"w": W}, optimizer={"name": "sgd", "lr": 0.1})
    first = await step(client, sid, {"w": GW}, headers={"Idempotency-Key": "k1"})
    again = await step(client, sid, {"w": GW}, headers={"Idempotency-Key": "k1"})
    assert again.status_code == 200
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    assert (await client.get(f"/v1/sessions/{sid}")).json()["step"] == 1
    other = await step(client, sid, {"w": GB[:1].repeat(6).reshape(2, 3)}, headers={"Idempotency-Key": "k1"})
    assert other.status_code == 422
    assert (await client.get(f"/v1/sessions/{sid}")).json()["step"] == 1


async def test_checkpoint_restores_a_session_that_continues_bit_exactly(client: httpx.AsyncClient) -> None:
    spec = {
        "optimizer": {"name": "adam", "lr": 0.01, "amsgrad": True},
        "scheduler": {"name": "step_lr", "step_size": 3},
    }
    sid = await create(client, {"w": W, "b": B}, **spec)
    for t in range(5):
        await step(client, sid, {"w": GW * (t + 1), "b": GB}, loss=float(t))
    blob = (await client.get(f"/v1/sessions/{sid}/checkpoint")).content
    restored = await client.post("/v1/sessions", content=blob, headers={"Content-Type": ST})
    assert restored.status_code == 201, restored.text
    rid = restored.json()["id"]
    assert restored.json()["step"] == 5
    for t in range(5, 12):
        a = await step(client, sid, {"w": GW * (t + 1), "b": GB})
        b = await step(client, rid, {"w": GW * (t + 1), "b": GB})
        assert a.json()["lr"] == b.json()["lr"]
        for name, value in params_of(a).items():
            np.testing.assert_array_equal(value, params_of(b)[name])


async def test_put_params_keeps_state_and_step(client: httpx.AsyncClient) -> None:
    sid = await create(client, {"w": W}, optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9})
    await step(client, sid, {"w": GW})
    r = await client.put(f"/v1/sessions/{sid}/params", json={"params": {"w": np.zeros((2, 3)).tolist()}})
    assert r.status_code == 200, r.text
    assert r.json()["step"] == 1
    params = params_of(await step(client, sid, {"w": GW}))
    np.testing.assert_allclose(params["w"], -0.1 * (0.9 * GW + GW), rtol=1e-6)
    bad = await client.put(f"/v1/sessions/{sid}/params", json={"params": {"w": [1.0]}})
    assert bad.status_code == 422


async def test_history_and_delete(client: httpx.AsyncClient) -> None:
    sid = await create(client, {"w": W}, optimizer={"name": "sgd"})
    for t in range(3):
        await step(client, sid, {"w": GW}, loss=float(t))
    steps = (await client.get(f"/v1/sessions/{sid}/history?limit=2")).json()["steps"]
    assert [s["step"] for s in steps] == [2, 3]
    assert [s["loss"] for s in steps] == [1.0, 2.0]
    assert (await client.delete(f"/v1/sessions/{sid}")).status_code == 204
    for method, path in [("GET", ""), ("GET", "/params"), ("POST", "/step"), ("DELETE", "")]:
        r = await client.request(method, f"/v1/sessions/{sid}{path}", json={"grads": {}})
        assert r.status_code == 404
        assert r.headers["content-type"] == "application/problem+json"


async def test_schedule_preview_gives_lr_before_each_step(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/schedules/preview",
        json={"lr": [0.1, 1.0], "scheduler": {"name": "step_lr", "step_size": 2, "gamma": 0.5}, "steps": 5},
    )
    assert r.status_code == 200, r.text
    assert r.json()["lr"] == [[0.1, 0.1, 0.05, 0.05, 0.025], [1.0, 1.0, 0.5, 0.5, 0.25]]


async def test_catalogue_lists_every_optimizer_and_scheduler(client: httpx.AsyncClient) -> None:
    optimizers = {o["name"]: o for o in (await client.get("/v1/optimizers")).json()["optimizers"]}
    assert set(optimizers) >= {"sgd", "adam", "adamw", "nadam", "radam", "adamax", "rmsprop", "adagrad"}
    lr = next(h for h in optimizers["sgd"]["hyperparameters"] if h["name"] == "lr")
    assert lr == {"name": "lr", "type": "number", "default": 0.001, "description": "learning rate"}
    schedulers = {s["name"] for s in (await client.get("/v1/schedulers")).json()["schedulers"]}
    assert {"step_lr", "one_cycle_lr", "inverse_time_lr", "piecewise_constant_lr"} <= schedulers


async def test_health_ready_and_metrics(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).status_code == 200
    sid = await create(client, {"w": W}, optimizer={"name": "sgd"})
    await step(client, sid, {"w": GW})
    text = (await client.get("/metrics")).text
    assert 'optserve_steps_total{skipped="false"} 1.0' in text
    assert 'route="/v1/sessions/{session_id}/step"' in text
    assert "optserve_request_bytes_total" in text


async def test_body_over_the_limit_is_413(make_client: Any) -> None:
    client = await make_client(max_body_bytes=1000)
    r = await client.post("/v1/sessions", json={"optimizer": {"name": "sgd"}, "params": {"w": [0.0] * 1000}})
    assert r.status_code == 413
    assert r.headers["content-type"] == "application/problem+json"


async def test_tensor_object_form_checks_data_length(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/sessions",
        json={
            "optimizer": {"name": "sgd"},
            "params": {"w": {"shape": [2, 2], "dtype": "float32", "data": [1.0]}},
        },
    )
    assert r.status_code == 422
    assert "params.w" in r.json()["detail"]
    ok = await client.post(
        "/v1/sessions", json={"optimizer": {"name": "sgd"}, "params": {"w": tensor_json(W)}}
    )
    assert ok.status_code == 201


async def test_float16_gradients_step_a_float32_session_as_their_float32_values(
    client: httpx.AsyncClient,
) -> None:
    half = (GW * 3.3).astype(np.float16)
    a = await create(client, {"w": W}, optimizer={"name": "adam", "lr": 0.1})
    b = await create(client, {"w": W}, optimizer={"name": "adam", "lr": 0.1})
    from_half = params_of(await step(client, a, {"w": half}, "safetensors"))
    from_single = params_of(await step(client, b, {"w": half.astype(np.float32)}, "safetensors"))
    assert from_half["w"].dtype == np.float32
    np.testing.assert_array_equal(from_half["w"], from_single["w"])
