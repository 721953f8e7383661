"""`Worker` and `AsyncWorker`: one of several workers training one session (synchronous rounds, bounded
staleness, or plain one-at-a-time steps). Each sends its gradient with the step of the parameters it was
computed from, tracks that step and those parameters, and catches up when its gradient was refused."""

from __future__ import annotations

from collections.abc import Mapping

import numpy.typing as npt

from optserve._client import AsyncSession, Session
from optserve._wire import Array
from optserve.errors import StepConflict
from optserve.models import StepResult


class _Tracking:
    def __init__(self, session: Session | AsyncSession, worker_id: str) -> None:
        self.session = session
        self.id = worker_id
        self.at_step = session.info.step
        """The step of the parameters this worker holds: its gradients are computed there."""
        self.params: dict[str, Array] | None = None
        """The parameters at `step`, once a step or a catch-up fetched them (None before)."""
        self.dropped = 0
        """Gradients the session refused as too late (the worker then caught up)."""
        rounds = session.info.aggregation
        self._worker = worker_id if rounds is not None and rounds.get("mode") == "sync" else None

    def _took(self, result: StepResult) -> StepResult:
        self.at_step = result.step
        if result.params:
            self.params = result.params
        return result


class Worker(_Tracking):
    """`Worker(session, "w3")`; `worker.step(grads, loss=..., weight=...)` returns the step's result, or
    None when the gradient was refused as too late: `worker.params` then holds the session's current
    parameters, to compute the next gradient from."""

    session: Session

    def __init__(self, session: Session, worker_id: str) -> None:
        super().__init__(session, worker_id)

    def step(
        self, grads: Mapping[str, npt.ArrayLike], loss: float | None = None, weight: float | None = None
    ) -> StepResult | None:
        try:
            result = self.session.step(grads, loss, self.at_step, worker=self._worker, weight=weight)
        except StepConflict as conflict:
            self.dropped += 1
            self.params = self.session.params()
            self.at_step = conflict.current_step if conflict.current_step is not None else self.at_step
            return None
        return self._took(result)


class AsyncWorker(_Tracking):
    """`Worker` for `AsyncClient` sessions."""

    session: AsyncSession

    def __init__(self, session: AsyncSession, worker_id: str) -> None:
        super().__init__(session, worker_id)

    async def step(
        self, grads: Mapping[str, npt.ArrayLike], loss: float | None = None, weight: float | None = None
    ) -> StepResult | None:
        try:
            result = await self.session.step(grads, loss, self.at_step, worker=self._worker, weight=weight)
        except StepConflict as conflict:
            self.dropped += 1
            self.params = await self.session.params()
            self.at_step = conflict.current_step if conflict.current_step is not None else self.at_step
            return None
        return self._took(result)
