"""The request metrics are kept as plain numbers (app.metrics.RequestStats) and must read as
prometheus_client's own Counter and Histogram would have."""

from __future__ import annotations

import random

import httpx
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from app.metrics import LATENCY_BUCKETS, Metrics


def _samples(text: bytes) -> set[str]:
    return {
        line
        for line in text.decode().splitlines()
        if line and not line.startswith("#") and "_created" not in line
    }


def test_request_stats_read_as_prometheus_clients_own_metrics() -> None:
    ours = Metrics()
    registry = CollectorRegistry()
    requests = Counter(
        "optserve_requests_total", "HTTP requests", ["method", "route", "status"], registry=registry
    )
    latency = Histogram(
        "optserve_request_duration_seconds",
        "request latency",
        ["method", "route"],
        buckets=LATENCY_BUCKETS,
        registry=registry,
    )
    bytes_in = Counter("optserve_request_bytes_total", "request body bytes", registry=registry)
    bytes_out = Counter("optserve_response_bytes_total", "response body bytes", registry=registry)
    rng = random.Random(0)
    edges = [*LATENCY_BUCKETS, 0.0, 1e-7, 60.0]  # values on a bucket's bound fall in it ("le")
    for _ in range(500):
        method, route, status = (
            rng.choice(["GET", "POST"]),
            rng.choice(["/a", "/b/{id}"]),
            rng.choice([200, 422]),
        )
        seconds = rng.choice(edges) if rng.random() < 0.3 else rng.expovariate(50)
        received, sent = rng.randrange(10_000), rng.randrange(10_000)
        ours.stats.record(method, route, status, seconds, received, sent)
        requests.labels(method, route, str(status)).inc()
        latency.labels(method, route).observe(seconds)
        bytes_in.inc(received)
        bytes_out.inc(sent)
    theirs = _samples(generate_latest(registry))
    mine = {
        line
        for line in _samples(ours.render())
        if not line.startswith(("optserve_steps", "optserve_sessions"))
    }

    def rounded(lines: set[str]) -> set[str]:  # sums of floats: the same to 9 digits
        return {
            line if "_sum" not in line else line.rsplit(" ", 1)[0] + f" {float(line.rsplit(' ', 1)[1]):.9g}"
            for line in lines
        }

    assert len(theirs) > 4 * 16  # every (method, route) histogram, its buckets and count
    assert rounded(mine) == rounded(theirs)


async def test_a_method_of_any_name_is_counted_under_one_label(client: httpx.AsyncClient) -> None:
    """uvicorn takes any token as a method: a client inventing a method per request must not grow the
    metrics (a label set per method) without bound."""
    for i in range(50):
        await client.request(f"X{i}", "/v1/sessions")
    text = (await client.get("/metrics")).text
    assert 'method="OTHER"' in text
    assert 'method="X1"' not in text


async def test_the_step_counts_itself_as_the_middleware_counts_the_others(client: httpx.AsyncClient) -> None:
    """The step (`StepFastPath`, which counts its own requests) adds to the metrics what the middleware
    adds for any other request: one request per answer under the step's route and its status, and the
    body bytes each way, answered or refused."""
    import numpy as np

    from app.api.routes.step import PATH
    from app.wire import safetensors
    from tests.api.helpers import ST, create

    stats = client.app.state.metrics.stats  # type: ignore[attr-defined]
    sid = await create(client, {"w": np.ones(3, np.float32)}, optimizer={"name": "sgd", "lr": 0.1})
    good = safetensors.encode_bytes({"w": np.ones(3, np.float32)})
    bad = safetensors.encode_bytes({"w": np.ones(4, np.float32)})  # the wrong shape: 422
    requests = [(sid, good, 200), (sid, bad, 422), ("nobody", good, 404), (sid, b"\x00" * 5, 400)]
    before_in, before_out = stats.bytes_in, stats.bytes_out
    received = sent = 0
    for session, body, status in requests:
        answer = await client.post(
            f"/v1/sessions/{session}/step", content=body, headers={"Content-Type": ST, "Accept": ST}
        )
        assert answer.status_code == status, answer.text
        received += len(body)
        sent += len(answer.content)
    assert (stats.bytes_in - before_in, stats.bytes_out - before_out) == (received, sent)
    for status in (200, 422, 404, 400):
        assert stats.requests[("POST", PATH, status)] == 1
    counts, _ = stats.latency[("POST", PATH)]
    assert sum(counts) == 4
