"""The reference loop: linear regression y = 2x + 1 + noise trained through the HTTP API.

It starts its own server on a temporary SQLite store unless given a URL, and speaks plain JSON with the
standard library, so it shows exactly what any language would send.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np

RUNS = [
    ("SGD+momentum", {"name": "sgd", "lr": 0.05, "momentum": 0.9}, None),
    ("Adagrad", {"name": "adagrad", "lr": 0.5}, None),
    ("RMSprop", {"name": "rmsprop", "lr": 0.01}, None),
    ("Adam+cosine", {"name": "adam", "lr": 0.1}, {"name": "cosine_annealing_lr", "T_max": 300}),
]


def _call(url: str, method: str, path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=60) as response:
        raw = response.read()
    return json.loads(raw) if raw else None


@contextlib.contextmanager
def local_server() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="optserve-demo-") as tmp, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        cmd = [
            sys.executable,
            "-m",
            "app.cli",
            "serve",
            "--port",
            str(port),
            "--store",
            f"sqlite:///{tmp}/demo.db",
        ]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    _call(url, "GET", "/readyz")
                    break
                except (urllib.error.URLError, ConnectionError):
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError("the demo server did not start") from None
                    time.sleep(0.1)
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def train(
    url: str, optimizer: dict[str, Any], scheduler: dict[str, Any] | None, steps: int
) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, 256)
    y = 2 * x + 1 + 0.1 * rng.standard_normal(256)
    spec: dict[str, Any] = {"optimizer": optimizer, "params": {"w": [0.0], "b": [0.0]}}
    if scheduler:
        spec["scheduler"] = scheduler
    session = _call(url, "POST", "/v1/sessions", spec)
    w = b = 0.0
    start = time.perf_counter()
    loss = float("nan")
    for _ in range(steps):
        err = w * x + b - y
        loss = float(np.mean(err**2))
        grads = {"w": [float(np.mean(2 * err * x))], "b": [float(np.mean(2 * err))]}
        answer = _call(url, "POST", f"/v1/sessions/{session['id']}/step", {"grads": grads, "loss": loss})
        w, b = answer["params"]["w"]["data"][0], answer["params"]["b"]["data"][0]
    elapsed = time.perf_counter() - start
    _call(url, "DELETE", f"/v1/sessions/{session['id']}")
    return {"loss": loss, "w": w, "b": b, "steps_per_s": steps / elapsed, "lr": answer["lr"][0]}


def run_demo(url: str | None = None, steps: int = 300) -> int:
    with contextlib.ExitStack() as stack:
        if url is None:
            print("starting a local optserve on a temporary SQLite store ...")
            url = stack.enter_context(local_server())
        print(f"training y = 2x + 1 + noise through {url}, {steps} steps per optimizer\n")
        print(f"{'optimizer':<14} {'final loss':>10} {'w':>8} {'b':>8} {'steps/s':>8} {'lr at end':>10}")
        for label, optimizer, scheduler in RUNS:
            r = train(url, optimizer, scheduler, steps)
            row = f"{r['loss']:>10.5f} {r['w']:>8.4f} {r['b']:>8.4f}"
            row += f" {r['steps_per_s']:>8.0f} {r['lr']:>10.3g}"
            print(f"{label:<14} {row}")
        print("\nEvery run should end near w = 2, b = 1, loss ~ 0.01 (the noise floor).")
    return 0
