"""A real server on SQLite, and on a real Redis, killed with SIGKILL at random points: every answered step
survives. A small session, and one whose 8 MB state takes milliseconds to write into its slot, so that kills
land mid-write too. On Redis the steps are logged and folded into snapshots behind the answers, so kills
land in those too, and each restart rebuilds the session from its snapshot and the steps logged since."""

from __future__ import annotations

import random
import threading
from functools import partial
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
import torch
from torch.optim.lr_scheduler import StepLR

from app.store.redis import session_keys
from app.wire import safetensors
from tests.api.helpers import TorchTwin
from tests.system.redis_server import RedisServer
from tests.system.server import Server

ST = "application/vnd.safetensors"
SMALL = {"w": (64, 32), "b": (32,)}
LARGE = {"w": (512, 512), "b": (512,)}  # float64 Adam with amsgrad: 4 x 2 MB of state


def grads_for(t: int, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(t)
    return {k: rng.standard_normal(s) for k, s in shapes.items()}


def torch_params(init: dict[str, np.ndarray], steps: int) -> dict[str, np.ndarray]:
    twin = TorchTwin(init, torch.optim.Adam, partial(StepLR, step_size=7, gamma=0.8), lr=0.01, amsgrad=True)
    shapes = {k: v.shape for k, v in init.items()}
    for t in range(steps):
        twin.step(grads_for(t, shapes))
    return twin.params()


def send_step(client: httpx.Client, url: str, t: int, shapes: dict[str, tuple[int, ...]]) -> httpx.Response:
    body = safetensors.encode_bytes(grads_for(t, shapes), {"step": str(t)})
    return client.post(
        url, content=body, headers={"Content-Type": ST, "Idempotency-Key": f"step-{t}"}, timeout=10
    )


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
@pytest.mark.parametrize("shapes", [SMALL, LARGE], ids=["small", "8 MB state"])
def test_sigkill_at_random_points_loses_no_answered_step(
    tmp_path: Path, shapes: dict[str, tuple[int, ...]], kind: str, request: pytest.FixtureRequest
) -> None:
    if kind == "redis":
        redis_server: RedisServer = request.getfixturevalue("redis_server")
        redis.Redis.from_url(redis_server.url()).flushdb()
        store = redis_server.url()
    else:
        store = f"sqlite:///{tmp_path}/durable.db"
    rng = np.random.default_rng(1)
    init = {k: rng.standard_normal(s) for k, s in shapes.items()}
    chooser = random.Random(7)
    server = Server(store, log=tmp_path / "server.log").start()
    with httpx.Client(base_url=server.url) as client:
        spec = {
            "optimizer": {"name": "adam", "lr": 0.01, "amsgrad": True},
            "scheduler": {"name": "step_lr", "step_size": 7, "gamma": 0.8},
            "params": {
                k: {"shape": list(v.shape), "dtype": "float64", "data": v.ravel().tolist()}
                for k, v in init.items()
            },
        }
        sid = client.post("/v1/sessions", json=spec).json()["id"]
    url = f"/v1/sessions/{sid}/step"
    answered: dict[int, dict[str, np.ndarray]] = {}
    t = 0
    for _round in range(5):
        killer = threading.Timer(chooser.uniform(0.2, 1.2), server.kill)
        killer.start()
        with httpx.Client(base_url=server.url) as client:
            while True:
                try:
                    r = send_step(client, url, t, shapes)
                except httpx.TransportError:
                    break  # killed mid-request: this step may or may not have been committed
                assert r.status_code == 200, r.text
                tensors, meta = safetensors.decode(r.content)
                assert int(meta["step"]) == t + 1
                answered[t + 1] = {k: np.array(v) for k, v in tensors.items()}
                t += 1
        killer.join()
        server = Server(store, port=server.port, log=tmp_path / "server.log").start()
        with httpx.Client(base_url=server.url) as client:
            current = client.get(f"/v1/sessions/{sid}").json()["step"]
            last = max(answered, default=0)
            assert current >= last, f"answered step {last} lost: the session is at {current}"
            assert current <= t + 1
            if current == t + 1:
                # the in-flight step was committed before the kill; its retry must be a replay
                replay = send_step(client, url, t, shapes)
                assert replay.headers.get("idempotent-replayed") == "true"
                answered[t + 1] = {k: np.array(v) for k, v in safetensors.decode(replay.content)[0].items()}
                t += 1
            stored = safetensors.decode(
                client.get(f"/v1/sessions/{sid}/params", headers={"Accept": ST}).content
            )[0]
            if t in answered:
                for k, v in stored.items():
                    np.testing.assert_array_equal(
                        v, answered[t][k], err_msg=f"params after restart, step {t}"
                    )
    server.stop()
    assert t >= 10, "the kills came too early to test anything"
    if kind == "redis":  # the run went through snapshots (the steps are logged until one is written)
        meta = redis.Redis.from_url(store).hgetall(session_keys(sid)[0])
        assert 0 < int(meta[b"snap"]) <= int(meta[b"version"]), (t, meta[b"snap"], meta[b"version"])
    expected = torch_params(init, t)
    for k, v in answered[t].items():
        np.testing.assert_allclose(v, expected[k], rtol=1e-10, atol=1e-12)
