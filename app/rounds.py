"""Synchronous rounds across replicas: the round lives in a `RoundStore` (Redis), not in one process.

A contribution joins the round in the store (the store checks the session's step, the worker's earlier
request and the round's byte budget in one atomic script). Its request then waits: it tries to claim the
round, which succeeds when the round is full or its timeout has passed (the store's clock decides), and
otherwise sleeps on the store's signal (pub/sub: a claim or the end of the round, in any replica) until the
timeout or the claim's lease runs out. The claimer reads every contribution, reduces them (`reduce`: by
worker id, in float64) and commits the one step together with the round's outcome (`commit_round`); the
session's compare-and-set keeps it one step even when two claimers race. Every waiter, in every replica,
then reads the outcome and answers from the session's parameters.

A replica killed mid-round loses nothing: contributions are in the store, its clients resend with the same
Idempotency-Key and body to another replica (the store recognises the worker's request and the resend
waits like any contributor), and a claim it held runs out after LEASE_SECONDS, when another waiter takes
the round over.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, TypeVar

from app.optim.aggregate import Contribution, mean_loss, reduce
from app.optim.base import Array
from app.optim.engine import Engine, StepError, StepOutcome
from app.sessions import (
    NotFound,
    Render,
    RoundConflict,
    RoundsFull,
    SessionService,
    StepConflict,
    Written,
    off_the_loop_if,
    too_few,
)
from app.store.base import HistoryRow, Joined, RoundOutcome, RoundPart, RoundStore, SessionMeta
from app.wire import safetensors

T = TypeVar("T")

LEASE_SECONDS = 5.0
"""How long a claim on a round holds: a closer that died is replaced after at most this long."""
ENCODE_INLINE_BYTES = 1 << 20


class SharedRounds:
    """The synchronous rounds of a service whose store is a `RoundStore`."""

    def __init__(self, service: SessionService, store: RoundStore, lease: float = LEASE_SECONDS) -> None:
        self.service = service
        self.store = store
        self.lease = lease
        self.owner = secrets.token_hex(8)  # this process, as a round's closer

    async def contribute(
        self,
        tenant: str,
        session_id: str,
        engine: Engine,
        aggregation: Mapping[str, Any],
        worker: str,
        grads: Mapping[str, Array],
        render: Render[T],
        *,
        round_step: int,
        loss: float | None,
        weight: float | None,
        fingerprint: str,
    ) -> T:

        service = self.service
        if round_step == engine.step_count:
            engine.check_tensors(grads, "grads")
        nbytes = sum(g.nbytes for g in grads.values())
        blob = await off_the_loop_if(nbytes > ENCODE_INLINE_BYTES, safetensors.encode_bytes, grads)
        part = RoundPart(worker, fingerprint, 1.0 if weight is None else weight, loss, blob)
        joined = await service._guard(
            self.store.round_join(
                session_id,
                round_step,
                part,
                service.max_round_bytes,
                aggregation["timeout"],
                aggregation["workers"],
            )
        )
        del blob, part
        if joined.kind == "gone":
            raise NotFound(session_id)
        if joined.kind == "done":
            return await self._answer_again(
                tenant, session_id, worker, fingerprint, joined, render, aggregation
            )
        if joined.kind == "stale":
            raise StepConflict(round_step, joined.current, aggregation)
        if joined.kind == "other":
            raise RoundConflict(
                f"worker {worker!r} already contributed to round {round_step} with another request",
                round_step,
            )
        if joined.kind == "closed":
            raise RoundConflict(f"round {round_step} is closed; it is being applied", round_step)
        if joined.kind == "full":
            raise RoundsFull(
                f"round {round_step} holds its contributions up to OPTSERVE_MAX_ROUND_BYTES="
                f"{service.max_round_bytes} bytes; this one does not fit: retry"
            )
        outcome = await self._wait(tenant, session_id, joined.round_id, round_step, aggregation)
        return await self._answer(tenant, session_id, outcome, render, joined.kind == "resent")

    async def _answer_again(
        self,
        tenant: str,
        session_id: str,
        worker: str,
        fingerprint: str,
        joined: Joined,
        render: Render[T],
        aggregation: Mapping[str, Any],
    ) -> T:
        """A contribution to a round that was applied: its resend is answered again, anything else 409."""

        outcome = joined.outcome
        if outcome is None or worker not in outcome.fingerprints:
            raise StepConflict(outcome.step if outcome else joined.current - 1, joined.current, aggregation)
        if outcome.fingerprints[worker] != fingerprint:
            raise RoundConflict(
                f"worker {worker!r} contributed to round {outcome.step} with another request", joined.current
            )
        return await self._answer(tenant, session_id, outcome, render, True)

    async def _answer(
        self, tenant: str, session_id: str, outcome: RoundOutcome, render: Render[T], replayed: bool
    ) -> T:

        if not outcome.applied:
            if outcome.error_field:
                raise StepError(outcome.error_field, outcome.message)
            raise RoundConflict(outcome.message, outcome.step)
        service = self.service
        async with service._lock(session_id):
            _, engine = await service._load(tenant, session_id)
        if engine.step_count != outcome.next_step:
            raise RoundConflict(
                f"round {outcome.step} was applied with this contribution, but the session has moved on to "
                f"step {engine.step_count} since, and the parameters right after that round are no longer "
                "kept: read the current ones",
                engine.step_count,
            )
        result = StepOutcome(
            outcome.next_step, outcome.lr, outcome.skipped, outcome.grad_norm, 0, outcome.workers
        )
        return await render(result, engine.params, replayed)

    async def _wait(
        self, tenant: str, session_id: str, round_id: str, step: int, aggregation: Mapping[str, Any]
    ) -> RoundOutcome:
        """How the round ended, closing it here when this waiter's claim is the one that succeeds."""

        service = self.service
        signal = self.store.round_signal(session_id, round_id)
        try:
            while True:
                claim = await service._guard(
                    self.store.round_claim(
                        session_id,
                        round_id,
                        self.owner,
                        aggregation["workers"],
                        aggregation["timeout"],
                        self.lease,
                    )
                )
                if claim.kind == "claimed":
                    closed = await self._close(tenant, session_id, round_id, step, aggregation)
                    if closed is not None:
                        return closed
                    continue
                if claim.kind == "gone":
                    ended = await service._guard(self.store.round_outcome(session_id, round_id))
                    if ended is not None:
                        return ended
                    meta = await service._meta(tenant, session_id)  # NotFound when the session went
                    raise RoundConflict(
                        f"round {step} ended and how is no longer known (session version {meta.version})",
                        step,
                    )
                await signal.wait(claim.wait_ms / 1000)
        finally:
            signal.close()

    async def _close(
        self, tenant: str, session_id: str, round_id: str, step: int, aggregation: Mapping[str, Any]
    ) -> RoundOutcome | None:
        """Applies the claimed round once, or ends it unapplied below min_workers; None when the claim was
        lost meanwhile (another waiter ends the round)."""
        service = self.service
        parts = await service._guard(self.store.round_parts(session_id, round_id))
        if not parts:
            return None
        fingerprints = {part.worker: part.fingerprint for part in parts}
        if len(parts) < aggregation["min_workers"]:
            failed = RoundOutcome(
                round_id,
                step,
                False,
                too_few(step, len(parts), aggregation),
                fingerprints=fingerprints,
            )
            ended = await service._guard(self.store.round_fail(session_id, self.owner, failed))
            return failed if ended else None
        contributions = [
            Contribution(part.worker, safetensors.decode(part.blob)[0], part.weight, part.loss)
            for part in parts
        ]
        try:
            return await self._apply(
                tenant, session_id, round_id, step, contributions, fingerprints, aggregation
            )
        except StepError as exc:  # the reduced step itself is refused: every contributor is told
            refused = RoundOutcome(
                round_id, step, False, exc.message, fingerprints=fingerprints, error_field=exc.field
            )
            ended = await service._guard(self.store.round_fail(session_id, self.owner, refused))
            return refused if ended else None

    async def _apply(
        self,
        tenant: str,
        session_id: str,
        round_id: str,
        step: int,
        contributions: list[Contribution],
        fingerprints: dict[str, str],
        aggregation: Mapping[str, Any],
    ) -> RoundOutcome:

        service = self.service
        loss = mean_loss(contributions)
        applied: list[tuple[RoundOutcome, StepOutcome]] = []

        async def write(meta: SessionMeta, engine: Engine) -> Written | RoundOutcome:
            if engine.step_count != step:  # another closer (this one's lease ran out) applied it first
                ended = await service._guard(self.store.round_outcome(session_id, round_id))
                if ended is not None:
                    return ended
                raise StepConflict(step, engine.step_count, aggregation)

            def work() -> tuple[Engine, StepOutcome]:
                return engine.advance(engine.prepare(reduce(contributions, aggregation["reduce"]), loss))

            following, outcome = await service._run(engine, work)
            grad_norm = None if outcome.skipped else outcome.grad_norm
            ended = RoundOutcome(
                round_id,
                step,
                True,
                "",
                outcome.step,
                outcome.lr,
                outcome.skipped,
                outcome.grad_norm,
                fingerprints,
            )
            applied.append((ended, replace(outcome, workers=ended.workers)))
            history = HistoryRow(outcome.step, outcome.lr, loss, grad_norm, outcome.skipped, service.clock())
            return Written(following, history, round=ended)

        result = await service._transact(tenant, session_id, write)
        if isinstance(result, RoundOutcome):
            return result
        ended, outcome = applied[-1]
        service.on_step(outcome)
        return ended
