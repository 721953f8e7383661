"""The optimizer protocol: per-parameter state as named arrays, updated in place one group at a time.

An optimizer is stateless code. Its state lives in plain `dict[str, ndarray]` slots named after the
maths (`exp_avg`, `momentum_buffer`, `step`), so a session can be stored and checkpointed without pickle.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from app.optim.hparams import Check, HParam

Array = npt.NDArray[Any]
State = dict[str, Array]
HP = Mapping[str, Any]

LR = HParam("lr", "float", 1e-3, "learning rate")
MAXIMIZE = HParam("maximize", "bool", False, "maximize the objective instead of minimizing")


def weight_decay(default: float = 0.0) -> HParam:
    return HParam("weight_decay", "float", default, "weight decay (L2 penalty)")


def new_step() -> Array:
    """The per-parameter step counter, a 0-d float array as torch keeps it; bumped before each use."""
    return np.zeros((), dtype=np.float64)


class Optimizer(ABC):
    """One family member of torch.optim, named as torch names it, with torch's defaults and checks."""

    name: ClassVar[str]
    description: ClassVar[str]
    hparams: ClassVar[tuple[HParam, ...]]

    def check(self, hp: HP, check: Check) -> None:  # noqa: B027 - most optimizers check something
        """torch's constructor checks, with torch's messages; called once per group spec."""

    def check_param(self, name: str, shape: tuple[int, ...]) -> str | None:
        """Why a parameter of this shape cannot be optimized (Muon: 2-D only), or None."""
        return None

    @abstractmethod
    def init_state(self, param: Array, hp: HP) -> State:
        """Preallocated state slots for one parameter, as torch's lazy init would fill them."""

    @abstractmethod
    def update(
        self, params: Sequence[Array], grads: Sequence[Array], states: Sequence[State], hp: HP
    ) -> None:
        """One step of one group, in place on `params` and `states`. `grads` are read-only.

        Only the parameters that received a gradient this step are passed, as torch skips `grad is None`.
        """
