"""Heavy parsing and rendering in worker processes: the same answers as inline, errors included, the event
loop free meanwhile, a lost worker answered with 503 and replaced; and the safetensors create."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import httpx
import numpy as np
import pytest

from app.api import bodies
from app.api.offload import INLINE_BYTES, Offload, WorkerLost, WorkersBusy
from app.wire import envelopes, jsontensor, safetensors
from app.wire.errors import WireError
from tests.api.helpers import ST, params_of, step
from tests.conftest import AppClient


@pytest.fixture
async def offload() -> AsyncIterator[Offload]:
    pool = Offload(1)
    yield pool
    pool.close()


def step_body(n: int) -> bytes:
    grads = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    return jsontensor.dumps({"grads": {"w": grads, "b": [1.0, 2.0]}, "step": 3, "loss": 0.5})


async def test_a_step_body_parsed_in_a_worker_equals_the_one_parsed_inline(offload: Offload) -> None:
    body = step_body(100_000)
    assert len(body) > INLINE_BYTES
    inline = envelopes.parse_step(body)
    for given in (body, memoryview(bytearray(body))):
        remote = await offload.parse(envelopes.parse_step, given)
        assert (remote.step, remote.loss) == (3, 0.5)
        assert remote.grads.keys() == inline.grads.keys()
        for name, value in inline.grads.items():
            assert remote.grads[name].dtype == value.dtype
            np.testing.assert_array_equal(remote.grads[name], value)


async def test_a_worker_refuses_a_body_exactly_as_inline_parsing_does(offload: Offload) -> None:
    body = b'{"grads": {"w": [' + b"1.0," * 100_000 + b'"x"]}}'
    with pytest.raises(WireError) as inline:
        envelopes.parse_step(body)
    with pytest.raises(WireError) as remote:
        await offload.parse(envelopes.parse_step, body)
    assert (remote.value.status, remote.value.field, remote.value.detail) == (
        inline.value.status,
        inline.value.field,
        inline.value.detail,
    )
    # the worker answers the next call as before
    assert (await offload.parse(envelopes.parse_step, step_body(50_000))).step == 3


async def test_rendering_in_a_worker_writes_the_same_bytes(offload: Offload) -> None:
    data = {
        "step": 1,
        "params": {"w": jsontensor.encode_tensor(np.linspace(0, 1, 100_000, dtype=np.float32))},
    }
    remote = await offload.run(jsontensor.dumps, data, heavy=True)
    assert bytes(remote) == jsontensor.dumps(data)


async def test_a_long_safetensors_header_is_read_in_a_worker_as_decode_reads_it(offload: Offload) -> None:
    tensors = {f"p{i}": np.full(2, i, np.float32) for i in range(5_000)}
    body = safetensors.encode_bytes(tensors, {"k": "v"})
    assert safetensors.header_end(body) > INLINE_BYTES
    got, metadata = await bodies.decode_safetensors(offload, body, {"float32"})
    expected, expected_metadata = safetensors.decode(body, {"float32"})
    assert metadata == expected_metadata == {"k": "v"}
    assert got.keys() == expected.keys()
    assert all(np.array_equal(got[k], expected[k]) for k in expected)


async def test_the_event_loop_keeps_turning_while_a_worker_parses(offload: Offload) -> None:
    await offload.parse(envelopes.parse_step, step_body(50_000))  # the worker is started
    body = b'{"grads": {"w": [' + b"0," * (8 << 20) + b"0]}}"  # 16 MiB of zeros: ~0.4 s of parsing
    gaps: list[float] = []
    done = asyncio.Event()

    async def tick() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    started = time.perf_counter()
    parsed = await offload.parse(envelopes.parse_step, body)
    elapsed = time.perf_counter() - started
    done.set()
    await ticker
    assert parsed.grads["w"].shape == ((8 << 20) + 1,)
    assert elapsed > 0.1  # the parse was long enough to matter
    assert max(gaps) < 0.08, (max(gaps), elapsed)


async def test_a_lost_worker_is_a_503_and_the_next_call_starts_another(offload: Offload) -> None:
    body = step_body(50_000)
    await offload.parse(envelopes.parse_step, body)
    (worker,) = offload._idle
    worker.process.kill()
    worker.process.wait()
    with pytest.raises(WorkerLost):
        await offload.parse(envelopes.parse_step, body)
    assert (await offload.parse(envelopes.parse_step, body)).step == 3
    assert offload._idle[0].process.pid != worker.process.pid


def create_st(params: dict[str, np.ndarray], spec: dict[str, object], **extra: str) -> bytes:
    return safetensors.encode_bytes(params, {envelopes.CREATE_KEY: json.dumps(spec), **extra})


@pytest.mark.parametrize("n", [3, 200_000])
async def test_a_safetensors_create_is_the_json_create(make_client: AppClient, n: int) -> None:
    client: httpx.AsyncClient = await make_client()
    w = np.linspace(-1, 1, n, dtype=np.float32)
    spec = {
        "optimizer": {"name": "adam", "lr": 0.01},
        "scheduler": {"name": "step_lr", "step_size": 2},
        "metadata": {"run": "a"},
    }
    by_json = await client.post(
        "/v1/sessions",
        content=jsontensor.dumps({**spec, "params": {"w": w}}),
        headers={"Content-Type": "application/json"},
    )
    by_st = await client.post("/v1/sessions", content=create_st({"w": w}, spec), headers={"Content-Type": ST})
    assert by_json.status_code == by_st.status_code == 201, by_st.text
    a, b = by_json.json(), by_st.json()
    assert {k: v for k, v in a.items() if k not in ("id", "created_at", "updated_at")} == {
        k: v for k, v in b.items() if k not in ("id", "created_at", "updated_at")
    }
    grads = {"w": np.full(n, 0.5, np.float32)}
    after = [params_of(await step(client, sid, grads, "safetensors"))["w"] for sid in (a["id"], b["id"])]
    np.testing.assert_array_equal(after[0], after[1])


async def test_a_safetensors_create_refuses_what_a_json_create_refuses(make_client: AppClient) -> None:
    client: httpx.AsyncClient = await make_client()
    w = {"w": np.ones(3, np.float32)}
    cases = [
        (create_st(w, {"optimizer": {"name": "adam"}}, extra="x"), 422, "extra"),
        (create_st(w, {"optimizer": {"name": "adam"}, "params": {}}), 422, "params"),
        (create_st(w, {"optimizer": {"name": "nope"}}), 422, "optimizer"),
        (safetensors.encode_bytes(w, {envelopes.CREATE_KEY: "{not json"}), 400, None),
    ]
    for body, status, field in cases:
        answer = await client.post("/v1/sessions", content=body, headers={"Content-Type": ST})
        assert answer.status_code == status, answer.text
        if field is not None:
            assert field in answer.text
    assert (await client.get("/v1/sessions")).json()["sessions"] == []


async def test_large_json_answers_are_rendered_off_the_loop_and_read_the_same(make_client: AppClient) -> None:
    client: httpx.AsyncClient = await make_client()
    w = np.linspace(-1, 1, 100_000, dtype=np.float32)
    created = await client.post(
        "/v1/sessions",
        content=create_st({"w": w}, {"optimizer": {"name": "sgd", "lr": 0.5}}),
        headers={"Content-Type": ST},
    )
    sid = created.json()["id"]
    grads = np.ones(100_000, np.float32)
    stepped = await client.post(
        f"/v1/sessions/{sid}/step",
        content=jsontensor.dumps({"grads": {"w": grads}}),
        headers={"Content-Type": "application/json"},
    )
    assert stepped.status_code == 200, stepped.text
    expected = w - np.float32(0.5) * grads
    np.testing.assert_array_equal(np.asarray(stepped.json()["params"]["w"]["data"], np.float32), expected)
    answer = await client.get(f"/v1/sessions/{sid}/params")
    np.testing.assert_array_equal(np.asarray(answer.json()["params"]["w"]["data"], np.float32), expected)
    assert client.app.state.offload._idle  # type: ignore[attr-defined]  # a worker did the work


async def test_at_most_four_calls_per_worker_wait_and_the_next_is_told_to_retry(offload: Offload) -> None:
    body = b'{"grads": {"w": [' + b"0," * (4 << 20) + b"0]}}"  # ~0.2 s each in the worker
    await offload.parse(envelopes.parse_step, step_body(50_000))  # the worker is started
    first = asyncio.create_task(offload.parse(envelopes.parse_step, body))  # in the worker
    await asyncio.sleep(0.02)
    queued = [asyncio.create_task(offload.parse(envelopes.parse_step, body)) for _ in range(4)]
    await asyncio.sleep(0.02)
    assert offload.waiting == 4
    with pytest.raises(WorkersBusy):
        await offload.parse(envelopes.parse_step, body)
    results = await asyncio.gather(first, *queued)
    assert all(r.grads["w"].shape == ((4 << 20) + 1,) for r in results)
    assert offload.waiting == 0
    await offload.parse(envelopes.parse_step, body)  # room again
