"""Sessions as named arrays plus JSON and back (no pickle): `restore` reads what `Engine.snapshot` writes.

A checkpoint is untrusted input: `restore` accepts only what `snapshot` could have written, validated as a
new session's spec is, so that nothing the restored session does later can fail on it.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson

from app.optim.base import Array, Optimizer, State
from app.optim.engine import MAX_STEP, SNAPSHOT_FORMAT, Engine
from app.optim.hparams import FieldError, SpecError, to_json
from app.optim.registry import get_optimizer
from app.optim.schedulers import build_scheduler, filled_spec
from app.optim.spec import PARAM_DTYPES, checked, name_errors, session_options


def _tuple_names(opt: Optimizer) -> set[str]:
    return {p.name for p in opt.hparams if p.kind == "tuple"}


def restore(tensors: Mapping[str, Array], meta: Mapping[str, Any]) -> Engine:
    """Rebuilds an engine from `Engine.snapshot()` output; SpecError naming what is inconsistent."""
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
        engine = Engine(
            options,
            params,
            states,
            groups,
            [list(ns) for ns in meta["group_params"]],
            scheduler,
            int(meta["step"]),
            [float(x) for x in meta["losses"]],
        )
        _verify(engine, tensors)
        return engine
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as exc:
        if isinstance(exc, SpecError):
            raise
        raise SpecError.one("checkpoint", f"inconsistent checkpoint: {exc!r}") from None


def _verify(self: Engine, tensors: Mapping[str, Array]) -> None:
    """A checkpoint is untrusted input: accept only what `snapshot` could have written, so that nothing
    the session does later fails on it. Spec values are validated (and canonicalized) as `create` does,
    every parameter's state must have exactly the slots, shapes and dtypes `init_state` gives it, no
    tensor may be left over, and the scheduler must be able to advance."""

    def bad(field: str, message: str) -> SpecError:
        return SpecError.one(f"checkpoint.{field}", message)

    opt = self.optimizer
    base = checked(opt, self.options["optimizer"], "checkpoint.optimizer")
    self.options["optimizer"] = {"name": opt.name, **to_json(base)}
    self.options.update(session_options(self.options, "checkpoint"))
    if self.options.get("scheduler") is not None:
        self.options["scheduler"] = filled_spec(self.options["scheduler"], "checkpoint.scheduler")
    members = [name for names in self.group_params for name in names]
    if sorted(members) != sorted(self.params) or len(self.groups) != len(self.group_params):
        raise bad("group_params", "the groups must hold every parameter exactly once")
    expected = {f"params/{name}" for name in self.params}
    for i, (names, hp) in enumerate(zip(self.group_params, self.groups, strict=True)):
        declared = {p.name: hp[p.name] for p in opt.hparams if p.name in hp}
        hp.update(checked(opt, declared, f"checkpoint.groups[{i}]", defaults=base))
        for name in names:
            param = self.params[name]
            why = opt.check_param(name, param.shape) if param.dtype in PARAM_DTYPES else "not float32/64"
            why = why or ("has no elements" if param.size == 0 else None)
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
        raise bad("step", f"the step must be an integer from 0 to 2**53 ({MAX_STEP}) and the losses finite")
    wrong_names = name_errors(list(self.params))
    if wrong_names:
        raise SpecError([FieldError(f"checkpoint.{e.field}", e.message) for e in wrong_names])
    if self.scheduler is not None:
        probe, groups = copy.deepcopy(self.scheduler), copy.deepcopy(self.groups)
        probe.bind(groups)
        with contextlib.suppress(ArithmeticError, ValueError):  # a schedule at its end: a 422 per step
            probe.step(0.0)
    orjson.dumps([self.describe(), self.snapshot()[1]])  # what the session will answer and store
