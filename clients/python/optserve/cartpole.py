"""`optserve demo --task cartpole [--actors N]`: a DQN agent on gymnasium's CartPole-v1 whose Q-network is
trained through an optserve session, with RMSprop (the choice of the article this project began from),
Adam and SGD+momentum, each under a linear warm-up then cosine schedule; and the same agent played by N
actor processes at once on one session, against one actor alone.

The agent is the DQN of Mnih et al. 2015 at CartPole's scale: a 4-128-128-2 ReLU network in numpy (forward
and backward by hand, as the digits MLP of `optserve.demo`), a replay memory, a Huber loss on the
one-step TD target r + gamma * max_a' Q_target(s', a') * (1 - terminated) (CartPole's truncation at 500
steps is not a terminal state: the pole was still up), a target network copied from the parameters the
session answered every `target_every` optimizer steps, epsilon-greedy exploration decaying linearly, and
random steps before the first gradient. The session holds the parameters, the optimizer state and the
schedule; this process computes gradients and acts with the parameters each step answers with.

**Many actors**, the design: asynchronous one-step Q-learning (Mnih et al. 2016, "Asynchronous Methods for
Deep Reinforcement Learning"), with the remote optimizer as the shared learner. Each actor process has its
own environment (seeded apart), replay memory, exploration schedule and random stream; it computes the
gradient of its own samples and sends it through `optserve.Worker` to ONE session created with
`aggregation={"mode": "async", "max_staleness": k, "staleness_lr": "inverse" | "none"}`, and acts with the
parameters that answer returns. This is the design where optserve earns its keep: the gradients are small
(17,410 float32 numbers, 70 KB each way), the optimizer state lives in one place that every actor reaches,
staleness is bounded by the service (a gradient more than k steps behind is refused, and the actor
catches up), and there is no learner process to run or to lose. The alternative, Ape-X or IMPALA style,
ships experience to one learner process that alone talks to the optimizer: optserve would then serve a
single client, and the actors' parallelism would end at the learner's replay memory.

"Solved" is CartPole's: a mean return of at least 475 over 100 consecutive episodes, here the training
episodes themselves (exploration included); with many actors, the last 100 episodes of all actors in the
order they ended. A run stops when solved, or at its budget of environment steps. With one actor a run is
reproducible to the bit: every random source is seeded (the initial weights, the environment's resets,
the generator that draws exploration and replay samples) and the service's numerics are deterministic.
With several, the order in which gradients reach the session depends on timing, and so do the numbers.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import queue
import sys
import textwrap
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

import optserve
from optserve.demo import DEFAULT_OUT as CLASSIC_OUT
from optserve.demo import WIDTH, ServerStartError, local_server, trailing_mean

try:
    import gymnasium
    from matplotlib.figure import Figure
    from tqdm import tqdm
except ImportError as missing:  # the SDK installs without them; a bare traceback would not say what to do
    raise ImportError(
        f"optserve demo --task cartpole needs gymnasium, matplotlib and tqdm ({missing}): "
        "pip install 'optserve[demo]'"
    ) from missing

Array = NDArray[Any]
Params = dict[str, Array]
Batch = tuple[Array, Array, Array, Array, Array]  # observations, actions, rewards, next observations, ends

ENV_ID = "CartPole-v1"
SOLVED = 475.0  # CartPole-v1's reward threshold, as gymnasium registers it
WINDOW = 100  # episodes in the mean that must reach it
DEFAULT_OUT = Path("demo-output/optserve-cartpole.png")
# torch's defaults except lr (and SGD's momentum, Nesterov's, without which it is not competitive here). The
# lrs come from a grid (x2 apart) on the defaults of Config and a 200k-step budget, tuned against an
# in-process numpy copy of the three updates (fast; the service's own runs are what the benchmark reports):
# solved within the budget on 9 of seeds 0-9 (Adam), 4 of seeds 5-9 (RMSprop), 5 of seeds 0-4 (SGD).
# RMSprop at 3e-4 solved 4 of 10 (too slow to settle before the cosine ends), SGD with plain momentum 2 of 3.
OPTIMIZERS: dict[str, dict[str, Any]] = {
    "RMSprop": {"name": "rmsprop", "lr": 5e-4},
    "Adam": {"name": "adam", "lr": 6e-4},
    "SGD+momentum": {"name": "sgd", "momentum": 0.9, "nesterov": True, "lr": 5e-3},
}
COLORS = {"RMSprop": "C0", "Adam": "C1", "SGD+momentum": "C2"}


@dataclass(frozen=True)
class Config:
    """The agent's hyper-parameters, tuned so that each optimizer solves CartPole-v1 within the budget on most
    seeds (DQN on CartPole is notoriously seed-sensitive: a good policy can still collapse). What mattered
    most: a replay memory that keeps the whole run (the early failures stay in it: a memory that forgets
    them lets a good policy forget how to recover, and collapse), batches of 128, gamma 0.98 (Q values near
    50 instead of 100, so the gap between the two actions is a larger share of them), and the cosine
    schedule, which settles the policy at the end of the run."""

    budget: int = 200_000
    """Environment steps of a run, over all its actors; a run stops earlier when solved."""
    hidden: int = 128
    gamma: float = 0.98
    batch: int = 128
    learning_starts: int = 1_000
    """Random steps before the first gradient (over all actors: each actor takes its share)."""
    train_every: int = 2
    """Environment steps per gradient: one optimizer step (one round trip) every 2 steps of each actor."""
    target_every: int = 250
    """Optimizer steps of the session between two copies of its parameters into the target network."""
    eps_end: float = 0.01
    eps_steps: int = 10_000
    """Environment steps (over all actors) over which epsilon falls linearly from 1 to `eps_end`."""
    warmup: int = 1_000
    """Optimizer steps of linear warm-up (from 1% of the lr) before the cosine takes over."""
    clip_grad_norm: float = 10.0

    @property
    def optimizer_steps(self) -> int:
        """The steps the schedule spans: one gradient per `train_every` environment steps of the budget."""
        return max(2, self.budget // self.train_every)

    def scheduler(self) -> dict[str, Any]:
        """Linear warm-up, then cosine annealing to 0 at the end of the budget, as a server scheduler spec."""
        steps = self.optimizer_steps
        warmup = max(1, min(self.warmup, steps // 10))
        return {
            "name": "sequential_lr",
            "schedulers": [
                {"name": "linear_lr", "start_factor": 0.01, "end_factor": 1.0, "total_iters": warmup},
                {"name": "cosine_annealing_lr", "T_max": steps - warmup},
            ],
            "milestones": [warmup],
        }


# -- the Q-network: 4-H-H-2, ReLU, numpy -------------------------------------------------------------


def init_params(rng: np.random.Generator, hidden: int) -> Params:
    """torch.nn.Linear's default: weights and biases uniform in +-1/sqrt(fan_in)."""
    params: Params = {}
    for i, (fan_in, fan_out) in enumerate([(4, hidden), (hidden, hidden), (hidden, 2)], 1):
        bound = 1 / math.sqrt(fan_in)
        params[f"w{i}"] = rng.uniform(-bound, bound, (fan_in, fan_out)).astype(np.float32)
        params[f"b{i}"] = rng.uniform(-bound, bound, fan_out).astype(np.float32)
    return params


def _forward(params: Params, obs: Array) -> tuple[Array, Array, Array]:
    h1 = np.maximum(obs @ params["w1"] + params["b1"], 0)
    h2 = np.maximum(h1 @ params["w2"] + params["b2"], 0)
    return h1, h2, h2 @ params["w3"] + params["b3"]


def q_values(params: Params, obs: Array) -> Array:
    """Q(s, .) for a batch of observations: shape (n, 2)."""
    return _forward(params, obs)[2]


def td_loss_and_grads(params: Params, target: Params, batch: Batch, gamma: float) -> tuple[float, Params]:
    """The Huber loss (delta 1, mean over the batch) of Q(s, a) against r + gamma * max Q_target(s', .) for
    non-terminal s', and its gradient with respect to `params` (the target is a constant)."""
    obs, actions, rewards, next_obs, terminated = batch
    h1, h2, q = _forward(params, obs)
    y = rewards + gamma * q_values(target, next_obs).max(axis=1) * (1 - terminated)
    rows = np.arange(len(actions))
    error = q[rows, actions] - y
    loss = float(np.mean(np.where(np.abs(error) <= 1, 0.5 * error**2, np.abs(error) - 0.5)))
    d_q = np.zeros_like(q)
    d_q[rows, actions] = np.clip(error, -1, 1) / len(actions)  # Huber's derivative, over the mean
    d_h2 = (d_q @ params["w3"].T) * (h2 > 0)
    d_h1 = (d_h2 @ params["w2"].T) * (h1 > 0)
    grads = {
        "w1": obs.T @ d_h1,
        "b1": d_h1.sum(axis=0),
        "w2": h1.T @ d_h2,
        "b2": d_h2.sum(axis=0),
        "w3": h2.T @ d_q,
        "b3": d_q.sum(axis=0),
    }
    return loss, grads


class Replay:
    """A ring of transitions in numpy arrays; sampled uniformly, with replacement."""

    def __init__(self, capacity: int) -> None:
        self.obs = np.zeros((capacity, 4), np.float32)
        self.next_obs = np.zeros((capacity, 4), np.float32)
        self.actions = np.zeros(capacity, np.int64)
        self.rewards = np.zeros(capacity, np.float32)
        self.terminated = np.zeros(capacity, np.float32)
        self.capacity, self.size, self.at = capacity, 0, 0

    def add(self, obs: Array, action: int, reward: float, next_obs: Array, terminated: bool) -> None:
        i = self.at
        self.obs[i], self.actions[i], self.rewards[i] = obs, action, reward
        self.next_obs[i], self.terminated[i] = next_obs, terminated
        self.at, self.size = (i + 1) % self.capacity, min(self.size + 1, self.capacity)

    def sample(self, rng: np.random.Generator, n: int) -> Batch:
        i = rng.integers(0, self.size, n)
        return self.obs[i], self.actions[i], self.rewards[i], self.next_obs[i], self.terminated[i]


# -- one actor -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Episode:
    """One finished episode: whose, its return and length, and when: the environment steps all actors had
    taken by then, wall seconds since the run began, and the session's step."""

    actor: int
    ret: float
    length: int
    env_steps: int
    time: float  # time.time() when it ended; a Run holds them as seconds since its start
    step: int


@dataclass
class Log:
    """What an actor sends back at its end: per answered step, the session's step, the lr the service
    reported (the next step's) and the staleness it applied the gradient with; and its counts."""

    actor: int
    steps: list[int] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    staleness: list[int] = field(default_factory=list)
    dropped: int = 0
    env_steps: int = 0


def solved_at(returns: Sequence[float]) -> int | None:
    """How many episodes it took until the mean of the last `WINDOW` first reached `SOLVED`, or None."""
    sums = np.concatenate([[0.0], np.cumsum(returns)])
    ends = np.arange(WINDOW, len(returns) + 1)
    reached = np.flatnonzero((sums[ends] - sums[ends - WINDOW]) / WINDOW >= SOLVED)
    return int(ends[reached[0]]) if len(reached) else None


def _share(total: int, actor: int, actors: int) -> int:
    """Actor `actor`'s part of `total` split over `actors` (the first ones take the remainder)."""
    return total // actors + (actor < total % actors)


class Actor:
    """One actor: its environment, replay memory, exploration schedule and random stream, seeded from the
    run's seed and its index. It acts with the parameters the session last answered and sends the gradient
    of its TD loss on a batch of its own memory every `train_every` of its steps."""

    def __init__(self, config: Config, actor: int, actors: int, seed: int) -> None:
        self.config, self.actor, self.actors = config, actor, actors
        self.budget = _share(config.budget, actor, actors)
        self.learning_starts = max(config.batch, _share(config.learning_starts, actor, actors))
        self.eps_steps = max(1, _share(config.eps_steps, actor, actors))
        self.rng = np.random.default_rng([seed, actor])
        self.env_seed = int(self.rng.integers(2**31))
        self.replay = Replay(self.budget)  # the whole run: see Config

    def epsilon(self, t: int) -> float:
        end = self.config.eps_end
        return max(end, 1.0 - (1.0 - end) * t / self.eps_steps)

    def run(
        self,
        worker: optserve.Worker,
        counts: Array,
        report: Callable[[Episode], None],
        stop: Callable[[], bool],
    ) -> Log:
        """Play and learn until this actor's share of the budget is spent or `stop()` says the run is solved
        (asked at the end of each episode). `counts[actor]` is kept at this actor's environment steps, so
        that an episode can say how many all actors had taken."""
        config, rng = self.config, self.rng
        params = worker.params if worker.params is not None else worker.session.params()
        target, synced = params, worker.at_step // config.target_every
        log = Log(self.actor)
        returns: deque[float] = deque(maxlen=WINDOW)
        env = gymnasium.make(ENV_ID)
        try:
            obs, _ = env.reset(seed=self.env_seed)
            episode_return, episode_start = 0.0, 0
            for t in range(self.budget):
                if t < self.learning_starts or rng.random() < self.epsilon(t):
                    action = int(rng.integers(2))
                else:
                    action = int(np.argmax(q_values(params, obs[None])[0]))
                next_obs, reward, terminated, truncated, _ = env.step(action)
                self.replay.add(obs, action, float(reward), next_obs, bool(terminated))
                episode_return += float(reward)
                obs = next_obs
                counts[self.actor] = t + 1
                if terminated or truncated:
                    ended = Episode(
                        self.actor,
                        episode_return,
                        t + 1 - episode_start,
                        int(counts.sum()),
                        time.time(),
                        worker.at_step,
                    )
                    report(ended)
                    returns.append(episode_return)
                    # One actor's own episodes are all of its run's: it stops itself, at the same episode
                    # on every run, which keeps the run reproducible; several are told by `stop`.
                    if stop() or (self.actors == 1 and solved_at(returns) is not None):
                        break
                    obs, _ = env.reset()
                    episode_return, episode_start = 0.0, t + 1
                if t >= self.learning_starts and (t - self.learning_starts) % config.train_every == 0:
                    batch = self.replay.sample(rng, config.batch)
                    loss, grads = td_loss_and_grads(params, target, batch, config.gamma)
                    result = worker.step(grads, loss=loss)
                    if result is None:  # too stale: refused; the worker fetched the session's parameters
                        assert worker.params is not None
                        params = worker.params
                    else:
                        params = result.params
                        log.steps.append(result.step)
                        log.lrs.append(result.lr[0])
                        log.staleness.append(result.staleness)
                    if worker.at_step // config.target_every > synced:
                        target, synced = params, worker.at_step // config.target_every
        finally:
            env.close()
        log.dropped, log.env_steps = worker.dropped, int(counts[self.actor])
        return log


@dataclass(frozen=True)
class Job:
    """What an actor process needs to join a run (picklable: it crosses to a spawned process)."""

    url: str
    api_key: str | None
    session_id: str
    actor: int
    actors: int
    config: Config
    seed: int


def _act(job: Job, messages: Any, counts_buffer: Any, go: Any, stop: Any) -> None:
    """An actor process: joins the session, says it is ready and waits for `go` (every actor's clock starts
    together, after their imports), plays, and reports each episode and at its end its log (or its
    traceback) on `messages`."""
    try:
        counts = np.frombuffer(counts_buffer, dtype=np.int64)
        actor = Actor(job.config, job.actor, job.actors, job.seed)
        with optserve.Client(job.url, api_key=job.api_key) as client:
            worker = optserve.Worker(client.get_session(job.session_id), f"actor-{job.actor}")
            worker.params = worker.session.params()  # before anyone steps: every actor starts at step 0
            messages.put(("ready", job.actor))
            go.wait()
            if stop.is_set():  # the run was called off before it began
                return
            log = actor.run(worker, counts, lambda e: messages.put(("episode", e)), stop.is_set)
        messages.put(("done", log))
    except BaseException:
        messages.put(("error", (job.actor, traceback.format_exc())))


# -- a run: one optimizer, 1 or N actors, one session --------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One optimizer played by `actors` actors through one session."""

    optimizer: str
    actors: int
    lr: float  # the optimizer's peak lr
    episodes: list[Episode]  # in the order they ended; `time` in seconds since the run's start
    steps: list[int]  # the session's step after each answered gradient, sorted
    lrs: list[float]  # the lr the service reported with that step (the next step's)
    initial_lr: float  # the lr before the first step (the warm-up's start)
    solved: int | None  # episodes it took to solve, or None
    env_steps: int  # taken by all actors
    seconds: float
    dropped: int
    mean_staleness: float
    max_staleness: int

    @property
    def label(self) -> str:
        return f"{self.optimizer}, {self.actors} actor{'s' * (self.actors != 1)}"

    @property
    def returns(self) -> list[float]:
        return [e.ret for e in self.episodes]

    @property
    def solved_episode(self) -> Episode | None:
        return self.episodes[self.solved - 1] if self.solved is not None else None

    @property
    def best_mean(self) -> float:
        """The best mean of `WINDOW` consecutive episodes (of all there were, when fewer)."""
        means = trailing_mean(self.returns, WINDOW)[min(WINDOW, len(self.episodes)) - 1 :]
        return float(means.max()) if len(means) else 0.0

    @property
    def steps_per_second(self) -> float:
        return self.env_steps / self.seconds if self.seconds > 0 else 0.0


class ActorFailed(RuntimeError):
    """An actor process raised, or died without a word; the message carries what it reported."""


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    """Actor processes started inside get one BLAS/OpenMP thread each: the matrices are small, and on a
    machine with few cores the actors and the server need them more than a threaded matmul does."""
    names = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(dict.fromkeys(names, "1"))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def train(
    urls: Sequence[str],
    api_key: str | None,
    label: str,
    actors: int,
    config: Config,
    seed: int = 0,
    staleness_lr: str = "inverse",
    progress: bool = False,
) -> Run:
    """One optimizer, `actors` actor processes on one session (actor i talks to `urls[i % len(urls)]`, e.g.
    replicas of one Redis-backed service). One actor steps a plain session; several, a session that
    applies each gradient on arrival with bounded staleness."""
    optimizer = dict(OPTIMIZERS[label])
    aggregation = None
    if actors > 1:
        aggregation = {"mode": "async", "max_staleness": 2 * actors, "staleness_lr": staleness_lr}
    context = multiprocessing.get_context("spawn")
    messages: Any = context.Queue()
    counts_buffer = context.RawArray("q", actors)
    go, stop = context.Event(), context.Event()
    with optserve.Client(urls[0], api_key=api_key) as client:
        session = client.create_session(
            init_params(np.random.default_rng(seed), config.hidden),
            optimizer,
            config.scheduler(),
            clip_grad_norm=config.clip_grad_norm,
            aggregation=aggregation,
            metadata={"demo": "cartpole", "optimizer": label, "actors": str(actors)},
        )
        processes = [
            context.Process(
                target=_act,
                args=(
                    Job(urls[i % len(urls)], api_key, session.id, i, actors, config, seed),
                    messages,
                    counts_buffer,
                    go,
                    stop,
                ),
                daemon=True,
            )
            for i in range(actors)
        ]
        description = f"CartPole, {label}, {actors} actor{'s' * (actors != 1)}"
        try:
            with _one_blas_thread():
                for p in processes:
                    p.start()
            for _ in processes:
                _receive(messages, processes, set())  # "ready": imported, connected, parameters fetched
            go.set()
            origin = time.time()
            with tqdm(total=config.budget, desc=description, unit="step", disable=not progress) as bar:
                episodes, logs = _collect(messages, processes, stop, bar)
            end = time.time()
        finally:
            stop.set()
            go.set()
            for p in processes:
                if p.pid is not None:  # started
                    p.join(timeout=30)
                    if p.is_alive():
                        p.kill()
            with contextlib.suppress(optserve.OptserveError):  # the server may be what failed
                session.delete()
    episodes.sort(key=lambda e: e.time)
    episodes = [Episode(e.actor, e.ret, e.length, e.env_steps, e.time - origin, e.step) for e in episodes]
    answered = sorted(
        (step, lr, stale)
        for log in logs
        for step, lr, stale in zip(log.steps, log.lrs, log.staleness, strict=True)
    )
    staleness = [s for _, _, s in answered]
    return Run(
        label,
        actors,
        optimizer["lr"],
        episodes,
        [s for s, _, _ in answered],
        [lr for _, lr, _ in answered],
        session.info.lr[0],
        solved_at([e.ret for e in episodes]),
        sum(log.env_steps for log in logs),
        end - origin,
        sum(log.dropped for log in logs),
        float(np.mean(staleness)) if staleness else 0.0,
        max(staleness, default=0),
    )


def _receive(messages: Any, processes: Sequence[Any], finished: set[int]) -> tuple[str, Any]:
    """The next message of the actors; ActorFailed when one reported a failure, or when one that had not
    finished (`finished`: the indexes of those that said "done") exited without a word, e.g. killed."""
    while True:
        try:
            kind, body = messages.get(timeout=1.0)
        except queue.Empty:
            gone = {i: p.exitcode for i, p in enumerate(processes) if i not in finished and not p.is_alive()}
            if gone:
                raise ActorFailed(
                    f"actor processes exited without a word (index: exit code): {gone}"
                ) from None
            continue
        if kind == "error":
            actor, text = body
            raise ActorFailed(f"actor {actor} failed:\n{text}")
        return kind, body


def _collect(
    messages: Any, processes: Sequence[Any], stop: Any, bar: tqdm[Any]
) -> tuple[list[Episode], list[Log]]:
    """The episodes as they end (setting `stop` once the last `WINDOW` of them are solved) and every
    actor's log at its end."""
    episodes: list[Episode] = []
    logs: list[Log] = []
    recent: deque[float] = deque(maxlen=WINDOW)
    counted = 0
    while len(logs) < len(processes):
        kind, body = _receive(messages, processes, {log.actor for log in logs})
        if kind == "episode":
            episodes.append(body)
            recent.append(body.ret)
            if len(recent) == WINDOW and sum(recent) / WINDOW >= SOLVED:
                stop.set()
            bar.update(max(0, body.env_steps - counted))
            counted = max(counted, body.env_steps)
            bar.set_postfix(mean100=f"{sum(recent) / len(recent):.0f}", refresh=False)
        elif kind == "done":
            logs.append(body)
    return episodes, logs


def run(
    urls: Sequence[str],
    api_key: str | None,
    actors: int,
    config: Config,
    seed: int = 0,
    staleness_lr: str = "inverse",
    progress: bool = False,
    optimizers: Sequence[str] = tuple(OPTIMIZERS),
) -> list[Run]:
    """Every optimizer with one actor, then (when `actors` > 1) with `actors`, one session each."""
    counts = [1] if actors == 1 else [1, actors]
    return [
        train(urls, api_key, label, n, config, seed, staleness_lr, progress)
        for label in optimizers
        for n in counts
    ]


# -- what a run shows ------------------------------------------------------------------------------------

COLUMNS = (
    "optimizer",
    "actors",
    "solved at episode",
    "env steps",
    "seconds",
    "best mean100",
    "episodes",
    "env steps/s",
    "opt steps",
    "staleness",
    "dropped",
)


def rows(runs: Sequence[Run]) -> list[tuple[str, ...]]:
    """One row per run: where it was solved (episodes, environment steps, wall seconds: "-" when it was not),
    the best 100-episode mean, what it ran, and the staleness its gradients were applied with."""
    out: list[tuple[str, ...]] = []
    for r in runs:
        hit = r.solved_episode
        where = (str(r.solved), f"{hit.env_steps:,}", f"{hit.time:.0f}") if hit else ("-", "-", "-")
        out.append(
            (
                r.optimizer,
                str(r.actors),
                *where,
                f"{r.best_mean:.0f}",
                str(len(r.episodes)),
                f"{r.steps_per_second:.0f}",
                f"{r.steps[-1] if r.steps else 0:,}",
                f"{r.mean_staleness:.2f} (max {r.max_staleness})",
                str(r.dropped),
            )
        )
    return out


def table(runs: Sequence[Run], markdown: bool = False) -> str:
    """The runs as aligned text, or as a Markdown table."""
    body = rows(runs)
    if markdown:
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])
    everything = [COLUMNS, *body]
    widths = [max(len(row[i]) for row in everything) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in everything
    )


def verdict(runs: Sequence[Run], config: Config) -> str:
    """Which runs solved CartPole and how fast, which did not, and what the extra actors gained."""
    lines = []
    for r in runs:
        hit = r.solved_episode
        if hit is None:
            lines.append(
                f"{r.label}: not solved within {config.budget:,} steps (best {WINDOW}-episode mean "
                f"{r.best_mean:.0f})."
            )
        else:
            lines.append(
                f"{r.label}: solved after {r.solved} episodes, {hit.env_steps:,} environment steps, "
                f"{hit.time:.0f} s."
            )
    singles = {r.optimizer: r for r in runs if r.actors == 1}
    for many in (r for r in runs if r.actors > 1 and r.optimizer in singles):
        one = singles[many.optimizer]
        gain = many.steps_per_second / one.steps_per_second if one.steps_per_second else math.nan
        line = (
            f"{many.optimizer}: {many.actors} actors took {many.steps_per_second:.0f} environment steps/s "
            f"against {one.steps_per_second:.0f} for one ({gain:.2f}x)"
        )
        if one.solved_episode and many.solved_episode:
            line += f"; solved in {many.solved_episode.time:.0f} s against {one.solved_episode.time:.0f} s"
        lines.append(line + ".")
    return "\n".join(textwrap.fill(line, WIDTH) for line in lines)


def plot(runs: Sequence[Run], out: Path) -> None:
    """Episode return and its 100-episode mean against environment steps and against wall time (one
    actor), the lr the service reported against the optimizer step, and one actor against N over wall time."""
    many = [r for r in runs if r.actors > 1]
    figure = Figure(figsize=(14, 9) if many else (18, 4.5), layout="constrained")
    axes = list(figure.subplots(2, 2).flat) if many else list(figure.subplots(1, 3))
    by_steps, by_time, lr_axes = axes[:3]
    for r in (r for r in runs if r.actors == 1):
        color = COLORS.get(r.optimizer)
        steps = [e.env_steps for e in r.episodes]
        seconds = [e.time for e in r.episodes]
        mean = trailing_mean(r.returns, WINDOW)
        for ax, x in ((by_steps, steps), (by_time, seconds)):
            ax.plot(x, r.returns, color=color, alpha=0.2, linewidth=0.6)
            ax.plot(x, mean, color=color, label=f"{r.optimizer} (lr {r.lr:g})")
    for r in runs:
        style = "-" if r.actors == 1 else "--"
        lr_axes.plot([0, *r.steps], [r.initial_lr, *r.lrs], color=COLORS.get(r.optimizer), linestyle=style)
        lr_axes.plot([], [], color=COLORS.get(r.optimizer), linestyle=style, label=r.label)
    by_steps.set(title="episode return (faint) and its 100-episode mean, 1 actor", xlabel="environment steps")
    by_time.set(title="the same against wall time", xlabel="seconds")
    lr_axes.set(
        title="lr the service reported (linear warm-up, then cosine)",
        xlabel="optimizer steps (the session's)",
        ylabel="lr of the next step",
        yscale="log",
    )
    if many:
        versus = axes[3]
        for r in runs:
            versus.plot(
                [e.time for e in r.episodes],
                trailing_mean(r.returns, WINDOW),
                color=COLORS.get(r.optimizer),
                linestyle="-" if r.actors == 1 else "--",
                label=r.label,
            )
        versus.set(
            title=f"1 actor (solid) against {many[0].actors} (dashed) on one session",
            xlabel="seconds",
            ylabel="mean return of the last 100 episodes",
        )
    for ax in (by_steps, by_time, *axes[3:]):
        ax.axhline(SOLVED, color="gray", linestyle=":", label=f"solved ({SOLVED:g})")
        ax.set_ylim(0, 520)
        ax.set_ylabel(ax.get_ylabel() or "return")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    lr_axes.set_ylim(bottom=1e-3 * min(r.lr for r in runs))  # annealing to 0 would stretch the log axis
    figure.suptitle(
        "optserve demo: a DQN agent on CartPole-v1 whose Q-network is trained through the service"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)


# -- `optserve demo --task cartpole` -------------------------------------------------------------------------


def header(urls: Sequence[str], local: bool, actors: int, config: Config, staleness_lr: str) -> str:
    where = "a server of its own on a temporary memory store" if local else "the server"
    many = (
        f", then by {actors} actor processes on one session (asynchronous, at most {2 * actors} steps stale, "
        f"staleness_lr {staleness_lr})"
        if actors > 1
        else ""
    )
    text = (
        f"optserve demo --task cartpole: a DQN agent on {ENV_ID} whose {config.hidden}x{config.hidden} "
        f"Q-network is trained through {where} at {', '.join(urls)}, with {', '.join(OPTIMIZERS)}, each "
        f"under a linear warm-up then cosine schedule; each played by 1 actor{many}. A run stops when the "
        f"mean return of {WINDOW} consecutive episodes reaches {SOLVED:g}, or after {config.budget:,} "
        "environment steps."
    )
    return f"{textwrap.fill(text, WIDTH)}\nWatch the runs live on the dashboard: {urls[0].rstrip('/')}/ui/\n"


def main(args: Any, start: float) -> int:
    """`optserve demo --task cartpole`: the runs, the table, what they say, and the plot. `args` is the demo's
    argparse namespace (url, api_key, actors, staleness_lr, budget, seed, quick, out, no_progress)."""
    config = Config(budget=args.budget or (10_000 if args.quick else Config.budget))
    out = args.out if args.out != CLASSIC_OUT else DEFAULT_OUT
    try:
        with contextlib.ExitStack() as stack:
            urls = args.url.split(",") if args.url else [stack.enter_context(local_server(store="memory://"))]
            with optserve.Client(urls[0], api_key=args.api_key) as client:
                client.optimizers()  # a wrong --url or key fails here, before the header promises a run
            print(header(urls, args.url is None, args.actors, config, args.staleness_lr), flush=True)
            runs = run(
                urls,
                args.api_key,
                args.actors,
                config,
                args.seed,
                args.staleness_lr,
                progress=not args.no_progress,
            )
    except (optserve.OptserveError, ServerStartError, ActorFailed) as error:
        hint = " (give the key with --api-key)" if isinstance(error, optserve.Unauthorized) else ""
        print(f"optserve demo: {error}{hint}", file=sys.stderr)
        return 1
    plot(runs, out)
    print(table(runs))
    print()
    print(verdict(runs, config))
    print(f"Plot of the returns, the lr and 1 actor against {args.actors}: {out}")
    print(f"Done in {time.perf_counter() - start:.0f} s.")
    return 0
