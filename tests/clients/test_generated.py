"""Clients generated from the live OpenAPI document by third-party generators, unedited, train y = 2x + 1
against a real server with an API key, retry a step with its Idempotency-Key and get a 409 for a stale
step: openapi-python-client (PyPI), @hey-api/openapi-ts and openapi-typescript with openapi-fetch (npm;
the TypeScript is type-checked by tsc in strict mode, then run with node)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.system.server import Server

KEY = "generated-clients-key"
HERE = Path(__file__).with_name("generated")
NODE_MODULES = HERE / "node_modules"


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with Server("memory://", env={"OPTSERVE_API_KEYS": KEY}) as running:
        yield running


@pytest.fixture(scope="module")
def document(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("openapi") / "openapi.json"
    path.write_bytes(httpx.get(f"{server.url}/openapi.json").content)
    return path


def run(cmd: list[str], cwd: Path, **env: str) -> str:
    done = subprocess.run(
        cmd, cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def assert_trained(output: str) -> None:
    fit = json.loads(output.strip().splitlines()[-1])
    assert fit["steps"] == 300
    assert abs(fit["w"] - 2) < 1e-3, fit
    assert abs(fit["b"] - 1) < 1e-3, fit


def test_openapi_python_client_generates_a_client_that_trains(
    server: Server, document: Path, tmp_path: Path
) -> None:
    venv_bin = Path(sys.executable).parent
    run(
        [
            str(venv_bin / "openapi-python-client"),
            "generate",
            "--path",
            str(document),
            "--meta",
            "none",
            "--output-path",
            str(tmp_path / "optserve_api"),
        ],
        tmp_path,
        PATH=f"{venv_bin}{os.pathsep}{os.environ['PATH']}",  # its post-hooks run ruff
    )
    assert (tmp_path / "optserve_api" / "api" / "sessions" / "step.py").exists()
    assert_trained(
        run(
            [sys.executable, str(HERE / "train_python.py"), server.url, KEY],
            tmp_path,
            PYTHONPATH=str(tmp_path),
        )
    )


def test_hey_api_generates_a_typescript_client_that_trains(
    server: Server, document: Path, tmp_path: Path
) -> None:
    assert NODE_MODULES.is_dir(), (
        "run `make install-test`: it installs tests/clients/generated's npm packages"
    )
    for name in ("train.ts", "tsconfig.json", "package.json"):
        shutil.copy(HERE / name, tmp_path / name)
    (tmp_path / "node_modules").symlink_to(NODE_MODULES)
    bin_ = NODE_MODULES / ".bin"
    run(
        [str(bin_ / "openapi-ts"), "-i", str(document), "-o", "out/client", "-c", "@hey-api/client-fetch"],
        tmp_path,
    )
    assert (tmp_path / "out" / "client" / "sdk.gen.ts").exists()
    run([str(bin_ / "tsc"), "-p", "."], tmp_path)  # the generated types check against how train.ts uses them
    assert_trained(run(["node", "out/js/train.js", server.url, KEY], tmp_path))
