"""`POST /v1/schedules/preview`'s numerics: the lr a session's schedule gives before each step."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from app.optim.hparams import SpecError
from app.optim.registry import get_optimizer
from app.optim.schedulers import advance_epoch, build_scheduler
from app.optim.spec import checked


def preview_schedule(
    lr: float | list[float],
    scheduler: Mapping[str, Any],
    steps: int,
    steps_per_epoch: int = 1,
    losses: list[float] | None = None,
    optimizer: Mapping[str, Any] | None = None,
) -> list[list[float]]:
    """The lr of each group before each of `steps` steps, as a session with this spec would use it.

    The groups carry `optimizer`'s hyperparameters (default SGD), so momentum-cycling schedulers work.
    """
    opt = get_optimizer((optimizer or {"name": "sgd"}).get("name"))
    base = checked(opt, optimizer or {"name": "sgd"}, "optimizer")
    lrs = lr if isinstance(lr, list) else [lr]
    if steps_per_epoch < 1:
        raise SpecError.one("steps_per_epoch", f"must be >= 1, got {steps_per_epoch}")
    groups = [{**base, "lr": float(x)} for x in lrs]
    sched = build_scheduler(scheduler, groups)
    if sched.needs_metric:
        needed = steps - steps % steps_per_epoch
        if losses is None or len(losses) < needed:
            raise SpecError.one(
                "losses", f"reduce_lr_on_plateau needs a loss for each of the first {needed} steps"
            )
    out: list[list[float]] = [[] for _ in groups]
    epoch_losses: list[float] = []
    for t in range(steps):
        for values, g in zip(out, groups, strict=True):
            values.append(float(g["lr"]))
        if losses is not None and t < len(losses):
            epoch_losses.append(losses[t])
        if (t + 1) % steps_per_epoch == 0:
            advance_epoch(sched, epoch_losses)
            epoch_losses.clear()
    return out
