"""`optserve demo --workers N [--mode sync|async]`: the digits MLP trained by N worker processes, each on its
shard of the training set, through one session: in synchronous rounds (every round one Adam step on the
mean of the N gradients) and with bounded staleness (every gradient applied on arrival, the lr divided by
1 + its staleness); against one worker alone. It plots the training loss against wall time and against
the samples seen, and prints a table."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import optserve
from optserve.demo import DigitsMLP, trailing_mean

try:
    from matplotlib.figure import Figure
except ImportError as missing:
    raise ImportError(
        f"optserve demo needs matplotlib ({missing}): pip install 'optserve[demo]'"
    ) from missing

DEFAULT_OUT = Path("demo-output/optserve-fleet.png")
ADAM = {"name": "adam", "lr": 0.01}
BATCH = 32


@dataclass(frozen=True)
class Trace:
    """What one configuration did: per applied step (as a worker saw it), the wall time since the start,
    the samples all workers had used by then, and that batch's loss."""

    label: str
    times: list[float]
    samples: list[int]
    losses: list[float]
    final_loss: float
    test_accuracy: float
    dropped: int


def _work(url: str, session_id: str, worker: int, workers: int, epochs: int, queue: Any) -> None:
    """One worker process: its shard, its batches, one gradient per batch from the parameters it holds."""
    task = DigitsMLP(epochs, BATCH)
    shard = np.arange(worker, len(task.x_train), workers)
    rng = np.random.default_rng(worker)
    log: list[tuple[float, int, float]] = []
    with optserve.Client(url) as client:
        me = optserve.Worker(client.get_session(session_id), f"w{worker}")
        params = me.session.params()
        for _ in range(epochs):
            order = rng.permutation(shard)
            for at in range(0, len(order) - BATCH + 1, BATCH):
                chosen = order[at : at + BATCH]
                loss, grads = task.loss_and_grads(params, (task.x_train[chosen], task.y_train[chosen]))
                result = me.step(grads, loss=loss)
                if result is not None:
                    params = result.params
                    log.append((time.time(), result.step, loss))
                else:
                    assert me.params is not None
                    params = me.params
    queue.put((worker, log, me.dropped))


def train(url: str, label: str, workers: int, aggregation: dict[str, Any] | None, epochs: int) -> Trace:
    task = DigitsMLP(epochs, BATCH)
    with optserve.Client(url) as client:
        session = client.create_session(task.init_params(), ADAM, aggregation=aggregation)
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        processes = [
            context.Process(target=_work, args=(url, session.id, w, workers, epochs, queue))
            for w in range(workers)
        ]
        for p in processes:
            p.start()
        reports = [queue.get(timeout=600) for _ in processes]
        for p in processes:
            p.join(timeout=60)
        params = session.params()
        session.delete()
    # every applied step, when its answer came, with the loss of its batch (a round's: the mean of its
    # workers' losses, as the server records it)
    seen: dict[int, list[tuple[float, float]]] = {}
    for _, log, _ in reports:
        for t, step, loss in log:
            seen.setdefault(step, []).append((t, loss))
    steps = sorted(seen)
    # wall time from the first answer of the run (the workers' processes start one after the other)
    origin = min(t for step in steps for t, _ in seen[step])
    per_step = workers * BATCH if aggregation is not None and aggregation["mode"] == "sync" else BATCH
    final_loss, accuracy = task.evaluate(params)
    return Trace(
        label,
        [min(t for t, _ in seen[step]) - origin for step in steps],
        [step * per_step for step in steps],
        [float(np.mean([loss for _, loss in seen[step]])) for step in steps],
        final_loss,
        accuracy or 0.0,
        sum(dropped for _, _, dropped in reports),
    )


def run(url: str, workers: int, modes: Sequence[str], epochs: int) -> list[Trace]:
    configurations: list[tuple[str, int, dict[str, Any] | None]] = [("1 worker", 1, None)]
    if "sync" in modes:
        configurations.append(
            (f"{workers} workers, sync rounds", workers, {"mode": "sync", "workers": workers})
        )
    if "async" in modes:
        staleness = {"mode": "async", "max_staleness": 2 * workers, "staleness_lr": "inverse"}
        configurations.append((f"{workers} workers, async", workers, staleness))
    return [train(url, label, n, aggregation, epochs) for label, n, aggregation in configurations]


def table(traces: Sequence[Trace]) -> str:
    heads = ("steps", 7), ("seconds", 9), ("samples", 9), ("final loss", 12), ("test acc", 10), ("dropped", 9)
    lines = [f"{'configuration':<26}" + "".join(f"{h:>{w}}" for h, w in heads)]
    for t in traces:
        lines.append(
            f"{t.label:<26}{len(t.losses):>7}{t.times[-1]:>9.1f}{t.samples[-1]:>9}{t.final_loss:>12.4f}"
            f"{t.test_accuracy:>10.1%}{t.dropped:>9}"
        )
    return "\n".join(lines)


def plot(traces: Sequence[Trace], out: Path) -> None:
    figure = Figure(figsize=(12, 4.5), layout="constrained")
    by_time, by_samples = figure.subplots(1, 2)
    for t in traces:
        smoothed = trailing_mean(t.losses, 20)
        by_time.plot(t.times, smoothed, label=t.label)
        by_samples.plot(t.samples, smoothed, label=t.label)
    by_time.set(title="training loss against wall time", xlabel="seconds", ylabel="loss (mean of 20 steps)")
    by_samples.set(title="training loss against samples seen", xlabel="training samples used", ylabel="loss")
    for ax in (by_time, by_samples):
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    figure.suptitle("optserve demo: the digits MLP trained by a fleet of workers through one session (Adam)")
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
