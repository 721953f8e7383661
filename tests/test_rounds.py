"""Synchronous rounds (`aggregation: {"mode": "sync", ...}`): every contributor of a round is answered with
the round's one step, which is torch's step on the same mean; arrival order does not matter; a round
closes at its timeout with at least `min_workers` (else 409, nothing applied); late, repeated and
conflicting contributions are answered as documented. Each runs where the round lives in the process
(memory://) and where it lives in a real Redis (redis://), the replicas' way; then two replicas in one
process share rounds over one Redis, and one that claimed a round and died is taken over."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import httpx
import numpy as np
import pytest
import redis
import torch

from app.wire import safetensors
from tests.api.helpers import ST, params_of
from tests.conftest import AppClient
from tests.system.redis_server import RedisServer

SHAPES = {"w": (3, 2), "b": (2,)}
INIT = {name: np.random.default_rng(5).standard_normal(shape) for name, shape in SHAPES.items()}


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> str:
    """Where rounds live: this process (memory://), or a real Redis shared by replicas (flushed first)."""
    if request.param == "memory":
        return "memory://"
    server: RedisServer = request.getfixturevalue("redis_server")
    flush = redis.Redis.from_url(server.url())
    flush.flushdb()
    flush.close()
    return server.url()


def sync(workers: int = 4, **more: Any) -> dict[str, Any]:
    return {"mode": "sync", "workers": workers, "timeout": 30, **more}


async def create(client: httpx.AsyncClient, aggregation: dict[str, Any], dtype: str = "float64") -> str:
    params = {
        n: {"shape": list(v.shape), "dtype": dtype, "data": v.ravel().tolist()} for n, v in INIT.items()
    }
    body = {"optimizer": {"name": "adam", "lr": 0.05}, "params": params, "aggregation": aggregation}
    created = await client.post("/v1/sessions", json=body)
    assert created.status_code == 201, created.text
    sid: str = created.json()["id"]
    return sid


def grads_of(round_: int, worker: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 * round_ + worker)
    return {name: rng.standard_normal(shape) for name, shape in SHAPES.items()}


async def contribute(
    client: httpx.AsyncClient,
    sid: str,
    worker: int,
    round_: int,
    grads: dict[str, np.ndarray] | None = None,
    **more: Any,
) -> httpx.Response:
    grads = grads_of(round_, worker) if grads is None else grads
    body = {
        "grads": {n: g.tolist() for n, g in grads.items()},
        "step": round_,
        "worker": f"w{worker}",
        **more,
    }
    return await client.post(f"/v1/sessions/{sid}/step", json=body)


async def test_every_contributor_gets_the_rounds_one_step_which_is_torchs_step_on_the_mean(
    make_client: AppClient,
    store: str,
) -> None:
    client: httpx.AsyncClient = await make_client(store=store)
    sid = await create(client, sync(4))
    tensors = {n: torch.tensor(v.copy(), requires_grad=True) for n, v in INIT.items()}
    opt = torch.optim.Adam(list(tensors.values()), lr=0.05)
    rng = np.random.default_rng(0)
    for round_ in range(3):
        order = rng.permutation(4)
        answers = await asyncio.gather(
            *(contribute(client, sid, int(w), round_, loss=float(w)) for w in order)
        )
        assert {a.status_code for a in answers} == {200}
        bodies = [a.json() for a in answers]
        assert all(b == bodies[0] for b in bodies)
        assert (bodies[0]["step"], bodies[0]["workers"]) == (round_ + 1, ["w0", "w1", "w2", "w3"])
        for name, tensor in tensors.items():
            total = torch.zeros(SHAPES[name], dtype=torch.float64)
            for worker in range(4):  # workers sorted by id, summed in float64, divided by their count
                total += torch.from_numpy(grads_of(round_, worker)[name])
            tensor.grad = total / 4
        opt.step()
        got = params_of(answers[0])
        for name, tensor in tensors.items():
            np.testing.assert_allclose(got[name], tensor.detach().numpy(), rtol=1e-10, atol=1e-14)
    history = (await client.get(f"/v1/sessions/{sid}/history")).json()["steps"]
    assert [(h["step"], h["loss"]) for h in history] == [(1, 1.5), (2, 1.5), (3, 1.5)]  # one row per round


async def test_the_arrival_order_does_not_change_a_bit(make_client: AppClient, store: str) -> None:
    client: httpx.AsyncClient = await make_client(store=store)
    results = set()
    rng = np.random.default_rng(3)
    for _ in range(10):
        sid = await create(client, sync(4, reduce="sum"), "float32")
        order = rng.permutation(4)
        for w in order:  # one after the other, in this order: the last completes the round
            task = asyncio.create_task(contribute(client, sid, int(w), 0))
            await asyncio.sleep(0.005)
        answer = await task
        results.add(b"".join(v.tobytes() for v in params_of(answer).values()))
    assert len(results) == 1


async def test_a_round_closes_at_its_timeout_with_min_workers_or_applies_nothing(
    make_client: AppClient,
    store: str,
) -> None:
    client: httpx.AsyncClient = await make_client(store=store)
    sid = await create(client, sync(4, timeout=0.3, min_workers=2))
    answers = await asyncio.gather(*(contribute(client, sid, w, 0) for w in (2, 0, 1)))
    assert [a.json()["workers"] for a in answers] == [["w0", "w1", "w2"]] * 3
    before = (await client.get(f"/v1/sessions/{sid}/checkpoint")).content
    lonely = await contribute(client, sid, 3, 1)
    assert lonely.status_code == 409
    assert lonely.json()["current_step"] == 1
    assert "min_workers=2" in lonely.json()["detail"]
    assert (await client.get(f"/v1/sessions/{sid}/checkpoint")).content == before
    everyone = await create(client, sync(2, timeout=0.3))  # min_workers defaults to workers
    assert (await contribute(client, everyone, 0, 0)).status_code == 409


async def test_late_repeated_and_conflicting_contributions(make_client: AppClient, store: str) -> None:
    client: httpx.AsyncClient = await make_client(store=store)
    sid = await create(client, sync(2))
    first = await asyncio.gather(contribute(client, sid, 0, 0), contribute(client, sid, 1, 0))
    again = await contribute(client, sid, 0, 0)  # the same contribution, resent: the same answer
    assert again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first[0].json()
    changed = await contribute(client, sid, 0, 0, grads_of(9, 9))
    assert changed.status_code == 409
    assert "another request" in changed.json()["detail"]
    late = await contribute(client, sid, 0, 0, grads_of(8, 8))
    assert late.status_code == 409
    pending = asyncio.create_task(contribute(client, sid, 0, 1))
    await asyncio.sleep(0.05)
    twice = await contribute(client, sid, 0, 1, grads_of(7, 7))
    assert twice.status_code == 409
    assert "already contributed" in twice.json()["detail"]
    ahead = await contribute(client, sid, 1, 5)
    assert ahead.status_code == 409
    plain = await client.post(f"/v1/sessions/{sid}/step", json={"grads": {}, "step": 1})
    assert plain.status_code == 422
    assert plain.json()["errors"][0]["field"] == "worker"
    assert (await client.delete(f"/v1/sessions/{sid}")).status_code == 204
    assert (await pending).status_code == 404  # its session went while it waited


async def test_weights_and_binary_contributions(make_client: AppClient, store: str) -> None:
    client: httpx.AsyncClient = await make_client(store=store)
    sid = await create(client, sync(2, reduce="weighted_mean"))
    unweighted = await contribute(client, sid, 0, 0)
    assert unweighted.status_code == 422
    assert unweighted.json()["errors"][0]["field"] == "weight"
    body = safetensors.encode_bytes(grads_of(0, 1), {"step": "0", "worker": "w1", "weight": "3"})
    binary = asyncio.create_task(
        client.post(f"/v1/sessions/{sid}/step", content=body, headers={"Content-Type": ST, "Accept": ST})
    )
    await asyncio.sleep(0.05)
    text = await contribute(client, sid, 0, 0, weight=1.0)
    answer = await binary
    assert answer.status_code == 200
    assert answer.headers["optserve-step"] == "1"
    np.testing.assert_array_equal(params_of(answer)["w"], params_of(text)["w"])
    plain = await create(client, sync(2))
    assert (await contribute(client, plain, 0, 0, weight=2.0)).status_code == 422


async def test_rounds_are_refused_where_replicas_share_the_store(make_client: AppClient) -> None:
    client: httpx.AsyncClient = await make_client()
    client.app.state.service.store.replicas = True  # type: ignore[attr-defined]  # as the Redis store is
    body = {"optimizer": {"name": "sgd"}, "params": {"w": [1.0]}, "aggregation": sync(2)}
    answer = await client.post("/v1/sessions", json=body)
    assert answer.status_code == 422
    assert answer.json()["errors"][0]["field"] == "aggregation.mode"


async def test_waiting_contributions_hold_at_most_max_round_bytes(make_client: AppClient) -> None:
    client: httpx.AsyncClient = await make_client(max_round_bytes=100)  # one contribution: 64 bytes
    service = client.app.state.service  # type: ignore[attr-defined]
    sid = await create(client, sync(2, timeout=0.3, min_workers=1))
    first = asyncio.create_task(contribute(client, sid, 0, 0))
    await asyncio.sleep(0.05)
    assert service.round_bytes == 64
    refused = await contribute(client, sid, 1, 0)
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert "OPTSERVE_MAX_ROUND_BYTES=100" in refused.json()["detail"]
    assert (await first).json()["workers"] == ["w0"]  # its round closed at the timeout, alone
    assert service.round_bytes == 0
    pending = asyncio.create_task(contribute(client, sid, 1, 1))
    await asyncio.sleep(0.05)
    assert (await client.delete(f"/v1/sessions/{sid}")).status_code == 204
    assert (await pending).status_code == 404
    assert service.round_bytes == 0


@pytest.mark.parametrize("where", ["sqlite", "redis"])
def test_a_soak_of_8_workers_and_200_rounds_over_http_loses_none_and_applies_none_twice(
    tmp_path: Any, where: str, request: pytest.FixtureRequest
) -> None:
    """Real servers: one on SQLite, or two replicas on a real Redis, the workers spread over both. 8 SDK
    workers step 200 rounds, each resending some of its contributions (the same Idempotency-Key and body,
    as after a lost answer). Every round is applied exactly once, with all 8, and every worker saw each."""
    import optserve

    from tests.system.server import Server

    rounds, workers = 200, 8

    async def run(urls: list[str]) -> list[list[optserve.StepResult]]:
        async with optserve.AsyncClient(urls[0]) as setup:
            session = await setup.create_session(
                {k: v.astype(np.float32) for k, v in INIT.items()},
                {"name": "sgd", "lr": 0.01, "momentum": 0.9},
                aggregation={"mode": "sync", "workers": workers, "timeout": 30},
            )

        async def worker(i: int) -> list[optserve.StepResult]:
            seen = []
            async with optserve.AsyncClient(urls[i % len(urls)]) as client:
                mine = await client.get_session(session.id)
                for t in range(rounds):
                    grads = {k: v.astype(np.float32) for k, v in grads_of(t, i).items()}
                    key = f"w{i}-round-{t}"
                    result = await mine.step(
                        grads, step=t, worker=f"w{i}", return_params=t % 50 == 0, idempotency_key=key
                    )
                    if (t + i) % 17 == 0:  # the same request again: answered again, applied once
                        again = await mine.step(
                            grads, step=t, worker=f"w{i}", return_params=t % 50 == 0, idempotency_key=key
                        )
                        assert (again.step, again.replayed) == (t + 1, True)
                    seen.append(result)
            return seen

        return list(await asyncio.gather(*(worker(i) for i in range(workers))))

    if where == "sqlite":
        servers = [Server(f"sqlite:///{tmp_path}/soak.db")]
    else:
        redis_server: RedisServer = request.getfixturevalue("redis_server")
        flush = redis.Redis.from_url(redis_server.url())
        flush.flushdb()
        flush.close()
        servers = [Server(redis_server.url()) for _ in range(2)]
    with contextlib.ExitStack() as stack:
        for server in servers:
            stack.enter_context(server)
        seen = asyncio.run(run([server.url for server in servers]))
        url = servers[-1].url
        sessions = httpx.get(f"{url}/v1/sessions").json()["sessions"]
        (only,) = sessions
        history = httpx.get(f"{url}/v1/sessions/{only['id']}/history", params={"limit": 1000}).json()
    assert only["step"] == rounds
    assert [row["step"] for row in history["steps"]] == list(range(1, rounds + 1))
    expected_workers = tuple(f"w{i}" for i in range(workers))
    for results in seen:
        assert [r.step for r in results] == list(range(1, rounds + 1))
        assert all(r.workers == expected_workers for r in results)
        assert not any(r.replayed for r in results)


async def replicas_on(
    make_client: AppClient, server: RedisServer, lease: float = 5.0
) -> list[httpx.AsyncClient]:
    """Two apps (two replicas, each with its own cache and subscription) on one flushed Redis."""
    flush = redis.Redis.from_url(server.url())
    flush.flushdb()
    flush.close()
    replicas = [await make_client(store=server.url()) for _ in range(2)]
    for replica in replicas:
        replica.app.state.service._shared_rounds.lease = lease  # type: ignore[attr-defined]
    return replicas


async def test_workers_on_two_replicas_join_the_same_rounds_applied_once_each(
    make_client: AppClient, redis_server: RedisServer
) -> None:
    replicas = await replicas_on(make_client, redis_server)
    sid = await create(replicas[0], sync(4, reduce="sum"))
    tensors = {n: torch.tensor(v.copy(), requires_grad=True) for n, v in INIT.items()}
    opt = torch.optim.Adam(list(tensors.values()), lr=0.05)
    for round_ in range(6):
        answers = await asyncio.gather(
            *(contribute(replicas[(w + round_) % 2], sid, w, round_, loss=1.0) for w in range(4))
        )
        assert {a.status_code for a in answers} == {200}, [a.text for a in answers]
        assert all(a.json() == answers[0].json() for a in answers)
        for name, tensor in tensors.items():
            tensor.grad = sum(torch.from_numpy(grads_of(round_, w)[name]) for w in range(4))
        opt.step()
        for name, tensor in tensors.items():
            np.testing.assert_allclose(params_of(answers[0])[name], tensor.detach().numpy(), rtol=1e-10)
    history = (await replicas[1].get(f"/v1/sessions/{sid}/history")).json()["steps"]
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5, 6]
    keys = redis.Redis.from_url(redis_server.url())
    assert not keys.exists(f"optserve:{{{sid}}}:round", f"optserve:{{{sid}}}:roundgrads")  # nothing held
    keys.close()


async def test_a_round_whose_closer_died_is_taken_over_and_a_resend_elsewhere_gets_its_answer(
    make_client: AppClient, redis_server: RedisServer
) -> None:
    """Replica A completes the round, claims it, and dies before applying it (its close never returns).
    B's waiter takes the round over when A's lease runs out and applies it once; the worker that was on A
    resends the same request (same Idempotency-Key and body) to B and gets the round's answer."""
    a, b = await replicas_on(make_client, redis_server, lease=0.3)
    sid = await create(a, sync(2))
    dead = asyncio.Event()

    async def dies(*_: Any) -> None:
        dead.set()
        await asyncio.Event().wait()  # never returns: the process is gone

    a.app.state.service._shared_rounds._close = dies  # type: ignore[attr-defined]
    headers = {"Idempotency-Key": "w1-round-0"}
    on_b = asyncio.create_task(contribute(b, sid, 0, 0))
    await asyncio.sleep(0.05)
    body = {"grads": {n: g.tolist() for n, g in grads_of(0, 1).items()}, "step": 0, "worker": "w1"}
    on_a = asyncio.create_task(a.post(f"/v1/sessions/{sid}/step", json=body, headers=headers))
    await asyncio.wait_for(dead.wait(), 5)
    started = asyncio.get_running_loop().time()
    answer = await asyncio.wait_for(on_b, 5)
    assert answer.status_code == 200, answer.text
    assert 0.2 < asyncio.get_running_loop().time() - started < 3  # after A's lease, not at the timeout
    on_a.cancel()
    resent = await b.post(f"/v1/sessions/{sid}/step", json=body, headers=headers)
    assert resent.status_code == 200, resent.text
    assert resent.headers["idempotent-replayed"] == "true"
    assert resent.json() == answer.json()
    assert answer.json()["workers"] == ["w0", "w1"]
    other = await b.post(f"/v1/sessions/{sid}/step", json=body, headers={"Idempotency-Key": "another"})
    assert other.status_code == 409  # the same worker and body under another key is another request
    history = (await b.get(f"/v1/sessions/{sid}/history")).json()["steps"]
    assert [h["step"] for h in history] == [1]


async def test_a_round_waiting_on_one_replica_ends_when_another_deletes_its_session(
    make_client: AppClient, redis_server: RedisServer
) -> None:
    a, b = await replicas_on(make_client, redis_server)
    sid = await create(a, sync(2))
    waiting = asyncio.create_task(contribute(a, sid, 0, 0))
    await asyncio.sleep(0.1)
    assert (await b.delete(f"/v1/sessions/{sid}")).status_code == 204
    assert (await asyncio.wait_for(waiting, 3)).status_code == 404


async def test_on_redis_an_abandoned_rounds_contributions_expire_and_a_round_holds_at_most_max_round_bytes(
    make_client: AppClient, redis_server: RedisServer
) -> None:
    """Contributions wait in Redis with an expiry of the round's timeout + 60 s: a round whose contributors
    all went (nobody left to close it) frees Redis' memory. And OPTSERVE_MAX_ROUND_BYTES bounds each round
    there (503 past it)."""
    (client,) = [await make_client(store=redis_server.url(), max_round_bytes=200)]
    sid = await create(client, sync(3, timeout=10))
    waiting = asyncio.create_task(contribute(client, sid, 0, 0))
    await asyncio.sleep(0.1)
    keys = redis.Redis.from_url(redis_server.url())
    ttls = [keys.pttl(f"optserve:{{{sid}}}:{suffix}") for suffix in ("round", "roundgrads")]
    assert all(60_000 < ttl <= 70_000 for ttl in ttls), ttls
    refused = await contribute(client, sid, 1, 0)  # each contribution is about 130 bytes of safetensors
    assert refused.status_code == 503
    assert "OPTSERVE_MAX_ROUND_BYTES=200" in refused.json()["detail"]
    waiting.cancel()
    keys.close()
