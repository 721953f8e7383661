"""One builder per endpoint: the request to send, how to read its answer, and whether resending is safe.
Pure: `Client` and `AsyncClient` only differ in how they carry a `Call` out."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx
import numpy.typing as npt
import orjson

from optserve import _safetensors
from optserve._wire import (
    GRAD_DTYPES,
    JSON,
    PARAM_DTYPES,
    SAFETENSORS,
    Array,
    Wire,
    arrays,
    content,
    dumps,
    is_safetensors,
    loads,
    safetensors_answer,
    tensor_json,
    tensors_body,
    tensors_from_json,
)
from optserve.models import HistoryRecord, SessionInfo, SessionSummary, StepResult
from optserve.transport import BufferStream

T = TypeVar("T")

# A checkpoint holds the parameters and the optimizer's state, at most two buffers per parameter (Adam's
# moments); a guess of the answer's size, for its timeout.
CHECKPOINT_SIZE_FACTOR = 3
# Parameters of a create that go as JSON; larger ones go as safetensors.
JSON_CREATE_NUMBERS = 65_536
CREATE_KEY = "optserve.create"


@dataclass(frozen=True)
class Call(Generic[T]):
    """One exchange. `resendable`: the request may be sent again after it may have reached the server (reads,
    PUT, DELETE, and steps, whose Idempotency-Key makes a resend harmless); creating a session is not, since a
    resend could create two. `gone_means_done`: a 404 after such a resend means the first try did the work.
    `size_hint`: bytes expected in the answer, and `wait` seconds the server may hold it (a synchronous
    round), for the timeout. `content` is bytes, or for tensors a
    `BufferStream` of views of the arrays."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    content: bytes | BufferStream | None = None
    content_type: str | None = None
    accept: str = JSON
    query: Mapping[str, str] | None = None
    idempotency_key: str | None = None
    resendable: bool = True
    gone_means_done: bool = False
    size_hint: int = 0
    wait: float = 0.0


def _session_path(session_id: str, tail: str = "") -> str:
    return f"/v1/sessions/{quote(session_id, safe='')}{tail}"


def _session_info(response: httpx.Response) -> SessionInfo:
    return SessionInfo.from_json(loads(response))


def create(
    params: Mapping[str, npt.ArrayLike], optimizer: Mapping[str, Any], **options: Any
) -> Call[SessionInfo]:
    """A create body: JSON up to JSON_CREATE_NUMBERS numbers of parameters; beyond, safetensors parameters
    with the rest of the body, as JSON, in `__metadata__["optserve.create"]` (optserve's extension of the
    contract: large JSON bodies are slow to parse and capped by the server). `options` are the create
    body's other members; None ones are left out."""
    tensors = arrays(params, PARAM_DTYPES, "parameter")
    spec = {"optimizer": dict(optimizer), **{k: v for k, v in options.items() if v is not None}}
    if sum(a.size for a in tensors.values()) > JSON_CREATE_NUMBERS:
        parts = _safetensors.encode_parts(tensors, {CREATE_KEY: dumps(spec).decode()})
        return Call("POST", "/v1/sessions", _session_info, BufferStream(parts), SAFETENSORS, resendable=False)
    body = {"params": {n: tensor_json(a) for n, a in tensors.items()}, **spec}
    return Call("POST", "/v1/sessions", _session_info, dumps(body), JSON, resendable=False)


def restore(blob: bytes) -> Call[SessionInfo]:
    return Call("POST", "/v1/sessions", _session_info, bytes(blob), SAFETENSORS, resendable=False)


def get_session(session_id: str) -> Call[SessionInfo]:
    return Call("GET", _session_path(session_id), _session_info)


def list_sessions() -> Call[list[SessionSummary]]:
    def parse(response: httpx.Response) -> list[SessionSummary]:
        return [SessionSummary.from_json(s) for s in loads(response)["sessions"]]

    return Call("GET", "/v1/sessions", parse)


def _step_result(response: httpx.Response) -> StepResult:
    replayed = response.headers.get("idempotent-replayed") == "true"
    if is_safetensors(response):
        params, meta = safetensors_answer(response)
        return StepResult(
            step=int(meta["step"]),
            lr=[float(x) for x in orjson.loads(meta["lr"])],
            params=params,
            skipped=meta["skipped"] == "true",
            grad_norm=None if meta["grad_norm"] == "null" else float(meta["grad_norm"]),
            replayed=replayed,
            staleness=int(meta.get("staleness", "0")),
            workers=tuple(orjson.loads(meta.get("workers", "[]"))),
        )
    body = loads(response)
    return StepResult(
        step=body["step"],
        lr=body["lr"],
        params=tensors_from_json(body.get("params", {})),
        skipped=body["skipped"],
        grad_norm=body["grad_norm"],
        replayed=replayed,
        staleness=body.get("staleness", 0),
        workers=tuple(body.get("workers", ())),
    )


def expected(expected_step: int | None, step: int | None) -> int | None:
    """`step=` is another name for `expected_step=` (the round a worker's gradient belongs to)."""
    if step is not None and expected_step is not None and step != expected_step:
        raise ValueError(f"step={step} and expected_step={expected_step} disagree; give one")
    return expected_step if step is None else step


def step(
    wire: Wire,
    info: SessionInfo,
    grads: Mapping[str, npt.ArrayLike],
    loss: float | None,
    expected_step: int | None,
    return_params: bool,
    worker: str | None = None,
    weight: float | None = None,
    idempotency_key: str | None = None,
) -> Call[StepResult]:
    """Every step carries an Idempotency-Key (a fresh one unless given), the same on each resend of this one
    step, so that a step whose answer was lost is answered again by the server rather than applied twice.
    With `worker`, the step is a contribution to the synchronous round `expected_step`, answered when the
    round is applied."""
    scalars = {
        "step": expected_step,
        "loss": None if loss is None else float(loss),
        "worker": worker,
        "weight": None if weight is None else float(weight),
    }
    rounds = info.aggregation if worker is not None and info.aggregation else {}
    content, content_type = tensors_body(wire, arrays(grads, GRAD_DTYPES, "gradient"), "grads", scalars)
    return Call(
        "POST",
        _session_path(info.id, "/step"),
        _step_result,
        content,
        content_type,
        accept=content_type,
        query=None if return_params else {"return_params": "false"},
        idempotency_key=idempotency_key or str(uuid.uuid4()),
        size_hint=info.param_bytes if return_params else 0,
        wait=float(rounds.get("timeout", 0.0)),
    )


def _params(response: httpx.Response) -> dict[str, Array]:
    if is_safetensors(response):
        return safetensors_answer(response)[0]
    return tensors_from_json(loads(response)["params"])


def get_params(wire: Wire, info: SessionInfo) -> Call[dict[str, Array]]:
    accept = SAFETENSORS if wire == "safetensors" else JSON
    return Call("GET", _session_path(info.id, "/params"), _params, accept=accept, size_hint=info.param_bytes)


def put_params(wire: Wire, info: SessionInfo, params: Mapping[str, npt.ArrayLike]) -> Call[SessionInfo]:
    content, content_type = tensors_body(wire, arrays(params, PARAM_DTYPES, "parameter"), "params", {})
    return Call("PUT", _session_path(info.id, "/params"), _session_info, content, content_type)


def _bytes(response: httpx.Response) -> bytes:
    body = content(response)
    return body if isinstance(body, bytes) else body.tobytes()


def checkpoint(info: SessionInfo) -> Call[bytes]:
    return Call(
        "GET",
        _session_path(info.id, "/checkpoint"),
        _bytes,
        accept=SAFETENSORS,
        size_hint=CHECKPOINT_SIZE_FACTOR * info.param_bytes,
    )


def history(session_id: str, limit: int | None) -> Call[list[HistoryRecord]]:
    def parse(response: httpx.Response) -> list[HistoryRecord]:
        return [HistoryRecord.from_json(r) for r in loads(response)["steps"]]

    query = None if limit is None else {"limit": str(limit)}
    return Call("GET", _session_path(session_id, "/history"), parse, query=query)


def delete(session_id: str) -> Call[None]:
    return Call("DELETE", _session_path(session_id), lambda _: None, gone_means_done=True)


def catalogue(kind: str) -> Call[list[dict[str, Any]]]:
    """`optimizers` or `schedulers`: each entry's name, hyperparameters (types, defaults) and description."""

    def parse(response: httpx.Response) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = loads(response)[kind]
        return entries

    return Call("GET", f"/v1/{kind}", parse)


def preview_schedule(
    lr: float | list[float], scheduler: Mapping[str, Any], steps: int, **options: Any
) -> Call[list[list[float]]]:
    """A pure computation on the server: safe to resend. None `options` are left out."""
    body: dict[str, Any] = {"lr": lr, "scheduler": dict(scheduler), "steps": steps}
    body.update((k, v) for k, v in options.items() if v is not None)

    def parse(response: httpx.Response) -> list[list[float]]:
        lrs: list[list[float]] = loads(response)["lr"]
        return lrs

    return Call("POST", "/v1/schedules/preview", parse, dumps(body), JSON)


def health() -> Call[dict[str, Any]]:
    def parse(response: httpx.Response) -> dict[str, Any]:
        body: dict[str, Any] = loads(response)
        return body

    return Call("GET", "/healthz", parse)
