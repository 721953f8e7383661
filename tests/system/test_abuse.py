"""Hostile requests against a real server under `prlimit` (`tests/system/attacks.py`): each is refused
with a problem naming the limit, or served without holding up anyone, while `/healthz` stays quick, another
tenant's small session keeps stepping, a quiet session stays bit for bit as it was, and memory returns."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.system.attacks import (
    PRLIMIT,
    SERVER_ENV,
    SESSIONS_PER_KEY,
    MiB,
    Watch,
    add_latencies,
    process_tree_rss,
    run_attacks,
    table,
)
from tests.system.server import Server

EXPECTED = {
    "4 bodies declared 1 GiB, 2 bytes sent, held open": "408 408 408 408",
    "a 10 MiB body trickled a byte per 0.2 s": "408",
    "a body declared past OPTSERVE_MAX_BODY_BYTES": "413",
    "adafactor on a [0, 1e8] parameter (112 bytes)": "422",
    "preview of 1e6 steps": "422",
    "preview of 100 groups x 1,000 steps": "200",
    "create with 1e6 one-element parameters (16 MB JSON)": "413",
    "step naming 1e6 unknown gradients (16 MB JSON)": "413",
    "step with 60 MiB of JSON zeros": "422",
    "restore with a 14 MiB safetensors header": "422",
    # the bystander's and the quiet session count too: open mode is one key
    f"sessions past the per-key quota ({SESSIONS_PER_KEY})": f"{SESSIONS_PER_KEY - 2} x 201, then 429",
    "parameters of a 1e7-parameter session as JSON": "200",
    "spike: 1e7-parameter Adam stepped twice, deleted": "200 200 204",
}
# What a request may cost in resident memory (server and workers) beyond what it was before: large bodies
# and answers cost what they are (the JSON of 1e7 numbers is 150 MB; 31 million zeros parsed are a
# 250 MB array, from a list of as many items), refusals cost almost nothing.
PEAK_BUDGET_MIB = {
    "step with 60 MiB of JSON zeros": 1200,
    "parameters of a 1e7-parameter session as JSON": 1000,
    "spike: 1e7-parameter Adam stepped twice, deleted": 600,
    "restore with a 14 MiB safetensors header": 400,
    "create with 1e6 one-element parameters (16 MB JSON)": 200,  # starts the worker process
    "step naming 1e6 unknown gradients (16 MB JSON)": 160,
}
# The first large JSON starts a worker process (an interpreter with numpy: ~60 MB) that stays.
RSS_AFTER_MARGIN_MIB = 160


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("abuse") / "server.log"
    with Server("memory://", env=SERVER_ENV, log=log, prefix=PRLIMIT) as running:
        yield running


def test_hostile_requests_cost_nothing_and_hold_up_no_one(server: Server, tmp_path: Path) -> None:
    client = httpx.Client(base_url=server.url, timeout=30.0)
    quiet = client.post(
        "/v1/sessions", json={"optimizer": {"name": "adam"}, "params": {"q": [1.0, 2.0, 3.0]}}
    ).json()["id"]
    assert (
        client.post(f"/v1/sessions/{quiet}/step", json={"grads": {"q": [0.1, 0.2, 0.3]}}).status_code == 200
    )
    quiet_before = client.get(f"/v1/sessions/{quiet}/checkpoint").content
    with Watch(server, tmp_path) as watch:
        base = process_tree_rss(watch.pid)
        results = run_attacks(server, watch)
    add_latencies(results, watch)
    report = table(results, "abuse") + f"\n\n/healthz p99 over the whole run: {watch.p99() * 1000:.1f} ms"
    (tmp_path / "abuse.md").write_text(report)
    print(report)

    assert {r.attack: r.answer for r in results} == EXPECTED, report
    assert watch.errors == []
    assert watch.steps > 50, report
    assert watch.p99() < 0.1, report
    for r in results:
        assert r.healthz_p99 < 0.1, report
        assert r.peak_rss_over_before < PEAK_BUDGET_MIB.get(r.attack, 64) * MiB, report
    after = process_tree_rss(watch.pid) - base
    assert after < RSS_AFTER_MARGIN_MIB * MiB, f"{report}\nresident after, over before: {after / MiB:.0f} MiB"
    # nobody else's session changed: the bystander's took exactly its own steps, the quiet one none
    assert client.get(f"/v1/sessions/{watch.session}").json()["step"] == watch.steps
    history = client.get(f"/v1/sessions/{watch.session}/history", params={"limit": 100_000}).json()["steps"]
    assert [row["step"] for row in history] == list(range(1, watch.steps + 1))
    assert client.get(f"/v1/sessions/{quiet}/checkpoint").content == quiet_before
    client.close()
