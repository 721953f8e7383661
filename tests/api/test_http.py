"""HTTP as browsers and generated clients need it: 405 names every allowed method, OPTIONS answers, CORS
when configured (a working preflight with Authorization allowed by name, the headers a page must read
exposed), `/docs` and `/redoc` from the package's own assets, and the step's result in headers."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.api.helpers import ST
from tests.conftest import AppClient

ORIGIN = "https://trainer.example"


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("DELETE", "/v1/sessions", "GET, POST, OPTIONS"),
        ("PATCH", "/v1/sessions/s_x", "GET, DELETE, OPTIONS"),
        ("GET", "/v1/sessions/s_x/step", "POST, OPTIONS"),
        ("POST", "/v1/sessions/s_x/params", "GET, PUT, OPTIONS"),
        ("PUT", "/healthz", "GET, OPTIONS"),
    ],
)
async def test_a_wrong_method_is_405_naming_every_allowed_one(
    make_client: AppClient, method: str, path: str, allowed: str
) -> None:
    client = await make_client()
    answer = await client.request(method, path)
    assert answer.status_code == 405
    assert answer.headers["allow"] == allowed
    assert answer.headers["content-type"].startswith("application/problem+json")
    options = await client.options(path)
    assert options.status_code == 204
    assert options.headers["allow"] == allowed


async def test_without_cors_origins_no_page_elsewhere_is_let_in(make_client: AppClient) -> None:
    client = await make_client()
    answer = await client.get("/v1/sessions", headers={"Origin": ORIGIN})
    assert answer.status_code == 200
    assert "access-control-allow-origin" not in answer.headers


async def test_a_configured_origin_gets_a_working_preflight_and_readable_answers(
    make_client: AppClient,
) -> None:
    client = await make_client(cors_origins=f"{ORIGIN}, https://other.example", api_keys="k")
    preflight = await client.options(
        "/v1/sessions/s_x/step",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, idempotency-key",
        },
    )
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    allowed_headers = {
        h.strip().lower() for h in preflight.headers["access-control-allow-headers"].split(",")
    }
    assert {"authorization", "content-type", "idempotency-key"} <= allowed_headers
    assert "POST" in preflight.headers["access-control-allow-methods"]

    key = {"Authorization": "Bearer k", "Origin": ORIGIN}
    created = await client.post(
        "/v1/sessions", json={"optimizer": {"name": "sgd", "lr": 0.5}, "params": {"w": [1.0]}}, headers=key
    )
    assert created.status_code == 201
    assert created.headers["access-control-allow-origin"] == ORIGIN
    exposed = {h.strip().lower() for h in created.headers["access-control-expose-headers"].split(",")}
    assert {"location", "retry-after", "idempotent-replayed", "optserve-step", "optserve-lr"} <= exposed
    stepped = await client.post(
        f"{created.headers['location']}/step", json={"grads": {"w": [1.0]}}, headers=key
    )
    assert stepped.headers["access-control-allow-origin"] == ORIGIN  # the step's own fast path too
    refused = await client.get("/v1/sessions", headers={"Origin": ORIGIN})  # no key: still readable
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == ORIGIN

    stranger = await client.options(
        "/v1/sessions", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"}
    )
    assert "access-control-allow-origin" not in stranger.headers


@pytest.mark.parametrize("fmt", ["json", "safetensors"])
async def test_a_step_answer_carries_its_result_in_headers(make_client: AppClient, fmt: str) -> None:
    client = await make_client()
    created = await client.post(
        "/v1/sessions", json={"optimizer": {"name": "sgd", "lr": 0.5}, "params": {"w": [1.0]}}
    )
    url = f"{created.headers['location']}/step"
    headers = {"Accept": ST} if fmt == "safetensors" else {}
    answer = await client.post(url, json={"grads": {"w": [1.0]}}, headers=headers)
    assert answer.status_code == 200
    assert answer.headers["optserve-step"] == "1"
    assert answer.headers["optserve-lr"] == "[0.5]"
    assert answer.headers["optserve-skipped"] == "false"
    assert answer.headers["optserve-grad-norm"] == "1.0"


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_the_api_pages_load_nothing_from_elsewhere(make_client: AppClient, page: str) -> None:
    client: httpx.AsyncClient = await make_client()
    html = await client.get(page)
    assert html.status_code == 200
    sources = re.findall(r'(?:src|href)="([^"]+)"', html.text) + re.findall(r"url: '([^']+)'", html.text)
    assert sources
    for source in sources:
        assert source.startswith("/"), source  # this server, never a CDN
        asset = await client.get(source)
        assert asset.status_code == 200, source
        assert len(asset.content) > 100, source
