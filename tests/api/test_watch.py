"""What a live view reads: the listing's optimizer, scheduler and last loss; history since a step; the
schedule ahead, which must be the lr the coming steps are then taken with."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import AppClient

SPEC = {
    "optimizer": {"name": "adam", "lr": 0.1},
    "scheduler": {
        "name": "sequential_lr",
        "schedulers": [
            {"name": "linear_lr", "start_factor": 0.1, "total_iters": 4},
            {"name": "cosine_annealing_lr", "T_max": 10, "eta_min": 0.001},
        ],
        "milestones": [4],
    },
    "params": {"w": [1.0, 2.0]},
}


@pytest.fixture(params=["memory", "sqlite"])
async def client(request: pytest.FixtureRequest, make_client: AppClient) -> httpx.AsyncClient:
    made: httpx.AsyncClient = await make_client(store="memory://" if request.param == "memory" else "sqlite")
    return made


async def steps(client: httpx.AsyncClient, sid: str, count: int, loss: float = 1.0) -> None:
    for _ in range(count):
        answer = await client.post(
            f"/v1/sessions/{sid}/step", json={"grads": {"w": [0.5, -0.5]}, "loss": loss}
        )
        assert answer.status_code == 200, answer.text


async def test_the_schedule_ahead_is_the_lr_the_next_steps_are_taken_with(client: httpx.AsyncClient) -> None:
    sid = (await client.post("/v1/sessions", json=SPEC)).json()["id"]
    await steps(client, sid, 3)
    ahead = (await client.get(f"/v1/sessions/{sid}/schedule", params={"steps": 12})).json()
    assert (ahead["step"], ahead["steps"], ahead["depends_on_loss"]) == (3, list(range(4, 16)), False)
    before = (await client.get(f"/v1/sessions/{sid}")).json()["lr"]
    assert ahead["lr"][0][0] == before[0]  # the next step's lr is the session's lr now
    await steps(client, sid, 12)
    history = (await client.get(f"/v1/sessions/{sid}/history")).json()["steps"]
    taken_with = [row["lr"][0] for row in history[2:14]]  # a record's lr is the lr of the step after it
    assert ahead["lr"][0] == taken_with
    still = await client.get(f"/v1/sessions/{sid}")
    assert still.json()["step"] == 15  # looking ahead changed nothing
    bad = await client.get(f"/v1/sessions/{sid}/schedule", params={"steps": 0})
    assert bad.status_code == 422


async def test_plateau_is_shown_held_and_a_session_without_scheduler_is_flat(
    client: httpx.AsyncClient,
) -> None:
    plateau = {**SPEC, "scheduler": {"name": "reduce_lr_on_plateau", "patience": 0}}
    sid = (await client.post("/v1/sessions", json=plateau)).json()["id"]
    ahead = (await client.get(f"/v1/sessions/{sid}/schedule", params={"steps": 3})).json()
    assert (ahead["lr"], ahead["depends_on_loss"]) == ([[0.1, 0.1, 0.1]], True)
    flat = {k: v for k, v in SPEC.items() if k != "scheduler"}
    sid = (await client.post("/v1/sessions", json=flat)).json()["id"]
    assert (await client.get(f"/v1/sessions/{sid}/schedule", params={"steps": 2})).json()["lr"] == [
        [0.1, 0.1]
    ]


async def test_history_since_a_step_and_the_listings_summary(client: httpx.AsyncClient) -> None:
    sid = (await client.post("/v1/sessions", json=SPEC)).json()["id"]
    listed = (await client.get("/v1/sessions")).json()["sessions"]
    assert [(s["optimizer"], s["scheduler"], s["loss"]) for s in listed] == [("adam", "sequential_lr", None)]
    await steps(client, sid, 5, loss=0.25)
    since = (await client.get(f"/v1/sessions/{sid}/history", params={"since": 3})).json()["steps"]
    assert [row["step"] for row in since] == [4, 5]
    first = (await client.get(f"/v1/sessions/{sid}/history", params={"since": 0, "limit": 2})).json()["steps"]
    assert [row["step"] for row in first] == [1, 2]
    assert (await client.get(f"/v1/sessions/{sid}/history", params={"since": 5})).json()["steps"] == []
    listed = (await client.get("/v1/sessions")).json()["sessions"]
    assert [(s["step"], s["loss"]) for s in listed] == [(5, 0.25)]
    missing = await client.get("/v1/sessions/s_nothing/history", params={"since": 0})
    assert missing.status_code == 404


async def test_a_look_ahead_is_bounded_by_steps_times_groups(client: httpx.AsyncClient) -> None:
    groups = [{"params": [f"p{i}"], "lr": 0.1} for i in range(20)]
    spec = {
        "optimizer": {"name": "sgd", "lr": 0.1},
        "scheduler": {"name": "step_lr", "step_size": 3},
        "params": {f"p{i}": [0.0] for i in range(20)},
        "param_groups": groups,
    }
    created = await client.post("/v1/sessions", json=spec)
    assert created.status_code == 201, created.text
    sid = created.json()["id"]
    refused = await client.get(f"/v1/sessions/{sid}/schedule", params={"steps": 10_000})  # 200,000 values
    assert refused.status_code == 422
    assert refused.json()["errors"][0]["field"] == "steps"
    assert "at most 100000" in refused.json()["errors"][0]["message"]
    fine = await client.get(f"/v1/sessions/{sid}/schedule", params={"steps": 5000})
    assert len(fine.json()["lr"]) == 20
