"""One training run's numerics: parameters, optimizer state, groups and scheduler, stepped as torch would.

An engine is never changed once built: `advance` computes the next engine beside it (fresh arrays for
what the step writes, the same arrays for what it does not), and everything that can fail (validation,
the update, non-finite results, the scheduler's arithmetic) fails before the caller has anything to
swap in. So a step that fails at any stage leaves the session as it was with nothing to undo, and the
caller's swap to the new engine is its one point of change. Validating a spec lives in `spec`, reading
a checkpoint back in `checkpoint`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from app.optim import clip
from app.optim.base import Array, Optimizer, State
from app.optim.hparams import to_json
from app.optim.registry import get_optimizer
from app.optim.schedulers import Scheduler, advance_epoch
from app.optim.spec import SESSION_OPTIONS, validate
from app.values import immutable

SNAPSHOT_FORMAT = 1
# Step counts stay exact as JSON numbers in every language (IEEE doubles) and far from SQLite's int64.
MAX_STEP = 2**53


class StepError(ValueError):
    """A step (or parameter write) the engine refuses; `field` names the offending input."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


@immutable
class StepOutcome:
    step: int
    lr: list[float]
    skipped: bool
    grad_norm: float
    staleness: int = 0
    workers: tuple[str, ...] = ()  # a synchronous round's contributors, sorted


@immutable
class PreparedStep:
    """A validated step: gradients cast to their parameters' dtypes, grouped, not yet applied."""

    grads: dict[str, Array]
    loss: float | None
    grad_norm: float
    skipped: bool
    staleness: int = 0


class Engine:
    """Parameters, per-parameter state, param groups and the scheduler of one session."""

    def __init__(
        self,
        options: dict[str, Any],
        params: dict[str, Array],
        states: dict[str, State],
        groups: list[dict[str, Any]],
        group_params: list[list[str]],
        scheduler: Scheduler | None,
        step: int = 0,
        losses: list[float] | None = None,
        sizes: Engine | None = None,
    ) -> None:
        """`sizes`: an engine with the same options and shapes, whose optimizer and element and byte counts
        are taken over."""
        self.options = options
        self.optimizer: Optimizer = (
            get_optimizer(options["optimizer"]["name"]) if sizes is None else sizes.optimizer
        )
        self.params = params
        self.states = states
        self.groups = groups
        self.group_params = group_params
        self.scheduler = scheduler
        self.step_count = step
        self.losses: list[float] = losses or []
        self.numel: int
        self.nbytes: int
        # the groups as JSON, made by the first snapshot and kept by the engines that follow with the same
        # groups (a step without a scheduler advance): a snapshot is taken at every step
        self._groups_json: list[dict[str, Any]] | None = None
        if sizes is not None:
            self.numel, self.nbytes = sizes.numel, sizes.nbytes
            if groups is sizes.groups:
                self._groups_json = sizes._groups_json
            return
        self.numel = sum(p.size for p in params.values())
        state_bytes = sum(v.nbytes for slots in states.values() for v in slots.values())
        self.nbytes = sum(p.nbytes for p in params.values()) + state_bytes

    # -- creation ---------------------------------------------------------------------------------

    @classmethod
    def create(
        cls, options: Mapping[str, Any], params: Mapping[str, Array], max_bytes: int | None = None
    ) -> Engine:
        """A new session's engine: the spec validated (`spec.validate`, within `max_bytes`), the
        parameters copied, the state laid out as torch's lazy init would."""
        valid = validate(options, params, max_bytes)
        owned = {name: np.array(value, copy=True, order="C") for name, value in params.items()}
        states = {}
        for names, hp in zip(valid.group_params, valid.groups, strict=True):
            for name in names:
                states[name] = valid.optimizer.init_state(owned[name], hp)
        return cls(valid.options, owned, states, valid.groups, valid.group_params, valid.scheduler)

    # -- reading ----------------------------------------------------------------------------------

    @property
    def lr(self) -> list[float]:
        return [float(g["lr"]) for g in self.groups]

    @property
    def replayable(self) -> bool:
        """Whether `advance` redoes a prepared step to the same bits on any CPU: elementwise IEEE arithmetic
        and numpy's fixed-order sums do (tests/optim/test_dispatch.py pins it across numpy's and OpenBLAS'
        dispatch); Muon's matrix products follow the CPU's BLAS kernel, so its steps are not redone."""
        return self.optimizer.name != "muon"

    def describe(self) -> dict[str, Any]:
        """The spec with every default filled in, current group hyperparameters, parameter shapes."""
        declared = {p.name for p in self.optimizer.hparams}
        return {
            "optimizer": self.options["optimizer"],
            "scheduler": self.options["scheduler"],
            "param_groups": [
                {"params": names, **to_json({k: v for k, v in g.items() if k in declared})}
                for names, g in zip(self.group_params, self.groups, strict=True)
            ],
            "params": {n: {"shape": list(p.shape), "dtype": str(p.dtype)} for n, p in self.params.items()},
            **{p.name: self.options[p.name] for p in SESSION_OPTIONS},
            "aggregation": self.options.get("aggregation"),
        }

    def schedule_ahead(self, steps: int) -> tuple[list[list[float]], bool]:
        """The lr of each group for each of the next `steps` steps, as the schedule will give them from
        here (on copies: this engine is left as it is), and whether that was knowable: a scheduler that
        reads the loss (reduce_lr_on_plateau) is shown holding its current lr."""
        out: list[list[float]] = [[] for _ in self.groups]
        groups = [dict(g) for g in self.groups]
        scheduler = copy.deepcopy(self.scheduler)
        depends_on_loss = scheduler is not None and scheduler.needs_metric
        if scheduler is not None and not depends_on_loss:
            scheduler.bind(groups)
        per_epoch = self.options["steps_per_epoch"]
        for t in range(steps):
            for values, group in zip(out, groups, strict=True):
                values.append(float(group["lr"]))
            if scheduler is not None and not depends_on_loss and (self.step_count + t + 1) % per_epoch == 0:
                try:
                    advance_epoch(scheduler, [])
                except (ArithmeticError, ValueError):
                    break  # the session's next step would refuse this advance too: nothing beyond it
        return out, not depends_on_loss

    # -- stepping ---------------------------------------------------------------------------------

    def check_tensors(self, tensors: Mapping[str, Array], prefix: str) -> None:
        for name, value in tensors.items():
            if name not in self.params:
                allowed = ", ".join(self.params)
                raise StepError(f"{prefix}.{name}", f"unknown parameter; this session has: {allowed}")
            want = self.params[name].shape
            if value.shape != want:
                raise StepError(f"{prefix}.{name}", f"shape {list(value.shape)} does not match {list(want)}")

    def staleness(self, computed_at: int | None) -> int | None:
        """How many steps behind the session a gradient computed at step `computed_at` is, if the session
        takes it; None if it does not (the caller answers 409 with the current step). Without the
        `aggregation` option a step must be current (or say nothing); with `{"mode": "async"}` it must say
        its step, and be at most `max_staleness` behind."""
        aggregation = self.options.get("aggregation")
        if aggregation is None:
            return 0 if computed_at is None or computed_at == self.step_count else None
        if aggregation["mode"] == "sync":
            raise StepError(
                "worker",
                "required: this session runs synchronous rounds (aggregation.mode 'sync'), so each step is a "
                "worker's contribution to the round `step`",
            )
        if computed_at is None:
            raise StepError(
                "step",
                "required: this session aggregates asynchronously (aggregation.mode 'async'), so each step "
                "says the step its gradient was computed at",
            )
        behind = self.step_count - computed_at
        return behind if 0 <= behind <= aggregation["max_staleness"] else None

    def prepare(
        self, grads: Mapping[str, Array], loss: float | None = None, staleness: int = 0
    ) -> PreparedStep:
        """Validates and processes gradients (nonfinite policy, clipping) without changing the engine."""
        self.check_tensors(grads, "grads")
        if loss is not None and not math.isfinite(loss):
            # a NaN loss usually comes with the NaN gradients the `skip` policy is there to absorb
            if self.options["nonfinite"] == "skip":
                return PreparedStep({}, None, math.nan, True, staleness)
            raise StepError(
                "loss", f"must be a finite number, got {loss!r} (session option nonfinite='error')"
            )
        cast, grad_norm = _cast_and_norm(grads, self.params)
        if not math.isfinite(grad_norm):
            bad = next((n for n, g in cast.items() if not np.isfinite(g).all()), None)
            if bad is not None and self.options["nonfinite"] == "skip":
                return PreparedStep({}, loss, math.nan, True, staleness)
            if bad is not None:
                raise StepError(f"grads.{bad}", "contains NaN or Infinity (session option nonfinite='error')")
        if self.scheduler is not None and self.scheduler.needs_metric:
            completes_epoch = (self.step_count + 1) % self.options["steps_per_epoch"] == 0
            if completes_epoch and loss is None and not self.losses:
                raise StepError(
                    "loss",
                    "reduce_lr_on_plateau advances after this step and needs a `loss`; none was reported "
                    "this epoch",
                )
        names = list(cast)
        values = list(cast.values())
        if self.options["clip_grad_value"] is not None:
            values = clip.clip_by_value(values, self.options["clip_grad_value"])
        if self.options["clip_grad_norm"] is not None:
            norm = grad_norm if self.options["clip_grad_value"] is None else clip.total_norm(values)
            values = clip.clip_by_norm(values, self.options["clip_grad_norm"], norm)
        return PreparedStep(dict(zip(names, values, strict=True)), loss, grad_norm, False, staleness)

    def advance(self, prepared: PreparedStep) -> tuple[Engine, StepOutcome]:
        """The engine after a prepared step, and the step's outcome; this engine is left as it was.

        Raises StepError, and changes nothing, for a step past MAX_STEP, a result that is not finite
        (unless `nonfinite` is 'allow'; 'skip' skips the step instead) and a scheduler advance that fails
        or yields a learning rate that is not a finite number >= 0.
        """
        if prepared.skipped:
            return self._skipped(prepared)
        step = self.step_count + 1
        if step > MAX_STEP:
            raise StepError("step", f"the session is at step {self.step_count}, the most a session may take")
        params, states = dict(self.params), dict(self.states)
        grads = prepared.grads
        nonfinite: list[str] = []
        aggregation = self.options.get("aggregation")
        divisor = 1 + prepared.staleness
        if aggregation is None or aggregation.get("staleness_lr") != "inverse" or divisor == 1:
            divisor = 1
        for names, hp in zip(self.group_params, self.groups, strict=True):
            if divisor != 1:  # a stale gradient's step only: the groups the scheduler keeps are untouched
                hp = {**hp, "lr": hp["lr"] / divisor}
            present = [n for n in names if n in grads]
            if present:
                new_params, new_states, finite = self.optimizer.step_into(
                    [params[n] for n in present],
                    [grads[n] for n in present],
                    [states[n] for n in present],
                    hp,
                )
                params.update(zip(present, new_params, strict=True))
                states.update(zip(present, new_states, strict=True))
                nonfinite.extend(n for n, ok in zip(present, finite, strict=True) if not ok)
        if nonfinite and self.options["nonfinite"] != "allow":
            if self.options["nonfinite"] == "skip":
                return self._skipped(prepared)
            raise StepError(
                f"params.{nonfinite[0]}",
                f"this step would make it NaN or Infinity (lr {self.lr}); nothing was applied "
                "(session option nonfinite='error'; 'skip' skips such steps, 'allow' applies them)",
            )
        losses = self.losses if prepared.loss is None else [*self.losses, prepared.loss]
        groups, scheduler = self.groups, self.scheduler
        if step % self.options["steps_per_epoch"] == 0:
            if scheduler is not None:
                groups, scheduler = _advanced_schedule(scheduler, groups, losses)
            losses = []
        following = Engine(
            self.options, params, states, groups, self.group_params, scheduler, step, losses, sizes=self
        )
        return following, StepOutcome(step, following.lr, False, prepared.grad_norm, prepared.staleness)

    def _skipped(self, prepared: PreparedStep) -> tuple[Engine, StepOutcome]:
        return self, StepOutcome(self.step_count, self.lr, True, prepared.grad_norm, prepared.staleness)

    def step(self, grads: Mapping[str, Array], loss: float | None = None) -> tuple[Engine, StepOutcome]:
        return self.advance(self.prepare(grads, loss))

    def with_params(self, values: Mapping[str, Array]) -> Engine:
        """The engine with some parameters overwritten (same names and shapes); state and step kept."""
        self.check_tensors(values, "params")
        # Checked after the cast to the parameter's dtype: a float64 beyond float32's range becomes inf.
        with np.errstate(over="ignore"):
            cast = {name: value.astype(self.params[name].dtype) for name, value in values.items()}
        for name, value in cast.items():
            if not np.isfinite(value).all():
                dtype = self.params[name].dtype.name
                raise StepError(
                    f"params.{name}", f"contains NaN or Infinity, or a value out of range for {dtype}"
                )
        params = {name: cast.get(name, value) for name, value in self.params.items()}
        return Engine(
            self.options,
            params,
            self.states,
            self.groups,
            self.group_params,
            self.scheduler,
            self.step_count,
            self.losses,
            sizes=self,
        )

    # -- persistence ------------------------------------------------------------------------------

    def _groups_as_json(self) -> list[dict[str, Any]]:
        if self._groups_json is None:
            self._groups_json = [to_json(g) for g in self.groups]
        return self._groups_json

    def snapshot(self) -> tuple[dict[str, Array], dict[str, Any]]:
        """Named arrays (`params/{name}`, `state/{name}/{slot}`) and JSON-ready metadata."""
        tensors: dict[str, Array] = {f"params/{n}": p for n, p in self.params.items()}
        for name, state in self.states.items():
            for slot, value in state.items():
                tensors[f"state/{name}/{slot}"] = value
        meta = {
            "format": SNAPSHOT_FORMAT,
            "options": self.options,
            "param_names": list(self.params),
            "step": self.step_count,
            "groups": self._groups_as_json(),
            "group_params": self.group_params,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "losses": self.losses,
        }
        return tensors, meta


@np.errstate(over="ignore", invalid="ignore")  # as a decorator it costs half what a `with` block does
def _cast_and_norm(grads: Mapping[str, Array], params: Mapping[str, Array]) -> tuple[dict[str, Array], float]:
    """The gradients in their parameters' dtypes (a float64 beyond float32's range becomes inf: the
    nonfinite policy decides), and their total norm. The norm (before clipping) is also the finiteness
    check: finite squares sum to a finite number or overflow to inf, which only a second look tells from NaN
    or Infinity."""
    cast: dict[str, Array] = {}
    for name, g in grads.items():
        dtype = params[name].dtype
        cast[name] = g if g.dtype == dtype else g.astype(dtype)
    return cast, clip.total_norm(list(cast.values()))


def _advanced_schedule(
    scheduler: Scheduler, groups: list[dict[str, Any]], losses: list[float]
) -> tuple[list[dict[str, Any]], Scheduler]:
    """The groups and scheduler after one scheduler advance, computed on copies: the originals stay."""
    groups = [dict(g) for g in groups]
    scheduler = copy.deepcopy(scheduler)
    scheduler.bind(groups)
    try:
        advance_epoch(scheduler, losses)
    except (ArithmeticError, ValueError) as exc:
        raise StepError("scheduler", f"{scheduler.name} cannot advance: {exc}; nothing was applied") from None
    for i, group in enumerate(groups):
        lr = group["lr"]
        if not (isinstance(lr, float | int) and math.isfinite(lr) and lr >= 0):
            raise StepError(
                "scheduler",
                f"{scheduler.name} would set group {i}'s lr to {lr!r}, not a finite number >= 0; "
                "nothing was applied",
            )
        for key in ("momentum", "betas"):  # what the momentum-cycling schedulers set
            values = group.get(key)
            if values is not None and not all(math.isfinite(v) for v in np.atleast_1d(values)):
                raise StepError(
                    "scheduler",
                    f"{scheduler.name} would set group {i}'s {key} to {values!r}; nothing was applied",
                )
    return groups, scheduler
