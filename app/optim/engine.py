"""One training run's numerics: parameters, optimizer state, groups and scheduler, stepped as torch would.

An engine is never changed once built: `advance` computes the next engine beside it (fresh arrays for
what the step writes, the same arrays for what it does not), and everything that can fail (validation,
the update, non-finite results, the scheduler's arithmetic) fails before the caller has anything to
swap in. So a step that fails at any stage leaves the session as it was with nothing to undo, and the
caller's swap to the new engine is its one point of change. `snapshot`/`restore` turn an engine into
named arrays plus JSON metadata (no pickle) and back, bit-exactly.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from app.optim import clip
from app.optim.base import Array, Optimizer, State
from app.optim.hparams import Check, FieldError, HParam, SpecError, parse, to_json
from app.optim.registry import get_optimizer
from app.optim.schedulers import Scheduler, build_scheduler, filled_spec

PARAM_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
SNAPSHOT_FORMAT = 1
# Step counts stay exact as JSON numbers in every language (IEEE doubles) and far from SQLite's int64.
MAX_STEP = 2**53
MAX_PARAMETERS = 10_000
MAX_GROUPS = 1_000
MAX_NAME_LENGTH = 256
# safetensors keeps its metadata under this key: no tensor, so no parameter, may be called so
RESERVED_NAME = "__metadata__"


def name_errors(names: list[str]) -> list[FieldError]:
    """What is wrong with a session's parameter names: too many, too long, empty or reserved."""
    if len(names) > MAX_PARAMETERS:
        return [FieldError("params", f"at most {MAX_PARAMETERS} parameters, got {len(names)}")]
    return [
        FieldError(
            f"params.{name[:MAX_NAME_LENGTH]}", f"names are 1 to {MAX_NAME_LENGTH} characters, not {why}"
        )
        for name, why in ((n, _bad_name(n)) for n in names)
        if why
    ]


def _bad_name(name: str) -> str | None:
    if not name:
        return "empty"
    if len(name) > MAX_NAME_LENGTH:
        return f"{len(name)} long"
    return f"{RESERVED_NAME!r}, which safetensors reserves" if name == RESERVED_NAME else None


SESSION_OPTIONS = (
    HParam("steps_per_epoch", "int", 1, "optimizer steps per scheduler advance"),
    HParam("clip_grad_norm", "float", None, "max L2 norm of all gradients (clip_grad_norm_)", nullable=True),
    HParam(
        "clip_grad_value", "float", None, "clamp each gradient to [-v, v] (clip_grad_value_)", nullable=True
    ),
    HParam(
        "nonfinite",
        "str",
        "error",
        "a NaN/Inf gradient, or a step that would make a parameter or state value NaN/Inf: 'error' "
        "refuses the step (422), 'skip' skips it, 'allow' applies it as torch would",
        choices=("error", "skip", "allow"),
    ),
)


class StepError(ValueError):
    """A step (or parameter write) the engine refuses; `field` names the offending input."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


@dataclass(frozen=True)
class StepOutcome:
    step: int
    lr: list[float]
    skipped: bool
    grad_norm: float


@dataclass(frozen=True)
class PreparedStep:
    """A validated step: gradients cast to their parameters' dtypes, grouped, not yet applied."""

    grads: dict[str, Array]
    loss: float | None
    grad_norm: float
    skipped: bool


def _tuple_names(opt: Optimizer) -> set[str]:
    return {p.name for p in opt.hparams if p.kind == "tuple"}


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
        """`sizes`: an engine with the same shapes, whose element and byte counts are taken over."""
        self.options = options
        self.optimizer = get_optimizer(options["optimizer"]["name"])
        self.params = params
        self.states = states
        self.groups = groups
        self.group_params = group_params
        self.scheduler = scheduler
        self.step_count = step
        self.losses: list[float] = losses or []
        self.numel: int
        self.nbytes: int
        if sizes is not None:
            self.numel, self.nbytes = sizes.numel, sizes.nbytes
            return
        self.numel = sum(p.size for p in params.values())
        state_bytes = sum(v.nbytes for slots in states.values() for v in slots.values())
        self.nbytes = sum(p.nbytes for p in params.values()) + state_bytes

    # -- creation ---------------------------------------------------------------------------------

    @classmethod
    def create(cls, options: Mapping[str, Any], params: Mapping[str, Array]) -> Engine:
        """Validates the whole spec against the parameters; every problem is reported at once."""
        errors = name_errors(list(params))
        if not params:
            errors.append(FieldError("params", "at least one parameter is required"))
        if errors and len(params) > MAX_PARAMETERS:
            raise SpecError(errors)
        for name, value in params.items():
            if value.dtype not in PARAM_DTYPES:
                errors.append(FieldError(f"params.{name}", f"dtype {value.dtype} is not float32 or float64"))
            elif not np.isfinite(value).all():
                errors.append(FieldError(f"params.{name}", "contains NaN or Infinity"))
        raw_opt = options.get("optimizer")
        if not isinstance(raw_opt, Mapping):
            raise SpecError([*errors, FieldError("optimizer", "required: an object with a `name`")])
        opt = get_optimizer(raw_opt.get("name"))
        session = {}
        try:
            base = parse(opt.hparams, raw_opt, "optimizer")
            check = Check("optimizer")
            opt.check(base, check)
            check.done()
        except SpecError as exc:
            raise SpecError([*errors, *exc.errors]) from None
        try:
            session = parse(
                SESSION_OPTIONS,
                {k: v for k, v in options.items() if k in {p.name for p in SESSION_OPTIONS}},
                "session",
            )
        except SpecError as exc:
            errors.extend(FieldError(e.field.removeprefix("session."), e.message) for e in exc.errors)
        if session.get("steps_per_epoch", 1) < 1:
            errors.append(FieldError("steps_per_epoch", f"must be >= 1, got {session['steps_per_epoch']}"))
        for key in ("clip_grad_norm", "clip_grad_value"):
            if session.get(key) is not None and session[key] <= 0:
                errors.append(FieldError(key, f"must be > 0, got {session[key]}"))
        groups, group_params = cls._parse_groups(opt, base, options.get("param_groups"), list(params), errors)
        for name, value in params.items():
            why = opt.check_param(name, value.shape)
            if why:
                errors.append(FieldError(f"params.{name}", why))
        if errors:
            raise SpecError(errors)
        raw_sched = options.get("scheduler")
        scheduler = None
        sched_spec = None
        if raw_sched is not None:
            if not isinstance(raw_sched, Mapping):
                raise SpecError.one("scheduler", "expected an object with a `name`")
            scheduler = build_scheduler(raw_sched, groups)
            sched_spec = filled_spec(raw_sched, "scheduler")
        normalized = {
            "optimizer": {"name": opt.name, **to_json(base)},
            "param_groups": [
                {"params": names, **to_json(g)} for names, g in zip(group_params, groups, strict=True)
            ],
            "scheduler": sched_spec,
            **session,
        }
        owned = {name: np.array(value, copy=True, order="C") for name, value in params.items()}
        states = {}
        for names, hp in zip(group_params, groups, strict=True):
            for name in names:
                states[name] = opt.init_state(owned[name], hp)
        return cls(normalized, owned, states, groups, group_params, scheduler)

    @staticmethod
    def _parse_groups(
        opt: Optimizer,
        base: dict[str, Any],
        raw: Any,
        names: list[str],
        errors: list[FieldError],
    ) -> tuple[list[dict[str, Any]], list[list[str]]]:
        if raw is None:
            return [dict(base)], [names]
        if not isinstance(raw, list) or not raw:
            errors.append(FieldError("param_groups", "expected a non-empty array of {params: [...], ...}"))
            return [], []
        if len(raw) > MAX_GROUPS:
            errors.append(FieldError("param_groups", f"at most {MAX_GROUPS} groups, got {len(raw)}"))
            return [], []
        groups: list[dict[str, Any]] = []
        group_params: list[list[str]] = []
        seen: dict[str, int] = {}
        for i, g in enumerate(raw):
            prefix = f"param_groups[{i}]"
            if not isinstance(g, Mapping) or not isinstance(g.get("params"), list):
                errors.append(FieldError(prefix, "expected an object with `params`: an array of names"))
                continue
            members = g["params"]
            for name in members:
                if name not in names:
                    errors.append(FieldError(f"{prefix}.params", f"unknown parameter {name!r}"))
                elif name in seen:
                    errors.append(
                        FieldError(f"{prefix}.params", f"{name!r} is already in group {seen[name]}")
                    )
                else:
                    seen[name] = i
            try:
                hp = parse(opt.hparams, g, prefix, ignore=("params",), defaults=base)
                check = Check(prefix)
                opt.check(hp, check)
                check.done()
            except SpecError as exc:
                errors.extend(exc.errors)
                continue
            groups.append(hp)
            group_params.append([str(n) for n in members])
        missing = [n for n in names if n not in seen]
        if missing:
            errors.append(FieldError("param_groups", f"parameters in no group: {', '.join(missing)}"))
        return groups, group_params

    # -- reading ----------------------------------------------------------------------------------

    @property
    def lr(self) -> list[float]:
        return [float(g["lr"]) for g in self.groups]

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
        }

    # -- stepping ---------------------------------------------------------------------------------

    def check_tensors(self, tensors: Mapping[str, Array], prefix: str) -> None:
        for name, value in tensors.items():
            if name not in self.params:
                allowed = ", ".join(self.params)
                raise StepError(f"{prefix}.{name}", f"unknown parameter; this session has: {allowed}")
            want = self.params[name].shape
            if value.shape != want:
                raise StepError(f"{prefix}.{name}", f"shape {list(value.shape)} does not match {list(want)}")

    def prepare(self, grads: Mapping[str, Array], loss: float | None = None) -> PreparedStep:
        """Validates and processes gradients (nonfinite policy, clipping) without changing the engine."""
        self.check_tensors(grads, "grads")
        if loss is not None and not math.isfinite(loss):
            # a NaN loss usually comes with the NaN gradients the `skip` policy is there to absorb
            if self.options["nonfinite"] == "skip":
                return PreparedStep({}, None, math.nan, skipped=True)
            raise StepError(
                "loss", f"must be a finite number, got {loss!r} (session option nonfinite='error')"
            )
        cast: dict[str, Array] = {}
        with np.errstate(over="ignore", invalid="ignore"):
            # a float64 beyond float32's range becomes inf: the nonfinite policy decides
            for name, g in grads.items():
                dtype = self.params[name].dtype
                cast[name] = g if g.dtype == dtype else g.astype(dtype)
            # the norm (before clipping) is also the finiteness check: finite squares sum to a finite
            # number or overflow to inf, which only a second look tells from NaN or Infinity
            grad_norm = clip.total_norm(list(cast.values()))
        if not math.isfinite(grad_norm):
            bad = next((n for n, g in cast.items() if not np.isfinite(g).all()), None)
            if bad is not None and self.options["nonfinite"] == "skip":
                return PreparedStep({}, loss, math.nan, skipped=True)
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
        return PreparedStep(dict(zip(names, values, strict=True)), loss, grad_norm, skipped=False)

    def advance(self, prepared: PreparedStep) -> tuple[Engine, StepOutcome]:
        """The engine after a prepared step, and the step's outcome; this engine is left as it was.

        Raises StepError, and changes nothing, for a step past MAX_STEP, a result that is not finite
        (unless `nonfinite` is 'allow'; 'skip' skips the step instead) and a scheduler advance that fails
        or yields a learning rate that is not a finite number >= 0.
        """
        if prepared.skipped:
            return self, StepOutcome(self.step_count, self.lr, True, prepared.grad_norm)
        step = self.step_count + 1
        if step > MAX_STEP:
            raise StepError("step", f"the session is at step {self.step_count}, the most a session may take")
        params, states = dict(self.params), dict(self.states)
        grads = prepared.grads
        nonfinite: list[str] = []
        # overflow to inf is not an error to warn of here: the results are checked, and `nonfinite` decides
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            for names, hp in zip(self.group_params, self.groups, strict=True):
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
                return self, StepOutcome(self.step_count, self.lr, True, prepared.grad_norm)
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
        return following, StepOutcome(step, following.lr, False, prepared.grad_norm)

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
            "groups": [to_json(g) for g in self.groups],
            "group_params": self.group_params,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "losses": self.losses,
        }
        return tensors, meta

    @classmethod
    def restore(cls, tensors: Mapping[str, Array], meta: Mapping[str, Any]) -> Engine:
        """Rebuilds an engine from `snapshot()` output; raises SpecError/StepError if it is inconsistent."""
        if meta.get("format") != SNAPSHOT_FORMAT:
            raise SpecError.one("checkpoint", f"unsupported snapshot format {meta.get('format')!r}")
        try:
            options = copy.deepcopy(dict(meta["options"]))
            opt = get_optimizer(options["optimizer"]["name"])
            tuples = _tuple_names(opt)
            groups = [{k: tuple(v) if k in tuples else v for k, v in g.items()} for g in meta["groups"]]
            params: dict[str, Array] = {}
            for name in meta["param_names"]:
                params[name] = np.array(tensors[f"params/{name}"], copy=True)
            states: dict[str, State] = {name: {} for name in params}
            for key, value in tensors.items():
                if key.startswith("state/"):
                    name, slot = key[len("state/") :].rsplit("/", 1)
                    states[name][slot] = np.array(value, copy=True)
            scheduler = None
            if options.get("scheduler") is not None:
                # building runs the constructor's initial step on the groups; the saved values then win
                scheduler = build_scheduler(options["scheduler"], groups)
                for group, saved in zip(groups, meta["groups"], strict=True):
                    group.clear()
                    group.update({k: tuple(v) if k in tuples else v for k, v in saved.items()})
                scheduler.load_state_dict(meta["scheduler"])
            engine = cls(
                options,
                params,
                states,
                groups,
                [list(ns) for ns in meta["group_params"]],
                scheduler,
                int(meta["step"]),
                [float(x) for x in meta["losses"]],
            )
            engine._verify_restored(tensors)
            return engine
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as exc:
            if isinstance(exc, SpecError):
                raise
            raise SpecError.one("checkpoint", f"inconsistent checkpoint: {exc!r}") from None

    def _verify_restored(self, tensors: Mapping[str, Array]) -> None:
        """A checkpoint is untrusted input: accept only what `snapshot` could have written, so that nothing
        the session does later fails on it. Spec values are validated (and canonicalized) as `create` does,
        every parameter's state must have exactly the slots, shapes and dtypes `init_state` gives it, no
        tensor may be left over, and the scheduler must be able to advance."""

        def bad(field: str, message: str) -> SpecError:
            return SpecError.one(f"checkpoint.{field}", message)

        opt = self.optimizer
        raw_opt = self.options["optimizer"]
        base = parse(opt.hparams, raw_opt, "checkpoint.optimizer")
        check = Check("checkpoint.optimizer")
        opt.check(base, check)
        check.done()
        self.options["optimizer"] = {"name": opt.name, **to_json(base)}
        session = parse(
            SESSION_OPTIONS, {p.name: self.options[p.name] for p in SESSION_OPTIONS}, "checkpoint"
        )
        if session["steps_per_epoch"] < 1 or any(
            session[k] is not None and session[k] <= 0 for k in ("clip_grad_norm", "clip_grad_value")
        ):
            raise bad("options", "steps_per_epoch must be >= 1 and clip_grad_norm/clip_grad_value > 0")
        self.options.update(session)
        if self.options.get("scheduler") is not None:
            self.options["scheduler"] = filled_spec(self.options["scheduler"], "checkpoint.scheduler")
        members = [name for names in self.group_params for name in names]
        if sorted(members) != sorted(self.params) or len(self.groups) != len(self.group_params):
            raise bad("group_params", "the groups must hold every parameter exactly once")
        expected = {f"params/{name}" for name in self.params}
        for i, (names, hp) in enumerate(zip(self.group_params, self.groups, strict=True)):
            declared = {p.name: hp[p.name] for p in opt.hparams if p.name in hp}
            typed = parse(opt.hparams, declared, f"checkpoint.groups[{i}]", defaults=base)
            check = Check(f"checkpoint.groups[{i}]")
            opt.check(typed, check)
            check.done()
            hp.update(typed)
            for name in names:
                param = self.params[name]
                why = opt.check_param(name, param.shape) if param.dtype in PARAM_DTYPES else "not float32/64"
                if why:
                    raise bad(f"params.{name}", why)
                want, have = opt.init_state(param, hp), self.states.get(name, {})
                if have.keys() != want.keys() or any(
                    have[k].shape != v.shape or have[k].dtype != v.dtype for k, v in want.items()
                ):
                    raise bad(f"state.{name}", f"is not {opt.name}'s state for this parameter")
                expected.update(f"state/{name}/{slot}" for slot in want)
        stray = sorted(set(tensors) - expected)
        if stray:
            raise bad("tensors", f"unexpected tensors: {', '.join(stray[:5])}")
        if not 0 <= self.step_count <= MAX_STEP or not all(math.isfinite(x) for x in self.losses):
            raise bad(
                "step", f"the step must be an integer from 0 to 2**53 ({MAX_STEP}) and the losses finite"
            )
        wrong_names = name_errors(list(self.params))
        if wrong_names:
            raise SpecError([FieldError(f"checkpoint.{e.field}", e.message) for e in wrong_names])
        if self.scheduler is not None:
            probe, groups = copy.deepcopy(self.scheduler), copy.deepcopy(self.groups)
            probe.bind(groups)
            with contextlib.suppress(ArithmeticError, ValueError):  # a schedule at its end: a 422 per step
                probe.step(0.0)
        orjson.dumps([self.describe(), self.snapshot()[1]])  # what the session will answer and store


def _advanced_schedule(
    scheduler: Scheduler, groups: list[dict[str, Any]], losses: list[float]
) -> tuple[list[dict[str, Any]], Scheduler]:
    """The groups and scheduler after one scheduler advance, computed on copies: the originals stay."""
    groups = [dict(g) for g in groups]
    scheduler = copy.deepcopy(scheduler)
    scheduler.bind(groups)
    metric = sum(losses) / len(losses) if scheduler.needs_metric else None
    try:
        scheduler.step(metric)
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
    base = parse(opt.hparams, optimizer or {"name": "sgd"}, "optimizer")
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
            sched.step(sum(epoch_losses) / len(epoch_losses) if sched.needs_metric else None)
            epoch_losses.clear()
    return out
