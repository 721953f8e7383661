"""Both clients and `RemoteOptimizer` over real sockets against an `optserve serve` process."""

from __future__ import annotations

from typing import Any, Literal

import httpx
import numpy as np
import optserve
import pytest
import torch
from optserve.torch import RemoteOptimizer

from tests.clients.conftest import DropAnswers, backward
from tests.system.server import Server, free_port

PARAMS: dict[str, Any] = {"w": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3)}
Wire = Literal["safetensors", "json"]
SPEC = {"name": "adamw", "lr": 0.01}
SCHEDULE = {"name": "cosine_annealing_lr", "T_max": 10}


def grads(seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal((2, 3)).astype(np.float32), "b": rng.standard_normal(3)}


@pytest.mark.parametrize("wire", ["safetensors", "json"])
def test_sync_client_runs_a_session_through_checkpoint_and_restore(server: Server, wire: Wire) -> None:
    with optserve.Client(server.url, wire=wire) as client:
        assert client.health() == {"status": "ok"}
        session = client.create_session(PARAMS, SPEC, SCHEDULE)
        for seed in range(3):
            result = session.step(grads(seed), loss=float(seed))
        assert result.step == 3
        restored = client.restore(session.checkpoint())
        a, b = session.step(grads(3)), restored.step(grads(3))
        assert (a.step, a.lr) == (b.step, b.lr) == (4, a.lr)
        for name in PARAMS:
            np.testing.assert_array_equal(a.params[name], b.params[name])
            np.testing.assert_array_equal(session.params()[name], a.params[name])
        assert [h.loss for h in session.history()] == [0.0, 1.0, 2.0, None]
        for s in (session, restored):
            s.delete()
        assert session.id not in [s.id for s in client.list_sessions()]


@pytest.mark.parametrize("wire", ["safetensors", "json"])
async def test_async_client_runs_a_session_through_checkpoint_and_restore(server: Server, wire: Wire) -> None:
    async with optserve.AsyncClient(server.url, wire=wire) as client:
        session = await client.create_session(PARAMS, SPEC, SCHEDULE)
        for seed in range(3):
            await session.step(grads(seed))
        restored = await client.restore(await session.checkpoint())
        a, b = await session.step(grads(3)), await restored.step(grads(3))
        assert (a.step, a.lr) == (b.step, b.lr)
        for name in PARAMS:
            np.testing.assert_array_equal(a.params[name], b.params[name])
            np.testing.assert_array_equal((await restored.params())[name], b.params[name])
        assert [h.step for h in await restored.history()] == [4]  # a restored session starts its own
        with pytest.raises(optserve.StepConflict) as caught:
            await session.step(grads(4), expected_step=0)
        assert caught.value.current_step == 4
        for s in (session, restored):
            await s.delete()


def test_json_requests_carry_every_float32_exactly(server: Server) -> None:
    """Tensors go as the shortest decimal of the float64 value, which reads back exactly; the float32's own
    shortest decimal, read as a double then rounded, misses for +-7.038531e-26 (bits 0x15ae43fd)."""
    tricky = np.array([0x15AE43FD, 0x95AE43FD, 0x3DCCCCCD, 0x00000001, 0x7F7FFFFF], np.uint32).view(
        np.float32
    )
    with optserve.Client(server.url, wire="json") as client:
        session = client.create_session({"w": tricky}, {"name": "sgd", "lr": 1.0})
        session.set_params({"w": tricky[::-1].copy()})
        with optserve.Client(server.url) as exact:  # read back as safetensors, which is bit-exact
            stored = exact.get_session(session.id).params()["w"]
        assert stored.view(np.uint32).tolist() == tricky[::-1].view(np.uint32).tolist()
        session.delete()


async def test_step_whose_answer_is_lost_on_a_real_connection_is_applied_once(server: Server) -> None:
    faults = DropAnswers("POST", "/step")
    faults.inner = httpx.AsyncHTTPTransport()
    async with optserve.AsyncClient(
        server.url, transport=faults, retries=optserve.RetryPolicy(backoff=0.01)
    ) as client:
        session = await client.create_session(PARAMS, {"name": "sgd", "lr": 1.0})
        result = await session.step({"b": np.ones(3)})
        assert (result.step, result.replayed) == (1, True)
        assert (await session.refresh()).step == 1
        np.testing.assert_array_equal((await session.params())["b"], -np.ones(3))
        await session.delete()


def test_unreachable_server_raises_transport_error_after_the_retries() -> None:
    policy = optserve.RetryPolicy(retries=2, backoff=0.01)
    with (
        optserve.Client(f"http://127.0.0.1:{free_port()}", retries=policy) as client,
        pytest.raises(optserve.TransportError) as caught,
    ):
        client.health()
    assert caught.value.attempts == 3
    assert isinstance(caught.value.__cause__, httpx.ConnectError)


def test_remote_optimizer_trains_over_the_network(server: Server) -> None:
    torch.manual_seed(0)
    local, remote = torch.nn.Linear(3, 1).double(), torch.nn.Linear(3, 1).double()
    remote.load_state_dict(local.state_dict())
    x = torch.randn(16, 3, dtype=torch.float64)
    y = x.sum(dim=1, keepdim=True)
    reference = torch.optim.RMSprop(local.parameters(), lr=0.01, centered=True)
    with optserve.Client(server.url) as client:
        opt = RemoteOptimizer(
            remote.named_parameters(),
            client=client,
            optimizer={"name": "rmsprop", "lr": 0.01, "centered": True},
        )
        for _ in range(10):
            for net, o in ((local, reference), (remote, opt)):
                o.zero_grad()
                backward(torch.nn.functional.mse_loss(net(x), y))
                o.step()
        for a, b in zip(remote.parameters(), local.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=0)
        opt.session.delete()
