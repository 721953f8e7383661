"""A session's spec, validated where it enters: the parameters' names and dtypes, the optimizer and its
param groups, the session options and the scheduler, each within its limits, every problem reported at
once. Creating a session, restoring a checkpoint and previewing a schedule all validate through here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.optim.aggregate import REDUCTIONS
from app.optim.base import Array, Optimizer
from app.optim.hparams import Check, FieldError, HParam, SpecError, parse, to_json
from app.optim.limits import MAX_GROUPS, MAX_NAME_LENGTH, MAX_PARAMETERS
from app.optim.registry import get_optimizer
from app.optim.schedulers import Scheduler, build_scheduler, filled_spec

PARAM_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
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


@dataclass(frozen=True)
class SessionSpec:
    """A validated spec: the optimizer, its typed groups, the scheduler built on them, and the spec as JSON
    with every default filled in."""

    optimizer: Optimizer
    groups: list[dict[str, Any]]
    group_params: list[list[str]]
    scheduler: Scheduler | None
    options: dict[str, Any]
    nbytes: int
    """What the session's parameters and optimizer state will take, counted from their shapes."""


def checked(
    opt: Optimizer,
    raw: Mapping[str, Any],
    prefix: str,
    *,
    defaults: Mapping[str, Any] | None = None,
    ignore: tuple[str, ...] = ("name",),
) -> dict[str, Any]:
    """An optimizer's hyperparameters typed (defaults filled in), then torch's constructor checks; a
    SpecError names every bad field under `prefix`."""
    hp = parse(opt.hparams, raw, prefix, ignore=ignore, defaults=defaults)
    check = Check(prefix)
    opt.check(hp, check)
    check.done()
    return hp


# How several workers' steps on one session combine (the `aggregation` session option; absent: every step
# applies in arrival order).
# "async": a step says which step its gradient was computed at (`step`); it is applied if at most
# `max_staleness` steps were taken since, with the lr divided by 1 + staleness for that step alone under
# "inverse".
# "sync": each step is one worker's contribution to the round `step`; the round applies once all `workers`
# sent theirs, or `timeout` seconds after its first one if at least `min_workers` did (else nothing).
AGGREGATION_OPTIONS = {
    "async": (
        HParam("max_staleness", "int", None, "the most steps a gradient may lag the session", required=True),
        HParam(
            "staleness_lr",
            "str",
            "none",
            "'inverse' divides the lr of a step by 1 + its staleness (for that step only)",
            choices=("none", "inverse"),
        ),
    ),
    "sync": (
        HParam("workers", "int", None, "contributions that complete a round", required=True),
        HParam("reduce", "str", "mean", "how contributions combine", choices=REDUCTIONS),
        HParam("timeout", "float", 60.0, "seconds after a round's first contribution before it closes"),
        HParam(
            "min_workers",
            "int",
            None,
            "contributions a round needs at its timeout (default: workers)",
            nullable=True,
        ),
    ),
}
MAX_WORKERS = 1_000
MAX_ROUND_SECONDS = 3_600.0


def aggregation_option(raw: Any, prefix: str = "") -> dict[str, Any] | None:
    """The `aggregation` option, defaults filled in (None when absent); SpecError naming the field."""
    field = _under(prefix, "aggregation")
    if raw is None:
        return None
    if not isinstance(raw, Mapping) or raw.get("mode") not in AGGREGATION_OPTIONS:
        modes = ", ".join(repr(m) for m in AGGREGATION_OPTIONS)
        raise SpecError.one(field, f"expected an object with `mode` one of {modes}, got {raw!r}"[:300])
    mode = raw["mode"]
    values = parse(AGGREGATION_OPTIONS[mode], {k: v for k, v in raw.items() if k != "mode"}, field)
    errors = []
    if mode == "async" and values["max_staleness"] < 0:
        errors.append(FieldError(f"{field}.max_staleness", f"must be >= 0, got {values['max_staleness']}"))
    if mode == "sync":
        workers = values["workers"]
        if not 1 <= workers <= MAX_WORKERS:
            errors.append(FieldError(f"{field}.workers", f"must be 1 to {MAX_WORKERS}, got {workers}"))
        if values["min_workers"] is None:
            values["min_workers"] = workers
        if not 1 <= values["min_workers"] <= workers:
            errors.append(
                FieldError(
                    f"{field}.min_workers", f"must be 1 to workers ({workers}), got {values['min_workers']}"
                )
            )
        if not 0 < values["timeout"] <= MAX_ROUND_SECONDS:
            errors.append(
                FieldError(
                    f"{field}.timeout", f"must be > 0 and <= {MAX_ROUND_SECONDS}, got {values['timeout']}"
                )
            )
    if errors:
        raise SpecError(errors)
    return {"mode": mode, **values}


def session_options(raw: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`steps_per_epoch`, clipping, `nonfinite` and `aggregation`, typed and range-checked; fields named
    under `prefix`."""
    known = {p.name for p in SESSION_OPTIONS}
    try:
        values = parse(SESSION_OPTIONS, {k: v for k, v in raw.items() if k in known}, "session")
    except SpecError as exc:
        raise SpecError([FieldError(_under(prefix, e.field), e.message) for e in exc.errors]) from None
    values["aggregation"] = aggregation_option(raw.get("aggregation"), prefix)
    errors = []
    if values["steps_per_epoch"] < 1:
        errors.append(
            FieldError(
                _under(prefix, "session.steps_per_epoch"), f"must be >= 1, got {values['steps_per_epoch']}"
            )
        )
    for key in ("clip_grad_norm", "clip_grad_value"):
        if values[key] is not None and values[key] <= 0:
            errors.append(FieldError(_under(prefix, f"session.{key}"), f"must be > 0, got {values[key]}"))
    if errors:
        raise SpecError(errors)
    return values


def _under(prefix: str, field: str) -> str:
    name = field.removeprefix("session.")
    return f"{prefix}.{name}" if prefix else name


def validate(
    options: Mapping[str, Any], params: Mapping[str, Array], max_bytes: int | None = None
) -> SessionSpec:
    """The whole spec of a new session against its parameters; SpecError lists every problem at once.

    `max_bytes` bounds the parameters plus every optimizer state slot, as counted from the shapes before
    any slot is allocated (`OPTSERVE_MAX_SESSION_BYTES`)."""
    errors = name_errors(list(params))
    if not params:
        errors.append(FieldError("params", "at least one parameter is required"))
    if errors and len(params) > MAX_PARAMETERS:
        raise SpecError(errors)
    for name, value in params.items():
        if value.dtype not in PARAM_DTYPES:
            errors.append(FieldError(f"params.{name}", f"dtype {value.dtype} is not float32 or float64"))
        elif value.size == 0:  # torch steps it, but Adafactor's factors of a [0, n] matrix are n long
            errors.append(FieldError(f"params.{name}", f"shape {list(value.shape)} has no elements"))
        elif not np.isfinite(value).all():
            errors.append(FieldError(f"params.{name}", "contains NaN or Infinity"))
    raw_opt = options.get("optimizer")
    if not isinstance(raw_opt, Mapping):
        raise SpecError([*errors, FieldError("optimizer", "required: an object with a `name`")])
    opt = get_optimizer(raw_opt.get("name"))
    session: dict[str, Any] = {}
    try:
        base = checked(opt, raw_opt, "optimizer")
    except SpecError as exc:
        raise SpecError([*errors, *exc.errors]) from None
    try:
        session = session_options(options)
    except SpecError as exc:
        errors.extend(exc.errors)
    groups, group_params = parse_groups(opt, base, options.get("param_groups"), list(params), errors)
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
    shapes = {n: (p.shape, p.dtype) for n, p in params.items()}
    nbytes = session_nbytes(opt, groups, group_params, shapes)
    if max_bytes is not None and nbytes > max_bytes:
        raise SpecError.one(
            "params",
            f"the parameters and {opt.name}'s state would take {nbytes} bytes, past "
            f"OPTSERVE_MAX_SESSION_BYTES={max_bytes}",
        )
    return SessionSpec(opt, groups, group_params, scheduler, normalized, nbytes)


def session_nbytes(
    opt: Optimizer,
    groups: list[dict[str, Any]],
    group_params: list[list[str]],
    shapes: Mapping[str, tuple[tuple[int, ...], np.dtype[Any]]],
) -> int:
    """Parameters plus optimizer state, in bytes, from the shapes alone."""
    total = 0
    for names, hp in zip(group_params, groups, strict=True):
        for name in names:
            shape, dtype = shapes[name]
            total += int(np.prod(shape, dtype=np.int64)) * dtype.itemsize + opt.state_nbytes(shape, dtype, hp)
    return total


def parse_groups(
    opt: Optimizer,
    base: dict[str, Any],
    raw: Any,
    names: list[str],
    errors: list[FieldError],
) -> tuple[list[dict[str, Any]], list[list[str]]]:
    """The typed groups and their members; problems go to `errors`."""
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
                errors.append(FieldError(f"{prefix}.params", f"{name!r} is already in group {seen[name]}"))
            else:
                seen[name] = i
        try:
            hp = checked(opt, g, prefix, ignore=("params",), defaults=base)
        except SpecError as exc:
            errors.extend(exc.errors)
            continue
        groups.append(hp)
        group_params.append([str(n) for n in members])
    missing = [n for n in names if n not in seen]
    if missing:
        errors.append(FieldError("param_groups", f"parameters in no group: {', '.join(missing)}"))
    return groups, group_params
