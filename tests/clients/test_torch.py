"""`optserve.torch.RemoteOptimizer` against torch.optim on the same model: step for step, groups, state."""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import optserve
import pytest
import torch
from optserve.torch import RemoteOptimizer

from tests.clients.conftest import backward

STEPS = 25
ADAM = {"name": "adam", "lr": 0.05, "betas": [0.8, 0.99], "weight_decay": 0.01}
EXPONENTIAL = {"name": "exponential_lr", "gamma": 0.9}


class Net(torch.nn.Module):
    """Linear(4, 3), tanh, Linear(3, 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = torch.nn.Linear(4, 3)
        self.out = torch.nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.out(torch.tanh(self.hidden(x)))
        return out


def model(dtype: torch.dtype = torch.float64) -> Net:
    torch.manual_seed(0)
    return Net().to(dtype)


def data(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(32, 4, generator=generator, dtype=dtype)
    return x, x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]], dtype=dtype) + 0.25


def train_step(net: torch.nn.Module, opt: torch.optim.Optimizer) -> float:
    x, y = data(next(net.parameters()).dtype)
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(net(x), y)
    backward(loss)
    opt.step()
    return loss.item()


def assert_same(remote: torch.nn.Module, local: torch.nn.Module, rtol: float = 1e-9) -> None:
    for (name, a), (_, b) in zip(remote.named_parameters(), local.named_parameters(), strict=True):
        np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=rtol, atol=0, err_msg=name)


def test_trains_step_for_step_like_local_adam_with_exponential_lr(sync_client: optserve.Client) -> None:
    local, remote = model(), model()
    reference = torch.optim.Adam(local.parameters(), lr=0.05, betas=(0.8, 0.99), weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.ExponentialLR(reference, gamma=0.9)
    opt = RemoteOptimizer(remote.parameters(), client=sync_client, optimizer=ADAM, scheduler=EXPONENTIAL)

    for _ in range(STEPS):
        assert train_step(remote, opt) == pytest.approx(train_step(local, reference), rel=1e-9)
        schedule.step()
        assert_same(remote, local)
        assert [g["lr"] for g in opt.param_groups] == pytest.approx(schedule.get_last_lr(), rel=1e-12)
    assert opt.last_result is not None
    assert opt.last_result.step == STEPS
    assert opt.session.refresh().step == STEPS


def test_float32_model_keeps_float32_and_matches_torch(sync_client: optserve.Client) -> None:
    local, remote = model(torch.float32), model(torch.float32)
    reference = torch.optim.SGD(local.parameters(), lr=0.1, momentum=0.9)
    opt = RemoteOptimizer(
        remote.parameters(), client=sync_client, optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9}
    )
    for _ in range(5):
        train_step(remote, opt)
        train_step(local, reference)
    assert {p.dtype for p in remote.parameters()} == {torch.float32}
    assert {p.dtype for p in opt.session.info.params.values()} == {"float32"}
    assert_same(remote, local, rtol=1e-5)


def test_named_parameters_travel_under_their_names(sync_client: optserve.Client) -> None:
    net = model()
    opt = RemoteOptimizer(net.named_parameters(), client=sync_client, optimizer={"name": "sgd", "lr": 0.1})
    assert list(opt.session.info.params) == ["hidden.weight", "hidden.bias", "out.weight", "out.bias"]
    assert opt.session.info.params["hidden.weight"] == optserve.ParamInfo((3, 4), "float64")


def test_param_groups_with_overrides_match_torch_and_unnamed_tensors_are_p0_p1(
    sync_client: optserve.Client,
) -> None:
    local, remote = model(), model()

    def groups(net: Net) -> list[dict[str, Any]]:
        return [
            {"params": list(net.hidden.parameters()), "lr": 0.2, "betas": (0.5, 0.9)},
            {"params": list(net.out.parameters())},
        ]

    reference = torch.optim.Adam(groups(local), lr=0.01)
    opt = RemoteOptimizer(groups(remote), client=sync_client, optimizer={"name": "adam", "lr": 0.01})
    server_groups = opt.session.info.param_groups
    assert [g["params"] for g in server_groups] == [["p0", "p1"], ["p2", "p3"]]
    assert [(g["lr"], g["betas"]) for g in server_groups] == [(0.2, [0.5, 0.9]), (0.01, [0.9, 0.999])]
    for _ in range(10):
        train_step(remote, opt)
        train_step(local, reference)
        assert_same(remote, local)
    assert [g["lr"] for g in opt.param_groups] == [0.2, 0.01]


def test_parameter_without_grad_is_left_out_and_left_alone(sync_client: optserve.Client) -> None:
    net = model()
    net.hidden.weight.requires_grad_(False)
    frozen = net.hidden.weight.detach().clone()
    opt = RemoteOptimizer(net.named_parameters(), client=sync_client, optimizer={"name": "adam", "lr": 0.1})
    train_step(net, opt)
    torch.testing.assert_close(net.hidden.weight, frozen, rtol=0, atol=0)
    torch.testing.assert_close(
        torch.from_numpy(opt.session.params()["hidden.weight"]), frozen, rtol=0, atol=0
    )
    assert not torch.equal(net.hidden.bias, model().hidden.bias)


def test_closure_loss_is_returned_and_recorded_in_the_history(sync_client: optserve.Client) -> None:
    net = model()
    opt = RemoteOptimizer(net.parameters(), client=sync_client, optimizer={"name": "sgd", "lr": 0.01})
    x, y = data()

    seen: list[float] = []

    def closure() -> Any:  # a tensor that requires grad, as torch closures return
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(net(x), y)
        backward(loss)
        seen.append(loss.item())
        return loss

    returned = [opt.step(closure) for _ in range(3)]
    assert [h.loss for h in opt.session.history()] == seen
    assert [float(torch.as_tensor(r).detach()) for r in returned] == seen


def test_state_dict_round_trip_through_torch_save_continues_exactly(sync_client: optserve.Client) -> None:
    net = model()
    opt = RemoteOptimizer(net.parameters(), client=sync_client, optimizer=ADAM, scheduler=EXPONENTIAL)
    for _ in range(10):
        train_step(net, opt)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    saved = [p.detach().clone() for p in net.parameters()]
    for _ in range(5):
        train_step(net, opt)
    expected = [p.detach().clone() for p in net.parameters()]
    first = opt.session

    buffer.seek(0)
    opt.load_state_dict(torch.load(buffer))
    assert opt.session.id != first.id
    assert opt.session.info.step == 10
    for p, value in zip(net.parameters(), saved, strict=True):  # the checkpoint's parameters are back
        torch.testing.assert_close(p.detach(), value, rtol=0, atol=0)
    for _ in range(5):
        train_step(net, opt)
    for p, value in zip(net.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), value, rtol=0, atol=0)


def test_a_torch_state_dict_is_refused(sync_client: optserve.Client) -> None:
    net = model()
    opt = RemoteOptimizer(net.parameters(), client=sync_client, optimizer={"name": "sgd"})
    torch_state = torch.optim.SGD(net.parameters()).state_dict()
    with pytest.raises(ValueError, match="not a RemoteOptimizer state dict"):
        opt.load_state_dict(torch_state)


def test_continuing_a_session_copies_its_parameters_into_the_model(sync_client: optserve.Client) -> None:
    trained = model()
    first = RemoteOptimizer(trained.named_parameters(), client=sync_client, optimizer=ADAM)
    for _ in range(3):
        train_step(trained, first)
    fresh = model()
    second = RemoteOptimizer(fresh.named_parameters(), client=sync_client, session=first.session)
    assert_same(fresh, trained, rtol=0)
    assert [g["lr"] for g in second.param_groups] == [0.05]


def test_continuing_a_session_with_other_parameter_names_is_refused(sync_client: optserve.Client) -> None:
    first = RemoteOptimizer(model().named_parameters(), client=sync_client, optimizer=ADAM)
    with pytest.raises(ValueError, match="groups its parameters as"):
        RemoteOptimizer(model().parameters(), client=sync_client, session=first.session)


LOCAL_SCHEDULERS: list[Callable[[torch.optim.Optimizer], Any]] = [
    lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9),
    lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.5**epoch),
    lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10),
    lambda opt: torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.01, max_lr=0.1),
    lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt),
]


@pytest.mark.parametrize("attach", LOCAL_SCHEDULERS)
def test_a_local_lr_scheduler_is_refused_with_a_clear_message(
    sync_client: optserve.Client, attach: Callable[[torch.optim.Optimizer], Any]
) -> None:
    opt = RemoteOptimizer(model().parameters(), client=sync_client, optimizer={"name": "sgd", "lr": 0.1})
    with pytest.raises(TypeError, match="schedule lives on the server session") as caught:
        attach(opt)
    assert "scheduler={'name': 'exponential_lr'" in str(caught.value)
    assert opt.param_groups[0]["lr"] == 0.1
    assert "initial_lr" not in opt.param_groups[0]


def test_writing_a_groups_hyperparameter_locally_is_refused(sync_client: optserve.Client) -> None:
    opt = RemoteOptimizer(model().parameters(), client=sync_client, optimizer={"name": "sgd", "lr": 0.1})
    with pytest.raises(TypeError, match="'lr' cannot be set locally"):
        opt.param_groups[0]["lr"] = 0.5
    with pytest.raises(TypeError, match="'momentum' cannot be set locally"):
        opt.param_groups[0].update(momentum=0.9)
    opt.param_groups[0]["note"] = "free-form keys stay writable"


def test_adding_a_param_group_after_creation_is_refused(sync_client: optserve.Client) -> None:
    opt = RemoteOptimizer(model().parameters(), client=sync_client, optimizer={"name": "sgd"})
    with pytest.raises(TypeError, match="fixed by its server session"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)]})


def test_push_params_sends_in_place_edits_to_the_session(sync_client: optserve.Client) -> None:
    net = model()
    opt = RemoteOptimizer(net.named_parameters(), client=sync_client, optimizer={"name": "sgd"})
    with torch.no_grad():
        net.out.bias.fill_(7.0)
    opt.push_params()
    np.testing.assert_array_equal(opt.session.params()["out.bias"], [7.0])


def test_half_precision_parameters_are_refused(sync_client: optserve.Client) -> None:
    with pytest.raises(TypeError, match="float16; optserve sessions hold float32 or float64"):
        RemoteOptimizer(model(torch.float16).parameters(), client=sync_client, optimizer={"name": "sgd"})


def test_optserve_torch_loads_on_first_use_and_not_before() -> None:
    """`import optserve` then `optserve.torch.RemoteOptimizer`, as the contract writes it; torch is not
    imported by `import optserve` alone."""
    code = (
        "import sys, optserve\n"
        "assert 'torch' not in sys.modules and 'optserve.torch' not in sys.modules\n"
        "assert optserve.torch.RemoteOptimizer.__name__ == 'RemoteOptimizer'\n"
        "assert 'torch' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_data_parallel_workers_in_synchronous_rounds_train_as_one_full_batch(server: Any) -> None:
    """Two RemoteOptimizer workers, each on half of the batch, in rounds of their mean gradient: the same
    parameters as one torch SGD on the whole batch (shards of equal size: the mean of means)."""
    import threading

    torch.manual_seed(0)
    x, y = torch.randn(64, 3), torch.randn(64, 1)
    template = torch.nn.Linear(3, 1)
    reference = torch.nn.Linear(3, 1)
    reference.load_state_dict(template.state_dict())
    rounds = {"mode": "sync", "workers": 2, "timeout": 30}
    with optserve.Client(server.url) as setup:
        session = setup.create_session(
            {n: p.detach().numpy().copy() for n, p in template.named_parameters()},
            {"name": "sgd", "lr": 0.1},
            aggregation=rounds,
        )
    models = [torch.nn.Linear(3, 1) for _ in range(2)]
    errors: list[BaseException] = []

    def train(i: int) -> None:
        try:
            with optserve.Client(server.url) as client:
                opt = RemoteOptimizer(
                    models[i].named_parameters(),
                    client=client,
                    session=client.get_session(session.id),
                    worker=f"w{i}",
                )
                shard = slice(32 * i, 32 * (i + 1))
                for _ in range(10):
                    opt.zero_grad()
                    torch.nn.functional.mse_loss(models[i](x[shard]), y[shard]).backward()
                    opt.step()
                assert opt.last_result is not None
                assert opt.last_result.workers == ("w0", "w1")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=train, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for _ in range(10):
        ref_opt.zero_grad()
        torch.nn.functional.mse_loss(reference(x), y).backward()
        ref_opt.step()
    for a, b, ref in zip(models[0].parameters(), models[1].parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, ref, rtol=1e-5, atol=1e-6)


def test_a_worker_whose_gradient_is_too_late_catches_up(server: Any) -> None:
    with optserve.Client(server.url) as client:
        session = client.create_session(
            {"w": np.zeros(2, np.float32)},
            {"name": "sgd", "lr": 1.0},
            aggregation={"mode": "async", "max_staleness": 1, "staleness_lr": "none"},
        )
        fast, slow = optserve.Worker(session, "fast"), optserve.Worker(client.get_session(session.id), "slow")
        for _ in range(2):
            assert fast.step({"w": np.ones(2, np.float32)}) is not None
        assert slow.step({"w": np.ones(2, np.float32)}) is None  # computed at step 0, the session is at 2
        assert (slow.dropped, slow.at_step) == (1, 2)
        np.testing.assert_array_equal(slow.params["w"], [-2.0, -2.0])
        late = fast.step({"w": np.ones(2, np.float32)})
        taken = slow.step({"w": np.ones(2, np.float32)})  # from step 2, the session at 3: 1 behind, taken
        assert late is not None
        assert taken is not None
        assert (taken.step, taken.staleness) == (4, 1)
