"""Tenancy: a session belongs to the key that created it and does not exist for any other key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from app.wire import safetensors
from tests.api.helpers import ST

ALICE = {"Authorization": "Bearer alice-key"}
BOB = {"Authorization": "Bearer bob-key"}
SPEC = {"optimizer": {"name": "sgd", "lr": 0.1}, "params": {"w": [1.0, 2.0]}}


async def test_second_key_cannot_touch_the_first_keys_session(make_client: Any) -> None:
    client = await make_client(store="sqlite", api_keys="alice-key,bob-key")
    sid = (await client.post("/v1/sessions", json=SPEC, headers=ALICE)).json()["id"]
    grads = {"grads": {"w": [1.0, 1.0]}}
    attempts = [
        ("GET", f"/v1/sessions/{sid}", None),
        ("GET", f"/v1/sessions/{sid}/params", None),
        ("POST", f"/v1/sessions/{sid}/step", grads),
        ("PUT", f"/v1/sessions/{sid}/params", {"params": {"w": [0.0, 0.0]}}),
        ("GET", f"/v1/sessions/{sid}/checkpoint", None),
        ("GET", f"/v1/sessions/{sid}/history", None),
        ("DELETE", f"/v1/sessions/{sid}", None),
    ]
    for method, path, body in attempts:
        r = await client.request(method, path, json=body, headers=BOB)
        assert r.status_code == 404, (method, path, r.text)
    assert (await client.get("/v1/sessions", headers=BOB)).json() == {"sessions": []}
    mine = await client.get(f"/v1/sessions/{sid}/params", headers={**ALICE, "Accept": ST})
    tensors, meta = safetensors.decode(mine.content)
    np.testing.assert_array_equal(tensors["w"], np.array([1.0, 2.0], np.float32))
    assert meta["step"] == "0"
    assert [s["id"] for s in (await client.get("/v1/sessions", headers=ALICE)).json()["sessions"]] == [sid]


async def test_missing_or_unknown_key_is_401(make_client: Any, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nfile-key\n\n")
    client = await make_client(api_keys_file=keys)
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic file-key"}):
        r = await client.get("/v1/sessions", headers=headers)
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == "Bearer"
        assert r.headers["content-type"] == "application/problem+json"
    ok = await client.get("/v1/sessions", headers={"Authorization": "Bearer file-key"})
    assert ok.status_code == 200
    assert (await client.get("/healthz")).status_code == 200
