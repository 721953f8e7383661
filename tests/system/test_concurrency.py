"""Many threads stepping one session through a real server: every step applied exactly once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.system.server import Server

THREADS = 8
STEPS_EACH = 25


@pytest.mark.parametrize("store", ["memory://", "sqlite"])
def test_eight_threads_times_25_steps_apply_200_steps(tmp_path: Path, store: str) -> None:
    url = f"sqlite:///{tmp_path}/c.db" if store == "sqlite" else store
    with Server(url) as server, httpx.Client(base_url=server.url, timeout=30) as setup:
        spec = {
            "optimizer": {"name": "sgd", "lr": 1.0},
            "params": {"w": {"shape": [3], "dtype": "float64", "data": [0, 0, 0]}},
        }
        sid = setup.post("/v1/sessions", json=spec).json()["id"]

        def worker(i: int) -> list[int]:
            steps = []
            with httpx.Client(base_url=server.url, timeout=30) as client:
                for j in range(STEPS_EACH):
                    r = client.post(
                        f"/v1/sessions/{sid}/step",
                        json={"grads": {"w": [1.0, 1.0, 1.0]}},
                        headers={"Idempotency-Key": f"{i}-{j}"},
                    )
                    assert r.status_code == 200, r.text
                    steps.append(r.json()["step"])
            return steps

        with ThreadPoolExecutor(THREADS) as pool:
            seen = [s for steps in pool.map(worker, range(THREADS)) for s in steps]
        assert sorted(seen) == list(range(1, THREADS * STEPS_EACH + 1))
        info = setup.get(f"/v1/sessions/{sid}").json()
        assert info["step"] == THREADS * STEPS_EACH
        params = setup.get(f"/v1/sessions/{sid}/params").json()["params"]["w"]["data"]
        np.testing.assert_array_equal(params, [-200.0, -200.0, -200.0])
        history = setup.get(f"/v1/sessions/{sid}/history?limit=1000").json()["steps"]
        assert [h["step"] for h in history] == list(range(1, 201))
