"""The TypeScript client's own suite (`clients/typescript/test`, Node's test runner), run against a real
server that it starts with this interpreter: sessions, both wire formats, checkpoint and restore, typed
errors, resends with one Idempotency-Key, and its README's example."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "clients" / "typescript"


def test_the_typescript_client_passes_its_suite_against_a_real_server() -> None:
    assert (PACKAGE / "node_modules").is_dir(), (
        "run `make install-test`: it installs the client's npm packages"
    )
    env = {**os.environ, "OPTSERVE_PYTHON": sys.executable}
    env.pop("OPTSERVE_URL", None)
    done = subprocess.run(
        ["npm", "test"], cwd=PACKAGE, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    report = done.stdout[-4000:] + done.stderr[-2000:]
    assert done.returncode == 0, report
    passed = re.search(r"^# pass (\d+)$", done.stdout, re.M)
    failed = re.search(r"^# fail (\d+)$", done.stdout, re.M)
    assert passed, report
    assert failed, report
    assert int(failed[1]) == 0, report
    assert int(passed[1]) >= 11, report
