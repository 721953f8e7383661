"""Bounded staleness (`aggregation: {"mode": "async", ...}`): a gradient computed at step `step` is taken
when at most `max_staleness` steps behind (else 409 with `current_step`, nothing applied); under
`staleness_lr: "inverse"` its step uses lr / (1 + staleness), for that step only. torch is the oracle."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import pytest
import torch

from app.optim.engine import Engine
from app.wire import safetensors
from tests.api.helpers import ST, params_of
from tests.conftest import AppClient

W0 = np.linspace(-1.0, 1.0, 6).reshape(2, 3)
STALENESS = [0, 0, 1, 2, 0, 3, 1, 0, 2, 2]


def gradient(t: int) -> np.ndarray:
    return np.random.default_rng(t).standard_normal(W0.shape)


def spec(staleness_lr: str, max_staleness: int = 3) -> dict[str, Any]:
    return {
        "optimizer": {"name": "adam", "lr": 0.05, "betas": [0.8, 0.95]},
        "scheduler": {"name": "step_lr", "step_size": 3, "gamma": 0.5},
        "aggregation": {"mode": "async", "max_staleness": max_staleness, "staleness_lr": staleness_lr},
    }


@pytest.mark.parametrize("staleness_lr", ["none", "inverse"])
def test_stale_steps_match_torch_with_the_lr_divided_for_that_step_only(staleness_lr: str) -> None:
    engine = Engine.create(spec(staleness_lr), {"w": W0.copy()})
    w = torch.tensor(W0.copy(), requires_grad=True)
    opt = torch.optim.Adam([w], lr=0.05, betas=(0.8, 0.95))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    for t, behind in enumerate(STALENESS):
        computed_at = max(0, engine.step_count - behind)
        late = engine.staleness(computed_at)
        assert late == engine.step_count - computed_at
        assert late is not None
        engine, outcome = _step(engine, t, late)
        assert outcome.staleness == late
        scheduled = opt.param_groups[0]["lr"]
        if staleness_lr == "inverse":
            opt.param_groups[0]["lr"] = scheduled / (1 + late)
        w.grad = torch.tensor(gradient(t))
        opt.step()
        opt.param_groups[0]["lr"] = scheduled  # the schedule is not disturbed
        sched.step()
        np.testing.assert_allclose(engine.params["w"], w.detach().numpy(), rtol=1e-10, atol=1e-14)
        assert outcome.lr == [opt.param_groups[0]["lr"]]


def _step(engine: Engine, t: int, late: int) -> Any:
    return engine.advance(engine.prepare({"w": gradient(t)}, None, late))


def test_staleness_is_bounded_and_a_step_must_say_where_it_comes_from() -> None:
    engine = Engine.create(spec("none", max_staleness=1), {"w": W0.copy()})
    for _ in range(3):
        engine, _ = _step(engine, 0, engine.staleness(engine.step_count) or 0)
    assert [engine.staleness(s) for s in (3, 2, 1, 0, 4)] == [0, 1, None, None, None]
    with pytest.raises(ValueError, match="required"):
        engine.staleness(None)
    plain = Engine.create({"optimizer": {"name": "sgd"}}, {"w": W0.copy()})
    assert [plain.staleness(s) for s in (None, 0, 1)] == [0, 0, None]  # today's contract: k = 0


async def create(client: httpx.AsyncClient, body: dict[str, Any]) -> str:
    created = await client.post(
        "/v1/sessions",
        json={**body, "params": {"w": {"shape": [2, 3], "dtype": "float64", "data": W0.ravel().tolist()}}},
    )
    assert created.status_code == 201, created.text
    sid: str = created.json()["id"]
    return sid


async def test_over_http_stale_steps_report_their_staleness_and_too_stale_ones_change_nothing(
    make_client: AppClient,
) -> None:
    client: httpx.AsyncClient = await make_client()
    sid = await create(client, spec("inverse", max_staleness=1))
    info = (await client.get(f"/v1/sessions/{sid}")).json()
    assert info["aggregation"] == {"mode": "async", "max_staleness": 1, "staleness_lr": "inverse"}
    url = f"/v1/sessions/{sid}/step"
    grads = {"w": gradient(0).tolist()}
    first = await client.post(url, json={"grads": grads, "step": 0})
    assert (first.json()["step"], first.json()["staleness"]) == (1, 0)
    keyed = {"Idempotency-Key": "late-1"}
    late = await client.post(url, json={"grads": grads, "step": 0}, headers=keyed)
    assert late.status_code == 200
    assert (late.json()["step"], late.json()["staleness"], late.headers["optserve-staleness"]) == (2, 1, "1")
    replay = await client.post(url, json={"grads": grads, "step": 0}, headers=keyed)
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.json()["staleness"] == 1
    before = (await client.get(f"/v1/sessions/{sid}/checkpoint")).content
    too_late = await client.post(url, json={"grads": grads, "step": 0})
    assert too_late.status_code == 409
    assert too_late.json()["current_step"] == 2
    assert "max_staleness=1" in too_late.json()["detail"]
    missing = await client.post(url, json={"grads": grads})
    assert missing.status_code == 422
    assert missing.json()["errors"][0]["field"] == "step"
    assert (await client.get(f"/v1/sessions/{sid}/checkpoint")).content == before
    binary = await client.post(
        url, content=_safetensors(gradient(1), step=1), headers={"Content-Type": ST, "Accept": ST}
    )
    assert binary.status_code == 200
    assert binary.headers["optserve-staleness"] == "1"
    assert params_of(binary)["w"].shape == (2, 3)
    restored = await client.post(
        "/v1/sessions",
        content=(await client.get(f"/v1/sessions/{sid}/checkpoint")).content,
        headers={"Content-Type": ST},
    )
    assert restored.json()["aggregation"] == info["aggregation"]


def _safetensors(grad: np.ndarray, step: int) -> bytes:
    return safetensors.encode_bytes({"w": grad}, {"step": str(step)})


@pytest.mark.parametrize(
    ("aggregation", "field"),
    [
        ({"mode": "sideways"}, "aggregation"),
        ({"mode": "async"}, "aggregation.max_staleness"),
        ({"mode": "async", "max_staleness": -1}, "aggregation.max_staleness"),
        ({"mode": "async", "max_staleness": 1, "staleness_lr": "sqrt"}, "aggregation.staleness_lr"),
        ({"mode": "async", "max_staleness": 1, "extra": 1}, "aggregation.extra"),
        ({"mode": "sync"}, "aggregation.workers"),
        ({"mode": "sync", "workers": 0}, "aggregation.workers"),
        ({"mode": "sync", "workers": 2, "min_workers": 3}, "aggregation.min_workers"),
        ({"mode": "sync", "workers": 2, "timeout": 0}, "aggregation.timeout"),
        ({"mode": "sync", "workers": 2, "reduce": "median"}, "aggregation.reduce"),
    ],
)
async def test_a_bad_aggregation_is_a_422_naming_the_field(
    make_client: AppClient, aggregation: dict[str, Any], field: str
) -> None:
    client: httpx.AsyncClient = await make_client()
    answer = await client.post(
        "/v1/sessions",
        json={"optimizer": {"name": "sgd"}, "params": {"w": [1.0]}, "aggregation": aggregation},
    )
    assert answer.status_code == 422
    assert field in {e["field"] for e in answer.json()["errors"]}, answer.json()
