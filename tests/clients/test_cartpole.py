"""`optserve demo --task cartpole`: the DQN's gradient, a seeded agent that learns through the service and
does so reproducibly, and its actors through one session on a server with API keys and on two replicas of
one Redis."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import optserve
import orjson
import pytest
import redis
from optserve import cartpole, demo

from tests.clients.test_demo import png_size
from tests.system.redis_server import RedisServer
from tests.system.server import Server

KEY = "cartpole-key-0123456789"


def test_the_gradient_is_the_derivative_of_the_td_loss() -> None:
    """Central differences in float64 on a small network, on both sides of Huber's kink (rewards 0 put the
    TD errors near 0, in its quadratic part; rewards 3 near -3, in its linear part), terminal or not."""
    rng = np.random.default_rng(0)
    params = {k: v.astype(np.float64) for k, v in cartpole.init_params(rng, 8).items()}
    target = {k: v.astype(np.float64) for k, v in cartpole.init_params(rng, 8).items()}
    n = 16
    batch = (
        rng.standard_normal((n, 4)),
        rng.integers(0, 2, n),
        rng.choice([0.0, 3.0], n),
        rng.standard_normal((n, 4)),
        rng.integers(0, 2, n).astype(np.float64),
    )
    _, grads = cartpole.td_loss_and_grads(params, target, batch, 0.98)
    h = 1e-6
    for name, value in params.items():
        numeric = np.zeros_like(value)
        for i in np.ndindex(value.shape):
            for sign in (1, -1):
                moved = {**params, name: value.copy()}
                moved[name][i] += sign * h
                numeric[i] += sign * cartpole.td_loss_and_grads(moved, target, batch, 0.98)[0] / (2 * h)
        np.testing.assert_allclose(grads[name], numeric, rtol=1e-5, atol=1e-8, err_msg=name)


def test_solved_means_a_mean_of_475_over_100_consecutive_episodes() -> None:
    assert cartpole.solved_at([500.0] * 99) is None
    assert cartpole.solved_at([500.0] * 100) == 100
    assert cartpole.solved_at([0.0] * 10 + [500.0] * 100) == 105  # 5 zeros left in the window: 95 x 500
    assert cartpole.solved_at([475.0] * 100) == 100  # 475 exactly counts
    assert cartpole.solved_at([474.0, *[475.0] * 99, 474.0, 476.0]) == 102


def test_one_seeded_actor_learns_through_the_demo_server_and_the_lr_is_the_schedule() -> None:
    """10,000 steps of RMSprop on the demo's own server: the last 20 episodes last far longer than the first
    20 (random play: about 20 steps each), and the lr the service reported after each step is the schedule's
    (a warm-up from 1% of the lr, then cosine), as the server previews it."""
    config = cartpole.Config(budget=10_000)
    lr = cartpole.OPTIMIZERS["RMSprop"]["lr"]
    with demo.local_server(store="memory://") as url:
        run = cartpole.train([url], None, "RMSprop", 1, config, seed=0)
        with optserve.Client(url) as client:
            preview = client.preview_schedule(lr, config.scheduler(), len(run.steps) + 1)[0]
            assert client.list_sessions() == []  # the run deleted its session
    first, last = np.mean(run.returns[:20]), np.mean(run.returns[-20:])
    assert first < 40
    assert last > 3 * first + 30, (first, last)
    assert run.steps == list(range(1, (10_000 - 1_000) // 2 + 1))  # one step per 2 env steps, after 1,000
    assert run.env_steps == 10_000
    assert (run.dropped, run.max_staleness) == (0, 0)
    assert run.initial_lr == pytest.approx(lr / 100)
    assert run.lrs == pytest.approx(preview[1:], rel=1e-12)
    assert max(run.lrs) == pytest.approx(lr)


def test_a_seeded_run_is_reproducible_to_the_bit(server: Server) -> None:
    config = cartpole.Config(budget=3_000)
    first = cartpole.train([server.url], None, "Adam", 1, config, seed=7)
    again = cartpole.train([server.url], None, "Adam", 1, config, seed=7)
    other = cartpole.train([server.url], None, "Adam", 1, config, seed=8)

    assert len(first.episodes) > 50
    assert [(e.ret, e.env_steps, e.step) for e in first.episodes] == [
        (e.ret, e.env_steps, e.step) for e in again.episodes
    ]
    assert (first.steps, first.lrs) == (again.steps, again.lrs)
    assert first.returns != other.returns


@pytest.fixture(scope="module")
def keyed_server() -> Iterator[Server]:
    with Server("memory://", env={"OPTSERVE_API_KEYS": KEY}) as running:
        yield running


def test_the_demo_runs_one_actor_against_two_on_a_server_with_api_keys(
    keyed_server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`optserve demo --task cartpole --actors 2` end to end (a budget too short to learn): every optimizer
    with 1 actor and with 2 through one asynchronous session each, the table, the verdicts, the plot."""
    out = tmp_path / "cartpole.png"
    argv = ["--task", "cartpole", "--url", keyed_server.url, "--api-key", KEY, "--actors", "2"]
    argv += ["--budget", "2000", "--no-progress", "--out", str(out)]

    assert demo.main(argv) == 0

    printed = capsys.readouterr().out
    rows = [
        line.split()
        for line in printed.splitlines()
        if line.split()[:1] in ([n] for n in cartpole.OPTIMIZERS)
    ]
    assert sorted((row[0], row[1]) for row in rows) == sorted(
        (name, actors) for name in cartpole.OPTIMIZERS for actors in ("1", "2")
    )
    assert "SGD+momentum: 2 actors took" in printed
    assert "not solved within 2,000 steps" in printed
    assert png_size(out) == (1400, 900)
    with optserve.Client(keyed_server.url, api_key=KEY) as client:
        assert client.list_sessions() == []

    assert demo.main([*argv[:4], "--api-key", "wrong-key-0123456789", *argv[6:]]) == 1
    assert "--api-key" in capsys.readouterr().err


@pytest.fixture
def replicas(redis_server: RedisServer, tmp_path: Path) -> Iterator[list[Server]]:
    """Two `optserve serve` replicas on one real (flushed) Redis."""
    flush = redis.Redis.from_url(redis_server.url())
    flush.flushdb()
    flush.close()
    running = [Server(redis_server.url(), log=tmp_path / f"replica-{i}.log") for i in range(2)]
    try:
        with ThreadPoolExecutor(2) as pool:  # start concurrently: each takes seconds to import
            list(pool.map(Server.start, running))
        yield running
    finally:
        for server in running:
            server.stop()


def test_two_actors_train_one_session_through_two_replicas_on_redis(replicas: list[Server]) -> None:
    """Actor i talks to replica i % 2: each gradient is applied once, at most `max_staleness` steps late,
    whichever replica took it, and every step was answered to one actor."""
    config = cartpole.Config(budget=4_000)
    urls = [r.url for r in replicas]

    run = cartpole.train(urls, None, "Adam", 2, config, seed=0, staleness_lr="none")

    assert {e.actor for e in run.episodes} == {0, 1}
    assert run.env_steps == 4_000
    # each actor: (2,000 - 500) / 2 gradients, all applied except the ones refused as too stale
    assert len(run.steps) + run.dropped == 2 * 750
    assert run.steps == list(range(1, len(run.steps) + 1))  # every applied step answered exactly once
    assert run.mean_staleness > 0
    assert run.max_staleness <= 4
    with optserve.Client(urls[1]) as client:
        assert client.list_sessions() == []


TYPESCRIPT = Path(__file__).resolve().parents[2] / "clients" / "typescript"


def test_a_python_actor_and_a_node_actor_train_one_session(server: Server) -> None:
    """The TypeScript client's CartPole actor (clients/typescript/examples/cartpole.ts) beside a Python one on
    one asynchronous session: every gradient either actor sent was applied once or refused as too stale."""
    assert (TYPESCRIPT / "node_modules").is_dir(), "run `make install-test`: it installs the npm packages"
    subprocess.run(["npm", "run", "build"], cwd=TYPESCRIPT, check=True, capture_output=True, timeout=300)
    config = cartpole.Config(budget=1_500, hidden=64, learning_starts=300)
    aggregation = {"mode": "async", "max_staleness": 4, "staleness_lr": "inverse"}
    with optserve.Client(server.url) as client:
        params = cartpole.init_params(np.random.default_rng(0), config.hidden)
        session = client.create_session(
            params, cartpole.OPTIMIZERS["Adam"], aggregation=aggregation, clip_grad_norm=10.0
        )
        script = str(TYPESCRIPT / "dist-examples" / "cartpole.js")
        actor = [script, "--url", server.url, "--session", session.id]
        node = subprocess.Popen(
            ["node", *actor, "--steps", "1500", "--learning-starts", "300", "--seed", "4"],
            stdout=subprocess.PIPE,
            text=True,
        )
        worker = optserve.Worker(session, "python")
        worker.params = session.params()
        episodes: list[cartpole.Episode] = []
        log = cartpole.Actor(config, 0, 1, seed=0).run(
            worker, np.zeros(1, np.int64), episodes.append, lambda: False
        )
        out, _ = node.communicate(timeout=300)
        assert node.returncode == 0
        lines = [orjson.loads(line) for line in out.splitlines()]
        node_episodes, summary = lines[:-1], lines[-1]
        final = session.refresh().step
        session.delete()

    assert summary["done"] is True
    assert len(node_episodes) > 10
    assert len(episodes) > 10
    # each sent one gradient per 2 steps after its first 300: (1,500 - 300) / 2
    assert summary["applied"] + summary["dropped"] == 600
    assert len(log.steps) + log.dropped == 600
    assert final == summary["applied"] + len(log.steps)  # the session took each applied one, once
    assert max(log.staleness) > 0  # the two interleaved
