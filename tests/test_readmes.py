"""Every code block of the READMEs runs, so that none can rot: `python` and `bash` blocks against a real
server (the only change: its address for `127.0.0.1:8000`), `sh` blocks of make and pip commands dry-run or
checked against what they name, `js` blocks by the TypeScript client's own suite
(`clients/typescript/test`), `text` blocks being sample output. A block without one of these languages
fails the test."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.system.server import Server

ROOT = Path(__file__).resolve().parents[1]
READMES = [
    ROOT / "README.md",
    ROOT / "clients" / "python" / "README.md",
    ROOT / "clients" / "typescript" / "README.md",
]
LANGUAGES = {"python", "bash", "sh", "js", "text"}
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```$", re.S | re.M)


def blocks(readme: Path) -> list[tuple[str, str, int]]:
    text = readme.read_text()
    return [(m[1].strip(), m[2], text.count("\n", 0, m.start()) + 1) for m in FENCE.finditer(text)]


ALL = [(readme, *block) for readme in READMES for block in blocks(readme)]


def block_id(case: tuple[Path, str, str, int]) -> str:
    readme, language, _, line = case
    return f"{readme.relative_to(ROOT)}:{line}:{language or 'none'}"


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with Server("memory://") as running:
        yield running


def at(server: Server, code: str) -> str:
    """The block, aimed at the test's server instead of the default address."""
    return code.replace("http://127.0.0.1:8000", server.url).replace("localhost:8000", server.url)


def test_every_readme_block_has_a_language_this_test_runs() -> None:
    assert len(ALL) >= 12
    untagged = [block_id(case) for case in ALL if case[1] not in LANGUAGES]
    assert untagged == [], f"fence these as one of {sorted(LANGUAGES)}"


@pytest.mark.parametrize("case", [c for c in ALL if c[1] == "python"], ids=block_id)
def test_python_blocks_run(server: Server, case: tuple[Path, str, str, int], tmp_path: Path) -> None:
    script = tmp_path / "block.py"
    script.write_text(at(server, case[2]))
    done = subprocess.run(
        [sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


def test_bash_blocks_run_in_order(server: Server, tmp_path: Path) -> None:
    """The curl walk-through: its blocks run one after the other in one shell, as a reader pastes them."""
    code = "\n".join(at(server, c[2]) for c in ALL if c[1] == "bash")
    assert "curl" in code
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    answers = done.stdout
    assert '"step":1' in answers
    assert '"lr":[0.05]' in answers  # step_lr halved it after the second step
    assert '"status":422' in answers
    assert '"field":"grads.w"' in answers


def _extras(project: Path) -> set[str]:
    data = tomllib.loads((project / "pyproject.toml").read_text())
    return set(data["project"].get("optional-dependencies", {}))


@pytest.mark.parametrize("case", [c for c in ALL if c[1] == "sh"], ids=block_id)
def test_sh_blocks_name_commands_that_exist(case: tuple[Path, str, str, int]) -> None:
    """`make` lines dry-run (`make -n`: the targets exist and their recipes expand); `pip install -e` lines
    name a project here and extras it declares."""
    for raw in case[2].splitlines():
        command = raw.split("#", 1)[0].strip()
        if not command:
            continue
        words = shlex.split(command)
        if words[0] == "make":
            done = subprocess.run(
                ["make", "-n", *words[1:]], cwd=ROOT, capture_output=True, text=True, check=False
            )
            assert done.returncode == 0, (command, done.stderr)
        elif words[:3] == ["pip", "install", "-e"]:
            path, _, extras = words[3].partition("[")
            assert (ROOT / path / "pyproject.toml").exists(), command
            assert set(filter(None, extras.rstrip("]").split(","))) <= _extras(ROOT / path), command
        else:
            pytest.fail(f"no way to check {command!r}")


def test_js_blocks_are_run_by_the_typescript_suite() -> None:
    js = [c for c in ALL if c[1] == "js"]
    assert js
    assert all(c[0] == ROOT / "clients" / "typescript" / "README.md" for c in js)
    suite = (ROOT / "clients" / "typescript" / "test" / "client.test.mjs").read_text()
    assert "the README's example runs as written" in suite
    assert os.path.exists(ROOT / "tests" / "clients" / "test_typescript.py")
