"""`python -m bench.cartpole` (`make bench-cartpole`): how many episodes, environment steps and seconds the
DQN agent of `optserve.cartpole` takes to solve CartPole-v1 (a mean return of 475 over 100 consecutive
episodes) with its Q-network trained through the service, per optimizer, with 1 actor and with N actor
processes on one session; rewrites `bench/CARTPOLE.md` and `docs/optserve-cartpole.png`.

Not part of `make bench`: it takes 15-30 minutes on 2 cores. Against a real `optserve serve --store
memory://` on loopback (the store is not what this measures). With one actor a run is reproducible to the
bit; with several, the order in which their gradients arrive depends on timing, and so do the numbers.

Run: `python -m bench.cartpole [--actors 2] [--budget 200000] [--seed 0] [--staleness-lr inverse|none]`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from optserve import cartpole

from bench.common import machine
from tests.system.server import Server

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "CARTPOLE.md"
PLOT = ROOT / "docs" / "optserve-cartpole.png"


def render(
    runs: list[cartpole.Run],
    info: dict[str, str],
    config: cartpole.Config,
    args: argparse.Namespace,
    seconds: float,
) -> str:
    command = f"python -m bench.cartpole --actors {args.actors} --budget {config.budget} --seed {args.seed}"
    command += f" --staleness-lr {args.staleness_lr}"
    optimizers = ", ".join(
        f"{label} ({', '.join(f'{k} {v}' for k, v in spec.items() if k != 'name')})"
        for label, spec in cartpole.OPTIMIZERS.items()
    )
    method = [
        f"The agent: DQN, a 4-{config.hidden}-{config.hidden}-2 ReLU Q-network in numpy, Huber loss on the "
        f"one-step TD target (gamma {config.gamma}; truncation at 500 steps is not terminal), batches of "
        f"{config.batch} from a replay memory that keeps the whole run, one gradient every "
        f"{config.train_every} environment steps of each actor after {config.learning_starts:,} random "
        f"steps, the target network copied from the session's parameters every {config.target_every} "
        f"optimizer steps, epsilon from 1 to {config.eps_end} over the first {config.eps_steps:,} "
        f"environment steps, clip_grad_norm {config.clip_grad_norm} (applied by the service).",
        f"The optimizers, at torch's defaults otherwise: {optimizers}. Each under the service's schedule "
        f"`{config.scheduler()}`: a linear warm-up from 1% of the lr, then cosine annealing to 0 at the end "
        f"of the budget ({config.optimizer_steps:,} optimizer steps).",
        "Solved: the mean return of 100 consecutive training episodes (exploration included) reaches 475; "
        "with N actors, of all actors' episodes in the order they ended. A run stops there, or at "
        f"{config.budget:,} environment steps (over all its actors).",
        f"N actors: {args.actors} processes, each with its own environment, replay memory, exploration and "
        "random stream, sending its gradients through `optserve.Worker` to one session created with "
        f"`aggregation={{'mode': 'async', 'max_staleness': {2 * args.actors}, "
        f"'staleness_lr': '{args.staleness_lr}'}}` (asynchronous one-step Q-learning, Mnih et al. 2016). "
        "Every run's actors, 1 or N, are processes with one BLAS thread each, timed from the moment all "
        "of them are ready (their imports are left out); seconds are wall time, env steps/s over the "
        "whole run.",
        f"Seed {args.seed} for everything: the initial weights, each actor's environment resets and its "
        "generator of exploration and replay samples.",
    ]
    return "\n".join(
        [
            "# CartPole-v1 through optserve",
            "",
            f"`{command}` (`make bench-cartpole`), one run of {seconds / 60:.0f} min. This file is "
            "overwritten.",
            "",
            "## Machine",
            "",
            *[f"- {k}: {v}" for k, v in info.items()],
            "",
            "## Solved at",
            "",
            cartpole.table(runs, markdown=True),
            "",
            "`solved at`: the episode that completed the first 100-episode window with a mean of at least",
            "475, the environment steps of all actors by then, and the wall seconds since the run's start",
            "(`-`: not solved within the budget). `staleness`: the mean (and largest) number of steps the",
            "session had taken between the parameters a gradient was computed from and its arrival;",
            "`dropped`: gradients refused as more than `max_staleness` steps late (their actor caught up and",
            "went on).",
            "",
            *cartpole.verdict(runs, config).splitlines(),
            "",
            f"![returns, lr and 1 actor against {args.actors}](../docs/{PLOT.name})",
            "",
            "## Method",
            "",
            *[f"- {line}" for line in method],
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cartpole", description=__doc__)
    parser.add_argument("--actors", type=int, default=2, help="the many-actor runs' actors (2)")
    parser.add_argument(
        "--budget", type=int, default=cartpole.Config.budget, help="environment steps per run"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--staleness-lr", choices=("inverse", "none"), default="inverse")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results file (default {RESULTS})")
    parser.add_argument("--plot", type=Path, default=PLOT, help=f"the plot (default {PLOT})")
    args = parser.parse_args(argv)
    config = cartpole.Config(budget=args.budget)
    info = machine()
    start = time.perf_counter()
    with Server("memory://") as server:
        runs = cartpole.run(
            [server.url], None, args.actors, config, args.seed, args.staleness_lr, progress=True
        )
    seconds = time.perf_counter() - start
    cartpole.plot(runs, args.plot)
    print(cartpole.table(runs))
    print()
    print(cartpole.verdict(runs, config))
    args.out.write_text(render(runs, info, config, args, seconds))
    print(f"\nwrote {args.out} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
