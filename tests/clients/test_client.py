"""`Client` and `AsyncClient` on the real app in-process: sessions end to end, both wires, typed errors."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import numpy as np
import optserve
import pytest
from anyio.from_thread import start_blocking_portal
from optserve import ParamInfo, StepConflict

from app.main import create_app
from app.settings import Settings
from tests.clients.conftest import BASE_URL, Connect, PortalTransport, resolve

W = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], np.float32)
B = np.array([0.5, -0.5], np.float64)
WIRES = ["safetensors", "json"]


def grads(seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal((3, 2)).astype(np.float32), "b": rng.standard_normal(2)}


@pytest.mark.parametrize("wire", WIRES)
async def test_session_lifecycle_create_step_params_history_list_delete(connect: Connect, wire: str) -> None:
    client = await connect(wire=wire)
    session = await resolve(
        client.create_session({"w": W, "b": B}, {"name": "sgd", "lr": 0.5}, metadata={"run": "a"})
    )
    assert session.info.step == 0
    assert session.info.params == {"w": ParamInfo((3, 2), "float32"), "b": ParamInfo((2,), "float64")}

    gw, gb = np.full((3, 2), 0.25, np.float32), np.array([1.0, -2.0])
    result = await resolve(session.step({"w": gw, "b": gb}, loss=0.75))

    assert (result.step, result.lr, result.skipped, result.replayed) == (1, [0.5], False, False)
    assert result.grad_norm == pytest.approx(np.sqrt(6 * 0.25**2 + 5))
    assert result.params["w"].dtype == np.float32
    assert result.params["b"].dtype == np.float64
    np.testing.assert_array_equal(result.params["w"], W - np.float32(0.5) * gw)
    np.testing.assert_array_equal(result.params["b"], B - 0.5 * gb)
    params = await resolve(session.params())
    for name in ("w", "b"):
        np.testing.assert_array_equal(params[name], result.params[name])
        assert params[name].dtype == result.params[name].dtype
    history = await resolve(session.history())
    assert [(h.step, h.lr, h.loss, h.skipped) for h in history] == [(1, [0.5], 0.75, False)]
    summaries = await resolve(client.list_sessions())
    assert [(s.id, s.step, s.metadata) for s in summaries] == [(session.id, 1, {"run": "a"})]
    assert (await resolve(session.refresh())).step == 1

    await resolve(session.delete())
    with pytest.raises(optserve.NotFound):
        await resolve(client.get_session(session.id))


@pytest.mark.parametrize("wire", WIRES)
async def test_step_with_return_params_false_answers_without_parameters(connect: Connect, wire: str) -> None:
    client = await connect(wire=wire)
    session = await resolve(client.create_session({"w": W, "b": B}, {"name": "adam", "lr": 0.1}))
    result = await resolve(session.step(grads(0), return_params=False))
    assert (result.step, result.params) == (1, {})
    assert (await resolve(session.refresh())).step == 1


@pytest.mark.parametrize("wire", WIRES)
async def test_float16_gradients_update_float32_parameters(connect: Connect, wire: str) -> None:
    client = await connect(wire=wire)
    session = await resolve(client.create_session({"w": W}, {"name": "sgd", "lr": 1.0}))
    result = await resolve(session.step({"w": np.full((3, 2), 0.5, np.float16)}))
    assert result.params["w"].dtype == np.float32
    np.testing.assert_array_equal(result.params["w"], W - 0.5)


async def test_get_session_fills_every_default(connect: Connect) -> None:
    client = await connect()
    created = await resolve(
        client.create_session({"w": W}, {"name": "adam"}, {"name": "step_lr", "step_size": 2})
    )
    info = (await resolve(client.get_session(created.id))).info
    assert info.optimizer["betas"] == [0.9, 0.999]
    assert info.scheduler == {"name": "step_lr", "step_size": 2, "gamma": 0.1}
    assert info.param_groups[0]["params"] == ["w"]
    assert (info.steps_per_epoch, info.nonfinite, info.lr) == (1, "error", [0.001])


@pytest.mark.parametrize("wire", WIRES)
async def test_restored_checkpoint_continues_exactly(connect: Connect, wire: str) -> None:
    client = await connect(wire=wire)
    spec = {"name": "adam", "lr": 0.1, "amsgrad": True}
    session = await resolve(
        client.create_session({"w": W, "b": B}, spec, {"name": "step_lr", "step_size": 2, "gamma": 0.5})
    )
    for seed in range(3):
        await resolve(session.step(grads(seed)))
    restored = await resolve(client.restore(await resolve(session.checkpoint())))
    assert restored.id != session.id
    assert (restored.info.step, restored.info.lr) == (3, [0.05])
    for seed in range(3, 6):
        a = await resolve(session.step(grads(seed)))
        b = await resolve(restored.step(grads(seed)))
        assert (a.step, a.lr) == (b.step, b.lr)
        for name in ("w", "b"):
            np.testing.assert_array_equal(a.params[name], b.params[name])


async def test_a_large_model_is_created_as_safetensors_past_the_json_limit(connect: Connect) -> None:
    client = await connect(settings={"max_json_bytes": 1 << 20})
    w = np.random.default_rng(1).standard_normal(200_000).astype(np.float32)  # ~2.4 MB as JSON
    session = await resolve(
        client.create_session({"w": w, "b": B}, {"name": "adam", "lr": 0.1}, metadata={"run": "big"})
    )
    assert session.info.metadata == {"run": "big"}
    assert session.info.optimizer["name"] == "adam"
    params = await resolve(session.params())
    np.testing.assert_array_equal(params["w"], w)
    np.testing.assert_array_equal(params["b"], B)


@pytest.mark.parametrize("wire", WIRES)
async def test_set_params_overwrites_values_and_keeps_the_step(connect: Connect, wire: str) -> None:
    client = await connect(wire=wire)
    session = await resolve(client.create_session({"w": W, "b": B}, {"name": "sgd", "lr": 0.1}))
    await resolve(session.step(grads(0)))
    info = await resolve(session.set_params({"w": np.zeros((3, 2), np.float32)}))
    assert info.step == 1
    assert session.info is info
    params = await resolve(session.params())
    np.testing.assert_array_equal(params["w"], np.zeros((3, 2), np.float32))


async def test_invalid_spec_raises_validation_error_naming_each_field(connect: Connect) -> None:
    client = await connect()
    with pytest.raises(optserve.ValidationError) as caught:
        await resolve(client.create_session({"w": W}, {"name": "adam", "lr": -1.0, "betas": [2.0, 0.1]}))
    error = caught.value
    assert error.status == 422
    assert [e.field for e in error.errors] == ["optimizer.lr", "optimizer.betas"]
    assert "Invalid learning rate: -1.0" in error.errors[0].message
    assert error.problem["type"] == "urn:optserve:problem:invalid-specification"
    assert str(error).startswith("422 Invalid specification: optimizer.lr")


async def test_unknown_gradient_name_raises_validation_error_naming_it(connect: Connect) -> None:
    client = await connect()
    session = await resolve(client.create_session({"w": W}, {"name": "sgd"}))
    with pytest.raises(optserve.ValidationError) as caught:
        await resolve(session.step({"v": W}))
    assert [e.field for e in caught.value.errors] == ["grads.v"]


async def test_wrong_expected_step_raises_step_conflict_with_current_step(connect: Connect) -> None:
    client = await connect()
    session = await resolve(client.create_session({"w": W}, {"name": "sgd"}))
    await resolve(session.step({"w": W}, expected_step=0))
    with pytest.raises(optserve.StepConflict) as caught:
        await resolve(session.step({"w": W}, expected_step=0))
    assert (caught.value.status, caught.value.current_step) == (409, 1)
    assert (await resolve(session.refresh())).step == 1


async def test_unknown_session_raises_not_found(connect: Connect) -> None:
    client = await connect()
    with pytest.raises(optserve.NotFound) as caught:
        await resolve(client.get_session("s_missing"))
    assert caught.value.title == "Session not found"


async def test_api_key_is_sent_as_bearer_and_a_wrong_one_is_unauthorized(connect: Connect) -> None:
    settings = {"api_keys": "k1"}
    assert await resolve((await connect(settings=settings, api_key="k1")).list_sessions()) == []
    for key in (None, "k2"):
        with pytest.raises(optserve.Unauthorized):
            await resolve((await connect(settings=settings, api_key=key)).list_sessions())


@pytest.mark.parametrize("wire", WIRES)
async def test_body_over_the_server_limit_raises_payload_too_large(connect: Connect, wire: str) -> None:
    client = await connect(settings={"max_body_bytes": 12_000}, wire=wire)
    session = await resolve(client.create_session({"w": np.zeros(2000)}, {"name": "sgd"}))
    with pytest.raises(optserve.PayloadTooLarge):
        await resolve(session.step({"w": np.random.default_rng(0).standard_normal(2000)}))


async def test_nonfinite_gradients_are_skipped_over_safetensors(connect: Connect) -> None:
    client = await connect()
    session = await resolve(client.create_session({"w": W}, {"name": "sgd"}, nonfinite="skip"))
    result = await resolve(session.step({"w": np.full((3, 2), np.nan, np.float32)}))
    # "skip" changes nothing, the step count included
    assert (result.step, result.skipped, result.grad_norm) == (0, True, None)
    np.testing.assert_array_equal(result.params["w"], W)


async def test_nonfinite_gradients_cannot_travel_as_json(connect: Connect) -> None:
    client = await connect(wire="json")
    session = await resolve(client.create_session({"w": W}, {"name": "sgd"}, nonfinite="skip"))
    with pytest.raises(ValueError, match="wire='safetensors'"):
        await resolve(session.step({"w": np.full((3, 2), np.inf, np.float32)}))


async def test_integer_parameters_are_refused_before_sending(connect: Connect) -> None:
    client = await connect()
    with pytest.raises(TypeError, match="parameter 'w' has dtype int64"):
        await resolve(client.create_session({"w": np.arange(3)}, {"name": "sgd"}))


async def test_catalogue_preview_and_health(connect: Connect) -> None:
    client = await connect()
    optimizers = await resolve(client.optimizers())
    assert "adam" in [o["name"] for o in optimizers]
    assert "exponential_lr" in [s["name"] for s in await resolve(client.schedulers())]
    preview = await resolve(client.preview_schedule(0.1, {"name": "step_lr", "step_size": 2}, 4))
    np.testing.assert_allclose(preview, [[0.1, 0.1, 0.01, 0.01]])
    assert await resolve(client.health()) == {"status": "ok"}


def test_wire_must_be_safetensors_or_json() -> None:
    with pytest.raises(ValueError, match="wire must be"):
        optserve.Client("http://x", wire="xml")  # type: ignore[arg-type]


def test_an_injected_http_client_is_left_open_for_its_owner() -> None:
    app = create_app(Settings(store="memory://"))
    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(app.router.lifespan_context(app)),
        httpx.Client(transport=PortalTransport(httpx.ASGITransport(app=app), portal)) as http,
    ):
        with optserve.Client(BASE_URL, http_client=http) as client:
            assert client.health() == {"status": "ok"}
        assert not http.is_closed
        with pytest.raises(ValueError, match="not both"):
            optserve.Client(BASE_URL, http_client=http, transport=httpx.HTTPTransport())


async def test_the_sdk_sends_the_step_a_gradient_comes_from_and_reads_its_staleness(connect: Connect) -> None:
    client = await connect(wire="safetensors")
    session = await resolve(
        client.create_session(
            {"w": np.zeros((2, 3))},
            {"name": "sgd", "lr": 1.0},
            aggregation={"mode": "async", "max_staleness": 1, "staleness_lr": "inverse"},
        )
    )
    assert session.info.aggregation == {"mode": "async", "max_staleness": 1, "staleness_lr": "inverse"}
    first = await resolve(session.step({"w": np.ones((2, 3))}, expected_step=0))
    late = await resolve(session.step({"w": np.ones((2, 3))}, expected_step=0))
    assert (first.staleness, late.staleness) == (0, 1)
    np.testing.assert_array_equal(late.params["w"], np.full((2, 3), -1.5))  # lr 1, then lr 1 / (1 + 1)
    with pytest.raises(StepConflict) as too_late:
        await resolve(session.step({"w": np.ones((2, 3))}, expected_step=0))
    assert too_late.value.current_step == 2


async def test_workers_contribute_to_synchronous_rounds_and_all_get_the_rounds_step() -> None:
    app = create_app(Settings(store="memory://"))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with optserve.AsyncClient(BASE_URL, transport=transport, wire="safetensors") as client:
            rounds = {"mode": "sync", "workers": 3, "reduce": "weighted_mean", "timeout": 30}
            created = await client.create_session({"w": W}, {"name": "sgd", "lr": 0.5}, aggregation=rounds)
            assert created.info.aggregation == {**rounds, "min_workers": 3}
            workers = [await client.get_session(created.id) for _ in range(3)]
            for round_ in range(2):
                results = await asyncio.gather(
                    *(
                        s.step(
                            {"w": np.full((3, 2), i + 1.0, np.float32)},
                            expected_step=round_,
                            worker=f"w{i}",
                            weight=i + 1,
                        )
                        for i, s in enumerate(workers)
                    )
                )
                assert {r.step for r in results} == {round_ + 1}
                assert {r.workers for r in results} == {("w0", "w1", "w2")}
                for r in results[1:]:
                    np.testing.assert_array_equal(r.params["w"], results[0].params["w"])
            # weighted mean of 1, 2, 3 with weights 1, 2, 3 is 14 / 6; two rounds of lr 0.5
            expected = W - np.float32(0.5) * np.float32(14 / 6) - np.float32(0.5) * np.float32(14 / 6)
            np.testing.assert_allclose(results[0].params["w"], expected, rtol=1e-6)


async def test_a_step_resent_with_its_idempotency_key_is_answered_again_and_step_names_the_round(
    connect: Connect,
) -> None:
    client = await connect()
    session = await resolve(client.create_session({"w": np.zeros(2)}, {"name": "sgd", "lr": 1.0}))
    first = await resolve(session.step({"w": np.ones(2)}, step=0, idempotency_key="restarted-7"))
    again = await resolve(session.step({"w": np.ones(2)}, step=0, idempotency_key="restarted-7"))
    assert (first.step, first.replayed, again.step, again.replayed) == (1, False, 1, True)
    np.testing.assert_array_equal(again.params["w"], first.params["w"])
    with pytest.raises(ValueError, match="disagree"):
        await resolve(session.step({"w": np.ones(2)}, step=1, expected_step=2))
