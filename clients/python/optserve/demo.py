"""`optserve demo`: SGD+momentum, Adagrad, Adadelta, RMSprop and Adam compared on linear regression and a
small MLP on handwritten digits, each run in its own server session that holds the parameters."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import math
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

import optserve

try:
    from matplotlib.figure import Figure
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from tqdm import tqdm
except ImportError as missing:  # the SDK installs without them; a bare traceback would not say what to do
    raise ImportError(
        f"optserve demo needs scikit-learn, matplotlib and tqdm ({missing}): pip install 'optserve[demo]'"
    ) from missing

Array = NDArray[Any]
Params = dict[str, Array]
Batch = tuple[Array, Array]

# Every optimizer at torch's defaults except lr (per task, below); momentum is what makes SGD competitive.
OPTIMIZERS: dict[str, dict[str, Any]] = {
    "SGD+momentum": {"name": "sgd", "momentum": 0.9},
    "Adagrad": {"name": "adagrad"},
    "Adadelta": {"name": "adadelta"},
    "RMSprop": {"name": "rmsprop"},
    "Adam": {"name": "adam"},
}
SCHEDULERS = ("cosine", "step", "onecycle", "none")
DEFAULT_OUT = Path("demo-output/optserve-demo.png")
WIDTH = 100  # of the printed text
LINE_STYLES = ("-", "--", "-.", ":", (0, (5, 1)))  # tells apart the lr curves of optimizers with equal lrs


class Task(Protocol):
    title: str
    steps: int  # optimizer steps per run
    lrs: dict[str, float]  # the learning rate of each optimizer on this task
    smoothing: int  # steps averaged in the plotted loss curve
    loss_floor: float | None  # the best loss any optimizer can reach, when it is known

    def init_params(self) -> Params: ...
    def batches(self) -> Iterator[Batch]: ...
    def loss_and_grads(self, params: Params, batch: Batch) -> tuple[float, Params]: ...
    def evaluate(self, params: Params) -> tuple[float, float | None]: ...
    def describe(self) -> str: ...
    def verdict(self, runs: Sequence[Run]) -> str: ...


@dataclass(frozen=True)
class Run:
    """One optimizer on one task, as the server trained it."""

    task: str
    optimizer: str
    lr: float  # the optimizer's lr, before the scheduler
    losses: list[float]  # training loss on the parameters after 0, 1, ... steps, as each step began
    lrs: list[float]  # parameter group 0's lr after 0, 1, ... steps: one more than losses
    params: Params  # the final parameters, as the server answered them
    final_loss: float  # on the whole training set, at the final parameters
    test_accuracy: float | None
    steps_per_s: float  # round trips including computing the gradient here


class LinearRegression:
    """y = 2x + 1 + noise, 256 points, full batch: convex, so every optimizer should end at w = 2, b = 1."""

    title = "linear regression"
    smoothing = 1

    def __init__(self, steps: int) -> None:
        # From a coarse grid (x3 apart); Adadelta's 10 makes up for its tiny first steps (sqrt(eps) each).
        self.lrs = {"SGD+momentum": 0.05, "Adagrad": 0.5, "Adadelta": 10.0, "RMSprop": 0.05, "Adam": 0.1}
        rng = np.random.default_rng(0)
        self.x = rng.uniform(-1, 1, 256).astype(np.float32)
        self.y = (2 * self.x + 1 + 0.1 * rng.standard_normal(256)).astype(np.float32)
        self.steps = steps
        (self.w_best, self.b_best), residual, *_ = np.linalg.lstsq(
            np.stack([self.x, np.ones_like(self.x)], axis=1), self.y
        )
        self.loss_floor: float | None = float(residual[0]) / len(self.x)

    def init_params(self) -> Params:
        return {"w": np.zeros(1, np.float32), "b": np.zeros(1, np.float32)}

    def batches(self) -> Iterator[Batch]:
        return itertools.repeat((self.x, self.y), self.steps)

    def loss_and_grads(self, params: Params, batch: Batch) -> tuple[float, Params]:
        x, y = batch
        err = params["w"] * x + params["b"] - y
        grads = {"w": np.mean(2 * err * x, keepdims=True), "b": np.mean(2 * err, keepdims=True)}
        return float(np.mean(err**2)), grads

    def evaluate(self, params: Params) -> tuple[float, float | None]:
        return self.loss_and_grads(params, (self.x, self.y))[0], None

    def describe(self) -> str:
        return (
            f"{self.title}: y = 2x + 1 + noise, 256 points, full batch, {self.steps} steps. Convex: every "
            "optimizer should find w = 2, b = 1; the question is how fast."
        )

    def verdict(self, runs: Sequence[Run]) -> str:
        target = 1.01 * (self.loss_floor or 0.0)
        reached = {r.optimizer: next((i for i, v in enumerate(r.losses) if v <= target), None) for r in runs}
        arrived = sorted((steps, name) for name, steps in reached.items() if steps is not None)
        missed = [r for r in runs if reached[r.optimizer] is None]
        line = f"{self.title}: least squares gives w = {self.w_best:.3f}, b = {self.b_best:.3f}, loss "
        line += f"{self.loss_floor:.4f} (the noise). "
        if arrived:
            line += f"Within 1% of that loss first: {arrived[0][1]} after {arrived[0][0]} steps"
            line += f", last: {arrived[-1][1]} after {arrived[-1][0]}. " if len(arrived) > 1 else ". "
        if missed:
            fits = ", ".join(f"{r.optimizer} (w = {r.params['w'][0]:.2f})" for r in missed)
            line += f"Not there after {self.steps} steps: {fits}."
        return line.rstrip()


class DigitsMLP:
    """A 64-32-10 tanh network with softmax cross-entropy on scikit-learn's 8x8 digits, in mini-batches."""

    title = "digits MLP"
    loss_floor: float | None = None

    def __init__(self, epochs: int, batch_size: int = 32) -> None:
        # From a coarse grid (x3 apart) for 15 epochs with the cosine schedule.
        self.lrs = {"SGD+momentum": 0.1, "Adagrad": 0.1, "Adadelta": 3.0, "RMSprop": 0.01, "Adam": 0.01}
        images, labels = load_digits(return_X_y=True)
        pixels = (images / 16.0).astype(np.float32)  # the data set's intensities run 0..16
        split = train_test_split(pixels, labels, test_size=0.25, random_state=0, stratify=labels)
        self.x_train, self.x_test, self.y_train, self.y_test = split
        self.epochs, self.batch_size = epochs, batch_size
        self.smoothing = math.ceil(len(self.x_train) / batch_size)
        self.steps = epochs * self.smoothing

    def init_params(self) -> Params:
        rng = np.random.default_rng(0)
        # Scaled by 1/sqrt(fan_in) so that tanh starts out of saturation.
        return {
            "w1": (rng.standard_normal((64, 32)) / 8).astype(np.float32),
            "b1": np.zeros(32, np.float32),
            "w2": (rng.standard_normal((32, 10)) / math.sqrt(32)).astype(np.float32),
            "b2": np.zeros(10, np.float32),
        }

    def batches(self) -> Iterator[Batch]:
        rng = np.random.default_rng(0)  # the same batches in the same order for every optimizer
        for _ in range(self.epochs):
            order = rng.permutation(len(self.x_train))
            for start in range(0, len(order), self.batch_size):
                chosen = order[start : start + self.batch_size]
                yield self.x_train[chosen], self.y_train[chosen]

    def loss_and_grads(self, params: Params, batch: Batch) -> tuple[float, Params]:
        x, labels = batch
        hidden, log_probs = self._forward(params, x)
        rows = np.arange(len(labels))
        # d(mean cross-entropy)/d(logits) = (softmax - one-hot) / batch size
        d_logits = np.exp(log_probs)
        d_logits[rows, labels] -= 1
        d_logits /= len(labels)
        d_hidden = (d_logits @ params["w2"].T) * (1 - hidden**2)  # tanh' = 1 - tanh^2
        grads = {
            "w1": x.T @ d_hidden,
            "b1": d_hidden.sum(axis=0),
            "w2": hidden.T @ d_logits,
            "b2": d_logits.sum(axis=0),
        }
        return float(-log_probs[rows, labels].mean()), grads

    def evaluate(self, params: Params) -> tuple[float, float | None]:
        _, log_probs = self._forward(params, self.x_train)
        _, test_log_probs = self._forward(params, self.x_test)
        loss = float(-log_probs[np.arange(len(self.y_train)), self.y_train].mean())
        return loss, float(np.mean(test_log_probs.argmax(axis=1) == self.y_test))

    def describe(self) -> str:
        return (
            f"{self.title}: 64-32-10 tanh network, softmax cross-entropy, scikit-learn's 8x8 handwritten "
            f"digits ({len(self.x_train)} train / {len(self.x_test)} test), batches of {self.batch_size}, "
            f"{self.epochs} epoch{'s' * (self.epochs != 1)} = {self.steps} steps. Non-convex and noisy: the "
            "classic comparison."
        )

    def verdict(self, runs: Sequence[Run]) -> str:
        accuracy = {r.optimizer: r.test_accuracy or 0.0 for r in runs}
        lowest_loss = min(runs, key=lambda r: r.final_loss)
        return (
            f"{self.title}: highest test accuracy {_tied(accuracy, max)}, lowest {_tied(accuracy, min)}; "
            f"lowest training loss {lowest_loss.optimizer} ({lowest_loss.final_loss:.4f}). One test image "
            f"is {1 / len(self.y_test):.1%}: closer accuracies are a tie."
        )

    @staticmethod
    def _forward(params: Params, x: Array) -> tuple[Array, Array]:
        hidden = np.tanh(x @ params["w1"] + params["b1"])
        logits = hidden @ params["w2"] + params["b2"]
        logits -= logits.max(axis=1, keepdims=True)  # softmax ignores the shift; exp no longer overflows
        return hidden, logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))


def _tied(accuracy: dict[str, float], pick: Callable[[Iterable[float]], float]) -> str:
    """Every optimizer whose accuracy is the one `pick` chooses, and that accuracy."""
    chosen = pick(accuracy.values())
    return f"{', '.join(name for name, a in accuracy.items() if a == chosen)} ({chosen:.1%})"


def scheduler_spec(kind: str, optimizer: dict[str, Any], steps: int) -> dict[str, Any] | None:
    """The `--scheduler` choice as a server scheduler spec spanning a run of `steps` steps."""
    if kind == "cosine":
        return {"name": "cosine_annealing_lr", "T_max": steps}
    if kind == "step":
        return {"name": "step_lr", "step_size": max(1, steps // 3), "gamma": 0.1}
    if kind == "onecycle":
        # Momentum cycling would give RMSprop a momentum it does not have here, and Adagrad and Adadelta
        # have none to cycle (torch refuses them).
        cycle = optimizer["name"] in ("sgd", "adam")
        return {
            "name": "one_cycle_lr",
            "max_lr": optimizer["lr"],
            "total_steps": steps,
            "cycle_momentum": cycle,
        }
    if kind == "none":
        return None
    raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, not {kind!r}")


def train(client: optserve.Client, task: Task, label: str, scheduler: str, progress: bool) -> Run:
    """Train one optimizer on one task: gradients computed here, every update applied by the server."""
    optimizer = {**OPTIMIZERS[label], "lr": task.lrs[label]}
    params = task.init_params()
    session = client.create_session(
        params=params, optimizer=optimizer, scheduler=scheduler_spec(scheduler, optimizer, task.steps)
    )
    losses: list[float] = []
    lrs = [session.info.lr[0]]
    try:
        start = time.perf_counter()
        batches = tqdm(
            task.batches(), total=task.steps, desc=f"{task.title}, {label}", unit="step", disable=not progress
        )
        with batches:
            for batch in batches:
                loss, grads = task.loss_and_grads(params, batch)
                result = session.step(grads, loss=loss)
                params = result.params
                losses.append(loss)
                lrs.append(result.lr[0])
                batches.set_postfix(loss=f"{loss:.4f}", refresh=False)
        elapsed = time.perf_counter() - start
    finally:
        session.delete()
    final_loss, accuracy = task.evaluate(params)
    steps_per_s = len(losses) / elapsed
    return Run(task.title, label, optimizer["lr"], losses, lrs, params, final_loss, accuracy, steps_per_s)


def run(client: optserve.Client, tasks: Sequence[Task], scheduler: str, progress: bool) -> list[Run]:
    """Every optimizer on every task, one server session each, one after the other."""
    return [train(client, task, label, scheduler, progress) for task in tasks for label in OPTIMIZERS]


def server_installed() -> bool:
    """Whether `python -m app.cli serve` can run here: the server is a package apart from this SDK."""
    try:
        return importlib.util.find_spec("app.cli") is not None
    except ModuleNotFoundError:
        return False


class ServerStartError(RuntimeError):
    """The demo's own server did not come up."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_ready(url: str, server: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while server.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=1):
                return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.05)
    raise ServerStartError(f"the local optserve server did not become ready at {url}")


@contextlib.contextmanager
def local_server(timeout: float = 30.0, store: str | None = None) -> Iterator[str]:
    """`optserve serve` on a free port and a temporary SQLite store (or `store`), both gone on exit."""
    with tempfile.TemporaryDirectory(prefix="optserve-demo-") as tmp:
        url = f"http://127.0.0.1:{_free_port()}"
        cmd = [sys.executable, "-m", "app.cli", "serve", "--port", url.rsplit(":", 1)[1]]
        cmd += ["--store", store or f"sqlite:///{tmp}/demo.db", "--log-level", "warning"]
        # The demo's own server ignores OPTSERVE_* settings (API keys, limits) meant for a real deployment.
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPTSERVE_")}
        log = Path(tmp, "server.log")
        with log.open("wb") as out, subprocess.Popen(cmd, stdout=out, stderr=out, env=env) as server:
            try:
                _wait_ready(url, server, timeout)
            except ServerStartError as error:
                server.kill()
                raise ServerStartError(f"{error}; its log:\n{log.read_text()}") from None
            try:
                yield url
            finally:
                server.terminate()
                server.wait(timeout=10)


def header(tasks: Sequence[Task], scheduler: str, url: str, local: bool) -> str:
    where = "a server started here on a temporary SQLite store" if local else "the server"
    intro = (
        f"optserve demo: {', '.join(OPTIMIZERS)}, trained through {where} at {url}. Each run is one "
        "server session: this process computes gradients, the server applies torch.optim's update and "
        "answers with the new parameters. Every optimizer sees the same data, start and batches, with its "
        f"own learning rate per task and the same scheduler: {scheduler}."
    )
    items = [
        textwrap.fill(task.describe(), WIDTH, initial_indent=f"  {i}. ", subsequent_indent="     ")
        for i, task in enumerate(tasks, 1)
    ]
    watch = f"Watch the runs live on the dashboard: {url.rstrip('/')}/ui/"
    return "\n".join([textwrap.fill(intro, WIDTH), *items, watch, ""])


def table(runs: Sequence[Run]) -> str:
    rows = [("task", "optimizer", "final loss", "test acc", "w", "b", "steps/s", "lr", "lr at end")]
    for r in runs:
        accuracy = "-" if r.test_accuracy is None else f"{r.test_accuracy:.1%}"
        w, b = (f"{r.params['w'][0]:.3f}", f"{r.params['b'][0]:.3f}") if "w" in r.params else ("-", "-")
        numbers = (
            f"{r.final_loss:.4f}",
            accuracy,
            w,
            b,
            f"{r.steps_per_s:.0f}",
            f"{r.lr:.3g}",
            f"{r.lrs[-1]:.3g}",
        )
        rows.append((r.task, r.optimizer, *numbers))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    # Names read left-aligned, numbers right-aligned.
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i < 2 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    )


def trailing_mean(values: Sequence[float], window: int) -> Array:
    """Mean of each value and the `window - 1` before it (fewer at the start)."""
    sums = np.concatenate([[0.0], np.cumsum(values)])
    end = np.arange(1, len(values) + 1)
    begin = np.maximum(end - window, 0)
    means: Array = (sums[end] - sums[begin]) / (end - begin)
    return means


def plot(runs: Sequence[Run], tasks: Sequence[Task], scheduler: str, out: Path) -> None:
    """Loss (top, log scale) and learning rate (bottom) against step, one column per task."""
    figure = Figure(figsize=(6 * len(tasks), 8), layout="constrained")
    axes = figure.subplots(2, len(tasks), squeeze=False)
    for column, task in enumerate(tasks):
        loss_axes, lr_axes = axes[0, column], axes[1, column]
        task_runs = [r for r in runs if r.task == task.title]
        for r, style in zip(task_runs, itertools.cycle(LINE_STYLES), strict=False):
            loss_axes.plot(trailing_mean(r.losses, task.smoothing), label=r.optimizer)
            lr_axes.plot(r.lrs, label=r.optimizer, linestyle=style)
        if task.loss_floor is not None:
            loss_axes.axhline(task.loss_floor, color="gray", linestyle="--", label="least squares (noise)")
        averaged = f", mean over an epoch ({task.smoothing} batches)" if task.smoothing > 1 else ""
        loss_axes.set(title=f"{task.title}: training loss", xlabel="steps taken", ylabel=f"loss{averaged}")
        lr_axes.set(
            title=f"{task.title}: learning rate ({scheduler})",
            xlabel="steps taken",
            ylabel="lr of the next step",
        )
        for ax in (loss_axes, lr_axes):
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
        # Annealing to 0 would otherwise stretch the log axis over decades that show nothing.
        lr_axes.set_ylim(bottom=1e-3 * min(r.lr for r in task_runs))
    figure.suptitle(f"optserve demo: five optimizers trained through the service (scheduler: {scheduler})")
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="optserve demo", description=__doc__)
    parser.add_argument(
        "--url",
        help="an optserve server; default: start one on a temporary SQLite store (memory with --task "
        "cartpole). With --task cartpole, several comma-separated (replicas): actor i uses the i-th in turn",
    )
    parser.add_argument("--api-key", help="bearer key, when the server requires one")
    parser.add_argument(
        "--steps", type=_positive, default=300, help="linear-regression steps per optimizer (300)"
    )
    parser.add_argument("--epochs", type=_positive, help="MLP epochs per optimizer (15; 1 with --quick)")
    parser.add_argument("--scheduler", choices=SCHEDULERS, default="cosine", help="applied to every run")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the plot (PNG; {DEFAULT_OUT})")
    parser.add_argument("--quick", action="store_true", help="a very short run, for tests and a first look")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--workers",
        type=_positive,
        help="instead: the MLP trained by this many worker processes through one session, against 1 worker",
    )
    parser.add_argument(
        "--mode", choices=("sync", "async"), help="with --workers: only synchronous rounds, or only async"
    )
    parser.add_argument(
        "--task",
        choices=("classic", "cartpole"),
        default="classic",
        help="classic: linear regression and the digits MLP; cartpole: a DQN agent on CartPole-v1 "
        "(optserve.cartpole)",
    )
    parser.add_argument(
        "--actors",
        type=_positive,
        default=2,
        help="with --task cartpole: each optimizer by 1 actor, then by this many actor processes on one "
        "session (async, bounded staleness); 1: only the single actor (2)",
    )
    parser.add_argument(
        "--staleness-lr",
        choices=("inverse", "none"),
        default="inverse",
        help="with --actors: a gradient k steps stale is applied with the lr divided by 1 + k, or as is",
    )
    parser.add_argument(
        "--budget",
        type=_positive,
        help="with --task cartpole: environment steps per run, unless solved sooner "
        "(200000; 10000 with --quick)",
    )
    parser.add_argument("--seed", type=int, default=0, help="with --task cartpole: seeds every random source")
    return parser.parse_args(argv)


def train_all(args: argparse.Namespace, tasks: Sequence[Task]) -> list[Run]:
    """`run` against `--url`, or against a server of our own for the length of the runs."""
    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(local_server())
        client = stack.enter_context(optserve.Client(url, api_key=args.api_key))
        client.optimizers()  # a wrong --url or key fails here, before the header promises a run
        print(header(tasks, args.scheduler, url, local=args.url is None), flush=True)
        return run(client, tasks, args.scheduler, progress=not args.no_progress)


def report(runs: Sequence[Run], tasks: Sequence[Task], scheduler: str, out: Path) -> str:
    """The table, one line of interpretation per task, and where the plot went."""
    verdicts = [task.verdict([r for r in runs if r.task == task.title]) for task in tasks]
    lines = [table(runs), "", *(textwrap.fill(v, WIDTH) for v in verdicts), ""]
    lines.append(f"Plot of the loss and learning rate of every run ({scheduler}): {out}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.url is None and not server_installed():
        print("optserve demo: no optserve server is installed here; give one with --url.", file=sys.stderr)
        return 2
    start = time.perf_counter()
    if args.task == "cartpole":
        from optserve import cartpole

        return cartpole.main(args, start)
    if args.workers is not None:
        return fleet_main(args, start)
    tasks: list[Task] = [LinearRegression(args.steps), DigitsMLP(args.epochs or (1 if args.quick else 15))]
    try:
        runs = train_all(args, tasks)
    except (optserve.OptserveError, ServerStartError) as error:
        hint = " (give the key with --api-key)" if isinstance(error, optserve.Unauthorized) else ""
        print(f"optserve demo: {error}{hint}", file=sys.stderr)
        return 1
    plot(runs, tasks, args.scheduler, args.out)
    print(report(runs, tasks, args.scheduler, args.out))
    print(f"Done in {time.perf_counter() - start:.0f} s.")
    return 0


def fleet_main(args: argparse.Namespace, start: float) -> int:
    """`--workers N`: the fleet demo (optserve.fleet)."""
    from optserve import fleet

    out = args.out if args.out != DEFAULT_OUT else fleet.DEFAULT_OUT
    modes = [args.mode] if args.mode else ["sync", "async"]
    epochs = args.epochs or (1 if args.quick else 8)
    try:
        with contextlib.ExitStack() as stack:
            url = args.url or stack.enter_context(local_server())
            print(
                f"optserve demo: the digits MLP, {epochs} epochs, 1 worker and {args.workers} workers "
                f"({' and '.join(modes)}) through one session each, at {url}; watch them live at "
                f"{url.rstrip('/')}/ui/",
                flush=True,
            )
            traces = fleet.run(url, args.workers, modes, epochs)
    except (optserve.OptserveError, ServerStartError) as error:
        print(f"optserve demo: {error}", file=sys.stderr)
        return 1
    fleet.plot(traces, out)
    print(fleet.table(traces))
    print(f"Plot of the loss against wall time and against samples seen: {out}")
    print(f"Done in {time.perf_counter() - start:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
