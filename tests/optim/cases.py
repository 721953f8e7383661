"""One table per optimizer drives every test the optimizers share (in the spirit of optax's alias_test).

A test module fills a `Table` for its optimizer and collects `contract(table)` as its `Test...` class: the
table's rows say which specs are compared with torch and how, which constructor arguments torch rejects
and with what message, what our parser rejects before any check, and so on; the contract turns every
row into a test. What only one optimizer has stays a plain test in its module.
"""

from __future__ import annotations

import inspect
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch

from app.optim import fused
from app.optim.hparams import SpecError, parse
from app.optim.registry import get_optimizer
from tests.optim.oracle import (
    DEFAULT_SHAPES,
    assert_matches_torch,
    assert_one_step_matches_torch,
    gradient,
    initial_params,
    run_ours,
    torch_kwargs,
)

Spec = dict[str, Any]
# (arguments, field, message): the field without its "optimizer." or "param_groups[i]." prefix
Rejection = tuple[Spec, str, str]

DTYPES = [np.float64, np.float32]
# 37x29 gives torch's kernels enough elements for their vectorized loop body as well as the scalar tail
WIDE_SHAPES = {**DEFAULT_SHAPES, "big": (37, 29)}
# torch's implementation switches: constructor arguments that are not hyperparameters
TORCH_SWITCHES = {"self", "params", "foreach", "fused", "capturable", "differentiable"}


def spec_id(spec: Spec) -> str:
    return ",".join(f"{k}={v}" for k, v in spec.items() if k != "name") or "defaults"


def first_ids(rows: Sequence[tuple[Any, ...]]) -> list[str]:
    """Ids of table rows whose first item is a spec."""
    return [spec_id(row[0]) for row in rows]


def dtype_id(dtype: Any) -> str:
    return np.dtype(dtype).name


def grid(**options: Sequence[Any]) -> list[Spec]:
    """Every combination of the options' values, the last option varying fastest."""
    return [dict(zip(options, values, strict=True)) for values in itertools.product(*options.values())]


@dataclass(frozen=True)
class Table:
    """One optimizer's rows. Specs leave out the optimizer's name, which the contract adds."""

    name: str
    torch_cls: type[torch.optim.Optimizer]
    # compared with torch at every one of 200 steps, in both dtypes
    cases: Sequence[Spec]
    # the same with every third gradient of each parameter missing (torch skips `grad is None`)
    skipped: Sequence[Spec]
    # (spec, param groups overriding it), compared with torch in float64
    groups: Sequence[tuple[Spec, list[Spec]]]
    # what torch's constructor rejects: our spec check reports exactly its message, at the field
    rejects: Sequence[Rejection]
    # what our parser rejects before any check (a wrong type, an argument the optimizer lacks): part of
    # our message
    malformed: Sequence[Rejection]
    # an override that makes the first param group fail the checks: reported at `param_groups[0].<field>`
    group_check: Rejection
    # options for the read-only gradient run, which runs minimizing and maximizing
    read_only: Spec = field(default_factory=dict)
    # also compared with torch with a 37x29 parameter, in both dtypes
    wide: Sequence[Spec] = ()
    # options under which our state slots are torch's (names and shapes), less `own_slots`
    state_options: Sequence[Spec] = ({},)
    own_slots: frozenset[str] = frozenset()
    # a state slot torch fills at the parameter's first step from the lr of that moment
    first_step_slot: str | None = None
    # the optimizer has fused kernels: its oracle tests also run the numpy reference (OPTSERVE_FUSED=0)
    fused: bool = False


def contract(table: Table) -> type:
    """The tests every optimizer shares, over `table`'s rows; a module collects it as `TestName = ...`."""
    name, torch_cls = table.name, table.torch_cls

    def spec(options: Spec) -> Spec:
        return {"name": name, **options}

    def rejected(options: Spec, groups: list[Spec] | None = None) -> list[tuple[str, str]]:
        with pytest.raises(SpecError) as info:
            run_ours(spec(options), initial_params({"w": (2,)}, np.float64), 1, groups=groups)
        return [(e.field, e.message) for e in info.value.errors]

    class Contract:
        @pytest.fixture(params=["dispatch", "reference"] if table.fused else None)
        def path(self, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
            """`dispatch`: what `update` picks (the fused kernels where usable); `reference`: the numpy
            definition alone, as `OPTSERVE_FUSED=0` makes it. Only optimizers with kernels have both."""
            path: str = getattr(request, "param", "dispatch")
            if path == "reference":
                monkeypatch.setattr(fused, "ENABLED", False)
            return path

        @pytest.mark.usefixtures("path")
        @pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
        @pytest.mark.parametrize("options", table.cases, ids=spec_id)
        def test_matches_torch_for_200_steps(self, options: Spec, dtype: type) -> None:
            assert_matches_torch(spec(options), torch_cls, dtype=dtype)

        @pytest.mark.usefixtures("path")
        @pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
        @pytest.mark.parametrize("options", table.cases, ids=spec_id)
        def test_one_step_from_a_shared_state_matches_torch(self, options: Spec, dtype: type) -> None:
            """Nothing to amplify: what a trajectory test loosens for, this one holds to a few ulps."""
            assert_one_step_matches_torch(spec(options), torch_cls, dtype=dtype, shapes=WIDE_SHAPES)

        if table.wide:

            @pytest.mark.usefixtures("path")
            @pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
            @pytest.mark.parametrize("options", table.wide, ids=spec_id)
            def test_matches_torch_with_a_37x29_parameter(self, options: Spec, dtype: type) -> None:
                assert_matches_torch(spec(options), torch_cls, dtype=dtype, shapes=WIDE_SHAPES)

        @pytest.mark.usefixtures("path")
        @pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
        @pytest.mark.parametrize("options", table.skipped, ids=spec_id)
        def test_skipped_gradients_keep_per_parameter_steps(self, options: Spec, dtype: type) -> None:
            assert_matches_torch(spec(options), torch_cls, dtype=dtype, skip_every=3)

        @pytest.mark.usefixtures("path")
        @pytest.mark.parametrize(("options", "groups"), table.groups, ids=first_ids(table.groups))
        def test_param_groups_override_hyperparameters(self, options: Spec, groups: list[Spec]) -> None:
            assert_matches_torch(spec(options), torch_cls, groups=groups)

        @pytest.mark.parametrize(("options", "field", "message"), table.rejects, ids=first_ids(table.rejects))
        def test_rejects_what_torch_rejects_with_its_message(
            self, options: Spec, field: str, message: str
        ) -> None:
            with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
                torch_cls([torch.zeros(1, requires_grad=True)], **torch_kwargs(options))
            assert rejected(options) == [(f"optimizer.{field}", message)]

        @pytest.mark.parametrize(
            ("options", "field", "message"), table.malformed, ids=first_ids(table.malformed)
        )
        def test_rejects_malformed_spec_naming_the_field(
            self, options: Spec, field: str, message: str
        ) -> None:
            errors = rejected(options)
            assert errors[0][0] == f"optimizer.{field}"
            assert message in errors[0][1]

        def test_group_check_names_the_group(self) -> None:
            override, field, message = table.group_check
            groups = [{"params": ["w"], **override}]
            assert rejected({}, groups) == [(f"param_groups[0].{field}", message)]

        @pytest.mark.usefixtures("path")
        @pytest.mark.parametrize("maximize", [False, True], ids=["minimize", "maximize"])
        def test_update_never_writes_to_read_only_gradients(self, maximize: bool) -> None:
            """A 2-D and a 0-d parameter: grads untouched, params moved, float32 all along."""
            optimizer = get_optimizer(name)
            hp = parse(optimizer.hparams, {**table.read_only, "maximize": maximize}, "optimizer")
            params = initial_params({"w": (5, 4), "s": ()}, np.float32)
            before = {k: v.copy() for k, v in params.items()}
            grads = [
                np.linspace(-1.0, 1.0, p.size, dtype=np.float32).reshape(p.shape) for p in params.values()
            ]
            expected = [g.copy() for g in grads]
            for grad in grads:
                grad.flags.writeable = False
            states = [optimizer.init_state(p, hp) for p in params.values()]
            for _ in range(3):
                optimizer.update(list(params.values()), grads, states, hp)
            for grad, value in zip(grads, expected, strict=True):
                np.testing.assert_array_equal(grad, value)
            for k, param in params.items():
                assert param.dtype == np.float32
                assert param.shape == before[k].shape
                assert not np.array_equal(param, before[k]), k
            slots = [v for v in states[0].values() if v.shape == params["w"].shape]
            assert slots
            assert all(v.dtype == np.float32 for v in slots)

        @pytest.mark.usefixtures("path")
        @pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
        def test_step_into_fresh_arrays_is_update_and_leaves_its_inputs(self, dtype: type) -> None:
            """What a session steps with: the same bits as `update` in place, and the old arrays as they
            were (a step can then still be refused with nothing to undo)."""
            optimizer = get_optimizer(name)
            hp = parse(optimizer.hparams, {**table.read_only, "maximize": True}, "optimizer")
            params = initial_params(WIDE_SHAPES, dtype)
            states = [optimizer.init_state(p, hp) for p in params.values()]
            in_place = [p.copy() for p in params.values()]
            in_place_states = [{k: v.copy() for k, v in s.items()} for s in states]
            for t in range(3):
                grads = [gradient(t, n, p, 0) for n, p in zip(params, in_place, strict=True)]
                before = [p.copy() for p in in_place], [{k: v.copy() for k, v in s.items()} for s in states]
                new_params, new_states, finite = optimizer.step_into(in_place, grads, states, hp)
                assert finite == [True] * len(new_params)
                for old, kept in zip(in_place, before[0], strict=True):
                    np.testing.assert_array_equal(old, kept)
                for old_state, kept_state in zip(states, before[1], strict=True):
                    for slot, value in kept_state.items():
                        np.testing.assert_array_equal(old_state[slot], value)
                optimizer.update(in_place, grads, in_place_states, hp)
                for new, updated in zip(new_params, in_place, strict=True):
                    assert not np.shares_memory(new, updated)
                    np.testing.assert_array_equal(new, updated)
                for new_state, updated_state in zip(new_states, in_place_states, strict=True):
                    assert new_state.keys() == updated_state.keys()
                    for slot, value in updated_state.items():
                        np.testing.assert_array_equal(new_state[slot], value, err_msg=slot)
                states = new_states

        @pytest.mark.parametrize("options", table.state_options, ids=spec_id)
        def test_state_bytes_are_known_before_the_state_is_allocated(self, options: Spec) -> None:
            """What `OPTSERVE_MAX_SESSION_BYTES` is checked against, from the shape alone."""
            optimizer = get_optimizer(name)
            hp = parse(optimizer.hparams, options, "optimizer")
            shapes = [(5, 4), (7, 3), (1, 9)] if name == "muon" else [(), (7,), (5, 4), (2, 3, 4)]
            for shape, dtype in itertools.product(shapes, DTYPES):
                real = optimizer.init_state(np.zeros(shape, dtype), hp)
                expected = sum(v.nbytes for v in real.values())
                assert optimizer.state_nbytes(shape, np.dtype(dtype), hp) == expected, (shape, dtype)

        def test_hyperparameters_match_the_torch_constructor(self) -> None:
            """Names, defaults and order as torch's signature, minus the implementation switches."""
            signature = inspect.signature(torch_cls.__init__).parameters.values()
            theirs = [(p.name, p.default) for p in signature if p.name not in TORCH_SWITCHES]
            ours = [(p.name, p.default) for p in get_optimizer(name).hparams]
            assert ours == theirs

        @pytest.mark.parametrize("options", table.state_options, ids=spec_id)
        def test_state_slots_match_torch(self, options: Spec) -> None:
            p = torch.zeros(3, requires_grad=True)
            opt = torch_cls([p], **torch_kwargs(options))
            p.grad = torch.ones(3)
            opt.step()
            theirs = opt.state[p]
            optimizer = get_optimizer(name)
            ours = optimizer.init_state(np.zeros(3), parse(optimizer.hparams, options, "optimizer"))
            assert set(ours) - table.own_slots == set(theirs)
            for key, value in theirs.items():
                assert ours[key].shape == tuple(value.shape), key

        if table.first_step_slot is not None:

            def test_state_takes_the_lr_of_the_first_step(self) -> None:
                """torch creates the state at a parameter's first step: an lr a scheduler set after
                creation counts."""
                optimizer = get_optimizer(name)
                created = parse(optimizer.hparams, {"lr": 0.1}, "optimizer")
                stepped = {**created, "lr": 0.03}
                param = initial_params({"w": (5, 4)}, np.float64)["w"]
                state = optimizer.init_state(param, created)
                tensor = torch.tensor(param.copy(), requires_grad=True)
                theirs = torch_cls([tensor], lr=0.1)
                theirs.param_groups[0]["lr"] = 0.03
                for t in range(5):
                    tensor.grad = torch.from_numpy(gradient(t, "w", tensor.detach().numpy(), 0))
                    theirs.step()
                    optimizer.update([param], [gradient(t, "w", param, 0)], [state], stepped)
                    np.testing.assert_allclose(param, tensor.detach().numpy(), rtol=1e-10, atol=1e-12)
                slot = table.first_step_slot
                np.testing.assert_array_equal(state[slot], theirs.state[tensor][slot].numpy())

    Contract.__name__ = Contract.__qualname__ = f"Test{name}"
    return Contract
