"""Fuzzing over HTTP.

1. Schemathesis, in-process over ASGI, from the app's own OpenAPI document: every operation, positive and
   negative data; no answer is a 5xx and every answer is documented (status code, content type, body
   schema, required headers). Operations on `{session_id}` run on generated ids and, half of the time, on
   a session that exists; steps and parameter writes then often carry a fitting body (JSON or safetensors),
   and session creation a valid spec or a real checkpoint, so the success paths are fuzzed too.
2. Malformed safetensors bodies against a session with known state, on `POST .../step`, `PUT .../params`
   and the restore of `POST /v1/sessions`: each is a 400 or 422 problem+json, the session is bit-for-bit
   unchanged (parameters, optimizer state, step, history, no new session), and the server stays healthy.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
import safetensors.numpy as reference
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.generation.case import Case
from schemathesis.transport.serialization import Binary

from app.main import create_app
from app.optim.registry import optimizer_catalogue
from app.settings import Settings
from app.wire import safetensors
from tests.api.helpers import ST, create, step, tensor_json

PROBLEM = "application/problem+json"
GRAD_DTYPES = ("float16", "float32", "float64")
PARAM_DTYPES = ("float32", "float64")
LIVE = "live-session"  # a generated path value that the test swaps for a session that exists
LIVE_PARAMS: dict[str, np.ndarray] = {
    "w": (np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5) / 7,
    "b": np.array([0.5, -0.25, 1.0], dtype=np.float64),
}
LIVE_SPEC: dict[str, Any] = {
    "optimizer": {"name": "adam", "lr": 0.01},
    "scheduler": {"name": "step_lr", "step_size": 3, "gamma": 0.5},
    "metadata": {"purpose": "fuzz"},
}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
FUZZ_EXAMPLES = 100  # per operation and generation phase; the whole file stays well under a minute

# -- 1. schemathesis --------------------------------------------------------------------------------------

APP = create_app(Settings(store="memory://"))
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)
KEYED_APP = create_app(Settings(store="memory://", api_keys="fuzz-key"))
keyed_schema = schemathesis.openapi.from_asgi("/openapi.json", KEYED_APP)


@schemathesis.serializer(ST)
def _safetensors_body(_: Any, value: Any) -> bytes:
    if isinstance(value, Binary):
        return value.data
    return value if isinstance(value, bytes) else str(value).encode()


def _tensors_json(tensors: dict[str, np.ndarray]) -> dict[str, Any]:
    return {name: tensor_json(value) for name, value in tensors.items()}


@dataclass
class _Live:
    """The session that operations on `{session_id}` sometimes target, and its checkpoint."""

    session_id: str | None = None
    checkpoint: bytes | None = None


_live = _Live()


@pytest.fixture(autouse=True)
def _forget_live_session() -> None:
    # schemathesis ends the app's lifespan after each test, which empties its memory store
    _live.session_id = _live.checkpoint = None


def _call(path: str, method: str, **kwargs: Any) -> Any:
    return schema[path][method].Case(**kwargs).call()


def _create_live() -> str:
    body = {**LIVE_SPEC, "params": _tensors_json(LIVE_PARAMS)}
    response = _call("/v1/sessions", "POST", body=body, media_type="application/json")
    assert response.status_code == 201, response.text
    session_id: str = response.json()["id"]
    return session_id


def _live_session(fresh: bool) -> str:
    if fresh:
        return _create_live()
    if _live.session_id is None:
        _live.session_id = _create_live()
    return _live.session_id


def _live_checkpoint() -> bytes:
    if _live.checkpoint is None:
        path = {"session_id": _live_session(fresh=False)}
        response = _call("/v1/sessions/{session_id}/checkpoint", "GET", path_parameters=path)
        assert response.status_code == 200, response.text
        _live.checkpoint = response.content
    return _live.checkpoint


@schema.hook
def flatmap_path_parameters(_: Any, path_parameters: dict[str, Any]) -> Any:
    """Two thirds of the operations on one session target a session that exists."""
    if not path_parameters or "session_id" not in path_parameters:
        return st.just(path_parameters)
    live = {**path_parameters, "session_id": LIVE}
    return st.sampled_from([path_parameters, live, live])


def _array(shape: tuple[int, ...], dtype: str) -> st.SearchStrategy[np.ndarray]:
    """Finite values of `dtype`: mostly moderate, sometimes anywhere in its range (which may overflow the
    parameter's dtype, or the update)."""
    width = np.dtype(dtype).itemsize * 8
    floats = st.one_of(
        st.floats(-1e3, 1e3, width=width),  # type: ignore[arg-type]
        st.floats(allow_nan=False, allow_infinity=False, width=width),  # type: ignore[arg-type]
    )
    n = math.prod(shape)
    return st.lists(floats, min_size=n, max_size=n).map(lambda v: np.array(v, dtype=dtype).reshape(shape))


def _tensors(dtypes: tuple[str, ...], every: bool) -> st.SearchStrategy[dict[str, np.ndarray]]:
    """Tensors named and shaped as the live session's parameters, of any of `dtypes`; all or some."""

    def of_shape(shape: tuple[int, ...]) -> st.SearchStrategy[np.ndarray]:
        return st.sampled_from(dtypes).flatmap(lambda dtype: _array(shape, dtype))

    each = {name: of_shape(value.shape) for name, value in LIVE_PARAMS.items()}
    return st.fixed_dictionaries(each) if every else st.fixed_dictionaries({}, optional=each)


_LOSS = st.floats(-1e6, 1e6)
_OPTIMIZERS = [entry["name"] for entry in optimizer_catalogue()]
_SCHEDULERS: st.SearchStrategy[dict[str, Any] | None] = st.one_of(
    st.none(),
    st.builds(dict, name=st.just("step_lr"), step_size=st.integers(1, 5), gamma=st.floats(0.1, 1)),
    st.builds(dict, name=st.just("exponential_lr"), gamma=st.floats(0.5, 1)),
    st.builds(dict, name=st.just("cosine_annealing_lr"), T_max=st.integers(1, 10)),
    st.builds(dict, name=st.sampled_from(["constant_lr", "linear_lr", "reduce_lr_on_plateau"])),
)
_CREATE = st.fixed_dictionaries(
    {
        "optimizer": st.builds(dict, name=st.sampled_from(_OPTIMIZERS), lr=st.floats(1e-4, 1)),
        "params": st.dictionaries(
            st.sampled_from(["w", "v", "b"]),
            st.tuples(st.integers(1, 3), st.integers(1, 3)).flatmap(
                lambda shape: st.sampled_from(PARAM_DTYPES).flatmap(lambda dtype: _array(shape, dtype))
            ),
            min_size=1,
        ).map(_tensors_json),
    },
    optional={
        "scheduler": _SCHEDULERS,
        "metadata": st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2),
        "nonfinite": st.sampled_from(["error", "skip"]),
        "clip_grad_norm": st.floats(0.1, 10),
    },
)
_VALID_BODIES: dict[tuple[str, str], tuple[st.SearchStrategy[Any], st.SearchStrategy[bytes]]] = {
    ("POST", "/v1/sessions/{session_id}/step"): (
        st.fixed_dictionaries(
            {"grads": _tensors(GRAD_DTYPES, every=False).map(_tensors_json)}, optional={"loss": _LOSS}
        ),
        st.builds(
            safetensors.encode_bytes,
            _tensors(GRAD_DTYPES, every=False),
            st.fixed_dictionaries({}, optional={"loss": _LOSS.map(repr)}),
        ),
    ),
    ("PUT", "/v1/sessions/{session_id}/params"): (
        st.fixed_dictionaries({"params": _tensors(PARAM_DTYPES, every=True).map(_tensors_json)}),
        st.builds(safetensors.encode_bytes, _tensors(PARAM_DTYPES, every=True)),
    ),
    ("POST", "/v1/sessions"): (_CREATE, st.just(None).map(lambda _: _live_checkpoint())),
    ("POST", "/v1/schedules/preview"): (
        st.fixed_dictionaries(
            {
                "lr": st.one_of(st.floats(1e-4, 1), st.lists(st.floats(1e-4, 1), min_size=1, max_size=3)),
                "scheduler": _SCHEDULERS.filter(bool),
                "steps": st.integers(0, 50),
            },
            optional={"steps_per_epoch": st.integers(1, 4), "losses": st.lists(_LOSS, max_size=60)},
        ),
        st.nothing(),
    ),
}


@schema.hook
def flatmap_body(ctx: Any, body: Any) -> Any:
    """Two thirds of the steps, parameter writes and creations carry a body that the server should accept:
    gradients or parameters that fit the live session, a valid spec, or the live session's checkpoint."""
    operation = ctx.operation
    valid = None if operation is None else _VALID_BODIES.get((operation.method.upper(), operation.path))
    if valid is None:
        return st.just(body)
    if isinstance(body, dict):
        return st.one_of(st.just(body), valid[0], valid[0])
    if isinstance(body, (bytes, Binary)):
        return st.one_of(st.just(body), valid[1], valid[1])
    return st.just(body)


def _check_binary(response: Any) -> None:
    """A safetensors answer is one: both our strict decoder and the reference package read it."""
    content_type = (response.headers.get("content-type") or [""])[0]
    if content_type.startswith(ST):
        _, metadata = safetensors.decode(response.content)
        assert "step" in metadata
        reference.load(response.content)


@schema.parametrize()
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_operation_answers_as_documented(case: Case[Any]) -> None:
    session_id = (case.path_parameters or {}).get("session_id")
    deletes = case.method.upper() == "DELETE"
    if session_id == LIVE or (deletes and session_id == _live.session_id):
        # schemathesis also reuses ids seen in answers: the shared live session is never deleted
        case.path_parameters["session_id"] = _live_session(fresh=deletes)
    response = case.call_and_validate(checks=CHECKS)
    _check_binary(response)


@keyed_schema.parametrize()
@settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_operation_answers_as_documented_when_keys_are_required(case: Case[Any]) -> None:
    response = case.call_and_validate(checks=CHECKS)
    if case.path.startswith("/v1"):
        # A generated header is never the key. FastAPI parses a declared JSON body (preview's) before it
        # runs any dependency, so there a malformed body is refused before the missing key.
        refused = (400, 401, 405, 422) if case.path == "/v1/schedules/preview" else (401, 405)
        if case.method.upper() == "OPTIONS":
            refused = (204,)  # what the path allows is no secret (a browser asks it without credentials)
        assert response.status_code in refused, response.text


# -- 2. malformed safetensors over HTTP ------------------------------------------------------------------

W = {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
B = {"dtype": "F64", "shape": [3], "data_offsets": [24, 48]}
GRADS: dict[str, np.ndarray] = {
    "w": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3),
    "b": np.array([0.25, -0.5, 2.0], dtype=np.float64),
}
DATA = GRADS["w"].astype("<f4").tobytes() + GRADS["b"].astype("<f8").tobytes()


def frame(header: Any, data: bytes = DATA, *, length: int | None = None) -> bytes:
    """A body: the 8-byte length (of the header, unless `length`), the header (JSON, or raw bytes), data."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def with_entries(data: bytes = DATA, metadata: Any = None, **changes: dict[str, Any]) -> bytes:
    """The valid header with some entry keys changed (`w={"shape": [3, 2]}`)."""
    header: dict[str, Any] = {"w": {**W, **changes.get("w", {})}, "b": {**B, **changes.get("b", {})}}
    if metadata is not None:
        header["__metadata__"] = metadata
    return frame(header, data)


VALID = with_entries()
HEADER = json.dumps({"w": W, "b": B}).encode()
NAN = np.array([np.nan, 0, 0, 0, 0, 0], dtype="<f4").tobytes() + DATA[24:]

# Malformed or invalid for every endpoint that reads safetensors.
MALFORMED: dict[str, bytes] = {
    "empty": b"",
    "shorter than the length prefix": b"\x10\x00\x00",
    "length prefix only": struct.pack("<Q", 0),
    "empty header": struct.pack("<Q", 0) + DATA,
    "truncated in the length prefix": VALID[:5],
    "truncated in the header": VALID[:20],
    "truncated before the data": VALID[: len(VALID) - len(DATA)],
    "truncated in the data": VALID[:-1],
    "header length beyond the body": frame(HEADER, length=len(HEADER) + len(DATA) + 1),
    "header length one short": frame(HEADER, length=len(HEADER) - 1),
    "header length 2**63": struct.pack("<Q", 2**63) + HEADER + DATA,
    "header length 2**64 - 1": b"\xff" * 8 + HEADER + DATA,
    "overlapping offsets": with_entries(DATA[:40], b={"data_offsets": [16, 40]}),
    "aliasing offsets": with_entries(DATA[:24], b={"dtype": "F32", "shape": [6], "data_offsets": [0, 24]}),
    "offsets beyond the data": with_entries(b={"data_offsets": [24, 56]}),
    "offsets reversed": with_entries(w={"data_offsets": [24, 0]}),
    "negative offsets": with_entries(w={"data_offsets": [-24, 0]}),
    "offsets beyond 2**64": with_entries(b={"data_offsets": [24, 2**64 + 48]}),
    "offsets as floats": with_entries(w={"data_offsets": [0.0, 24.0]}),
    "offsets as strings": with_entries(w={"data_offsets": ["0", "24"]}),
    "offsets as booleans": with_entries(w={"data_offsets": [False, 24]}),
    "one offset": with_entries(w={"data_offsets": [0]}),
    "gap between tensors": with_entries(DATA[:24] + bytes(8) + DATA[24:], b={"data_offsets": [32, 56]}),
    "trailing bytes": with_entries(DATA + bytes(8)),
    "dtype F8_E4M3": with_entries(w={"dtype": "F8_E4M3"}),
    "dtype BF16": with_entries(DATA[:12] + DATA[24:], w={"data_offsets": [0, 12], "dtype": "BF16"}),
    "dtype I32": with_entries(w={"dtype": "I32"}),
    "dtype BOOL": with_entries(w={"dtype": "BOOL"}),
    "dtype as numpy names it": with_entries(w={"dtype": "float32"}),
    "dtype lower case": with_entries(w={"dtype": "f32"}),
    "dtype a number": with_entries(w={"dtype": 32}),
    "dtype null": with_entries(w={"dtype": None}),
    "shape smaller than the bytes": with_entries(w={"shape": [2, 2]}),
    "shape larger than the bytes": with_entries(w={"shape": [3, 3]}),
    "huge shape [2**40, 2**40]": with_entries(w={"shape": [2**40, 2**40]}),
    "huge shape [2**64]": with_entries(w={"shape": [2**64]}),
    "huge shape with a zero": with_entries(w={"shape": [0, 2**70]}),
    "65 dimensions": with_entries(w={"shape": [1] * 65}),
    "negative shape": with_entries(w={"shape": [-2, -3]}),
    "shape of floats": with_entries(w={"shape": [2.0, 3.0]}),
    "shape of booleans": with_entries(w={"shape": [True, 6]}),
    "shape a string": with_entries(w={"shape": "2x3"}),
    "non-UTF-8 header": frame(HEADER.replace(b'"w"', b'"\xff"')),
    "non-UTF-8 header (truncated sequence)": frame(b'{"\xc3": 1}'),
    "header not JSON": frame(b"not json at all"),
    "header an unclosed object": frame(b'{"w": '),
    "header with NaN": frame(b'{"w": NaN}'),
    "header JSON array": frame([W, B]),
    "header JSON string": frame("w"),
    "header JSON number": frame(1),
    "header JSON null": frame(None),
    "header nested too deeply": frame(b"[" * 100_000),
    "header with a 5000-digit integer": frame(b'{"w": ' + b"9" * 5000 + b"}"),
    "duplicate tensor": frame(
        b'{"w": ' + json.dumps(W).encode() + b', "w": ' + json.dumps(W).encode() + b"}"
    ),
    "entry not an object": frame({"w": [0, 24], "b": B}),
    "entry without data_offsets": frame({"w": {"dtype": "F32", "shape": [2, 3]}, "b": B}),
    "entry with an extra key": with_entries(w={"offset": 0}),
    "metadata a list": with_entries(metadata=["loss", "1"]),
    "metadata a string": with_entries(metadata="loss=1"),
    "metadata with a number": with_entries(metadata={"loss": 0.5}),
    "metadata with null": with_entries(metadata={"loss": None}),
    "metadata with an object": with_entries(metadata={"loss": {"value": "1"}}),
    "metadata with a list": with_entries(metadata={"loss": ["1"]}),
    "metadata with a boolean": with_entries(metadata={"skipped": True}),
    "unknown tensor name": frame({"v": W, "b": B}),
    "empty tensor name": frame({"": W, "b": B}),
    "wrong shape (transposed)": with_entries(w={"shape": [3, 2]}),
    "wrong shape (flat)": with_entries(w={"shape": [6]}),
    "wrong rank": with_entries(b={"shape": [1, 3]}),
    "scalar for a vector": with_entries(DATA[:32], b={"shape": [], "data_offsets": [24, 32]}),
    "NaN": with_entries(NAN),
    "beyond float32 for a float32 parameter": frame(
        {"w": {**W, "dtype": "F64", "data_offsets": [0, 48]}, "b": {**B, "data_offsets": [48, 72]}},
        np.full(6, 1e300).tobytes() + DATA[24:],
    ),
}
# The step also reads `step` and `loss` from the metadata (PUT params ignores metadata).
MALFORMED_STEP: dict[str, bytes] = {
    "metadata step not a number": with_entries(metadata={"step": "two"}),
    "metadata step a float": with_entries(metadata={"step": "2.0"}),
    "metadata step negative": with_entries(metadata={"step": "-1"}),
    "metadata step in exponent form": with_entries(metadata={"step": "2e0"}),
    "metadata loss not a number": with_entries(metadata={"loss": "low"}),
    "metadata loss NaN": with_entries(metadata={"loss": "nan"}),
    "metadata loss infinite": with_entries(metadata={"loss": "1e999"}),
}


def _checkpoint_cases(body: bytes) -> dict[str, bytes]:
    """Restore bodies made from a real checkpoint: broken framing, or consistent framing around a state that
    no session could have written."""
    tensors, metadata = safetensors.decode(body)
    saved = json.loads(metadata["optserve.checkpoint"])

    def edit(change: Callable[[dict[str, Any]], Any]) -> bytes:
        copy = json.loads(json.dumps(saved))
        change(copy)
        return safetensors.encode_bytes(tensors, {**metadata, "optserve.checkpoint": json.dumps(copy)})

    def tensors_with(**changes: Any) -> bytes:
        changed = {k.replace("__", "/"): v for k, v in changes.items()}
        kept = {k: v for k, v in {**tensors, **changed}.items() if v is not None}
        return safetensors.encode_bytes(kept, metadata)

    engine = "engine"
    w = tensors["params/w"]
    return {
        "checkpoint truncated by one byte": body[:-1],
        "checkpoint cut in half": body[: len(body) // 2],
        "checkpoint without its metadata": safetensors.encode_bytes(tensors),
        "checkpoint metadata not JSON": safetensors.encode_bytes(tensors, {"optserve.checkpoint": "{"}),
        "checkpoint metadata a list": safetensors.encode_bytes(tensors, {"optserve.checkpoint": "[]"}),
        "checkpoint metadata nested too deeply": safetensors.encode_bytes(
            tensors, {"optserve.checkpoint": "[" * 100_000}
        ),
        "checkpoint of another format": edit(lambda s: s[engine].update(format=2)),
        "checkpoint with a negative step": edit(lambda s: s[engine].update(step=-1)),
        "checkpoint with a step beyond 64 bits": edit(lambda s: s[engine].update(step=2**70)),
        "checkpoint with a loss that is not a number": edit(lambda s: s[engine].update(losses=["x"])),
        "checkpoint with an lr that is not a number": edit(lambda s: s[engine]["groups"][0].update(lr="x")),
        "checkpoint with betas out of range": edit(lambda s: s[engine]["groups"][0].update(betas=[2, 0.9])),
        "checkpoint with a negative optimizer lr": edit(
            lambda s: s[engine]["options"]["optimizer"].update(lr=-1)
        ),
        "checkpoint with an optimizer step_size beyond 64 bits": edit(
            lambda s: s[engine]["options"]["scheduler"].update(step_size=2**70)
        ),
        "checkpoint with steps_per_epoch 0": edit(lambda s: s[engine]["options"].update(steps_per_epoch=0)),
        "checkpoint with a scheduler state that is not one": edit(
            lambda s: s[engine].update(scheduler={"last_epoch": "x"})
        ),
        "checkpoint with user metadata not an object": edit(lambda s: s.update(metadata=3)),
        "checkpoint with a parameter in no group": edit(lambda s: s[engine].update(group_params=[["w"]])),
        "checkpoint without an optimizer state tensor": tensors_with(state__w__exp_avg=None),
        "checkpoint with an extra tensor": tensors_with(extra=w),
        "checkpoint with a state tensor of another shape": tensors_with(
            state__w__exp_avg=np.zeros(7, w.dtype)
        ),
        "checkpoint with a state tensor of another dtype": tensors_with(
            state__w__exp_avg=tensors["state/w/exp_avg"].astype(np.float64)
        ),
        "checkpoint with a parameter of another shape": tensors_with(params__w=w.reshape(3, 2)),
    }


@dataclass
class Known:
    """A session with optimizer state, history and a scheduler, on a server that has just this session."""

    client: httpx.AsyncClient
    session_id: str

    @property
    def url(self) -> str:
        return f"/v1/sessions/{self.session_id}"

    async def state(self) -> tuple[Any, ...]:
        """Everything a request could change: parameters and optimizer state (bit for bit, through the
        checkpoint), step, lr, timestamps, history, and the list of sessions."""
        answers = [
            await self.client.get(f"{self.url}/params", headers={"Accept": ST}),
            await self.client.get(f"{self.url}/checkpoint"),
            await self.client.get(self.url),
            await self.client.get(f"{self.url}/history"),
            await self.client.get("/v1/sessions"),
        ]
        for answer in answers:
            assert answer.status_code == 200, answer.text
        params, checkpoint, *documents = answers
        return params.content, checkpoint.content, *(a.json() for a in documents)

    async def send(self, endpoint: str, body: bytes, content_type: str = ST) -> httpx.Response:
        headers = {"Content-Type": content_type}
        if endpoint == "step":
            return await self.client.post(f"{self.url}/step", content=body, headers=headers)
        if endpoint == "params":
            return await self.client.put(f"{self.url}/params", content=body, headers=headers)
        return await self.client.post("/v1/sessions", content=body, headers=headers)

    async def healthy(self) -> None:
        """The server answers, and the session still steps."""
        assert (await self.client.get("/healthz")).status_code == 200
        assert (await self.client.get("/readyz")).status_code == 200
        before = (await self.client.get(self.url)).json()["step"]
        answer = await step(self.client, self.session_id, GRADS, fmt="safetensors")
        assert answer.status_code == 200, answer.text
        assert safetensors.decode(answer.content)[1]["step"] == str(before + 1)
        assert (await self.client.get(self.url)).json()["step"] == before + 1


async def _known(client: httpx.AsyncClient) -> Known:
    session_id = await create(client, LIVE_PARAMS, **LIVE_SPEC)
    for i in range(2):  # optimizer state, a scheduler advance pending, history with a loss
        answer = await step(client, session_id, GRADS, fmt="safetensors" if i else "json", loss=1.0 / (i + 1))
        assert answer.status_code == 200, answer.text
    return Known(client, session_id)


def _rejection(answer: httpx.Response, statuses: tuple[int, ...] = (400, 422)) -> str | None:
    """Why `answer` is not a problem+json refusal with one of `statuses`, or None."""
    if answer.status_code not in statuses:
        return f"status {answer.status_code}: {answer.text[:200]}"
    if not answer.headers["content-type"].startswith(PROBLEM):
        return f"content type {answer.headers['content-type']}"
    problem = answer.json()
    if problem.get("status") != answer.status_code or not all(
        isinstance(problem.get(key), str) and problem[key] for key in ("type", "title", "detail")
    ):
        return f"not a problem: {problem}"
    return None


async def test_the_well_formed_body_that_the_malformed_ones_alter_is_accepted(make_client: Any) -> None:
    known = await _known(await make_client())
    assert (await known.send("step", VALID)).status_code == 200
    assert (await known.send("params", VALID)).status_code == 200
    checkpoint = (await known.client.get(f"{known.url}/checkpoint")).content
    assert (await known.send("restore", checkpoint)).status_code == 201


@pytest.mark.parametrize("content_type", [ST, "application/octet-stream"])
@pytest.mark.parametrize("endpoint", ["step", "params", "restore"])
async def test_malformed_safetensors_are_refused_and_change_nothing(
    client: httpx.AsyncClient, endpoint: str, content_type: str
) -> None:
    known = await _known(client)
    cases = dict(MALFORMED)
    if endpoint == "step":
        cases.update(MALFORMED_STEP)
    if endpoint == "restore":
        cases.update(_checkpoint_cases((await client.get(f"{known.url}/checkpoint")).content))
    before = await known.state()
    failures = []
    for name, body in cases.items():
        answer = await known.send(endpoint, body, content_type)
        why = _rejection(answer)
        if why is None and await known.state() != before:
            why = "the session or the list of sessions changed"
        if why is None and (await client.get("/healthz")).status_code != 200:
            why = "the server is no longer healthy"
        if why:
            failures.append(f"{name}: {why}")
    assert not failures, "\n".join(failures)
    await known.healthy()


@pytest.fixture
async def known(make_client: Any) -> Known:
    return await _known(await make_client())


def _flipped(body: bytes, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(body)
    for position, mask in flips:
        out[position % len(out)] ^= mask
    return bytes(out)


_FLIPS = st.lists(st.tuples(st.integers(0, 2**16), st.integers(1, 255)), min_size=1, max_size=4)
_IN_THE_HEADER = st.lists(
    st.tuples(st.integers(0, len(VALID) - len(DATA) - 1), st.integers(1, 255)), min_size=1
)


def _reference_reads(body: bytes) -> dict[str, np.ndarray] | None:
    try:
        return reference.load(body)
    except Exception:
        return None


@pytest.mark.parametrize("endpoint", ["step", "params", "restore"])
@given(flips=st.one_of(_FLIPS, _IN_THE_HEADER.map(lambda f: f[:4])))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
async def test_byte_flips_of_a_valid_body_are_refused_or_applied_whole(
    known: Known, endpoint: str, flips: list[tuple[int, int]]
) -> None:
    """A flipped body that still parses may be applied (a flip in the data is a different gradient); else
    it is a 4xx problem that changes nothing. Either way the server stays up and answers as documented."""
    restore = endpoint == "restore"
    original = (await known.client.get(f"{known.url}/checkpoint")).content if restore else VALID
    body = _flipped(original, flips)
    before = await known.state()
    answer = await known.send(endpoint, body)
    if answer.status_code in (200, 201):
        # the server took it: the reference package must read it too, with the same tensor names and shapes
        tensors = _reference_reads(body)
        assert tensors is not None, f"accepted a body that the reference package refuses: {flips}"
        if endpoint == "restore":
            assert answer.json()["step"] == before[2]["step"]
            await known.client.delete(answer.headers["location"])
        else:
            assert all(tensors[n].shape == LIVE_PARAMS[n].shape for n in tensors), flips
    else:
        why = _rejection(answer, (400, 409, 422))
        assert why is None, f"{flips}: {why}"
        assert await known.state() == before, flips
    assert (await known.client.get("/healthz")).status_code == 200
