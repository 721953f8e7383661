"""The hostile requests of the abuse suite, each run alone against a real server while a bystander polls
`/healthz` and steps a small session of its own; for each: the answer, the seconds it took, the peak
resident memory of the server (and its worker processes) over what it was before, and `/healthz` p99.

`tests/system/test_abuse.py` asserts on the results; `python -m bench.abuse` prints them as a table (and
runs them against an older checkout, for a before/after). Loopback only; every loop is bounded in count
and time, and an attack that the server does not answer in time is recorded as such.
"""

from __future__ import annotations

import json
import multiprocessing
import socket
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from app.wire import safetensors
from tests.system.server import Server

MiB = 1 << 20
ST = "application/vnd.safetensors"
JSON = "application/json"
BODY_TIMEOUT = 3.0  # the server's OPTSERVE_BODY_TIMEOUT in these runs
SESSIONS_PER_KEY = 50  # ... and its OPTSERVE_MAX_SESSIONS_PER_KEY
SERVER_ENV = {
    "OPTSERVE_BODY_TIMEOUT": str(BODY_TIMEOUT),
    "OPTSERVE_IDLE_TRIM_SECONDS": "1",
    "OPTSERVE_MAX_SESSIONS_PER_KEY": str(SESSIONS_PER_KEY),
}
PRLIMIT = ["prlimit", "--as=4000000000"]


def process_tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and its descendants (the server and its worker processes)."""
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            for task in Path(f"/proc/{current}/task").iterdir():
                pending.extend(int(c) for c in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += next(
            int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:")
        )
    return total


def _poll(url: str, session: str, stop: Any, out: str) -> None:
    """The bystander, in a process of its own (so that the attacker's work does not delay its clock):
    `/healthz` then a small step, every 10 ms, until `stop` is set; what it saw goes to `out` as JSON."""
    health: list[tuple[float, float]] = []
    steps, errors = 0, []
    grads = {"grads": {"w": [0.1] * 100}}
    with httpx.Client(base_url=url, timeout=120.0) as client:
        while not stop.is_set():
            started = time.monotonic()
            try:
                answer = client.get("/healthz")
                health.append((started, time.monotonic() - started))
                if answer.status_code != 200:
                    errors.append(f"healthz {answer.status_code}")
                stepped = client.post(f"/v1/sessions/{session}/step", json=grads)
            except httpx.HTTPError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.5)
                continue
            if stepped.status_code == 200:
                steps += 1
            else:
                errors.append(f"step {stepped.status_code}: {stepped.text[:200]}")
            time.sleep(0.01)
    Path(out).write_text(json.dumps({"health": health, "steps": steps, "errors": errors}))


class Watch:
    """A bystander polling `/healthz` and stepping a small session of its own (in another process), and a
    sampler of the server's memory: what they saw, with monotonic times, to cut per attack."""

    def __init__(self, server: Server, scratch: Path) -> None:
        assert server.proc is not None
        self.pid = server.proc.pid
        self.url = server.url
        body = {"optimizer": {"name": "adam", "lr": 0.01}, "params": {"w": [0.0] * 100}}
        created = httpx.post(server.url + "/v1/sessions", json=body)
        assert created.status_code == 201, created.text
        self.session: str = created.json()["id"]
        self.health: list[tuple[float, float]] = []  # (started, seconds)
        self.rss: list[tuple[float, int]] = []
        self.steps = 0
        self.errors: list[str] = []
        self._out = scratch / "bystander.json"
        context = multiprocessing.get_context("spawn")
        self._stop = context.Event()
        self._poller = context.Process(
            target=_poll, args=(self.url, self.session, self._stop, str(self._out))
        )
        self._sampling = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._sampling.is_set():
            self.rss.append((time.monotonic(), process_tree_rss(self.pid)))
            time.sleep(0.02)

    def __enter__(self) -> Watch:
        self._poller.start()
        self._sampler.start()
        deadline = time.monotonic() + 30
        while not self._out.exists() and time.monotonic() < deadline and self._poller.is_alive():
            if httpx.get(f"{self.url}/v1/sessions/{self.session}").json()["step"] > 0:
                break  # the bystander is stepping
            time.sleep(0.05)
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._poller.join(timeout=130)
        self._sampling.set()
        self._sampler.join(timeout=5)
        seen = json.loads(self._out.read_text())
        self.health = [(t, s) for t, s in seen["health"]]
        self.steps, self.errors = seen["steps"], seen["errors"]

    def p99(self, since: float = 0.0, until: float = float("inf")) -> float:
        seen = [s for t, s in self.health if since <= t <= until]
        if len(seen) < 3:
            return max(seen, default=0.0)
        return statistics.quantiles(seen, n=100)[98]

    def peak_rss(self, since: float, until: float) -> int:
        return max((r for t, r in self.rss if since <= t <= until), default=0)


@dataclass
class Result:
    attack: str
    answer: str
    started: float
    finished: float
    peak_rss_over_before: int
    healthz_p99: float = float("nan")  # filled once the bystander has reported

    @property
    def seconds(self) -> float:
        return self.finished - self.started


def _raw(port: int, head: str, body: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=BODY_TIMEOUT + 10)
    sock.sendall(head.encode() + body)
    return sock


def _status(sock: socket.socket) -> str:
    """The status code the server answered on `sock`, or `none` if it did not within the socket's timeout."""
    data = b""
    try:
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    finally:
        sock.close()
    return data.split(b" ", 2)[1].decode() if data else "none"


def _head(path: str, length: int, content_type: str = JSON) -> str:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    )


def checkpoint_of_size(client: httpx.Client, numel: int) -> bytes:
    """An Adam checkpoint with one parameter of `numel` elements, as a client restoring a large model sends:
    a one-element session's checkpoint with every tensor grown to that size (any server version takes it)."""
    body = {"optimizer": {"name": "adam"}, "params": {"w": [0.0]}}
    small = client.post("/v1/sessions", json=body).json()["id"]
    tensors, metadata = safetensors.decode(client.get(f"/v1/sessions/{small}/checkpoint").content)
    client.delete(f"/v1/sessions/{small}")
    grown = {k: np.zeros(numel, v.dtype) if v.shape == (1,) else np.asarray(v) for k, v in tensors.items()}
    return safetensors.encode_bytes(grown, metadata)


class Attacks:
    """Each method is one attack: it sends its requests and returns the answer it got (status codes)."""

    def __init__(self, server: Server, target: str) -> None:
        self.server = server
        self.target = target  # the bystander's session: what attacks on a real session aim at
        self.client = httpx.Client(base_url=server.url, timeout=120.0)

    def _post(self, path: str, content: bytes, content_type: str = JSON) -> httpx.Response:
        return self.client.post(path, content=content, headers={"Content-Type": content_type})

    def held_declared_1gb(self) -> str:
        """Four bodies declared 1 GiB with 2 bytes sent each, held open."""
        held = [_raw(self.server.port, _head("/v1/sessions", (1 << 30) - 1, ST), b"{}") for _ in range(4)]
        return " ".join(_status(sock) for sock in held)

    def trickled_body(self) -> str:
        """A 10 MiB body sent a byte every 0.2 s."""
        sock = _raw(self.server.port, _head("/v1/sessions", 10 * MiB), b"{")
        deadline = time.monotonic() + BODY_TIMEOUT + 5
        while time.monotonic() < deadline:
            try:
                sock.sendall(b" ")
            except OSError:
                break
            time.sleep(0.2)
        return _status(sock)

    def declared_past_the_limit(self) -> str:
        return _status(_raw(self.server.port, _head("/v1/sessions", (1 << 30) + 1, ST)))

    def tiny_create_huge_state(self) -> str:
        """112 bytes: adafactor on a [0, 1e8] parameter, whose factored state the non-zero dimension sizes."""
        spec = {"optimizer": {"name": "adafactor"}, "params": {"w": {"shape": [0, 100_000_000], "data": []}}}
        return str(self.client.post("/v1/sessions", json=spec).status_code)

    def preview_a_million_steps(self) -> str:
        spec = {"lr": 0.1, "scheduler": {"name": "step_lr", "step_size": 1}, "steps": 1_000_000}
        return str(self.client.post("/v1/schedules/preview", json=spec).status_code)

    def preview_100_groups(self) -> str:
        spec = {"lr": [0.1] * 100, "scheduler": {"name": "cosine_annealing_lr", "T_max": 1000}, "steps": 1000}
        return str(self.client.post("/v1/schedules/preview", json=spec).status_code)

    def million_parameter_create(self) -> str:
        """A create of 1e6 one-element parameters: 16 MB of JSON."""
        many = b",".join(b'"p%d":[1.0]' % i for i in range(1_000_000))
        return str(
            self._post("/v1/sessions", b'{"optimizer":{"name":"sgd"},"params":{' + many + b"}}").status_code
        )

    def million_unknown_gradients(self) -> str:
        """A step naming 1e6 gradients the session does not have."""
        many = b",".join(b'"g%d":[1.0]' % i for i in range(1_000_000))
        return str(self._post(f"/v1/sessions/{self.target}/step", b'{"grads":{' + many + b"}}").status_code)

    def json_of_zeros(self) -> str:
        """A step whose one gradient is 60 MiB of JSON zeros: 31 million numbers to parse."""
        body = b'{"grads":{"w":[' + b"0," * (30 * MiB) + b"0]}}"
        return str(self._post(f"/v1/sessions/{self.target}/step", body).status_code)

    def long_safetensors_header(self) -> str:
        """A restore whose safetensors header is 14 MiB: 150,000 one-element tensors."""
        body = safetensors.encode_bytes({f"t{i:06d}": np.zeros(1, np.float32) for i in range(150_000)})
        return str(self._post("/v1/sessions", body, ST).status_code)

    def sessions_past_the_quota(self) -> str:
        """One key creates sessions of 10k-parameter Adam until refused (or twice the quota)."""
        body = json.dumps({"optimizer": {"name": "adam"}, "params": {"w": [0.0] * 10_000}}).encode()
        created, last, made = 0, "", []
        for _ in range(2 * SESSIONS_PER_KEY):
            answer = self._post("/v1/sessions", body)
            last = str(answer.status_code)
            if answer.status_code != 201:
                break
            created += 1
            made.append(answer.json()["id"])
        for sid in made:
            self.client.delete(f"/v1/sessions/{sid}")
        return f"{created} x 201, then {last}"

    def big_json_answer(self) -> str:
        """The parameters of a 1e7-parameter session asked for as JSON (rendering 1e7 numbers)."""
        created = self._post("/v1/sessions", checkpoint_of_size(self.client, 10_000_000), ST)
        if created.status_code != 201:
            return f"create {created.status_code}"
        sid = created.json()["id"]
        try:
            return str(self.client.get(f"/v1/sessions/{sid}/params").status_code)
        finally:
            self.client.delete(f"/v1/sessions/{sid}")

    def spike(self) -> str:
        """A 1e7-parameter Adam session (40 MB of parameters, 80 MB of state) stepped twice, then deleted."""
        created = self._post("/v1/sessions", checkpoint_of_size(self.client, 10_000_000), ST)
        if created.status_code != 201:
            return f"create {created.status_code}"
        sid = created.json()["id"]
        grads = safetensors.encode_bytes({"w": np.ones(10_000_000, np.float32)}, None)
        codes = [
            self._post(f"/v1/sessions/{sid}/step?return_params=false", grads, ST).status_code
            for _ in range(2)
        ]
        deleted = self.client.delete(f"/v1/sessions/{sid}").status_code
        return f"{codes[0]} {codes[1]} {deleted}"

    def all(self) -> list[tuple[str, Callable[[], str]]]:
        return [
            ("4 bodies declared 1 GiB, 2 bytes sent, held open", self.held_declared_1gb),
            ("a 10 MiB body trickled a byte per 0.2 s", self.trickled_body),
            ("a body declared past OPTSERVE_MAX_BODY_BYTES", self.declared_past_the_limit),
            ("adafactor on a [0, 1e8] parameter (112 bytes)", self.tiny_create_huge_state),
            ("preview of 1e6 steps", self.preview_a_million_steps),
            ("preview of 100 groups x 1,000 steps", self.preview_100_groups),
            ("create with 1e6 one-element parameters (16 MB JSON)", self.million_parameter_create),
            ("step naming 1e6 unknown gradients (16 MB JSON)", self.million_unknown_gradients),
            ("step with 60 MiB of JSON zeros", self.json_of_zeros),
            ("restore with a 14 MiB safetensors header", self.long_safetensors_header),
            (f"sessions past the per-key quota ({SESSIONS_PER_KEY})", self.sessions_past_the_quota),
            ("parameters of a 1e7-parameter session as JSON", self.big_json_answer),
            ("spike: 1e7-parameter Adam stepped twice, deleted", self.spike),
        ]


def run_attacks(server: Server, watch: Watch, settle: float = 2.5) -> list[Result]:
    """Every attack in turn, each measured on its own window; `settle` seconds of quiet after each (for the
    server to finish what the attack left, and to return idle memory)."""
    attacks = Attacks(server, watch.session)
    results = []
    for name, attack in attacks.all():
        before = process_tree_rss(watch.pid)
        started = time.monotonic()
        try:
            answer = attack()
        except httpx.HTTPError as exc:
            answer = f"{type(exc).__name__}"
        finished = time.monotonic()
        time.sleep(0.2)
        peak = max(watch.peak_rss(started, time.monotonic()), before)
        results.append(Result(name, answer, started, finished, peak - before))
        if server.proc is not None and server.proc.poll() is not None:
            results[-1].answer += " (server died)"
            break
        time.sleep(settle)
    attacks.client.close()
    return results


def add_latencies(results: list[Result], watch: Watch) -> list[Result]:
    """Each attack's `/healthz` p99, from what the bystander reported when it stopped."""
    for result in results:
        result.healthz_p99 = watch.p99(result.started, result.finished)
    return results


def table(results: list[Result], title: str) -> str:
    rows = [
        f"| {r.attack} | {r.answer} | {r.seconds:.2f} | {r.peak_rss_over_before / MiB:.0f} | "
        f"{r.healthz_p99 * 1000:.0f} |"
        for r in results
    ]
    head = (
        f"{title}\n\n| attack | answer | seconds | peak RSS over before (MiB) | /healthz p99 (ms) |\n"
        "|---|---|---|---|---|"
    )
    return "\n".join([head, *rows])
