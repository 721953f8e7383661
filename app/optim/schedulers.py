"""Learning-rate schedulers that replay torch.optim.lr_scheduler's float arithmetic operation by operation
on plain param-group dicts, mutating them as torch mutates `optimizer.param_groups`."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from bisect import bisect_right
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import pairwise
from typing import Any, ClassVar, NamedTuple

from app.optim.hparams import Check, FieldError, HParam, SpecError, parse, to_json

Groups = list[dict[str, Any]]
HP = Mapping[str, Any]


class PerGroup(HParam):
    """A float that torch also takes as a list holding one value per param group."""

    def type_name(self) -> str:
        return "number | array[number]"


def _parse(declared: Sequence[HParam], raw: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """`parse`, letting a `PerGroup` argument be an array whose items are coerced one by one."""
    errors: list[FieldError] = []
    arrays: dict[str, list[float]] = {}
    for p in declared:
        values = raw.get(p.name)
        if not (isinstance(p, PerGroup) and isinstance(values, (list, tuple))):
            continue
        arrays[p.name] = []
        for i, value in enumerate(values):
            item = replace(p, name=f"{p.name}[{i}]")
            try:
                arrays[p.name].append(parse([item], {item.name: value}, prefix)[item.name])
            except SpecError as exc:
                errors.extend(exc.errors)
    hp: dict[str, Any] = {}
    try:
        # an already coerced array stands in as the "default" for its removed raw entry
        hp = parse(declared, {k: v for k, v in raw.items() if k not in arrays}, prefix, defaults=arrays)
    except SpecError as exc:
        errors.extend(exc.errors)
    if errors:
        raise SpecError(errors)
    return hp


def _per_group(value: float | list[float], groups: Groups) -> list[float]:
    """torch's `_format_param`: one value per group (lengths were checked by `_check_per_group`)."""
    return list(value) if isinstance(value, list) else [value] * len(groups)


def _check_per_group(check: Check, hp: HP, name: str, groups: Groups) -> None:
    value = hp[name]
    if isinstance(value, list):
        check.require(
            len(value) == len(groups),
            name,
            f"{name} must have the same length as optimizer.param_groups. "
            f"{name} has {len(value)} values, param_groups has {len(groups)}.",
        )


def _cosine(base_lr: float, eta_min: float, t: float, period: float) -> float:
    return eta_min + (base_lr - eta_min) * (1 + math.cos(math.pi * t / period)) / 2


CYCLE_MOMENTUM = HParam(
    "cycle_momentum", "bool", True, "cycle momentum (or Adam's beta1) inversely to the learning rate"
)


def _check_momentum(check: Check, hp: HP, groups: Groups) -> None:
    # torch reads and formats the momentum bounds only when it cycles momentum
    if hp["cycle_momentum"]:
        check.require(
            all("momentum" in g or "betas" in g for g in groups),
            "cycle_momentum",
            "optimizer must support momentum or beta1 with `cycle_momentum` option enabled",
        )
        _check_per_group(check, hp, "base_momentum", groups)
        _check_per_group(check, hp, "max_momentum", groups)


def _set_momentum(group: dict[str, Any], momentum: float, use_beta1: bool) -> None:
    if use_beta1:
        group["betas"] = (momentum, *group["betas"][1:])
    else:
        group["momentum"] = momentum


def _install_momentum(hp: HP, groups: Groups) -> tuple[bool, list[float], list[float]]:
    """CyclicLR's and OneCycleLR's constructor: momentum starts at its max; both bounds join each group.

    Returns whether beta1 is cycled (torch prefers `betas` when an optimizer has both) and the bounds.
    """
    use_beta1 = all("betas" in g for g in groups)
    base_momentums = _per_group(hp["base_momentum"], groups)
    max_momentums = _per_group(hp["max_momentum"], groups)
    for max_momentum, base_momentum, group in zip(max_momentums, base_momentums, groups, strict=True):
        _set_momentum(group, max_momentum, use_beta1)
        group["max_momentum"] = max_momentum
        group["base_momentum"] = base_momentum
    return use_beta1, base_momentums, max_momentums


class Scheduler(ABC):
    """One torch scheduler bound to a list of param-group dicts, which `step` mutates in place."""

    name: ClassVar[str]
    description: ClassVar[str]
    hparams: ClassVar[tuple[HParam, ...]]
    needs_metric: ClassVar[bool] = False
    # the entries of torch's state_dict that change while the schedule runs (the rest comes from the spec)
    _state_keys: ClassVar[tuple[str, ...]] = ("last_epoch", "_last_lr")

    last_epoch: int

    def __init__(self, hp: HP, groups: Groups) -> None:
        self.groups = groups
        self._last_lr: list[float] = []
        self._is_initial = False

    @classmethod  # noqa: B027 - most schedulers check something
    def check(cls, hp: HP, groups: Groups, check: Check) -> None:
        """torch's constructor checks with torch's messages, plus a few for values torch would divide by."""

    @abstractmethod
    def step(self, metric: float | None = None) -> None:
        """One advance, as torch's `sched.step()`; `metric` is read only when `needs_metric`."""

    def bind(self, groups: Groups) -> None:
        """Points the scheduler at other group dicts (the restored ones, after building on a scratch copy)."""
        self.groups = groups

    def state_dict(self) -> dict[str, Any]:
        return {key: _copied(getattr(self, key)) for key in self._state_keys}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        missing = [key for key in self._state_keys if key not in state]
        if missing:
            raise ValueError(f"{self.name} state lacks {', '.join(missing)}")
        for key in self._state_keys:
            setattr(self, key, _copied(state[key]))

    def _current_lrs(self) -> list[float]:
        return [group["lr"] for group in self.groups]

    def _initial_step(self) -> None:
        """torch's `_initial_step`, which SequentialLR also calls again on its first scheduler."""
        self._is_initial = True
        try:
            self.step()
        finally:
            self._is_initial = False

    def _undo_initial_step(self) -> None:
        """torch's SequentialLR.recursive_undo on one scheduler."""
        self.last_epoch -= 1


def _copied(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


class LRScheduler(Scheduler):
    """torch's LRScheduler: records each group's `initial_lr` and takes the initial step."""

    _state_keys: ClassVar[tuple[str, ...]] = ("last_epoch", "base_lrs", "_last_lr")

    def __init__(self, hp: HP, groups: Groups) -> None:
        super().__init__(hp, groups)
        for group in groups:
            group.setdefault("initial_lr", group["lr"])
        self.base_lrs: list[float] = [group["initial_lr"] for group in groups]
        self.last_epoch = -1
        self._initial_step()

    @abstractmethod
    def get_lr(self) -> list[float]:
        """The next lrs at `last_epoch`; chainable ones scale the groups' current lrs."""

    def step(self, metric: float | None = None) -> None:
        self.last_epoch += 1
        self._set_lrs(self.get_lr())

    def _restart(self) -> None:
        """torch's `_update_lr(0)`, which SequentialLR calls on a scheduler at its milestone."""
        self.last_epoch = 0
        self._set_lrs(self._closed_form_lr())

    def _closed_form_lr(self) -> list[float]:
        """torch's `_get_closed_form_lr`; without one torch falls back on `get_lr`, as here."""
        return self.get_lr()

    def _set_lrs(self, lrs: list[float]) -> None:
        for group, lr in zip(self.groups, lrs, strict=True):
            group["lr"] = lr
        self._last_lr = self._current_lrs()

    def _scaled_lrs(self, factor: float) -> list[float]:
        return [group["lr"] * factor for group in self.groups]

    def _scaled_base_lrs(self, factor: float) -> list[float]:
        return [base_lr * factor for base_lr in self.base_lrs]


def _positive(check: Check, hp: HP, name: str) -> None:
    check.require(hp[name] > 0, name, f"Expected positive integer {name}, but got {hp[name]}")


GAMMA = HParam("gamma", "float", 0.1, "multiplicative factor of learning rate decay")


class StepLR(LRScheduler):
    name = "step_lr"
    description = "Decays the lr by gamma every step_size steps (torch.optim.lr_scheduler.StepLR)."
    hparams = (HParam("step_size", "int", None, "period of learning rate decay", required=True), GAMMA)

    def __init__(self, hp: HP, groups: Groups) -> None:
        self.step_size: int = hp["step_size"]
        self.gamma: float = hp["gamma"]
        super().__init__(hp, groups)

    @classmethod
    def check(cls, hp: HP, groups: Groups, check: Check) -> None:
        _positive(check, hp, "step_size")

    def get_lr(self) -> list[float]:
        if self.last_epoch == 0 or self.last_epoch % self.step_size != 0:
            return self._current_lrs()
        return self._scaled_lrs(self.gamma)

    def _closed_form_lr(self) -> list[float]:
        return self._scaled_base_lrs(self.gamma ** (self.last_epoch // self.step_size))


class MultiStepLR(LRScheduler):
    name = "multi_step_lr"
    description = "Decays the lr by gamma at each milestone (torch.optim.lr_scheduler.MultiStepLR)."
    hparams = (HParam("milestones", "int_list", None, "steps at which to decay", required=True), GAMMA)

    def __init__(self, hp: HP, groups: Groups) -> None:
        self.milestones: Counter[int] = Counter(hp["milestones"])
        self.gamma: float = hp["gamma"]
        super().__init__(hp, groups)

    def get_lr(self) -> list[float]:
        if self.last_epoch not in self.milestones:
            return self._current_lrs()
        return self._scaled_lrs(self.gamma ** self.milestones[self.last_epoch])

    def _closed_form_lr(self) -> list[float]:
        milestones = sorted(self.milestones.elements())
        return self._scaled_base_lrs(self.gamma ** bisect_right(milestones, self.last_epoch))


TOTAL_ITERS = HParam("total_iters", "int", 5, "number of steps the factor applies / changes over")


class ConstantLR(LRScheduler):
    name = "constant_lr"
    description = (
        "Multiplies the lr by a constant factor until total_iters (torch.optim.lr_scheduler.ConstantLR)."
    )
    hparams = (HParam("factor", "float", 1.0 / 3, "the factor applied until total_iters"), TOTAL_ITERS)

    def __init__(self, hp: HP, groups: Groups) -> None:
        self.factor: float = hp["factor"]
        self.total_iters: int = hp["total_iters"]
        super().__init__(hp, groups)

    @classmethod
    def check(cls, hp: HP, groups: Groups, check: Check) -> None:
        check.require(
            0 <= hp["factor"] <= 1.0,
            "factor",
            "Constant multiplicative factor expected to be between 0 and 1.",
        )
        check.require(
            hp["factor"] != 0 or hp["total_iters"] <= 0,
            "factor",
            "factor 0 makes torch divide by zero at step total_iters",
        )

    def get_lr(self) -> list[float]:
        if self.last_epoch == 0:
            return self._scaled_lrs(self.factor)
        if self.last_epoch != self.total_iters:
            return self._current_lrs()
        return self._scaled_lrs(1.0 / self.factor)

    def _closed_form_lr(self) -> list[float]:
        return self._scaled_base_lrs(self.factor + (self.last_epoch >= self.total_iters) * (1 - self.factor))


class LinearLR(LRScheduler):
    name = "linear_lr"
    description = (
        "Moves the lr factor linearly from start_factor to end_factor over total_iters "
        "(torch.optim.lr_scheduler.LinearLR)."
    )
    hparams = (
        HParam("start_factor", "float", 1.0 / 3, "factor at the first step"),
        HParam("end_factor", "float", 1.0, "factor from total_iters on"),
        TOTAL_ITERS,
    )

    def __init__(self, hp: HP, groups: Groups) -> None:
        self.start_factor: float = hp["start_factor"]
        self.end_factor: float = hp["end_factor"]
        self.total_iters: int = hp["total_iters"]
        super().__init__(hp, groups)

    @classmethod
    def check(cls, hp: HP, groups: Groups, check: Check) -> None:
        check.require(
            0 < hp["start_factor"] <= 1.0,
            "start_factor",
            "Starting multiplicative factor expected to be greater than 0 and less or equal to 1.",
        )
        check.require(
            0 <= hp["end_factor"] <= 1.0,
            "end_factor",
            "Ending multiplicative factor expected to be between 0 and 1.",
        )

    def get_lr(self) -> list[float]:
        if self.last_epoch == 0:
            return self._scaled_lrs(self.start_factor)
        if self._is_initial or self.last_epoch > self.total_iters:
            return self._current_lrs()
        return self._scaled_lrs(
            1.0
            + (self.end_factor - self.start_factor)
            / (
                self.total_iters * self.start_factor
                + (self.last_epoch - 1) * (self.end_factor - self.start_factor)
            )
        )

    def _closed_form_lr(self) -> list[float]:
        return self._scaled_base_lrs(
            self.start_factor
            + (self.end_factor - self.start_factor)
            * min(self.total_iters, self.last_epoch)
            / self.total_iters
        )


class ExponentialLR(LRScheduler):
    name = "exponential_lr"
    description = "Multiplies the lr by gamma every step (torch.optim.lr_scheduler.ExponentialLR)."
    hparams = (HParam("gamma", "float", None, "multiplicative factor of learning rate decay", required=True),)

    def __init__(self, hp: HP, groups: Groups) -> None:
        self.gamma: float = hp["gamma"]
        super().__init__(hp, groups)

    def get_lr(self) -> list[float]:
        if self._is_initial:
            return self._current_lrs()
        return self._scaled_lrs(self.gamma)

    def _closed_form_lr(self) -> list[float]:
        return self._scaled_base_lrs(self.gamma**self.last_epoch)


class PolynomialLR(LRScheduler):
    name = "polynomial_lr"
    description = (
        "Decays the lr to zero over total_iters along (1 - t/total_iters)^power "
        "(torch.optim.lr_scheduler.PolynomialLR)."
    )
    hparams = (TOTAL_ITERS, HParam("power", "float", 1.0, "power of the polynomial"))

    def __init__(self, hp: HP, groups: Groups) -> None:
        self.total_iters: int = hp["total_iters"]
        self.power: float = hp["power"]
        super().__init__(hp, groups)

    def get_lr(self) -> list[float]:
        if self._is_initial or self.last_epoch > self.total_iters:
            return self._current_lrs()
        return self._scaled_lrs(
            ((1.0 - self.last_epoch / self.total_iters) / (1.0 - (self.last_epoch - 1) / self.total_iters))
            ** self.power
        )

    def _closed_form_lr(self) -> list[float]:
        return self._scaled_base_lrs(
            (1.0 - min(self.total_iters, self.last_epoch) / self.total_iters) ** self.power
        )


ETA_MIN = HParam("eta_min", "float", 0.0, "minimum learning rate")


class CosineAnnealingLR(LRScheduler):
    name = "cosine_annealing_lr"
    description = (
        "Cosine annealing from the initial lr to eta_min over T_max steps, computed recursively "
        "(torch.optim.lr_scheduler.CosineAnnealingLR)."
    )
    hparams = (HParam("T_max", "int", None, "maximum number of iterations", required=True), ETA_MIN)

    def __init__(self, hp: HP, groups: Groups) -> None:
        self.T_max: int = hp["T_max"]
        self.eta_min: float = hp["eta_min"]
        super().__init__(hp, groups)

    @classmethod
    def check(cls, hp: HP, groups: Groups, check: Check) -> None:
        _positive(check, hp, "T_max")

    def get_lr(self) -> list[float]:
        # torch's branch for `_step_count == 1 and last_epoch > 0` is left out: `_step_count` is 1 only
        # during the initial step, which the first branch takes.
        if self._is_initial:
            return self._current_lrs()
        if (self.last_epoch - 1 - self.T_max) % (2 * self.T_max) == 0:
            return [
                group["lr"] + (base_lr - self.eta_min) * (1 - math.cos(math.pi / self.T_max)) / 2
                for base_lr, group in zip(self.base_lrs, self.groups, strict=True)
            ]
        ratio = (1 + math.cos(math.pi * self.last_epoch / self.T_max)) / (
            1 + math.cos(math.pi * (self.last_epoch - 1) / self.T_max)
        )
        return [ratio * (group["lr"] - self.eta_min) + self.eta_min for group in self.groups]

    def _closed_form_lr(self) -> list[float]:
        return [_cosine(base_lr, self.eta_min, self.last_epoch, self.T_max) for base_lr in self.base_lrs]


class CosineAnnealingWarmRestarts(LRScheduler):
    name = "cosine_annealing_warm_restarts"
    description = (
        "Cosine annealing restarted every T_i steps, T_i growing by T_mult "
        "(torch.optim.lr_scheduler.CosineAnnealingWarmRestarts)."
    )
    hparams = (
        HParam("T_0", "int", None, "number of iterations until the first restart", required=True),
        HParam("T_mult", "int", 1, "factor by which T_i grows after a restart"),
        ETA_MIN,
    )
    _state_keys = (*LRScheduler._state_keys, "T_cur", "T_i")

    def __init__(self, hp: HP, groups: Groups) -> None:
        self.T_0: int = hp["T_0"]
        self.T_i = self.T_0
        self.T_mult: int = hp["T_mult"]
        self.eta_min: float = hp["eta_min"]
        self.T_cur = -1
        super().__init__(hp, groups)

    @classmethod
    def check(cls, hp: HP, groups: Groups, check: Check) -> None:
        _positive(check, hp, "T_0")
        check.require(hp["T_mult"] >= 1, "T_mult", f"Expected integer T_mult >= 1, but got {hp['T_mult']}")

    def get_lr(self) -> list[float]:
        return [_cosine(base_lr, self.eta_min, self.T_cur, self.T_i) for base_lr in self.base_lrs]

    def step(self, metric: float | None = None) -> None:
        if self.last_epoch < 0:
            # torch steps to epoch 0 through its explicit-epoch branch, which (0 < T_0) resets T_i and T_cur
            self.T_i = self.T_0
            self.T_cur = 0
            self.last_epoch = 0
        else:
            self.last_epoch += 1
            self.T_cur = self.T_cur + 1
            if self.T_cur >= self.T_i:
                self.T_cur = self.T_cur % self.T_i
                self.T_i = self.T_i * self.T_mult
        self._set_lrs(self.get_lr())


class CyclicLR(LRScheduler):
    name = "cyclic_lr"
    description = (
        "Cycles the lr between base_lr and max_lr (triangular, triangular2, exp_range), momentum inversely "
        "(torch.optim.lr_scheduler.CyclicLR)."
    )
    hparams = (
        PerGroup("base_lr", "float", None, "lower lr boundary of the cycle", required=True),
        PerGroup("max_lr", "float", None, "upper lr boundary of the cycle", required=True),
        HParam("step_size_up", "int", 2000, "steps in the increasing half of a cycle"),
        HParam(
            "step_size_down", "int", None, "steps in the decreasing half (null: step_size_up)", nullable=True
        ),
        HParam(
            "mode",
            "str",
            "triangular",
            "amplitude scaling policy",
            choices=("triangular", "triangular2", "exp_range"),
        ),
        HParam("gamma", "float", 1.0, "exp_range scales the amplitude by gamma^iteration"),
        CYCLE_MOMENTUM,
        PerGroup("base_momentum", "float", 0.8, "lower momentum boundary (reached at max_lr)"),
        PerGroup("max_momentum", "float", 0.9, "upper momentum boundary (reached at base_lr)"),
    )

    def __init__(self, hp: HP, groups: Groups) -> None:
        base_lrs = _per_group(hp["base_lr"], groups)
        for lr, group in zip(base_lrs, groups, strict=True):
            group["lr"] = lr
        self.max_lrs = _per_group(hp["max_lr"], groups)
        step_size_up = float(hp["step_size_up"])
        step_size_down = float(hp["step_size_down"]) if hp["step_size_down"] is not None else step_size_up
        self.total_size = step_size_up + step_size_down
        self.step_ratio = step_size_up / self.total_size
        self.mode: str = hp["mode"]
        self.gamma: float = hp["gamma"]
        self.cycle_momentum: bool = hp["cycle_momentum"]
        if self.cycle_momentum:
            self.use_beta1, self.base_momentums, self.max_momentums = _install_momentum(hp, groups)
        super().__init__(hp, groups)
        # torch's initial step used base_lrs read from `initial_lr`, which an earlier scheduler may have set
        self.base_lrs = base_lrs

    @classmethod
    def check(cls, hp: HP, groups: Groups, check: Check) -> None:
        _check_per_group(check, hp, "base_lr", groups)
        _check_per_group(check, hp, "max_lr", groups)
        _positive(check, hp, "step_size_up")
        down = hp["step_size_down"]
        check.require(
            down is None or down >= 0,
            "step_size_down",
            f"Expected non-negative step_size_down, but got {down}",
        )
        _check_momentum(check, hp, groups)

    def _scale(self, cycle: int) -> float:
        """The mode's scale_fn at the argument its scale_mode picks: the cycle, or exp_range's iteration."""
        if self.mode == "triangular":
            return 1.0
        if self.mode == "triangular2":
            return 1 / (2.0 ** (cycle - 1))
        return self.gamma**self.last_epoch

    def get_lr(self) -> list[float]:
        cycle = math.floor(1 + self.last_epoch / self.total_size)
        x = 1.0 + self.last_epoch / self.total_size - cycle
        scale_factor = x / self.step_ratio if x <= self.step_ratio else (x - 1) / (self.step_ratio - 1)
        scale = self._scale(cycle)
        lrs = [
            base_lr + (max_lr - base_lr) * scale_factor * scale
            for base_lr, max_lr in zip(self.base_lrs, self.max_lrs, strict=True)
        ]
        if self.cycle_momentum:
            for group, base_momentum, max_momentum in zip(
                self.groups, self.base_momentums, self.max_momentums, strict=True
            ):
                momentum = max_momentum - (max_momentum - base_momentum) * scale_factor * scale
                _set_momentum(group, momentum, self.use_beta1)
        return lrs


class _Phase(NamedTuple):
    """One phase of OneCycleLR: where it ends and the group keys it anneals between."""

    end_step: float
    start_lr: str
    end_lr: str
    start_momentum: str
    end_momentum: str


def _one_cycle_phases(pct_start: float, total_steps: int, three_phase: bool) -> list[_Phase]:
    warmup = _Phase(
        float(pct_start * total_steps) - 1, "initial_lr", "max_lr", "max_momentum", "base_momentum"
    )
    if three_phase:
        return [
            warmup,
            _Phase(
                float(2 * pct_start * total_steps) - 2,
                "max_lr",
                "initial_lr",
                "base_momentum",
                "max_momentum",
            ),
            _Phase(total_steps - 1, "initial_lr", "min_lr", "max_momentum", "max_momentum"),
        ]
    return [warmup, _Phase(total_steps - 1, "max_lr", "min_lr", "base_momentum", "max_momentum")]


def _one_cycle_total_steps(hp: HP) -> int:
    total_steps: int | None = hp["total_steps"]
    return total_steps if total_steps is not None else hp["epochs"] * hp["steps_per_epoch"]


class OneCycleLR(LRScheduler):
    name = "one_cycle_lr"
    description = (
        "The 1cycle policy: warm up to max_lr, then anneal far below the initial lr, momentum inversely "
        "(torch.optim.lr_scheduler.OneCycleLR)."
    )
    hparams = (
        PerGroup("max_lr", "float", None, "upper lr boundary of the cycle", required=True),
        HParam(
            "total_steps", "int", None, "steps in the cycle (null: epochs * steps_per_epoch)", nullable=True
        ),
        HParam(
            "epochs", "int", None, "epochs, used with steps_per_epoch when total_steps is null", nullable=True
        ),
        HParam("steps_per_epoch", "int", None, "steps per epoch, used with epochs", nullable=True),
        HParam("pct_start", "float", 0.3, "fraction of the cycle spent increasing the lr"),
        HParam("anneal_strategy", "str", "cos", "annealing shape", choices=("cos", "linear")),
        CYCLE_MOMENTUM,
        PerGroup("base_momentum", "float", 0.85, "lower momentum boundary (reached at max_lr)"),
        PerGroup("max_momentum", "float", 0.95, "upper momentum boundary (reached at the initial lr)"),
        HParam("div_factor", "float", 25.0, "initial_lr = max_lr / div_factor"),
        HParam("final_div_factor", "float", 1e4, "min_lr = initial_lr / final_div_factor"),
        HParam(
            "three_phase", "bool", False, "anneal back to initial_lr before annihilating, as in the paper"
        ),
    )

    def __init__(self, hp: HP, groups: Groups) -> None:
        self.total_steps = _one_cycle_total_steps(hp)
        self._phases = _one_cycle_phases(hp["pct_start"], self.total_steps, hp["three_phase"])
        self.anneal_strategy: str = hp["anneal_strategy"]
        for max_lr, group in zip(_per_group(hp["max_lr"], groups), groups, strict=True):
            group["initial_lr"] = max_lr / hp["div_factor"]
            group["max_lr"] = max_lr
            group["min_lr"] = group["initial_lr"] / hp["final_div_factor"]
        self.cycle_momentum: bool = hp["cycle_momentum"]
        if self.cycle_momentum:
            self.use_beta1 = _install_momentum(hp, groups)[0]
        super().__init__(hp, groups)

    @classmethod
    def check(cls, hp: HP, groups: Groups, check: Check) -> None:
        total_steps, epochs, steps_per_epoch = hp["total_steps"], hp["epochs"], hp["steps_per_epoch"]
        if total_steps is not None:
            check.require(
                total_steps > 0,
                "total_steps",
                f"Expected positive integer total_steps, but got {total_steps}",
            )
        elif epochs is not None and steps_per_epoch is not None:
            _positive(check, hp, "epochs")
            _positive(check, hp, "steps_per_epoch")
        else:
            check.require(
                False, "total_steps", "You must define either total_steps OR (epochs AND steps_per_epoch)"
            )
        pct_start = hp["pct_start"]
        check.require(
            0 <= pct_start <= 1, "pct_start", f"Expected float between 0 and 1 pct_start, but got {pct_start}"
        )
        if not check.errors:
            total = _one_cycle_total_steps(hp)
            ends = [phase.end_step for phase in _one_cycle_phases(pct_start, total, hp["three_phase"])]
            check.require(
                all(end != start for start, end in zip([0.0, *ends], ends, strict=False)),
                "pct_start",
                f"pct_start {pct_start} with {total} total steps gives a phase of no steps, "
                "over which torch divides by zero",
            )
        for name in ("div_factor", "final_div_factor"):
            check.require(hp[name] != 0, name, f"{name} 0 makes torch divide by zero")
        _check_per_group(check, hp, "max_lr", groups)
        _check_momentum(check, hp, groups)

    def _anneal(self, start: float, end: float, pct: float) -> float:
        if self.anneal_strategy == "cos":
            cos_out = math.cos(math.pi * pct) + 1
            return end + (start - end) / 2.0 * cos_out
        return (end - start) * pct + start

    def get_lr(self) -> list[float]:
        step_num = self.last_epoch
        if step_num > self.total_steps:
            raise ValueError(
                f"Tried to step {step_num} times. The specified number of total steps is {self.total_steps}"
            )
        start_step = 0.0
        for i, phase in enumerate(self._phases):
            if step_num <= phase.end_step or i == len(self._phases) - 1:
                break
            start_step = phase.end_step
        pct = (step_num - start_step) / (phase.end_step - start_step)
        lrs = []
        for group in self.groups:
            lrs.append(self._anneal(group[phase.start_lr], group[phase.end_lr], pct))
            if self.cycle_momentum:
                momentum = self._anneal(group[phase.start_momentum], group[phase.end_momentum], pct)
                _set_momentum(group, momentum, self.use_beta1)
        return lrs


class _FactorLR(LRScheduler):
    """A LambdaLR with a built-in lambda: base_lr * factor(last_epoch)."""

    @abstractmethod
    def factor(self, epoch: int) -> float: ...

    def get_lr(self) -> list[float]:
        return self._scaled_base_lrs(self.factor(self.last_epoch))


class InverseTimeLR(_FactorLR):
    name = "inverse_time_lr"
    description = "lr = base_lr / (1 + decay_rate * t / decay_steps), t / decay_steps floored when staircase."
    hparams = (
        HParam("decay_rate", "float", None, "how fast the lr decays", required=True),
        HParam("decay_steps", "int", None, "steps per unit of decay", required=True),
        HParam("staircase", "bool", False, "decay in whole units of decay_steps"),
    )

    def __init__(self, hp: HP, groups: Groups) -> None:
        self.decay_rate: float = hp["decay_rate"]
        self.decay_steps: int = hp["decay_steps"]
        self.staircase: bool = hp["staircase"]
        super().__init__(hp, groups)

    @classmethod
    def check(cls, hp: HP, groups: Groups, check: Check) -> None:
        check.require(
            hp["decay_rate"] >= 0,
            "decay_rate",
            f"Expected non-negative decay_rate, but got {hp['decay_rate']}",
        )
        _positive(check, hp, "decay_steps")

    def factor(self, epoch: int) -> float:
        progress = epoch // self.decay_steps if self.staircase else epoch / self.decay_steps
        return 1.0 / (1.0 + self.decay_rate * progress)


class PiecewiseConstantLR(_FactorLR):
    name = "piecewise_constant_lr"
    description = "lr = base_lr * factors[i], i = how many boundaries are <= t."
    hparams = (
        HParam(
            "boundaries",
            "int_list",
            None,
            "strictly increasing steps where the factor changes",
            required=True,
        ),
        HParam("factors", "float_list", None, "one factor more than boundaries", required=True),
    )

    def __init__(self, hp: HP, groups: Groups) -> None:
        self.boundaries: list[int] = hp["boundaries"]
        self.factors: list[float] = hp["factors"]
        super().__init__(hp, groups)

    @classmethod
    def check(cls, hp: HP, groups: Groups, check: Check) -> None:
        boundaries, factors = hp["boundaries"], hp["factors"]
        check.require(
            all(a < b for a, b in pairwise(boundaries)),
            "boundaries",
            f"boundaries must be strictly increasing, got {boundaries}",
        )
        check.require(
            len(factors) == len(boundaries) + 1,
            "factors",
            f"expected {len(boundaries) + 1} factors (one more than boundaries), got {len(factors)}",
        )

    def factor(self, epoch: int) -> float:
        return self.factors[bisect_right(self.boundaries, epoch)]


def _class_of(spec: Mapping[str, Any]) -> type[Scheduler] | None:
    name = spec.get("name")
    return SCHEDULERS.get(name) if isinstance(name, str) else None


class _Composite(Scheduler):
    """SequentialLR and ChainedScheduler: `hp["schedulers"]` holds the already built inner schedulers."""

    _torch_name: ClassVar[str]
    _empty_message: ClassVar[str]

    def __init__(self, hp: HP, groups: Groups) -> None:
        super().__init__(hp, groups)
        self._schedulers: list[Scheduler] = list(hp["schedulers"])

    @classmethod
    def check(cls, hp: HP, groups: Groups, check: Check) -> None:
        check.require(bool(hp["schedulers"]), "schedulers", cls._empty_message)
        for i, spec in enumerate(hp["schedulers"]):
            inner = _class_of(spec)
            check.require(
                inner is None or not inner.needs_metric,
                f"schedulers[{i}]",
                f"{cls._torch_name} does not support `ReduceLROnPlateau` scheduler as it requires "
                "additional kwargs to be specified when calling `step`, but got one at index "
                f"{i} in the given schedulers sequence.",
            )

    def bind(self, groups: Groups) -> None:
        super().bind(groups)
        for scheduler in self._schedulers:
            scheduler.bind(groups)

    def _undo_initial_step(self) -> None:
        for scheduler in self._schedulers:
            scheduler._undo_initial_step()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "_schedulers": [s.state_dict() for s in self._schedulers]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        inner = state.get("_schedulers")
        if not isinstance(inner, list) or len(inner) != len(self._schedulers):
            raise ValueError(f"{self.name} state needs {len(self._schedulers)} _schedulers states")
        super().load_state_dict(state)
        for scheduler, scheduler_state in zip(self._schedulers, inner, strict=True):
            scheduler.load_state_dict(scheduler_state)


SCHEDULER_SPECS = HParam("schedulers", "spec_list", None, "the inner schedulers' specs", required=True)


class SequentialLR(_Composite):
    name = "sequential_lr"
    description = (
        "Hands over from one scheduler to the next at each milestone (torch.optim.lr_scheduler.SequentialLR)."
    )
    hparams = (
        SCHEDULER_SPECS,
        HParam("milestones", "int_list", None, "steps at which the next scheduler takes over", required=True),
    )
    _torch_name = "SequentialLR"
    _empty_message = "SequentialLR expects at least one scheduler, but got no scheduler."

    def __init__(self, hp: HP, groups: Groups) -> None:
        super().__init__(hp, groups)
        self._milestones: list[int] = hp["milestones"]
        self.last_epoch = 0
        for group in groups:
            group["lr"] = group["initial_lr"]
        self._undo_initial_step()
        first = self._schedulers[bisect_right(self._milestones, 0)]
        first._initial_step()
        self._last_lr = first._last_lr

    @classmethod
    def check(cls, hp: HP, groups: Groups, check: Check) -> None:
        super().check(hp, groups, check)
        specs, milestones = hp["schedulers"], hp["milestones"]
        check.require(
            not specs or len(milestones) == len(specs) - 1,
            "milestones",
            "Sequential Schedulers expects number of schedulers provided to be one more than the number of "
            f"milestone points, but got number of schedulers {len(specs)} and the number of milestones to be "
            f"equal to {len(milestones)}",
        )
        for i, spec in enumerate(specs[1:], 1):
            inner = _class_of(spec)
            check.require(
                inner is None or not issubclass(inner, _Composite),
                f"schedulers[{i}]",
                "only the first scheduler may be a sequential_lr or chained_scheduler: "
                "torch fails to restart one at its milestone",
            )

    def step(self, metric: float | None = None) -> None:
        self.last_epoch += 1
        idx = bisect_right(self._milestones, self.last_epoch)
        scheduler = self._schedulers[idx]
        if idx > 0 and self._milestones[idx - 1] == self.last_epoch:
            assert isinstance(scheduler, LRScheduler), "check() admits composites only first"
            scheduler._restart()
        else:
            scheduler.step()
        self._last_lr = scheduler._last_lr


class ChainedScheduler(_Composite):
    name = "chained_scheduler"
    description = (
        "Steps every inner scheduler in turn on each step (torch.optim.lr_scheduler.ChainedScheduler)."
    )
    hparams = (SCHEDULER_SPECS,)
    _state_keys = ("_last_lr",)
    _torch_name = "ChainedScheduler"
    _empty_message = "ChainedScheduler expects at least one scheduler to be chained, but got no scheduler."

    def __init__(self, hp: HP, groups: Groups) -> None:
        super().__init__(hp, groups)
        self._last_lr = self._current_lrs()

    def step(self, metric: float | None = None) -> None:
        for scheduler in self._schedulers:
            scheduler.step()
        self._last_lr = self._current_lrs()


class ReduceLROnPlateau(Scheduler):
    name = "reduce_lr_on_plateau"
    description = (
        "Multiplies the lr by factor once a metric stops improving for patience steps "
        "(torch.optim.lr_scheduler.ReduceLROnPlateau)."
    )
    hparams = (
        HParam(
            "mode", "str", "min", "whether the metric should decrease or increase", choices=("min", "max")
        ),
        HParam("factor", "float", 0.1, "new_lr = lr * factor"),
        HParam("patience", "int", 10, "steps without improvement tolerated before reducing"),
        HParam("threshold", "float", 1e-4, "minimal change that counts as an improvement"),
        HParam(
            "threshold_mode", "str", "rel", "threshold relative to best, or absolute", choices=("rel", "abs")
        ),
        HParam("cooldown", "int", 0, "steps to wait after a reduction before counting bad steps again"),
        PerGroup("min_lr", "float", 0.0, "lower bound on the lr"),
        HParam("eps", "float", 1e-8, "reductions smaller than eps are skipped"),
    )
    needs_metric = True
    _state_keys = ("last_epoch", "_last_lr", "best", "num_bad_epochs", "cooldown_counter")

    def __init__(self, hp: HP, groups: Groups) -> None:
        super().__init__(hp, groups)
        self.factor: float = hp["factor"]
        self.min_lrs = _per_group(hp["min_lr"], groups)
        self.patience: int = hp["patience"]
        self.cooldown: int = hp["cooldown"]
        self.eps: float = hp["eps"]
        self.last_epoch = 0
        self._last_lr = self._current_lrs()
        self.mode: str = hp["mode"]
        self.threshold: float = hp["threshold"]
        self.threshold_mode: str = hp["threshold_mode"]
        self.best = math.inf if self.mode == "min" else -math.inf
        self.cooldown_counter = 0
        self.num_bad_epochs = 0

    @classmethod
    def check(cls, hp: HP, groups: Groups, check: Check) -> None:
        check.require(hp["factor"] < 1.0, "factor", "Factor should be < 1.0.")
        min_lr = hp["min_lr"]
        if isinstance(min_lr, list):
            check.require(
                len(min_lr) == len(groups), "min_lr", f"expected {len(groups)} min_lrs, got {len(min_lr)}"
            )

    def step(self, metric: float | None = None) -> None:
        if metric is None:
            raise ValueError(f"{self.name} steps on a metric")
        current = float(metric)
        self.last_epoch += 1
        if self._is_better(current):
            self.best = current
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0  # torch ignores bad epochs in cooldown
        if self.num_bad_epochs > self.patience:
            self._reduce_lr()
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0
        self._last_lr = self._current_lrs()

    def _reduce_lr(self) -> None:
        for group, min_lr in zip(self.groups, self.min_lrs, strict=True):
            old_lr = float(group["lr"])
            new_lr = max(old_lr * self.factor, min_lr)
            if old_lr - new_lr > self.eps:
                group["lr"] = new_lr

    def _is_better(self, current: float) -> bool:
        if self.mode == "min" and self.threshold_mode == "rel":
            return current < self.best * (1.0 - self.threshold)
        if self.mode == "min":
            return current < self.best - self.threshold
        if self.threshold_mode == "rel":
            return current > self.best * (self.threshold + 1.0)
        return current > self.best + self.threshold

    def state_dict(self) -> dict[str, Any]:
        # best starts at +-inf, which strict JSON cannot hold; float() reads the string back
        best = self.best if math.isfinite(self.best) else str(self.best)
        return {**super().state_dict(), "best": best}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.best = float(state["best"])


SCHEDULERS: dict[str, type[Scheduler]] = {
    cls.name: cls
    for cls in (
        StepLR,
        MultiStepLR,
        ConstantLR,
        LinearLR,
        ExponentialLR,
        PolynomialLR,
        CosineAnnealingLR,
        CosineAnnealingWarmRestarts,
        CyclicLR,
        OneCycleLR,
        SequentialLR,
        ChainedScheduler,
        ReduceLROnPlateau,
        InverseTimeLR,
        PiecewiseConstantLR,
    )
}


@dataclass(frozen=True)
class _Plan:
    """A fully validated spec tree: nothing touches the groups until every nested spec has passed."""

    cls: type[Scheduler]
    hp: dict[str, Any]
    inner: tuple[_Plan, ...]

    def build(self, groups: Groups) -> Scheduler:
        if not self.inner:
            return self.cls(self.hp, groups)
        # as in torch, the inner schedulers are constructed (each taking its initial step) before the outer
        return self.cls({**self.hp, "schedulers": [plan.build(groups) for plan in self.inner]}, groups)


def _lookup(spec: Mapping[str, Any], prefix: str) -> type[Scheduler]:
    cls = _class_of(spec)
    if cls is None:
        raise SpecError.one(
            f"{prefix}.name",
            f"unknown scheduler {spec.get('name')!r}; allowed: {', '.join(sorted(SCHEDULERS))}",
        )
    return cls


MAX_DEPTH = 8
"""How deep schedulers may nest (sequential_lr in chained_scheduler in ...): deeper is refused up front."""


def _plan(spec: Mapping[str, Any], groups: Groups, prefix: str, depth: int = 1) -> _Plan:
    if depth > MAX_DEPTH:
        raise SpecError.one(prefix, f"schedulers nest at most {MAX_DEPTH} deep")
    cls = _lookup(spec, prefix)
    hp = _parse(cls.hparams, spec, prefix)
    check = Check(prefix)
    cls.check(hp, groups, check)
    check.done()
    inner = tuple(
        _plan(s, groups, f"{prefix}.schedulers[{i}]", depth + 1)
        for i, s in enumerate(hp.get("schedulers", ()))
    )
    return _Plan(cls, hp, inner)


def build_scheduler(spec: Mapping[str, Any], groups: Groups, prefix: str = "scheduler") -> Scheduler:
    """Validates `spec` (SpecError naming the field) and constructs it on `groups` with torch's side effects.

    Restoring must keep the constructor's side effects off the saved group values, as torch does by
    creating the scheduler before `optimizer.load_state_dict`: either build on a scratch copy, then
    `load_state_dict` and `bind` the restored groups; or build on the groups, then overwrite their
    contents in place with the saved values and `load_state_dict`.
    """
    return _plan(spec, groups, prefix).build(groups)


def filled_spec(spec: Mapping[str, Any], prefix: str = "scheduler", depth: int = 1) -> dict[str, Any]:
    """`spec` as JSON data with every default filled in, nested specs too (types checked, ranges not)."""
    if depth > MAX_DEPTH:
        raise SpecError.one(prefix, f"schedulers nest at most {MAX_DEPTH} deep")
    cls = _lookup(spec, prefix)
    hp = to_json(_parse(cls.hparams, spec, prefix))
    if "schedulers" in hp:
        hp["schedulers"] = [
            filled_spec(s, f"{prefix}.schedulers[{i}]", depth + 1) for i, s in enumerate(hp["schedulers"])
        ]
    return {"name": cls.name, **hp}


def advance_epoch(scheduler: Scheduler, losses: list[float]) -> None:
    """The advance at the end of an epoch, as the torch loop's `sched.step()`; reduce_lr_on_plateau steps
    on the mean of the epoch's losses."""
    scheduler.step(sum(losses) / len(losses) if scheduler.needs_metric else None)


def scheduler_catalogue() -> list[dict[str, Any]]:
    return [
        {
            "name": cls.name,
            "description": cls.description,
            "needs_metric": cls.needs_metric,
            "hyperparameters": [p.catalogue() for p in cls.hparams],
        }
        for cls in SCHEDULERS.values()
    ]
