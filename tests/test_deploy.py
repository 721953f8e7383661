"""The deployment files, checked offline (no Docker engine needed): the Dockerfile against hadolint and the
promises it makes, .dockerignore against what the build copies, docker-compose.yml against the compose-spec
schema and its topology (Redis with AOF, two healthy API replicas on it, a trainer that waits for both)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.system.server import Server, free_port

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
REDIS_STORE = "redis://redis:6379/0"


# ---------------------------------------------------------------- tools from the test extra


def venv_tool(name: str) -> str:
    """An executable the `test` extra installs next to this interpreter; fails (never skips) without it."""
    path = Path(sys.executable).parent / name
    if not path.is_file():
        pytest.fail(
            f"{name} was not found at {path}: it comes with the test extra "
            "(`pip install -e '.[test]'`, or `make install-test`)",
            pytrace=False,
        )
    return str(path)


# ---------------------------------------------------------------- Dockerfile


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int

    def flags_and_rest(self) -> tuple[dict[str, str], str]:
        """`--name=value` flags before the arguments, and the arguments after them."""
        flags: dict[str, str] = {}
        rest = self.args
        while match := re.match(r"--([\w-]+)(?:=(\S*))?\s+", rest):
            flags[match.group(1)] = match.group(2) or ""
            rest = rest[match.end() :]
        return flags, rest

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form CMD/ENTRYPOINT/HEALTHCHECK CMD, or None for shell form."""
        _, rest = self.flags_and_rest()
        rest = rest.removeprefix("CMD ").strip() if self.keyword == "HEALTHCHECK" else rest
        try:
            value = json.loads(rest)
        except json.JSONDecodeError:
            return None
        return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for i in self.all("ENV"):
            for token in shlex.split(i.args):
                key, sep, value = token.partition("=")
                assert sep, f"line {i.line}: use the ENV key=value form, not `ENV {i.args}`"
                values[key] = value
        return values


def instructions(text: str) -> list[Instruction]:
    """The Dockerfile's instructions, with continuation lines joined and comments dropped."""
    result: list[Instruction] = []
    pending, start = "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip().startswith("#") or (not pending and not line.strip()):
            continue
        start = start or number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, args = (pending + line).strip().partition(" ")
        result.append(Instruction(keyword.upper(), " ".join(args.split()), start))
        pending, start = "", 0
    return result


@cache
def stages() -> tuple[list[Stage], dict[str, str]]:
    """The build stages in order, and the global ARG defaults (declared before the first FROM)."""
    found: list[Stage] = []
    global_args: dict[str, str] = {}
    for i in instructions(DOCKERFILE.read_text()):
        if i.keyword == "FROM":
            _, rest = i.flags_and_rest()
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), m.group(0)), words[0])
            found.append(Stage(image, name))
        elif not found:
            if i.keyword == "ARG":
                key, _, value = i.args.partition("=")
                global_args[key] = value
        else:
            found[-1].instructions.append(i)
    return found, global_args


def stage(name: str) -> Stage:
    named = {s.name: s for s in stages()[0]}
    assert name in named, f"the Dockerfile has no stage named {name!r} (stages: {sorted(map(str, named))})"
    return named[name]


def final_stage() -> Stage:
    return stages()[0][-1]


def shipped_stages() -> list[Stage]:
    """Every stage that is an image someone runs: the final one and any compose builds with `--target`."""
    targets = {s["build"]["target"] for s in services().values() if isinstance(s.get("build"), dict)}
    return [s for s in stages()[0] if s is final_stage() or s.name in targets]


def inherited(s: Stage, keyword: str) -> Instruction | None:
    """The last `keyword` instruction in effect for a stage: its own, or that of the stage it builds on."""
    by_name = {x.name: x for x in stages()[0]}
    current: Stage | None = s
    while current is not None:
        found = current.last(keyword)
        if found is not None:
            return found
        current = by_name.get(current.base)
    return None


def run_user(s: Stage) -> str:
    user = inherited(s, "USER")
    return user.args if user else "root"


def test_dockerfile_passes_hadolint_with_no_findings() -> None:
    result = subprocess.run(
        [venv_tool("hadolint"), "--no-color", "--format", "json", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    findings = json.loads(result.stdout or "[]")
    report = "\n".join(f"line {f['line']}: {f['code']} {f['level']}: {f['message']}" for f in findings)
    assert findings == [], f"hadolint:\n{report}{result.stderr}"
    assert result.returncode == 0, result.stderr


def test_dockerfile_is_multi_stage_on_a_pinned_slim_python() -> None:
    all_stages, _ = stages()
    assert len(all_stages) >= 2
    names = {s.name for s in all_stages}
    for s in all_stages:
        if s.base in names:
            continue
        image, _, tag = s.base.partition(":")
        assert image == "python", f"stage {s.name}: {s.base} is not the official python image"
        assert re.fullmatch(r"3\.11\.\d+-slim(-\w+)?", tag), (
            f"stage {s.name}: {s.base!r} should pin a patch release of the slim 3.11 image"
        )


def test_final_stage_is_the_api_server_as_a_non_root_user() -> None:
    s = final_stage()
    assert run_user(s) not in {"root", "0", "0:0"}
    assert inherited(s, "WORKDIR") is not None
    cmd = s.last("CMD")
    assert cmd is not None
    assert cmd.exec_form() == ["optserve", "serve"], f"line {cmd.line}: CMD must be exec-form optserve serve"
    env = s.env()
    assert env["OPTSERVE_HOST"] == "0.0.0.0"
    assert env["OPTSERVE_STORE"] == "sqlite:////data/optserve.db"
    assert env.get("OPTSERVE_PORT", "8000") == "8000"
    assert [x.args for x in s.all("EXPOSE")] == ["8000"]
    assert any("/data" in json.loads(v.args) for v in s.all("VOLUME") if v.args.startswith("["))
    healthcheck = inherited(s, "HEALTHCHECK")
    assert healthcheck is not None
    probe = healthcheck.exec_form()
    assert probe is not None, f"line {healthcheck.line}: HEALTHCHECK CMD should be exec-form"
    assert probe[0] == "python", "the slim image has no curl or wget: probe with the standard library"
    assert "/healthz" in " ".join(probe)


@dataclass
class PipWheel:
    """One `pip wheel` of the builder stage."""

    instruction: Instruction
    words: list[str]
    wheel_dir: str
    specs: list[str]  # what it builds: local projects with their extras, `./clients/python[demo]`

    def projects(self) -> dict[str, set[str]]:
        """{project directory: extras asked for}."""
        found: dict[str, set[str]] = {}
        for spec in self.specs:
            directory, _, extras = spec.partition("[")
            found[directory] = {e.strip() for e in extras.rstrip("]").split(",") if e.strip()}
        return found


def builder_wheels() -> list[PipWheel]:
    result: list[PipWheel] = []
    for i in stage("builder").all("RUN"):
        for command in re.split(r"&&|;", i.flags_and_rest()[1]):
            words = shlex.split(command)
            if words[:2] != ["pip", "wheel"]:
                continue
            wheel_dir, specs, rest = "", [], iter(words[2:])
            for word in rest:
                if word in ("--wheel-dir", "-w"):
                    wheel_dir = next(rest)
                elif word.startswith("--wheel-dir="):
                    wheel_dir = word.partition("=")[2]
                elif not word.startswith("-"):
                    specs.append(word)
            result.append(PipWheel(i, words, wheel_dir, specs))
    return result


def test_shipped_stages_install_only_the_builders_wheels_and_no_compiler() -> None:
    builder = stage("builder")
    wheels = builder_wheels()
    built_dirs = {w.wheel_dir for w in wheels}
    assert wheels, "the builder should `pip wheel --wheel-dir DIR PROJECT`"
    assert len(built_dirs) == len(wheels), "one wheel directory per image: each installs all of its own"
    for w in wheels:
        assert "--no-cache-dir" in w.words, f"line {w.instruction.line}"
        assert all(spec.startswith(".") for spec in w.specs), "the builder wheels local projects only"
    for s in shipped_stages():
        assert s is not builder
        installs = [i for i in s.all("RUN") if "pip install" in i.args]
        assert installs, f"stage {s.name} installs nothing"
        for i in installs:
            flags, command = i.flags_and_rest()
            mount = dict(part.partition("=")[::2] for part in flags.get("mount", "").split(","))
            assert mount.get("from") == "builder", f"line {i.line}: install from a bind mount of the builder"
            assert mount.get("source") in built_dirs, f"line {i.line}: mount one of {sorted(built_dirs)}"
            assert "--no-index" in command, f"line {i.line}"
            assert "--no-cache-dir" in command, f"line {i.line}"
            assert f"{mount['target']}/*.whl" in command, f"line {i.line}: install exactly the built wheels"
        text = " ".join(i.args for i in s.instructions)
        for tool in ("apt-get", "gcc", "build-essential", "curl"):
            assert tool not in text, f"stage {s.name} should not need {tool}"
        assert not [c for c in s.all("COPY") if "--from=builder" in c.args], "wheels in a layer stay forever"


def test_trainer_stage_has_the_sdk_demo_extras_and_runs_as_a_non_root_user() -> None:
    trainer = stage("trainer")
    [sdk] = [w for w in builder_wheels() if "./clients/python" in w.projects()]
    assert sdk.projects()["./clients/python"] == {"demo"}
    assert any(f"source={sdk.wheel_dir}," in i.args for i in trainer.all("RUN"))
    assert run_user(trainer) not in {"root", "0", "0:0"}


# ---------------------------------------------------------------- .dockerignore and the build context


def ignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """(excludes, regex) per .dockerignore line, in order, with Docker's matching rules: patterns are
    anchored at the context root, `*` and `?` stay within one path element, `**` spans any number."""
    result: list[tuple[bool, re.Pattern[str]]] = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.removeprefix("!").strip().strip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex, i = regex + "[" + pattern[i + 1 : end].replace("!", "^", 1) + "]", end + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        result.append((not negated, re.compile(regex)))
    return result


def in_build_context(relative: str) -> bool:
    """Whether Docker sends this path: the last pattern matching it or one of its parents decides."""
    parts = relative.strip("/").split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for excludes, regex in ignore_patterns():
        if any(regex.fullmatch(p) for p in prefixes):
            excluded = excludes
    return not excluded


@pytest.mark.parametrize(
    "path",
    [
        ".git/HEAD",
        ".venv/bin/python",
        "app/__pycache__/main.cpython-311.pyc",
        "clients/python/optserve/__pycache__/client.cpython-311.pyc",
        ".pytest_cache/v/cache/nodeids",
        ".mypy_cache/3.11/app.json",
        ".ruff_cache/CACHEDIR.TAG",
        ".hypothesis/examples/x",
        "tests/conftest.py",
        "tests/wire/data/tensor.bin",
        "optserve-data/optserve.db",
        "demo-output/loss.png",
        "bench/out/result.json",
        "optserve_server.egg-info/PKG-INFO",
    ],
)
def test_dockerignore_keeps_local_state_out_of_the_build_context(path: str) -> None:
    assert not in_build_context(path)


def test_every_copy_source_exists_and_is_in_the_build_context() -> None:
    copied: list[str] = []
    for s in stages()[0]:
        for i in s.all("COPY") + s.all("ADD"):
            flags, rest = i.flags_and_rest()
            if "from" in flags:
                continue
            sources = json.loads(rest)[:-1] if rest.startswith("[") else rest.split()[:-1]
            for source in sources:
                matches = sorted(ROOT.glob(source))
                assert matches, f"line {i.line}: COPY source {source!r} does not exist in the repository"
                for match in matches:
                    relative = match.relative_to(ROOT).as_posix()
                    assert in_build_context(relative), f"line {i.line}: {relative} is in .dockerignore"
                    copied.append(relative)
    for relative in copied:
        sources = [ROOT / relative] if (ROOT / relative).is_file() else (ROOT / relative).rglob("*.py")
        for path in sources:
            if "__pycache__" not in path.parts:
                name = path.relative_to(ROOT).as_posix()
                assert in_build_context(name), f"{name} is copied but excluded by .dockerignore"
    assert {"pyproject.toml", "README.md", "app", "clients/python"} <= set(copied)


@dataclass
class BuiltWheel:
    project: str  # as the builder names it, relative to its WORKDIR
    extras: set[str]  # asked for by the builder
    wheel_dir: str  # the builder's
    names: set[str]  # files in the wheel
    metadata: str
    entry_points: str


PIP_WHEEL_OFFLINE = ["-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]


def copy_as_docker_would(copy: Instruction, workdir: Path) -> None:
    """A context COPY: a file source lands in the destination directory, a directory's contents under it,
    and only what .dockerignore lets through."""
    *sources, dest = copy.flags_and_rest()[1].split()
    for source in sources:
        top = ROOT / source
        for path in [top] if top.is_file() else sorted(top.rglob("*")):
            if path.is_file() and in_build_context(path.relative_to(ROOT).as_posix()):
                target = workdir / dest / (path.name if path == top else path.relative_to(top))
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)


def wheel_offline(project: str, extras: set[str], wheel_dir: str, workdir: Path, out: Path) -> BuiltWheel:
    result = subprocess.run(
        [sys.executable, *PIP_WHEEL_OFFLINE, "--wheel-dir", str(out), project],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"pip wheel {project} in the builder:\n{result.stdout}{result.stderr}"
    [wheel] = out.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata = archive.read(f"{info}/METADATA").decode()
        entry = f"{info}/entry_points.txt"
        entry_points = archive.read(entry).decode() if entry in names else ""
    return BuiltWheel(project, extras, wheel_dir, names, metadata, entry_points)


@pytest.fixture(scope="module")
def builder_replay(tmp_path_factory: pytest.TempPathFactory) -> list[BuiltWheel]:
    """The builder stage replayed offline, instruction by instruction: each COPY takes what Docker would
    send, each `pip wheel` builds its local projects (`--no-deps`: the dependencies are PyPI's wheels)."""
    setuptools = tuple(int(part) for part in version("setuptools").split(".")[:2])
    if setuptools < (70, 1):  # older ones build wheels only with the `wheel` package beside them
        pytest.fail(f"setuptools {setuptools} < 70.1 cannot build the wheels offline; the test extra pins it")
    builder = stage("builder")
    workdir_instruction = builder.last("WORKDIR")
    assert workdir_instruction is not None
    workdir = tmp_path_factory.mktemp("builder") / workdir_instruction.args.lstrip("/")
    workdir.mkdir(parents=True)
    wheels = {w.instruction.line: w for w in builder_wheels()}
    built: list[BuiltWheel] = []
    for i in builder.instructions:
        if i.keyword == "COPY":
            copy_as_docker_would(i, workdir)
        elif i.line in wheels:
            for project, extras in wheels[i.line].projects().items():
                out = tmp_path_factory.mktemp("wheels")
                built.append(wheel_offline(project, extras, wheels[i.line].wheel_dir, workdir, out))
    return built


def test_the_builder_wheels_each_local_project_from_the_build_context(
    builder_replay: list[BuiltWheel],
) -> None:
    assert {w.project for w in builder_replay} == {".", "./clients/python"}
    for w in builder_replay:
        provided = set(re.findall(r"^Provides-Extra: (\S+)$", w.metadata, re.MULTILINE))
        assert w.extras <= provided, f"{w.project} has no extra {w.extras - provided}; pip only warns"


def test_the_server_wheel_holds_every_app_module_and_the_optserve_command(
    builder_replay: list[BuiltWheel],
) -> None:
    [server] = [w for w in builder_replay if w.project == "."]
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "app").rglob("*.py")}
    assert modules - server.names == set(), "modules the image would lack (a package without __init__.py?)"
    assert re.search(r"^optserve = app\.cli:main$", server.entry_points, re.MULTILINE)


def test_the_trainer_command_runs_a_module_of_the_sdk_wheel_with_flags_it_defines(
    builder_replay: list[BuiltWheel],
) -> None:
    [sdk] = [w for w in builder_replay if w.project == "./clients/python"]
    command = services()["trainer"]["command"]
    text = command[-1] if isinstance(command, list) else command
    runs = re.findall(r"python -m ([\w.]+)((?: --[\w-]+(?: [^-&;\s]\S*)?)*)", text)
    assert runs, f"the trainer should run `python -m MODULE ...`: {text}"
    for module, arguments in runs:
        path = module.replace(".", "/") + ".py"
        assert path in sdk.names, f"{module} is not in the SDK wheel"
        source = (ROOT / "clients/python" / path).read_text()
        for flag in re.findall(r"--[\w-]+", arguments):
            assert f'"{flag}"' in source, f"{module} defines no {flag}"


# ---------------------------------------------------------------- docker-compose.yml


@cache
def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return document


def services() -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = compose()["services"]
    return result


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.partition("=")[::2] for item in env)
    return {k: str(v) for k, v in env.items()}


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    """{dependency: condition}; the short list form means `service_started`."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: spec.get("condition", "service_started") for name, spec in deps.items()}


def healthcheck_test(service: dict[str, Any]) -> list[str] | None:
    """The service's healthcheck command, its own or its image's (a Dockerfile HEALTHCHECK), or None."""
    check = service.get("healthcheck")
    if check is not None:
        if check.get("disable"):
            return None
        test = check["test"]
        return test if isinstance(test, list) else ["CMD-SHELL", test]
    build = service.get("build")
    if isinstance(build, dict):
        image_check = inherited(stage(build["target"]), "HEALTHCHECK") if build.get("target") else None
        probe = image_check.exec_form() if image_check else None
        return ["CMD", *probe] if probe else None
    return None


def api_services() -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services().items() if "OPTSERVE_STORE" in environment(s)}


def test_compose_file_matches_the_compose_spec_schema() -> None:
    result = subprocess.run(
        [venv_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "version" not in compose(), "the Compose Specification has no `version:`; it is obsolete"


def test_redis_keeps_an_append_only_file_on_a_named_volume() -> None:
    redis = services()["redis"]
    image, _, tag = redis["image"].partition(":")
    assert image == "redis"
    assert re.match(r"\d+\.\d+\.\d+", tag), f"pin a release of the official image, not {redis['image']}"
    command = redis["command"] if isinstance(redis["command"], list) else shlex.split(redis["command"])
    assert command[0] == "redis-server"
    flags = dict(zip(command[1::2], command[2::2], strict=True))
    assert flags == {"--appendonly": "yes", "--appendfsync": "everysec"}
    volume, _, target = redis["volumes"][0].partition(":")
    assert target == "/data"
    assert volume in (compose().get("volumes") or {}), "the AOF belongs on a named volume"
    assert "redis-cli ping" in " ".join(healthcheck_test(redis) or [])
    assert redis.get("restart") in {"always", "unless-stopped"}


def test_two_api_replicas_share_the_redis_store_each_healthy_on_healthz() -> None:
    apis = api_services()
    assert sorted(apis) == ["api1", "api2"]
    host_ports = set()
    for name, api in apis.items():
        assert environment(api)["OPTSERVE_STORE"] == REDIS_STORE, name
        assert api["build"]["target"] == final_stage().name, f"{name} should run the default (API) image"
        assert depends_on(api) == {"redis": "service_healthy"}, name
        assert "/healthz" in " ".join(healthcheck_test(api) or []), name
        assert api.get("restart") in {"always", "unless-stopped"}, name
        [port] = api["ports"]
        *_, host, container = str(port).split(":")
        assert container == "8000", name
        host_ports.add(host)
    assert host_ports == {"8000", "8001"}
    assert len({a["image"] for a in apis.values()}) == 1, "one image, built once, for both replicas"


def test_trainer_waits_for_both_healthy_replicas_and_trains_through_each() -> None:
    trainer = services()["trainer"]
    assert trainer["build"]["target"] == "trainer"
    assert depends_on(trainer) == dict.fromkeys(api_services(), "service_healthy")
    command = " ".join(trainer["command"]) if isinstance(trainer["command"], list) else trainer["command"]
    for name in api_services():
        assert re.search(rf"optserve[ .]demo\b[^&;]* --url http://{name}:8000\b", command), name
    assert trainer.get("restart", "no") in {"no", "on-failure"}, "a one-off job must not loop forever"


def test_every_dependency_exists_and_every_healthy_condition_has_a_healthcheck() -> None:
    for name, service in services().items():
        for dependency, condition in depends_on(service).items():
            assert dependency in services(), f"{name} depends on unknown service {dependency}"
            assert condition in {"service_started", "service_healthy", "service_completed_successfully"}
            if condition == "service_healthy":
                assert healthcheck_test(services()[dependency]), f"{name} waits on {dependency}'s health"


def test_every_build_is_of_this_dockerfile_and_targets_one_of_its_stages() -> None:
    for name, service in services().items():
        build = service.get("build")
        if build is None:
            continue
        assert isinstance(build, dict), name
        assert build.get("context") == ".", f"{name}: build this repository"
        assert build.get("dockerfile", "Dockerfile") == "Dockerfile", name
        stage(build["target"])  # fails naming the stages when the target is missing


# ---------------------------------------------------------------- the probes themselves, against a server


def probes() -> dict[str, list[str]]:
    """Every Python healthcheck command, by where it is written (the Dockerfile and each API service)."""
    result = {"Dockerfile": healthcheck_test({"build": {"target": final_stage().name}}) or []}
    result |= {name: healthcheck_test(api) or [] for name, api in api_services().items()}
    return result


def run_probe(args: list[str], port: int) -> int:
    """A `python ...` healthcheck run here, against `port` where it would ask the container's 8000."""
    command = [sys.executable, *(a.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for a in args)]
    env = {**os.environ, "OPTSERVE_PORT": str(port)}
    return subprocess.run(command, env=env, capture_output=True, timeout=30).returncode


@pytest.fixture(scope="module")
def live_server() -> Iterator[Server]:
    with Server("memory://") as server:
        yield server


@pytest.mark.parametrize("where", ["Dockerfile", "api1", "api2"])
def test_healthcheck_probe_passes_against_a_live_server_and_fails_without_one(
    where: str, live_server: Server
) -> None:
    kind, program, *args = probes()[where]
    assert kind == "CMD"
    assert program == "python"
    if where != "Dockerfile":  # compose probes name the container port; the image's reads OPTSERVE_PORT
        assert "127.0.0.1:8000/healthz" in " ".join(args)
    assert run_probe(args, live_server.port) == 0
    assert run_probe(args, free_port()) != 0
