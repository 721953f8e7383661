"""The optimizer protocol: per-parameter state as named arrays, updated in place one group at a time.

An optimizer is stateless code. Its state lives in plain `dict[str, ndarray]` slots named after the
maths (`exp_avg`, `momentum_buffer`, `step`), so a session can be stored and checkpointed without pickle.
"""

from __future__ import annotations

import math
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

    def state_nbytes(self, shape: tuple[int, ...], dtype: np.dtype[Any], hp: HP) -> int:
        """The bytes `init_state` allocates for a parameter of this shape, known before allocating: from
        `init_state` on a one-element stand-in, every slot shaped like it scaled to the real size (an
        optimizer whose slots are shaped otherwise, as Adafactor's factors, overrides this)."""
        stand_in = np.zeros((1,) * len(shape), dtype=dtype)
        numel = math.prod(shape)
        return sum(
            v.nbytes * (numel if v.shape == stand_in.shape else 1)
            for v in self.init_state(stand_in, hp).values()
        )

    @abstractmethod
    def update(
        self, params: Sequence[Array], grads: Sequence[Array], states: Sequence[State], hp: HP
    ) -> None:
        """One step of one group, in place on `params` and `states`. `grads` are read-only.

        Only the parameters that received a gradient this step are passed, as torch skips `grad is None`.
        """

    def step_into(
        self, params: Sequence[Array], grads: Sequence[Array], states: Sequence[State], hp: HP
    ) -> tuple[list[Array], list[State], list[bool]]:
        """One step into fresh arrays, `params` and `states` left as they were, so that a step can still
        be refused after it was computed with nothing to undo: per parameter, `kernel_into` where it
        takes it, else `update` on copies. Also says, per parameter, whether all it wrote is finite."""
        new_params, new_states, finite = [], [], []
        for param, grad, state in zip(params, grads, states, strict=True):
            fresh = self.kernel_into(param, grad, state, hp)
            if fresh is None:
                new_param, new_state = param.copy(), {slot: v.copy() for slot, v in state.items()}
                self.update([new_param], [grad], [new_state], hp)
                fresh = new_param, new_state, all_finite(new_param, *new_state.values())
            new_params.append(fresh[0])
            new_states.append(fresh[1])
            finite.append(fresh[2])
        return new_params, new_states, finite

    def kernel_into(
        self, param: Array, grad: Array, state: State, hp: HP
    ) -> tuple[Array, State, bool] | None:
        """One parameter's step by a kernel that reads the old arrays and writes new ones (no copy
        first) and tells whether what it wrote is finite; None where there is no kernel for it."""
        return None


def all_finite(*arrays: Array) -> bool:
    """No NaN or Infinity in any of the float arrays."""
    # a sum is finite for finite values unless it overflows, which only the exact check tells apart
    with np.errstate(over="ignore", invalid="ignore"):
        return all(
            a.dtype.kind != "f" or bool(np.isfinite(a.sum())) or bool(np.isfinite(a).all()) for a in arrays
        )
