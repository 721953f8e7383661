"""Schemathesis's command line with every check (`--checks all`) against a real server with API keys:
coverage, fuzzing and stateful phases (following the document's links from createSession) find nothing.
`schemathesis.toml` beside this file holds the one setting, and why; `schemathesis_hooks.py` keeps it from
creating sessions with synchronous rounds, whose contributions wait for the round."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.system.server import Server

KEY = "schemathesis-key"
ROOT = Path(__file__).resolve().parents[2]
CONFIG = Path(__file__).with_name("schemathesis.toml")


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with Server("memory://", env={"OPTSERVE_API_KEYS": KEY}) as running:
        yield running


def test_schemathesis_with_every_check_finds_nothing(server: Server) -> None:
    cli = Path(sys.executable).with_name("schemathesis")
    done = subprocess.run(
        [str(cli), "--config-file", str(CONFIG), "run", f"{server.url}/openapi.json", "--checks", "all",
         "-H", f"Authorization: Bearer {KEY}", "--max-examples", "30", "--seed", "1"],
        capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "SCHEMATHESIS_HOOKS": "tests.api.schemathesis_hooks"}, cwd=ROOT,
    )  # fmt: skip
    report = done.stdout[-6000:] + done.stderr[-2000:]
    assert done.returncode == 0, report
    counts = re.search(r"(\d+) generated, (\d+) passed", done.stdout)
    assert counts, report
    assert int(counts[1]) == int(counts[2]) > 500, report
    assert "Selected: 16/16" in done.stdout, report
