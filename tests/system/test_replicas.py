"""Real `optserve serve` replicas sharing one real Redis: torch's numbers, exactly-once steps, crashes.

Two server processes on `redis://127.0.0.1:<port>/0` (redis-server with AOF, `appendfsync always`) take
turns on one run, lose a replica to `kill -9`, take 180 concurrent steps from 6 threads, and live
through a SIGKILL of Redis itself. None of it may lose an answered step or apply one twice.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR

from app.wire import safetensors
from tests.api.helpers import TorchTwin
from tests.system.redis_server import RedisServer
from tests.system.server import Server

ST = "application/vnd.safetensors"
SHAPES = {"w": (16, 8), "b": (8,)}
OPTIMIZER = {"name": "adam", "lr": 0.01, "weight_decay": 0.01, "amsgrad": True}
SCHEDULER = {"name": "cosine_annealing_lr", "T_max": 25, "eta_min": 0.001}


class Cluster:
    """One redis-server and two replicas on it; a killed process is started again before each test."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.redis = RedisServer(tmp / "redis")
        self.replicas: list[Server] = []

    def start(self) -> None:
        self.redis.start()
        self.replicas = [Server(self.redis.url(), log=self.tmp / f"replica-{i}.log") for i in range(2)]
        self.ensure()

    def ensure(self) -> None:
        if not self.redis.running():
            self.redis.start()
        dead = [r for r in self.replicas if r.proc is None or r.proc.poll() is not None]
        with ThreadPoolExecutor(2) as pool:  # start concurrently: each takes seconds to import
            list(pool.map(lambda r: r.start(), dead))

    def stop(self) -> None:
        for replica in self.replicas:
            replica.stop()
        self.redis.kill()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("replicas"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture
def replicas(cluster: Cluster) -> list[Server]:
    cluster.ensure()
    return cluster.replicas


def grads_for(t: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 + t)
    return {k: rng.standard_normal(s) for k, s in SHAPES.items()}


def initial() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {k: rng.standard_normal(s) for k, s in SHAPES.items()}


def torch_params(steps: int) -> dict[str, np.ndarray]:
    schedule = partial(CosineAnnealingLR, T_max=25, eta_min=0.001)
    twin = TorchTwin(initial(), torch.optim.Adam, schedule, lr=0.01, weight_decay=0.01, amsgrad=True)
    for t in range(steps):
        twin.step(grads_for(t))
    return twin.params()


def create_adam_session(url: str) -> str:
    params = {
        k: {"shape": list(v.shape), "dtype": "float64", "data": v.ravel().tolist()}
        for k, v in initial().items()
    }
    spec = {"optimizer": OPTIMIZER, "scheduler": SCHEDULER, "params": params}
    r = httpx.post(url + "/v1/sessions", json=spec, timeout=10)
    assert r.status_code == 201, r.text
    sid: str = r.json()["id"]
    return sid


def send_step(client: httpx.Client, url: str, sid: str, t: int) -> httpx.Response:
    """Step t+1 (expected step t) as safetensors, keyed so that a retry anywhere is a replay."""
    body = safetensors.encode_bytes(grads_for(t), {"step": str(t), "loss": "0.5"})
    headers = {"Content-Type": ST, "Accept": ST, "Idempotency-Key": f"{sid}-{t}"}
    return client.post(f"{url}/v1/sessions/{sid}/step", content=body, headers=headers, timeout=10)


def params_of(response: httpx.Response) -> dict[str, np.ndarray]:
    tensors, _ = safetensors.decode(response.content)
    return {k: np.array(v) for k, v in tensors.items()}


def history_steps(url: str, sid: str) -> list[int]:
    r = httpx.get(f"{url}/v1/sessions/{sid}/history", params={"limit": 10_000}, timeout=10)
    assert r.status_code == 200, r.text
    return [h["step"] for h in r.json()["steps"]]


def test_two_replicas_alternating_steps_match_torch(replicas: list[Server]) -> None:
    steps = 60
    sid = create_adam_session(replicas[0].url)
    with httpx.Client() as client:
        for t in range(steps):
            r = send_step(client, replicas[t % 2].url, sid, t)
            assert r.status_code == 200, r.text
            assert safetensors.decode(r.content)[1]["step"] == str(t + 1)
            assert "idempotent-replayed" not in r.headers
        last = params_of(r)
    expected = torch_params(steps)
    for k, v in last.items():
        np.testing.assert_allclose(v, expected[k], rtol=1e-10, atol=1e-12)
    for replica in replicas:  # both replicas see the same, latest state
        got = params_of(httpx.get(f"{replica.url}/v1/sessions/{sid}/params", headers={"Accept": ST}))
        for k, v in got.items():
            np.testing.assert_array_equal(v, last[k])
    assert history_steps(replicas[1].url, sid) == list(range(1, steps + 1))


def test_kill_9_of_a_replica_mid_run_loses_nothing(cluster: Cluster, replicas: list[Server]) -> None:
    a, b = replicas
    sid = create_adam_session(a.url)
    answered: dict[int, dict[str, np.ndarray]] = {}
    killer = threading.Timer(random.Random(5).uniform(0.3, 0.8), a.kill)
    t, retried_on_b = 0, False
    killer.start()
    with httpx.Client() as client:
        deadline = time.monotonic() + 20
        while not retried_on_b and time.monotonic() < deadline:
            target = a if t % 2 == 0 else b
            try:
                r = send_step(client, target.url, sid, t)
            except httpx.TransportError:
                assert target is a
                r = send_step(client, b.url, sid, t)  # the in-flight step, same key, other replica
                retried_on_b = True
            assert r.status_code == 200, r.text
            answered[t + 1] = params_of(r)
            t += 1
        killer.join()
        assert retried_on_b, "the replica was never killed mid-run"
        for _ in range(10):  # b carries on alone
            r = send_step(client, b.url, sid, t)
            assert r.status_code == 200, r.text
            answered[t + 1] = params_of(r)
            t += 1
    # every answered step is there, in order, once; a replacement replica continues the same run
    assert history_steps(b.url, sid) == list(range(1, t + 1))
    cluster.ensure()
    with httpx.Client() as client:
        for _ in range(4):
            r = send_step(client, replicas[t % 2].url, sid, t)
            assert r.status_code == 200, r.text
            answered[t + 1] = params_of(r)
            t += 1
    expected = torch_params(t)
    for k, v in answered[t].items():
        np.testing.assert_allclose(v, expected[k], rtol=1e-10, atol=1e-12)
    assert history_steps(a.url, sid) == list(range(1, t + 1))


def test_a_replica_killed_mid_round_loses_nothing_its_workers_resend_to_the_other(
    cluster: Cluster, replicas: list[Server]
) -> None:
    """A synchronous round of 4 workers across both replicas: w0 and w1 wait on A when A is killed -9; they
    resend the same requests (same Idempotency-Key and body) to B, w2 and w3 contribute there, and all four
    get the round's one step, torch's step on the mean of the four gradients. Then the rounds go on with A
    back, the workers spread over both."""
    a, b = replicas
    spec = {
        "optimizer": OPTIMIZER,
        "params": {
            k: {"shape": list(v.shape), "dtype": "float64", "data": v.ravel().tolist()}
            for k, v in initial().items()
        },
        "aggregation": {"mode": "sync", "workers": 4, "timeout": 60},
    }
    created = httpx.post(a.url + "/v1/sessions", json=spec, timeout=10)
    assert created.status_code == 201, created.text
    sid = created.json()["id"]

    def grads(t: int, w: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(100 * t + w)
        return {k: rng.standard_normal(s) for k, s in SHAPES.items()}

    def contribute(url: str, t: int, w: int) -> httpx.Response:
        body = {"grads": {k: g.tolist() for k, g in grads(t, w).items()}, "step": t, "worker": f"w{w}"}
        headers = {"Idempotency-Key": f"{sid}-w{w}-{t}"}
        return httpx.post(f"{url}/v1/sessions/{sid}/step", json=body, headers=headers, timeout=30)

    def contributions_held() -> int:
        held = redis.Redis.from_url(cluster.redis.url()).hget(f"optserve:{{{sid}}}:round", "n")
        return int(held or 0)

    with ThreadPoolExecutor(4) as pool:
        on_a = [pool.submit(contribute, a.url, 0, w) for w in (0, 1)]
        deadline = time.monotonic() + 10
        while contributions_held() < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert contributions_held() == 2
        a.kill()
        for lost in on_a:
            with pytest.raises(httpx.TransportError):
                lost.result()
        answers = list(pool.map(lambda w: contribute(b.url, 0, w), range(4)))  # w0, w1 resend; w2, w3 new
    assert [r.status_code for r in answers] == [200] * 4, [r.text for r in answers]
    assert all(r.json() == answers[0].json() for r in answers)
    assert answers[0].json()["workers"] == ["w0", "w1", "w2", "w3"]
    assert [r.headers.get("idempotent-replayed") for r in answers] == ["true", "true", None, None]
    cluster.ensure()
    with ThreadPoolExecutor(4) as pool:
        for t in (1, 2):
            round_ = list(pool.map(lambda w, t=t: contribute(replicas[w % 2].url, t, w), range(4)))
            assert [r.status_code for r in round_] == [200] * 4, [r.text for r in round_]
            answers = round_
    mean = [{k: sum(grads(t, w)[k] for w in range(4)) / 4 for k in SHAPES} for t in range(3)]
    twin = TorchTwin(initial(), torch.optim.Adam, None, lr=0.01, weight_decay=0.01, amsgrad=True)
    for g in mean:
        twin.step(g)
    got = {k: np.array(v["data"]).reshape(SHAPES[k]) for k, v in answers[0].json()["params"].items()}
    for k, v in twin.params().items():
        np.testing.assert_allclose(got[k], v, rtol=1e-10, atol=1e-12)
    assert history_steps(b.url, sid) == [1, 2, 3]  # three rounds, each applied once


def test_six_threads_over_two_replicas_apply_exactly_180_steps(replicas: list[Server]) -> None:
    threads, each = 6, 30
    spec = {"optimizer": {"name": "sgd", "lr": 1.0}, "params": {"w": [0.0, 0.0, 0.0]}}
    sid = httpx.post(replicas[0].url + "/v1/sessions", json=spec).json()["id"]

    def worker(i: int) -> list[int]:
        url = replicas[i % 2].url
        seen = []
        with httpx.Client(base_url=url, timeout=30) as client:
            for j in range(each):
                r = client.post(
                    f"/v1/sessions/{sid}/step",
                    json={"grads": {"w": [1.0, 1.0, 1.0]}},
                    headers={"Idempotency-Key": f"{i}-{j}"},
                    params={"return_params": "false"},
                )
                assert r.status_code == 200, r.text
                seen.append(r.json()["step"])
        return seen

    with ThreadPoolExecutor(threads) as pool:
        seen = sorted(s for steps in pool.map(worker, range(threads)) for s in steps)
    assert seen == list(range(1, threads * each + 1))
    for replica in replicas:
        w = httpx.get(f"{replica.url}/v1/sessions/{sid}/params").json()["params"]["w"]["data"]
        assert w == [-180.0, -180.0, -180.0]
        assert history_steps(replica.url, sid) == list(range(1, 181))


def test_a_redis_sigkill_and_restart_keeps_every_session_and_answered_step(
    cluster: Cluster, replicas: list[Server]
) -> None:
    a, b = replicas
    sgd = {"optimizer": {"name": "sgd", "lr": 1.0}, "params": {"w": [0.0, 0.0]}}
    busy = httpx.post(a.url + "/v1/sessions", json=sgd).json()["id"]
    others = [create_adam_session(r.url) for r in (a, b)]
    with httpx.Client() as client:
        for sid in others:
            for t in range(5):
                assert send_step(client, (a, b)[t % 2].url, sid, t).status_code == 200
        before = {sid: client.get(f"{b.url}/v1/sessions/{sid}/checkpoint").content for sid in others}

    # a client keeps stepping `busy` through the crash; it retries each step with its key until a 200
    answered: list[int] = []
    unavailable: list[httpx.Response] = []
    failures: list[BaseException] = []
    restarted = threading.Event()
    after_restart = 0

    def stepper() -> None:
        nonlocal after_restart
        deadline = time.monotonic() + 30
        try:
            with httpx.Client(base_url=a.url, timeout=10) as client:
                while after_restart < 20 and time.monotonic() < deadline:
                    r = client.post(
                        f"/v1/sessions/{busy}/step",
                        json={"grads": {"w": [1.0, 1.0]}},
                        headers={"Idempotency-Key": f"busy-{len(answered)}"},
                        params={"return_params": "false"},
                    )
                    if r.status_code == 503:
                        unavailable.append(r)
                        time.sleep(0.05)
                        continue
                    assert r.status_code == 200, r.text
                    answered.append(r.json()["step"])
                    after_restart += restarted.is_set()
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=stepper)
    thread.start()
    time.sleep(0.4)
    cluster.redis.kill()
    down = httpx.get(f"{b.url}/v1/sessions/{others[0]}")
    assert down.status_code == 503, down.text
    assert down.headers["retry-after"] == "1"
    assert httpx.get(b.url + "/readyz").status_code == 503
    time.sleep(0.3)
    cluster.redis.start()  # same dir: the AOF is replayed
    restarted.set()
    thread.join(timeout=40)
    assert not thread.is_alive()
    assert not failures, failures
    assert after_restart == 20, "stepping did not resume after the restart"
    assert unavailable, "Redis was never seen down"
    assert all(r.headers.get("retry-after") == "1" for r in unavailable)

    # every answered step survived, none was applied twice, and stepping went on after the restart
    assert answered == list(range(1, len(answered) + 1))
    for replica in replicas:
        assert httpx.get(replica.url + "/readyz").status_code == 200
        listed = {s["id"] for s in httpx.get(replica.url + "/v1/sessions").json()["sessions"]}
        assert {busy, *others} <= listed
        assert history_steps(replica.url, busy) == answered
        w = httpx.get(f"{replica.url}/v1/sessions/{busy}/params").json()["params"]["w"]["data"]
        assert w == [-float(len(answered))] * 2
        for sid in others:  # parameters, optimizer and scheduler state: byte for byte
            assert httpx.get(f"{replica.url}/v1/sessions/{sid}/checkpoint").content == before[sid]
