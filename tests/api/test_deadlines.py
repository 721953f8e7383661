"""Request bodies must arrive within OPTSERVE_BODY_TIMEOUT: one periodic check watches them all
(`app.api.deps.BodyDeadlines`), instead of a timer per request."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from app.api.deps import BodyDeadlines, InflightBytes, receive_body
from app.api.errors import ApiError
from app.settings import Settings

SETTINGS = Settings(store="memory://", body_timeout=0.3)


def trickle(chunks: int, every: float) -> Any:
    """A receive() that gives `chunks` one-byte parts `every` seconds apart, then ends the body."""
    sent = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        await asyncio.sleep(every)
        sent += 1
        return {"type": "http.request", "body": b"x", "more_body": sent < chunks}

    return receive


async def test_a_body_that_does_not_arrive_in_time_is_a_408_within_a_period_of_its_deadline() -> None:
    deadlines = BodyDeadlines()
    start = time.monotonic()
    with pytest.raises(ApiError) as refused:
        await receive_body(trickle(1000, 0.05), SETTINGS, InflightBytes(1 << 20), deadlines, None, None)
    took = time.monotonic() - start
    assert refused.value.status == 408
    assert SETTINGS.body_timeout <= took <= SETTINGS.body_timeout + BodyDeadlines.PERIOD + 0.2
    assert not deadlines._due
    assert not deadlines._expired
    current = asyncio.current_task()
    assert current is not None
    assert current.cancelling() == 0


async def test_bodies_in_time_pass_and_leave_nothing_watched() -> None:
    deadlines = BodyDeadlines()
    inflight = InflightBytes(1 << 20)
    bodies = await asyncio.gather(
        *(receive_body(trickle(3, 0.01), SETTINGS, inflight, deadlines, None, None) for _ in range(20))
    )
    assert all(bytes(body) == b"xxx" for body in bodies)
    assert not deadlines._due
    assert not deadlines._expired
    assert inflight.used == 0
    await asyncio.sleep(BodyDeadlines.PERIOD * 1.5)
    assert deadlines._timer is None  # nothing to watch: the check stops


async def test_a_request_cancelled_by_someone_else_is_cancelled_not_timed_out() -> None:
    deadlines = BodyDeadlines()
    inflight = InflightBytes(1 << 20)
    task = asyncio.create_task(receive_body(trickle(1000, 0.05), SETTINGS, inflight, deadlines, None, None))
    await asyncio.sleep(0.12)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not deadlines._due
    assert not deadlines._expired
    assert inflight.used == 0


def test_the_watch_follows_a_new_event_loop() -> None:
    """One app may serve under one loop, then another (tests, a restarted server): the check is scheduled
    on the loop that runs now."""
    deadlines = BodyDeadlines()

    async def late() -> int:
        with pytest.raises(ApiError) as refused:
            await receive_body(trickle(1000, 0.05), SETTINGS, InflightBytes(1 << 20), deadlines, None, None)
        return refused.value.status

    assert asyncio.run(late()) == 408
    assert asyncio.run(late()) == 408
