"""Hostile requests against a real server under `prlimit`: each is refused with a problem naming the limit,
costs about nothing, and while they run `/healthz` stays quick and another tenant's small session keeps
stepping. Loopback only; every loop is bounded in count and time."""

from __future__ import annotations

import socket
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from app.wire import safetensors
from tests.api.helpers import tensor_json
from tests.system.server import Server

BODY_TIMEOUT = 3.0
IDLE_TRIM = 1.0
MiB = 1 << 20


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("abuse") / "server.log"
    env = {
        "OPTSERVE_BODY_TIMEOUT": str(BODY_TIMEOUT),
        "OPTSERVE_MAX_INFLIGHT_BYTES": str(2 << 30),
        "OPTSERVE_IDLE_TRIM_SECONDS": str(IDLE_TRIM),
    }
    with Server("memory://", env=env, log=log, prefix=["prlimit", "--as=4000000000"]) as running:
        yield running


class Bystander:
    """Polls /healthz and steps a small session of its own until stopped; records what it saw."""

    def __init__(self, url: str) -> None:
        self.client = httpx.Client(base_url=url, timeout=10.0)
        body = {"optimizer": {"name": "adam", "lr": 0.01}, "params": {"w": tensor_json(np.zeros(100))}}
        created = self.client.post("/v1/sessions", json=body)
        assert created.status_code == 201, created.text
        self.session = created.json()["id"]
        self.health: list[float] = []
        self.steps = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        grads = {"grads": {"w": [0.1] * 100}}
        while not self._stop.is_set():
            started = time.perf_counter()
            answer = self.client.get("/healthz")
            self.health.append(time.perf_counter() - started)
            if answer.status_code != 200:
                self.errors.append(f"healthz {answer.status_code}")
            stepped = self.client.post(f"/v1/sessions/{self.session}/step", json=grads)
            if stepped.status_code == 200:
                self.steps += 1
            else:
                self.errors.append(f"step {stepped.status_code}: {stepped.text[:200]}")
            time.sleep(0.01)

    def __enter__(self) -> Bystander:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=20)
        self.client.close()

    def p99(self) -> float:
        return statistics.quantiles(self.health, n=100)[98] if len(self.health) > 2 else max(self.health)


def raw_request(port: int, head: str, body: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=BODY_TIMEOUT + 10)
    sock.sendall(head.encode() + body)
    return sock


def answer_status(sock: socket.socket) -> int:
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ", 2)[1]) if data else 0


def big_checkpoint(client: httpx.Client, numel: int) -> bytes:
    """A checkpoint of an Adam session with one parameter of `numel` elements, as a client would send to
    restore a large model: a one-element session's checkpoint, every tensor grown to that size."""
    body = {"optimizer": {"name": "adam"}, "params": {"w": tensor_json(np.zeros(1, np.float32))}}
    small = client.post("/v1/sessions", json=body).json()["id"]
    tensors, metadata = safetensors.decode(client.get(f"/v1/sessions/{small}/checkpoint").content)
    client.delete(f"/v1/sessions/{small}")
    grown = {k: np.zeros(numel, v.dtype) if v.shape == (1,) else np.asarray(v) for k, v in tensors.items()}
    return safetensors.encode_bytes(grown, metadata)


def post_head(path: str, length: int, content_type: str = "application/json") -> str:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    )


def test_hostile_requests_cost_nothing_and_hold_up_no_one(server: Server, tmp_path: Path) -> None:
    client = httpx.Client(base_url=server.url, timeout=30.0)
    base_rss = server.rss()
    outcomes: dict[str, Any] = {}
    with Bystander(server.url) as bystander:
        # a 1 GB body declared, 2 bytes sent, four times, held open: no memory on the header's word
        held = [raw_request(server.port, post_head("/v1/sessions", (1 << 30) - 1), b"{}") for _ in range(4)]
        time.sleep(1.0)
        outcomes["declared 4 x 1 GB, sent 8 bytes: RSS growth"] = server.rss() - base_rss
        assert server.rss() - base_rss < 64 * MiB
        # ...and a body trickled a byte at a time is cut off at the deadline, whatever trickles in
        trickle = raw_request(server.port, post_head("/v1/sessions", 10 * MiB), b"{")
        deadline = time.monotonic() + BODY_TIMEOUT + 5
        while time.monotonic() < deadline:
            try:
                trickle.sendall(b" ")
            except OSError:
                break
            time.sleep(0.2)
        assert answer_status(trickle) == 408
        assert [answer_status(sock) for sock in held] == [408] * 4
        for sock in [*held, trickle]:
            sock.close()

        # a body past OPTSERVE_MAX_BODY_BYTES is refused on its header's word
        big = raw_request(server.port, post_head("/v1/sessions", (1 << 30) + 1))
        assert answer_status(big) == 413
        big.close()

        # a tiny create that would allocate a huge state
        tiny = {"optimizer": {"name": "adafactor"}, "params": {"w": {"shape": [0, 100_000_000], "data": []}}}
        answer = client.post("/v1/sessions", json=tiny)
        assert answer.status_code == 422, answer.text
        assert "no elements" in answer.json()["detail"]

        # a preview of a million steps, and one of 100 groups x 1,000 steps (served off the event loop)
        answer = client.post(
            "/v1/schedules/preview",
            json={"lr": 0.1, "scheduler": {"name": "step_lr", "step_size": 1}, "steps": 1_000_000},
        )
        assert answer.status_code == 422
        answer = client.post(
            "/v1/schedules/preview",
            json={
                "lr": [0.1] * 100,
                "scheduler": {"name": "cosine_annealing_lr", "T_max": 1000},
                "steps": 1000,
            },
        )
        assert answer.status_code == 200

        # a create of a million one-element parameters: 15 MB of JSON, refused before it is parsed
        many = b",".join(b'"p%d":[1.0]' % i for i in range(1_000_000))
        body = b'{"optimizer":{"name":"sgd"},"params":{' + many + b"}}"
        started = time.perf_counter()
        answer = client.post("/v1/sessions", content=body, headers={"Content-Type": "application/json"})
        outcomes["a million one-element parameters: seconds"] = time.perf_counter() - started
        assert answer.status_code == 413, answer.text[:300]
        assert "members" in answer.json()["detail"]

        # a step that names 20,000 gradients the session does not have
        session = bystander.session
        names = {f"g{i}": [1.0] for i in range(20_000)}
        started = time.perf_counter()
        answer = client.post(f"/v1/sessions/{session}/step", json={"grads": names})
        outcomes["20,000 unknown gradients: seconds"] = time.perf_counter() - started
        assert answer.status_code == 422
        assert "at most 10000" in answer.json()["detail"]
        time.sleep(0.5)
    assert bystander.errors == []
    # the other tenant's session took its own steps, each once, and nothing else
    assert client.get(f"/v1/sessions/{bystander.session}").json()["step"] == bystander.steps
    # a spike: a 10M-parameter session (40 MB of parameters, 80 MB of Adam state) stepped, then deleted
    before_spike = server.rss()
    created = client.post(
        "/v1/sessions",
        content=big_checkpoint(client, 10_000_000),
        headers={"Content-Type": "application/vnd.safetensors"},
    )
    assert created.status_code == 201, created.text[:300]
    sid = created.json()["id"]
    grads = safetensors.encode_bytes({"w": np.ones(10_000_000, np.float32)}, None)
    for _ in range(2):
        stepped = client.post(
            f"/v1/sessions/{sid}/step?return_params=false",
            content=grads,
            headers={"Content-Type": "application/vnd.safetensors"},
        )
        assert stepped.status_code == 200
    outcomes["RSS at the spike, over before it"] = server.rss() - before_spike
    assert client.delete(f"/v1/sessions/{sid}").status_code == 204
    time.sleep(IDLE_TRIM + 2.0)
    outcomes["RSS after the spike and an idle pause, over before it"] = server.rss() - before_spike
    client.close()
    assert bystander.steps > 20
    outcomes["/healthz p99 during the attacks (s)"] = bystander.p99()
    outcomes["RSS after, over before"] = server.rss() - base_rss
    (tmp_path / "abuse.txt").write_text("\n".join(f"{k}: {v}" for k, v in outcomes.items()))
    print(outcomes)
    assert bystander.p99() < 0.1, outcomes
    assert server.rss() - base_rss < 256 * MiB, outcomes
    assert outcomes["RSS at the spike, over before it"] > 100 * MiB, outcomes  # the spike was real
    assert outcomes["RSS after the spike and an idle pause, over before it"] < 48 * MiB, outcomes
