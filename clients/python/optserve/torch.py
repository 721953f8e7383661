"""`RemoteOptimizer`: a `torch.optim.Optimizer` whose steps (and learning-rate schedule) run in an optserve
session. Needs PyTorch (`pip install 'optserve[torch]'`); `import optserve` alone does not import it."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any, overload

from optserve._client import Client, Session
from optserve._wire import Array
from optserve._worker import Worker
from optserve.models import SessionInfo, StepResult

try:
    import torch
    from torch.optim.optimizer import ParamsT
except ImportError as exc:  # pragma: no cover - exercised only where torch is absent
    raise ImportError("optserve.torch needs PyTorch: pip install 'optserve[torch]'") from exc

_LR_SCHEDULER_MODULE = "torch.optim.lr_scheduler"
_NOT_HYPERPARAMETERS = ("params", "param_names")
_DTYPES = (torch.float32, torch.float64)
_REFUSAL = (
    "RemoteOptimizer's learning-rate schedule lives on the server session, so a local "
    "torch.optim.lr_scheduler (or any other local change of a group's hyperparameters) would be ignored "
    "there. Give the schedule to the session instead, e.g. RemoteOptimizer(..., scheduler={'name': "
    "'exponential_lr', 'gamma': 0.9}) for ExponentialLR(optimizer, gamma=0.9); every step() then sets "
    "param_groups[i]['lr'] from the server's answer."
)


class _ServerGroup(dict[str, Any]):
    """A param group whose hyperparameters only the server's answers change: writing one, or the
    `initial_lr` every torch scheduler sets first, is refused."""

    _guarded: frozenset[str] = frozenset()

    def _check(self, key: str) -> None:
        if key in self._guarded:
            raise TypeError(f"param group key {key!r} cannot be set locally: {_REFUSAL}")

    def __setitem__(self, key: str, value: Any) -> None:
        self._check(key)
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        self._check(key)
        super().__delitem__(key)

    def setdefault(self, key: str, default: Any = None) -> Any:
        self._check(key)
        return super().setdefault(key, default)

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key in dict(*args, **kwargs):
            self._check(key)
        super().update(*args, **kwargs)

    def __ior__(self, other: Any) -> _ServerGroup:  # type: ignore[override,misc]
        self.update(other)
        return self

    def pop(self, key: str, *default: Any) -> Any:
        self._check(key)
        return super().pop(key, *default)


def _server_group(group: dict[str, Any]) -> _ServerGroup:
    guarded = _ServerGroup(group)
    guarded._guarded = frozenset(k for k in group if k not in _NOT_HYPERPARAMETERS) | {"initial_lr"}
    return guarded


def _hyperparameters(group: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k not in _NOT_HYPERPARAMETERS}


class RemoteOptimizer(torch.optim.Optimizer):
    """A `torch.optim.Optimizer` backed by an optserve session.

    `params` is what torch optimizers take: `model.parameters()`, `model.named_parameters()` (the names travel
    on the wire) or a list of param-group dicts, whose hyperparameter overrides become the session's
    `param_groups`; tensors without names are called `p0`, `p1`, ... in group order. Parameters must be
    float32 or float64.

    Give `optimizer` (`{"name": "adam", "lr": 1e-3, ...}`), and optionally `scheduler` and the other session
    options, to create a session from the tensors' current values; or give `session` to continue an existing
    one (its parameters are then copied into the tensors). `step()` sends every `.grad` that is not None
    (a parameter without one is left alone, as torch does), writes the answered parameters in place and sets
    each group's `lr` for the next step. The schedule runs on the server: a local `torch.optim.lr_scheduler`
    is refused. `state_dict()` carries a checkpoint of the session; `load_state_dict()` restores it into a new
    session, which this optimizer then uses. The optimizer never deletes a session: `opt.session.delete()`.

    `worker="w3"` makes this optimizer one of several data-parallel workers on one session (created with
    `aggregation`): each step is sent with the step of the parameters it was computed from, as worker `w3`'s
    contribution in synchronous rounds; a gradient the session refuses as too late is dropped, and the
    optimizer copies the session's current parameters into the model instead (`opt.worker.dropped` counts).
    """

    def __init__(
        self,
        params: ParamsT,
        *,
        client: Client,
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        session: Session | None = None,
        steps_per_epoch: int | None = None,
        clip_grad_norm: float | None = None,
        clip_grad_value: float | None = None,
        nonfinite: str | None = None,
        metadata: Mapping[str, str] | None = None,
        worker: str | None = None,
    ) -> None:
        options: dict[str, Any] = {
            "scheduler": scheduler,
            "steps_per_epoch": steps_per_epoch,
            "clip_grad_norm": clip_grad_norm,
            "clip_grad_value": clip_grad_value,
            "nonfinite": nonfinite,
            "metadata": metadata,
        }
        if (optimizer is None) == (session is None):
            raise TypeError("give optimizer={...} to create a session, or session= to continue one; not both")
        if session is not None and any(v is not None for v in options.values()):
            raise TypeError("session= continues a session as it is: drop scheduler= and the session options")
        self._bound = False
        groups = _param_groups(params)
        overrides = [_hyperparameters(g) for g in groups]
        super().__init__(groups, {k: v for k, v in (optimizer or {}).items() if k != "name"})
        self._names = [self._group_names(i, group) for i, group in enumerate(self.param_groups)]
        self.client = client
        self.last_result: StepResult | None = None
        if session is None:
            assert optimizer is not None
            session = client.create_session(
                {name: _numpy(t, name) for name, t in self._named()},
                optimizer,
                param_groups=self._session_groups(overrides),
                **options,
            )
            self._bind(session, copy_params=False)
        else:
            self._bind(session, copy_params=True)
        self.param_groups = [_server_group(g) for g in self.param_groups]
        self.worker = None if worker is None else Worker(self._session, worker)
        self._bound = True

    # A torch scheduler reads `param_groups` in its constructor, before it changes anything: refusing there
    # stops every one of them at once with a clear message, ReduceLROnPlateau included (which otherwise would
    # only write a group's lr epochs later, on its first plateau).
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        if sys._getframe(1).f_globals.get("__name__") == _LR_SCHEDULER_MODULE:
            raise TypeError(_REFUSAL)
        return self._groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        self._groups = groups

    @property
    def session(self) -> Session:
        return self._session

    def _group_names(self, index: int, group: Mapping[str, Any]) -> list[str]:
        if "param_names" in group:
            return [str(n) for n in group["param_names"]]
        start = sum(len(g["params"]) for g in self._groups[:index])
        return [f"p{start + i}" for i in range(len(group["params"]))]

    def _named(self) -> Iterable[tuple[str, torch.Tensor]]:
        for names, group in zip(self._names, self._groups, strict=True):
            yield from zip(names, group["params"], strict=True)

    def _session_groups(self, overrides: list[dict[str, Any]]) -> list[Mapping[str, Any]] | None:
        """The session's `param_groups`, or None when one group without overrides says it all."""
        if len(overrides) == 1 and not overrides[0]:
            return None
        return [{"params": names, **o} for names, o in zip(self._names, overrides, strict=True)]

    def _bind(self, session: Session, *, copy_params: bool) -> None:
        """Uses `session` from now on, once its groups, names and shapes are this optimizer's."""
        info = session.info
        server_names = [list(g["params"]) for g in info.param_groups]
        if server_names != self._names:
            raise ValueError(
                f"session {session.id} groups its parameters as {server_names}, this optimizer as "
                f"{self._names}; build the optimizer with the same (named) parameters and groups"
            )
        for name, tensor in self._named():
            _check_matches(info, name, tensor)
        if copy_params:
            values = session.params()
            with torch.no_grad():
                for name, tensor in self._named():
                    tensor.copy_(torch.from_numpy(values[name]))
        for group, server_group, lr in zip(self._groups, info.param_groups, info.lr, strict=True):
            dict.update(group, _hyperparameters(server_group))
            dict.__setitem__(group, "lr", lr)
        self._session = session

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self._bound:
            raise TypeError(
                "a RemoteOptimizer's parameters are fixed by its server session; "
                "to optimize more, create a new RemoteOptimizer over all of them"
            )
        super().add_param_group(param_group)

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One step on the server; `closure`'s loss (re-evaluated with grad enabled) goes along with it."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = {}
        for name, tensor in self._named():
            if tensor.grad is not None:
                if tensor.grad.is_sparse:
                    raise RuntimeError(f"parameter {name!r} has a sparse gradient; optserve takes dense ones")
                grads[name] = tensor.grad.detach().cpu().numpy()
        # float() of a tensor that requires grad warns; the value is all the server needs
        value = loss.detach() if isinstance(loss, torch.Tensor) else loss
        reported = None if value is None else float(value)
        if self.worker is None:
            result = self._session.step(grads, loss=reported)
        else:
            taken = self.worker.step(grads, loss=reported)
            if taken is None:  # too late: dropped; catch up with the session's parameters
                assert self.worker.params is not None
                self._copy(self.worker.params, self.worker.params)
                self.last_result = None
                return loss
            result = taken
        self._copy(result.params, grads)
        for group, lr in zip(self._groups, result.lr, strict=True):
            dict.__setitem__(group, "lr", lr)
        self.last_result = result
        return loss

    def _copy(self, values: Mapping[str, Any], names: Mapping[str, Any]) -> None:
        with torch.no_grad():
            for name, tensor in self._named():
                if name in names:
                    tensor.copy_(torch.from_numpy(values[name]))

    def push_params(self) -> None:
        """Send the tensors' current values to the session (after changing them in place outside `step()`);
        the optimizer state and step count are kept."""
        self._session.set_params({name: _numpy(t, name) for name, t in self._named()})

    def state_dict(self) -> dict[str, Any]:
        """`{"optserve_checkpoint": bytes, "param_names": [[names of group 0], ...]}`: torch.save-able."""
        return {"optserve_checkpoint": self._session.checkpoint(), "param_names": self._names}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the checkpoint into a new session that continues exactly, copies its parameters into the
        tensors, and uses it from now on. The previous session is left on the server."""
        blob = state_dict.get("optserve_checkpoint")
        if not isinstance(blob, bytes):
            raise ValueError(
                "not a RemoteOptimizer state dict (no 'optserve_checkpoint' bytes); "
                "a torch.optim state dict cannot be loaded into a server session"
            )
        session = self.client.restore(blob)
        try:
            self._bind(session, copy_params=True)
        except BaseException:
            session.delete()
            raise


def _param_groups(params: Iterable[Any]) -> list[dict[str, Any]]:
    """Copies of the param groups (torch fills defaults into the dicts it gets), in torch's own shape."""
    items = list(params)
    if not items:
        raise ValueError("RemoteOptimizer got an empty parameter list")
    if not isinstance(items[0], dict):
        return [{"params": items}]
    return [
        {**g, "params": [g["params"]] if isinstance(g["params"], torch.Tensor) else list(g["params"])}
        for g in items
    ]


def _numpy(tensor: torch.Tensor, name: str) -> Array:
    if tensor.dtype not in _DTYPES:
        raise TypeError(f"parameter {name!r} is {tensor.dtype}; optserve sessions hold float32 or float64")
    return tensor.detach().cpu().numpy()


def _check_matches(info: SessionInfo, name: str, tensor: torch.Tensor) -> None:
    held = info.params.get(name)
    if held is None:
        raise ValueError(f"session {info.id} has no parameter {name!r}; it has {', '.join(info.params)}")
    shape, dtype = tuple(tensor.shape), str(tensor.dtype).removeprefix("torch.")
    if held.shape != shape or held.dtype != dtype:
        raise ValueError(
            f"parameter {name!r} is {dtype}{list(shape)} here "
            f"but {held.dtype}{list(held.shape)} in session {info.id}"
        )
