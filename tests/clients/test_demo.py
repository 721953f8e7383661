"""`optserve demo`: the quick run end to end on its own server, its sessions, its schedulers."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import optserve
import pytest
from optserve import demo

from tests.system.server import Server

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the IHDR chunk, which a valid PNG has right after its signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_quick_demo_trains_every_optimizer_on_its_own_server_and_draws_the_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    runs: list[demo.Run] = []
    real_run = demo.run

    def keep_runs(*args: Any, **kwargs: Any) -> list[demo.Run]:
        runs.extend(real_run(*args, **kwargs))
        return runs

    monkeypatch.setattr(demo, "run", keep_runs)
    out = tmp_path / "x.png"

    assert demo.main(["--quick", "--no-progress", "--out", str(out)]) == 0

    width, height = png_size(out)
    assert (width, height) == (1200, 800)
    assert out.stat().st_size > 50_000  # four panels of curves, not an empty canvas
    printed = capsys.readouterr().out
    for task in ("linear regression", "digits MLP"):
        for name in demo.OPTIMIZERS:
            assert any(line.startswith(task) and name in line for line in printed.splitlines())
    assert str(out) in printed
    assert [(r.task, r.optimizer) for r in runs] == [
        (task, name) for task in ("linear regression", "digits MLP") for name in demo.OPTIMIZERS
    ]
    for r in runs[:5]:
        assert r.params["w"][0] == pytest.approx(2.0, abs=0.02)
        assert r.params["b"][0] == pytest.approx(1.0, abs=0.02)
        assert (len(r.losses), len(r.lrs)) == (300, 301)  # lrs also holds the one after the last step
    for r in runs[5:]:
        assert r.test_accuracy is not None
        assert r.test_accuracy > 0.8  # one epoch already learns the digits; chance is 0.1


def test_demo_against_a_given_server_deletes_its_sessions(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--url", server.url, "--quick", "--steps", "5", "--no-progress", "--out", str(tmp_path / "y.png")]

    assert demo.main(argv) == 0

    printed = capsys.readouterr().out
    assert server.url in printed
    assert f"{server.url}/ui/" in printed  # the dashboard, to watch the runs live
    with optserve.Client(server.url) as client:
        assert client.list_sessions() == []


@pytest.mark.parametrize("scheduler", demo.SCHEDULERS)
def test_every_scheduler_choice_is_a_spec_the_server_accepts_for_every_optimizer(
    sync_client: optserve.Client, scheduler: str
) -> None:
    for name, optimizer in demo.OPTIMIZERS.items():
        spec = {**optimizer, "lr": 0.1}
        session = sync_client.create_session(
            params={"w": [0.0]}, optimizer=spec, scheduler=demo.scheduler_spec(scheduler, spec, steps=10)
        )
        result = session.step({"w": [1.0]})
        assert result.step == 1, name


def test_demo_without_the_server_package_asks_for_a_url(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(demo, "server_installed", lambda: False)

    assert demo.main(["--quick"]) == 2

    assert "--url" in capsys.readouterr().err


def test_the_fleet_demo_trains_with_workers_in_rounds_and_async(server: Server, tmp_path: Path) -> None:
    """`optserve demo --workers 2 --quick`: 1 worker, 2 in synchronous rounds, 2 async, each through one
    session; a table and a plot of loss against wall time and samples seen."""
    out = tmp_path / "fleet.png"
    argv = ["demo", "--workers", "2", "--quick", "--url", server.url, "--out", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", *argv], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = {
        line.split("  ")[0].strip(): line.split()
        for line in done.stdout.splitlines()
        if "worker" in line[:30]
    }
    assert set(rows) >= {"1 worker", "2 workers, sync rounds", "2 workers, async"}, done.stdout
    assert int(rows["2 workers, sync rounds"][4]) == 21  # rounds: each worker's 21 batches of its half
    assert out.stat().st_size > 10_000
    assert httpx.get(f"{server.url}/v1/sessions").json()["sessions"] == []  # each run deleted its session
