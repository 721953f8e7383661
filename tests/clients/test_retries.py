"""Retries, idempotency keys and timeouts of both clients, with faults injected between them and the app."""

from __future__ import annotations

import time
import uuid

import httpx
import numpy as np
import optserve
import pytest
from optserve import RetryPolicy

from tests.clients.conftest import (
    Answer503,
    Connect,
    DropAnswers,
    Recorder,
    RefuseConnections,
    resolve,
)

W = np.array([1.0, -2.0, 3.0], np.float32)
FAST = RetryPolicy(retries=3, backoff=0.01)


async def test_refused_connections_are_retried_until_one_succeeds(connect: Connect) -> None:
    faults = RefuseConnections(2)
    client = await connect(faults, retries=FAST)
    # Nothing reached the server, so even creating a session is retried.
    session = await resolve(client.create_session({"w": W}, {"name": "sgd"}))
    assert len(faults.requests) == 3
    assert [s.id for s in await resolve(client.list_sessions())] == [session.id]


async def test_refused_connections_beyond_the_retries_raise_transport_error(connect: Connect) -> None:
    faults = RefuseConnections(10)
    client = await connect(faults, retries=FAST)
    with pytest.raises(optserve.TransportError, match="after 4 attempt") as caught:
        await resolve(client.health())
    assert caught.value.attempts == 4
    assert isinstance(caught.value.__cause__, httpx.ConnectError)
    assert len(faults.requests) == 4


async def test_503_waits_the_retry_after_seconds_then_retries(connect: Connect) -> None:
    faults = Answer503(1, "1")
    client = await connect(faults, retries=FAST)
    started = time.monotonic()
    assert await resolve(client.health()) == {"status": "ok"}
    assert time.monotonic() - started >= 1.0  # FAST's own backoff would be 10 ms
    assert len(faults.requests) == 2


async def test_503_without_retry_after_backs_off_then_raises_service_unavailable(connect: Connect) -> None:
    faults = Answer503(99, None)
    client = await connect(faults, retries=FAST)
    with pytest.raises(optserve.ServiceUnavailable) as caught:
        await resolve(client.list_sessions())
    assert (caught.value.status, caught.value.detail) == (503, "busy")
    assert isinstance(caught.value, optserve.ServerError)
    assert len(faults.requests) == 4


async def test_retry_after_beyond_the_limit_raises_at_once(connect: Connect) -> None:
    faults = Answer503(1, "3600")
    client = await connect(faults, retries=FAST)
    with pytest.raises(optserve.ServiceUnavailable):
        await resolve(client.list_sessions())
    assert len(faults.requests) == 1


async def test_create_is_not_resent_after_it_reached_the_server(connect: Connect) -> None:
    faults = Answer503(1)
    client = await connect(faults, retries=FAST)
    with pytest.raises(optserve.ServiceUnavailable):
        await resolve(client.create_session({"w": W}, {"name": "sgd"}))
    assert len(faults.requests) == 1


async def test_create_whose_answer_was_lost_is_not_resent(connect: Connect) -> None:
    faults = DropAnswers("POST", "/v1/sessions")
    client = await connect(faults, retries=FAST)
    with pytest.raises(optserve.TransportError) as caught:
        await resolve(client.create_session({"w": W}, {"name": "sgd"}))
    assert caught.value.attempts == 1
    # The server did create it: resending would have made a second one.
    assert len(await resolve(client.list_sessions())) == 1


@pytest.mark.parametrize("wire", ["safetensors", "json"])
async def test_step_whose_answer_was_lost_is_resent_with_its_key_and_applied_once(
    connect: Connect, wire: str
) -> None:
    faults = DropAnswers("POST", "/step")
    client = await connect(faults, retries=FAST, wire=wire)
    session = await resolve(client.create_session({"w": W}, {"name": "sgd", "lr": 0.5}))
    # expected_step=0 too: the resend is answered from the first try, not refused as a conflict
    result = await resolve(session.step({"w": np.ones(3, np.float32)}, loss=1.5, expected_step=0))

    sent = faults.sent("POST", "/step")
    assert len(sent) == 2
    assert sent[0].headers["idempotency-key"] == sent[1].headers["idempotency-key"]
    assert (result.step, result.replayed) == (1, True)
    np.testing.assert_array_equal(result.params["w"], W - 0.5)
    assert (await resolve(session.refresh())).step == 1
    assert [h.step for h in await resolve(session.history())] == [1]
    np.testing.assert_array_equal((await resolve(session.params()))["w"], W - 0.5)


async def test_every_step_carries_its_own_uuid4_idempotency_key(connect: Connect) -> None:
    recorder = Recorder()
    client = await connect(recorder)
    session = await resolve(client.create_session({"w": W}, {"name": "sgd"}))
    for _ in range(3):
        await resolve(session.step({"w": W}))
    keys = [r.headers["idempotency-key"] for r in recorder.sent("POST", "/step")]
    assert len(set(keys)) == 3
    assert all(uuid.UUID(k).version == 4 for k in keys)


async def test_delete_whose_answer_was_lost_is_resent_and_succeeds(connect: Connect) -> None:
    faults = DropAnswers("DELETE", "")
    client = await connect(faults, retries=FAST)
    session = await resolve(client.create_session({"w": W}, {"name": "sgd"}))
    await resolve(session.delete())  # the resend meets a 404: the first try did it
    assert len(faults.sent("DELETE", "")) == 2
    with pytest.raises(optserve.NotFound):
        await resolve(session.delete())


async def test_read_whose_answer_was_lost_is_resent(connect: Connect) -> None:
    faults = DropAnswers("GET", "/params")
    client = await connect(faults, retries=FAST)
    session = await resolve(client.create_session({"w": W}, {"name": "sgd"}))
    np.testing.assert_array_equal((await resolve(session.params()))["w"], W)
    assert len(faults.sent("GET", "/params")) == 2


async def test_read_and_write_timeouts_grow_with_the_body(connect: Connect) -> None:
    recorder = Recorder()
    client = await connect(recorder)
    await resolve(client.health())
    big = np.zeros(1 << 20, np.float32)  # 4 MiB
    session = await resolve(client.create_session({"big": big}, {"name": "sgd"}))
    await resolve(session.step({"big": big}))
    small = recorder.sent("GET", "/healthz")[0].extensions["timeout"]
    step = recorder.sent("POST", "/step")[0]
    large = step.extensions["timeout"]
    assert small == {"connect": 10.0, "read": 60.0, "write": 60.0, "pool": 60.0}
    assert large["connect"] == 10.0
    assert large["read"] == large["write"] == pytest.approx(60.0 + 0.5 * len(step.content) / (1 << 20))
    assert large["read"] > 62.0
