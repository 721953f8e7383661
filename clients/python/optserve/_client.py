"""`Client`/`Session` and their `async` mirrors `AsyncClient`/`AsyncSession`; only the I/O differs, everything
else is in `_base` and `_calls`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self, TypeVar, cast

import httpx
import numpy.typing as npt

from optserve import _calls
from optserve._base import BaseClient, let_go, needs_reading, own_http_client
from optserve._calls import Call
from optserve._policy import RetryPolicy, Timeout
from optserve._wire import Array, Wire
from optserve.models import HistoryRecord, SessionInfo, SessionSummary, StepResult

T = TypeVar("T")


class Client(BaseClient):
    """A blocking client of one optserve server.

    `timeout`: a `Timeout`, or a number of seconds for reads and writes of small bodies (larger bodies get
    more, see `Timeout`). `retries`: a `RetryPolicy`, or how many times to retry. `transport` or
    `http_client` replace the network, e.g. to run against an app in-process; an injected `http_client` is
    not closed by `close()`. `wire`: tensors as `"safetensors"` (the default, binary and exact) or `"json"`.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float | Timeout | None = None,
        retries: int | RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
        http_client: httpx.Client | None = None,
        wire: Wire = "safetensors",
    ) -> None:
        super().__init__(base_url, api_key, timeout, retries, wire)
        self._http, self._owns_http, self._zero_copy = own_http_client(
            httpx.Client, self.base_url, http_client, transport
        )

    def _request(self, call: Call[T]) -> T:
        flow = self._exchange(self._http, call)
        try:
            action = next(flow)
            while True:
                if not isinstance(action, httpx.Request):
                    time.sleep(action)
                    action = flow.send(None)
                    continue
                try:
                    response = self._http.send(action, stream=True)
                    try:
                        if needs_reading(response):
                            response.read()
                    finally:
                        response.close()
                except httpx.TransportError as exc:
                    action = flow.throw(exc)
                else:
                    try:
                        action = flow.send(response)
                    finally:
                        let_go(response)
        except StopIteration as done:
            return cast(T, done.value)

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def create_session(
        self,
        params: Mapping[str, npt.ArrayLike],
        optimizer: Mapping[str, Any],
        scheduler: Mapping[str, Any] | None = None,
        *,
        param_groups: list[Mapping[str, Any]] | None = None,
        steps_per_epoch: int | None = None,
        clip_grad_norm: float | None = None,
        clip_grad_value: float | None = None,
        nonfinite: str | None = None,
        aggregation: Mapping[str, Any] | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> Session:
        """A new session over `params` (name -> float32/float64 array, dtypes kept). Not retried once the
        request may have reached the server: a resend could create a second session."""
        call = _calls.create(
            params,
            optimizer,
            scheduler=scheduler,
            param_groups=param_groups,
            steps_per_epoch=steps_per_epoch,
            clip_grad_norm=clip_grad_norm,
            clip_grad_value=clip_grad_value,
            nonfinite=nonfinite,
            aggregation=aggregation,
            metadata=metadata,
        )
        return Session(self, self._request(call))

    def get_session(self, session_id: str) -> Session:
        return Session(self, self._request(_calls.get_session(session_id)))

    def list_sessions(self) -> list[SessionSummary]:
        return self._request(_calls.list_sessions())

    def restore(self, blob: bytes) -> Session:
        """A new session continuing exactly where `blob` (from `Session.checkpoint()`) was. Not retried once
        the request may have reached the server, as `create_session`."""
        return Session(self, self._request(_calls.restore(blob)))

    def optimizers(self) -> list[dict[str, Any]]:
        return self._request(_calls.catalogue("optimizers"))

    def schedulers(self) -> list[dict[str, Any]]:
        return self._request(_calls.catalogue("schedulers"))

    def preview_schedule(
        self,
        lr: float | list[float],
        scheduler: Mapping[str, Any],
        steps: int,
        *,
        steps_per_epoch: int | None = None,
        losses: list[float] | None = None,
        optimizer: Mapping[str, Any] | None = None,
    ) -> list[list[float]]:
        """The lr before each of `steps` steps, one list per parameter group."""
        call = _calls.preview_schedule(
            lr, scheduler, steps, steps_per_epoch=steps_per_epoch, losses=losses, optimizer=optimizer
        )
        return self._request(call)

    def health(self) -> dict[str, Any]:
        return self._request(_calls.health())


class _SessionBase:
    """What `Session` and `AsyncSession` share: the client, the description, and how a step is called."""

    client: Client | AsyncClient

    def __init__(self, client: Client | AsyncClient, info: SessionInfo) -> None:
        self.client = client
        self.info = info

    @property
    def id(self) -> str:
        return self.info.id

    def _step_of(
        self,
        grads: Mapping[str, npt.ArrayLike],
        loss: float | None,
        expected_step: int | None,
        return_params: bool,
        worker: str | None,
        weight: float | None,
        step: int | None,
        idempotency_key: str | None,
    ) -> Call[StepResult]:
        expected = _calls.expected(expected_step, step)
        wire, info = self.client.wire, self.info
        return _calls.step(wire, info, grads, loss, expected, return_params, worker, weight, idempotency_key)


class Session(_SessionBase):
    """A session on the server. `info` is its description as last read (creation, `refresh()`,
    `set_params()`); `step()` does not update it."""

    client: Client

    def __init__(self, client: Client, info: SessionInfo) -> None:
        super().__init__(client, info)

    def __repr__(self) -> str:
        return f"Session({self.id!r})"

    def step(
        self,
        grads: Mapping[str, npt.ArrayLike],
        loss: float | None = None,
        expected_step: int | None = None,
        return_params: bool = True,
        *,
        worker: str | None = None,
        weight: float | None = None,
        step: int | None = None,
        idempotency_key: str | None = None,
    ) -> StepResult:
        """Apply one step. A parameter left out of `grads` is left alone, as torch does for `grad is None`.
        With `expected_step` (or its other name `step`), the server refuses (`StepConflict`) unless the
        session is at that step (or, aggregating asynchronously, at most `max_staleness` past it). With
        `worker`, on a session with synchronous rounds, this is that worker's contribution to round
        `expected_step` (`weight` for weighted_mean): it returns when the round is applied, with the round's
        step. `idempotency_key` resends a step made before, e.g. by a worker process that restarted: the
        same key and gradients are answered again, never applied twice (one is made up when not given)."""
        call = self._step_of(grads, loss, expected_step, return_params, worker, weight, step, idempotency_key)
        return self.client._request(call)

    def params(self) -> dict[str, Array]:
        return self.client._request(_calls.get_params(self.client.wire, self.info))

    def set_params(self, params: Mapping[str, npt.ArrayLike]) -> SessionInfo:
        """Overwrite parameters (same names and shapes); the optimizer state and step count are kept."""
        self.info = self.client._request(_calls.put_params(self.client.wire, self.info, params))
        return self.info

    def checkpoint(self) -> bytes:
        """Parameters, optimizer state, spec and step as safetensors bytes, for `Client.restore`."""
        return self.client._request(_calls.checkpoint(self.info))

    def history(self, limit: int | None = None) -> list[HistoryRecord]:
        return self.client._request(_calls.history(self.id, limit))

    def refresh(self) -> SessionInfo:
        self.info = self.client._request(_calls.get_session(self.id))
        return self.info

    def delete(self) -> None:
        self.client._request(_calls.delete(self.id))


class AsyncClient(BaseClient):
    """`Client` with `async`/`await`; same arguments, except that `transport` and `http_client` are async."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float | Timeout | None = None,
        retries: int | RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        http_client: httpx.AsyncClient | None = None,
        wire: Wire = "safetensors",
    ) -> None:
        super().__init__(base_url, api_key, timeout, retries, wire)
        self._http, self._owns_http, self._zero_copy = own_http_client(
            httpx.AsyncClient, self.base_url, http_client, transport
        )

    async def _request(self, call: Call[T]) -> T:
        flow = self._exchange(self._http, call)
        try:
            action = next(flow)
            while True:
                if not isinstance(action, httpx.Request):
                    await asyncio.sleep(action)
                    action = flow.send(None)
                    continue
                try:
                    response = await self._http.send(action, stream=True)
                    try:
                        if needs_reading(response):
                            await response.aread()
                    finally:
                        await response.aclose()
                except httpx.TransportError as exc:
                    action = flow.throw(exc)
                else:
                    try:
                        action = flow.send(response)
                    finally:
                        let_go(response)
        except StopIteration as done:
            return cast(T, done.value)

    async def close(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def create_session(
        self,
        params: Mapping[str, npt.ArrayLike],
        optimizer: Mapping[str, Any],
        scheduler: Mapping[str, Any] | None = None,
        *,
        param_groups: list[Mapping[str, Any]] | None = None,
        steps_per_epoch: int | None = None,
        clip_grad_norm: float | None = None,
        clip_grad_value: float | None = None,
        nonfinite: str | None = None,
        aggregation: Mapping[str, Any] | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> AsyncSession:
        """See `Client.create_session`."""
        call = _calls.create(
            params,
            optimizer,
            scheduler=scheduler,
            param_groups=param_groups,
            steps_per_epoch=steps_per_epoch,
            clip_grad_norm=clip_grad_norm,
            clip_grad_value=clip_grad_value,
            nonfinite=nonfinite,
            aggregation=aggregation,
            metadata=metadata,
        )
        return AsyncSession(self, await self._request(call))

    async def get_session(self, session_id: str) -> AsyncSession:
        return AsyncSession(self, await self._request(_calls.get_session(session_id)))

    async def list_sessions(self) -> list[SessionSummary]:
        return await self._request(_calls.list_sessions())

    async def restore(self, blob: bytes) -> AsyncSession:
        """See `Client.restore`."""
        return AsyncSession(self, await self._request(_calls.restore(blob)))

    async def optimizers(self) -> list[dict[str, Any]]:
        return await self._request(_calls.catalogue("optimizers"))

    async def schedulers(self) -> list[dict[str, Any]]:
        return await self._request(_calls.catalogue("schedulers"))

    async def preview_schedule(
        self,
        lr: float | list[float],
        scheduler: Mapping[str, Any],
        steps: int,
        *,
        steps_per_epoch: int | None = None,
        losses: list[float] | None = None,
        optimizer: Mapping[str, Any] | None = None,
    ) -> list[list[float]]:
        """See `Client.preview_schedule`."""
        call = _calls.preview_schedule(
            lr, scheduler, steps, steps_per_epoch=steps_per_epoch, losses=losses, optimizer=optimizer
        )
        return await self._request(call)

    async def health(self) -> dict[str, Any]:
        return await self._request(_calls.health())


class AsyncSession(_SessionBase):
    """`Session` with `async`/`await`."""

    client: AsyncClient

    def __init__(self, client: AsyncClient, info: SessionInfo) -> None:
        super().__init__(client, info)

    def __repr__(self) -> str:
        return f"AsyncSession({self.id!r})"

    async def step(
        self,
        grads: Mapping[str, npt.ArrayLike],
        loss: float | None = None,
        expected_step: int | None = None,
        return_params: bool = True,
        *,
        worker: str | None = None,
        weight: float | None = None,
        step: int | None = None,
        idempotency_key: str | None = None,
    ) -> StepResult:
        """See `Session.step`."""
        call = self._step_of(grads, loss, expected_step, return_params, worker, weight, step, idempotency_key)
        return await self.client._request(call)

    async def params(self) -> dict[str, Array]:
        return await self.client._request(_calls.get_params(self.client.wire, self.info))

    async def set_params(self, params: Mapping[str, npt.ArrayLike]) -> SessionInfo:
        """See `Session.set_params`."""
        self.info = await self.client._request(_calls.put_params(self.client.wire, self.info, params))
        return self.info

    async def checkpoint(self) -> bytes:
        return await self.client._request(_calls.checkpoint(self.info))

    async def history(self, limit: int | None = None) -> list[HistoryRecord]:
        return await self.client._request(_calls.history(self.id, limit))

    async def refresh(self) -> SessionInfo:
        self.info = await self.client._request(_calls.get_session(self.id))
        return self.info

    async def delete(self) -> None:
        await self.client._request(_calls.delete(self.id))
