"""A step is all or nothing: a fault at any stage leaves the session bit for bit as it was, in the cache and
in the store, on every store, and the client's retry (same Idempotency-Key) applies the step once."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import numpy as np
import pytest

from app.api import bodies
from app.optim import schedulers
from app.optim.base import Optimizer
from app.optim.engine import Engine
from app.sessions import SessionService, rebuild
from app.store.base import SessionRecord
from app.wire import safetensors
from tests.api.helpers import ST, create, params_of, step
from tests.conftest import AppClient
from tests.system.redis_server import RedisServer

SPEC = {
    "optimizer": {"name": "adam", "lr": 0.1, "amsgrad": True},
    "scheduler": {"name": "step_lr", "step_size": 1, "gamma": 0.5},
}
INIT = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, np.float64)}
STAGES = ["parse", "prepare", "update", "scheduler", "render", "commit", "after commit"]


class Injected(RuntimeError):
    """The fault a test plants: a defect anywhere in the step."""


def grads(t: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(t)
    return {name: rng.standard_normal(value.shape).astype(value.dtype) for name, value in INIT.items()}


def _raise(*_: Any, **__: Any) -> Any:
    raise Injected("injected fault")


async def _raise_later(*_: Any, **__: Any) -> Any:
    raise Injected("injected fault")


@contextmanager
def fault(stage: str, service: SessionService, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Makes `stage` of the next step raise; undone on exit."""
    with monkeypatch.context() as patch:
        if stage == "parse":
            patch.setattr(bodies, "read_step", _raise_later)
        elif stage == "prepare":
            patch.setattr(Engine, "prepare", _raise)
        elif stage == "update":
            patch.setattr(Optimizer, "step_into", _raise)
        elif stage == "scheduler":
            patch.setattr(schedulers.StepLR, "get_lr", _raise)
        elif stage == "render":
            patch.setattr(bodies, "render_step", lambda *_: _raise_later)
        else:
            store, commit = service.store, service.store.commit

            async def failing(*args: Any) -> bool:
                if stage == "after commit":
                    assert await commit(*args)
                raise Injected("injected fault")

            patch.setattr(store, "commit", failing)
        yield


async def snapshot(client: httpx.AsyncClient, sid: str) -> tuple[Any, ...]:
    """Everything a step touches, as the cache serves it and as the store holds it."""
    service: SessionService = client.app.state.service  # type: ignore[attr-defined]
    checkpoint = await client.get(f"/v1/sessions/{sid}/checkpoint")
    history = await client.get(f"/v1/sessions/{sid}/history")
    info = await client.get(f"/v1/sessions/{sid}")
    record = await service.store.load(sid)
    assert record is not None
    return (
        checkpoint.content,
        history.json(),
        {k: v for k, v in info.json().items() if k != "updated_at"},
        stored(record),
        await service.store.idempotency(sid, "retried"),
    )


def stored(record: SessionRecord) -> tuple[Any, ...]:
    """The session the record holds, to the bit: its version, and the engine it rebuilds to (a store that
    logs steps may fold them into its state behind the answers: how it holds the session may change, what
    the session is may not)."""
    tensors, description = rebuild(record).snapshot()
    arrays = {k: (v.dtype.str, v.shape, v.tobytes()) for k, v in tensors.items()}
    return record.meta.version, description, arrays


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def client(request: pytest.FixtureRequest, make_client: AppClient) -> httpx.AsyncClient:
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        store = server.url()
    else:
        store = "memory://" if request.param == "memory" else "sqlite"
    made: httpx.AsyncClient = await make_client(store=store)
    return made


@pytest.mark.parametrize("fmt", ["json", "safetensors"])
@pytest.mark.parametrize("stage", STAGES)
async def test_a_fault_at_any_stage_changes_nothing_and_the_retry_applies_once(
    client: httpx.AsyncClient, stage: str, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    service: SessionService = client.app.state.service  # type: ignore[attr-defined]
    sid = await create(client, INIT, **SPEC)
    twin = await create(client, INIT, **SPEC)  # the same steps, never faulted
    headers = {"Accept": ST if fmt == "safetensors" else "application/json"}
    for t in range(2):
        for session in (sid, twin):
            assert (await step(client, session, grads(t), fmt, headers)).status_code == 200
    before = await snapshot(client, sid)

    keyed = {**headers, "Idempotency-Key": "retried"}
    with fault(stage, service, monkeypatch):
        failed = await step(client, sid, grads(2), fmt, keyed)
    # a store that fails is 503 (try again); a defect anywhere else is 500
    assert failed.status_code == (503 if "commit" in stage else 500), failed.text
    assert failed.headers["content-type"] == "application/problem+json"

    if stage == "after commit":  # the step did land: the retry finds its record and replays it
        after = await snapshot(client, sid)
        assert after[2]["step"] == 3
        retried = await step(client, sid, grads(2), fmt, keyed)
        assert retried.headers.get("idempotent-replayed") == "true"
    else:
        assert await snapshot(client, sid) == before
        retried = await step(client, sid, grads(2), fmt, keyed)
        assert "idempotent-replayed" not in retried.headers
    assert retried.status_code == 200, retried.text
    expected = await step(client, twin, grads(2), fmt, headers)
    for name, value in params_of(expected).items():
        np.testing.assert_array_equal(params_of(retried)[name], value)
    assert (await client.get(f"/v1/sessions/{sid}")).json()["step"] == 3
    assert [row["step"] for row in (await client.get(f"/v1/sessions/{sid}/history")).json()["steps"]] == [
        1,
        2,
        3,
    ]
    again = await step(client, sid, grads(2), fmt, keyed)
    assert again.headers.get("idempotent-replayed") == "true"
    assert (await client.get(f"/v1/sessions/{sid}")).json()["step"] == 3


FaultyPut = Callable[..., Any]


@pytest.mark.parametrize("stage", ["commit", "after commit"])
async def test_a_failed_parameter_write_changes_nothing(
    client: httpx.AsyncClient, stage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    service: SessionService = client.app.state.service  # type: ignore[attr-defined]
    sid = await create(client, INIT, **SPEC)
    assert (await step(client, sid, grads(0))).status_code == 200
    before = await snapshot(client, sid)
    body = {"params": {"w": np.ones((2, 3)).tolist()}}
    with fault(stage, service, monkeypatch):
        assert (await client.put(f"/v1/sessions/{sid}/params", json=body)).status_code == 503
    if stage == "commit":
        assert await snapshot(client, sid) == before
    now = params_of(await client.get(f"/v1/sessions/{sid}/params"))
    np.testing.assert_array_equal(now["w"], np.ones((2, 3)) if stage == "after commit" else before_w(before))


def before_w(before: tuple[Any, ...]) -> np.ndarray:
    """The parameter as the checkpoint taken before showed it."""
    tensors, _ = safetensors.decode(before[0])
    return np.asarray(tensors["params/w"])
