"""Steps over HTTP (JSON and safetensors both ways) agree with torch.optim run in-process."""

from __future__ import annotations

from functools import partial
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from tests.api.helpers import ST, TorchTwin, create, params_of, step
from tests.asgi import post_scope
from tests.optim.oracle import TOL, gradient, initial_params

SHAPES = {"w": (6, 5), "b": (5,)}

CASES: list[tuple[str, dict[str, Any], Any, dict[str, Any], dict[str, Any] | None, Any]] = [
    (
        "adam+amsgrad+step_lr",
        {"name": "adam", "lr": 0.01, "amsgrad": True, "weight_decay": 0.01},
        torch.optim.Adam,
        {"lr": 0.01, "amsgrad": True, "weight_decay": 0.01},
        {"name": "step_lr", "step_size": 10, "gamma": 0.7},
        partial(torch.optim.lr_scheduler.StepLR, step_size=10, gamma=0.7),
    ),
    (
        "sgd+nesterov+cosine",
        {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True},
        torch.optim.SGD,
        {"lr": 0.05, "momentum": 0.9, "nesterov": True},
        {"name": "cosine_annealing_lr", "T_max": 25, "eta_min": 0.001},
        partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=25, eta_min=0.001),
    ),
    (
        "rmsprop+centered",
        {"name": "rmsprop", "lr": 0.01, "centered": True, "momentum": 0.5},
        torch.optim.RMSprop,
        {"lr": 0.01, "centered": True, "momentum": 0.5},
        None,
        None,
    ),
    ("adamw", {"name": "adamw", "lr": 0.01}, torch.optim.AdamW, {"lr": 0.01}, None, None),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(("request_fmt", "accept"), [("json", None), ("safetensors", None), ("json", ST)])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
async def test_http_steps_match_torch(
    make_client: Any, case: tuple[Any, ...], request_fmt: str, accept: str | None, dtype: Any
) -> None:
    _, spec, torch_cls, torch_kwargs, sched_spec, torch_sched = case
    client: httpx.AsyncClient = await make_client()
    init = initial_params(SHAPES, dtype)
    session = await create(client, init, optimizer=spec, scheduler=sched_spec)
    twin = TorchTwin(init, torch_cls, torch_sched, **torch_kwargs)
    ours = init
    for t in range(60):
        grads = {k: gradient(t, k, ours[k], skip_every=0) for k in ours}
        answer = await step(
            client, session, grads, request_fmt, headers={"Accept": accept} if accept else None
        )
        twin.step(grads)
        ours = params_of(answer)
        for name, value in ours.items():
            assert value.dtype == dtype
            np.testing.assert_allclose(value, twin.params()[name], **TOL[dtype], err_msg=f"{name} step {t}")
        lr = answer.json()["lr"] if request_fmt == "json" and not accept else None
        if lr is not None:
            assert lr == pytest.approx(twin.lr(), rel=1e-12)


async def test_a_client_that_leaves_before_its_body_arrived_gets_no_answer_and_changes_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The step reads its body by `receive()`: an `http.disconnect` there ends the request with nothing
    applied, nothing sent and nothing logged as an error (it used to be a logged 500)."""
    from app.main import create_app
    from app.settings import Settings

    app = create_app(Settings(store="memory://"))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://optserve.test") as client:
            sid = await create(client, {"w": np.ones(3, np.float32)}, optimizer={"name": "sgd", "lr": 0.1})
            before = (await client.get(f"/v1/sessions/{sid}/checkpoint")).content
        scope = post_scope(
            f"/v1/sessions/{sid}/step", [(b"content-type", ST.encode()), (b"content-length", b"1000")]
        )
        sent: list[dict[str, Any]] = []
        messages = iter(
            [{"type": "http.request", "body": b"\x10" * 10, "more_body": True}, {"type": "http.disconnect"}]
        )

        async def receive() -> dict[str, Any]:
            return next(messages)

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        with caplog.at_level("ERROR"):
            await app(scope, receive, send)
        assert sent == []
        assert not [r for r in caplog.records if r.levelname == "ERROR"]
        async with httpx.AsyncClient(transport=transport, base_url="http://optserve.test") as client:
            assert (await client.get(f"/v1/sessions/{sid}/checkpoint")).content == before


@pytest.mark.parametrize("declared", [b"\xb2", b"\xb9\xb2", b"1\xb3"])
async def test_a_content_length_of_latin1_superscripts_is_no_length(declared: bytes) -> None:
    """Latin-1's superscripts are digits to `str.isdigit` that `int()` refuses: a Content-Length of them
    (which uvicorn's parsers refuse before the app, but the app does not count on it) is read as no length,
    in the body bounds and in the metrics, not as a 500."""
    from app.main import create_app
    from app.settings import Settings
    from app.wire import safetensors

    app = create_app(Settings(store="memory://"))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://optserve.test") as client:
            sid = await create(client, {"w": np.ones(3, np.float32)}, optimizer={"name": "sgd", "lr": 0.1})
        body = safetensors.encode_bytes({"w": np.ones(3, np.float32)})
        scope = post_scope(
            f"/v1/sessions/{sid}/step",
            [(b"content-type", ST.encode()), (b"accept", ST.encode()), (b"content-length", declared)],
        )
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await app(scope, receive, send)
        assert sent[0]["status"] == 200
        assert safetensors.decode(sent[1]["body"])[0]["w"].tolist() == pytest.approx([0.9] * 3)


async def test_a_content_length_of_thousands_of_digits_is_too_large_not_a_500() -> None:
    """int() refuses a string of more than 4,300 digits: a Content-Length that long (which uvicorn's
    parsers refuse before the app) reads as past every limit, a 413, and the metrics count the request out
    as they counted it in."""
    from app.main import create_app
    from app.settings import Settings

    app = create_app(Settings(store="memory://"))
    async with app.router.lifespan_context(app):
        scope = post_scope(
            "/v1/sessions/s_any/step", [(b"content-type", ST.encode()), (b"content-length", b"9" * 5000)]
        )
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await app(scope, receive, send)
        assert sent[0]["status"] == 413
        assert b"OPTSERVE_MAX_BODY_BYTES" in sent[1]["body"]
        assert app.state.metrics.large_in_flight == 0
