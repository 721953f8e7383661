"""The Redis store on a real 3-master Redis Cluster (`redis+cluster://`), through redis-py's cluster client:
two `optserve serve` replicas run sessions whose keys land on every master (each session in one slot, its
hash tag), steps that match torch, synchronous rounds whose workers are spread over both replicas, the
listing and the deletes."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from app.store.redis import session_keys
from tests.api.helpers import TorchTwin
from tests.system.redis_cluster import RedisCluster
from tests.system.server import Server

SHAPES = {"w": (4, 3), "b": (3,)}


@pytest.fixture
def replicas(redis_cluster: RedisCluster, tmp_path: Path) -> Iterator[list[Server]]:
    redis_cluster.flush()
    servers = [Server(redis_cluster.url(), log=tmp_path / f"replica-{i}.log") for i in range(2)]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda s: s.start(), servers))
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()


def initial(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s) for k, s in SHAPES.items()}


def grads(t: int, w: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 * t + w)
    return {k: rng.standard_normal(s) for k, s in SHAPES.items()}


def as_json(arrays: dict[str, np.ndarray]) -> dict[str, dict[str, object]]:
    return {
        k: {"shape": list(v.shape), "dtype": "float64", "data": v.ravel().tolist()} for k, v in arrays.items()
    }


def params_of(answer: httpx.Response) -> dict[str, np.ndarray]:
    return {k: np.array(v["data"]).reshape(SHAPES[k]) for k, v in answer.json()["params"].items()}


def test_sessions_on_every_master_step_as_torch_does_from_both_replicas(
    replicas: list[Server], redis_cluster: RedisCluster
) -> None:
    sessions: list[str] = []
    held: dict[int, int] = {}  # master's port -> sessions there
    with httpx.Client(timeout=10) as client:
        while len(held) < 3 or min(held.values()) < 2:  # ids are random: go on until every master has 2
            assert len(sessions) < 100
            i = len(sessions)
            spec = {"optimizer": {"name": "adam", "lr": 0.01}, "params": as_json(initial(i))}
            created = client.post(f"{replicas[i % 2].url}/v1/sessions", json=spec)
            assert created.status_code == 201, created.text
            sessions.append(created.json()["id"])
            (port,) = redis_cluster.owners([session_keys(sessions[-1])[0]])
            held[port] = held.get(port, 0) + 1
        twins = [TorchTwin(initial(i), torch.optim.Adam, lr=0.01) for i in range(len(sessions))]
        for t in range(5):
            for i, sid in enumerate(sessions):
                body = {"grads": {k: g.tolist() for k, g in grads(t, i).items()}, "step": t}
                answer = client.post(f"{replicas[(t + i) % 2].url}/v1/sessions/{sid}/step", json=body)
                assert answer.status_code == 200, answer.text
                twins[i].step(grads(t, i))
        for twin, sid in zip(twins, sessions, strict=True):
            got = params_of(client.get(f"{replicas[0].url}/v1/sessions/{sid}/params"))
            for k, v in twin.params().items():
                np.testing.assert_allclose(got[k], v, rtol=1e-10, atol=1e-12)
        listed = client.get(f"{replicas[1].url}/v1/sessions").json()["sessions"]
        assert sorted(s["id"] for s in listed) == sorted(sessions)
        assert {s["step"] for s in listed} == {5}
        for sid in sessions[:3]:
            assert client.delete(f"{replicas[1].url}/v1/sessions/{sid}").status_code == 204
        assert len(client.get(f"{replicas[0].url}/v1/sessions").json()["sessions"]) == len(sessions) - 3
        assert client.get(f"{replicas[0].url}/readyz").status_code == 200


def test_synchronous_rounds_across_replicas_on_the_cluster(replicas: list[Server]) -> None:
    """Four sessions (on different slots) each run rounds of 4 workers, two on each replica."""
    workers, rounds = 4, 4

    def contribute(url: str, sid: str, t: int, w: int) -> httpx.Response:
        body = {"grads": {k: g.tolist() for k, g in grads(t, w).items()}, "step": t, "worker": f"w{w}"}
        headers = {"Idempotency-Key": f"{sid}-{w}-{t}"}
        return httpx.post(f"{url}/v1/sessions/{sid}/step", json=body, headers=headers, timeout=30)

    with httpx.Client(timeout=10) as client:
        aggregation = {"mode": "sync", "workers": workers, "timeout": 30}
        spec = {"optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}, "params": as_json(initial(0))}
        sessions = [
            client.post(f"{replicas[0].url}/v1/sessions", json={**spec, "aggregation": aggregation}).json()[
                "id"
            ]
            for _ in range(4)
        ]
    twin = TorchTwin(initial(0), torch.optim.SGD, lr=0.1, momentum=0.9)
    with ThreadPoolExecutor(16) as pool:
        for t in range(rounds):
            jobs = [
                pool.submit(contribute, replicas[w % 2].url, sid, t, w)
                for sid in sessions
                for w in range(workers)
            ]
            answers = [job.result() for job in jobs]
            assert {a.status_code for a in answers} == {200}, [
                a.text for a in answers if a.status_code != 200
            ]
            assert {a.json()["step"] for a in answers} == {t + 1}
            twin.step({k: sum(grads(t, w)[k] for w in range(workers)) / workers for k in SHAPES})
    for answer in answers:
        for k, v in twin.params().items():
            np.testing.assert_allclose(params_of(answer)[k], v, rtol=1e-10, atol=1e-12)
    for sid in sessions:
        history = httpx.get(f"{replicas[1].url}/v1/sessions/{sid}/history").json()["steps"]
        assert [h["step"] for h in history] == list(range(1, rounds + 1))
