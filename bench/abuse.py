"""The abuse table: each hostile request of `tests/system/attacks.py` against a real server under
`prlimit --as=4000000000`, with its answer, seconds, peak resident memory over before (the server and its
worker processes) and `/healthz` p99 while it ran (a bystander in another process polls every 10 ms and
steps a small session).

`--source DIR` runs the `app` package of another checkout (e.g. `git worktree add /tmp/before 24fbbc2`), for
the table before a change. Loopback only; every attack is bounded in count and time.

Run: `python -m bench.abuse [--source DIR]`.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.system.attacks import (
    PRLIMIT,
    SERVER_ENV,
    Watch,
    add_latencies,
    process_tree_rss,
    run_attacks,
    table,
)
from tests.system.server import Server


def _commit(source: Path) -> str:
    run = subprocess.run(
        ["git", "-C", str(source), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return run.stdout.strip() or "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=Path.cwd(), help="checkout whose server to attack")
    args = parser.parse_args(argv)
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    with (
        tempfile.TemporaryDirectory() as scratch,
        Server("memory://", env=SERVER_ENV, prefix=PRLIMIT, cwd=args.source.resolve()) as server,
    ):
        with Watch(server, Path(scratch)) as watch:
            base = process_tree_rss(watch.pid)
            results = run_attacks(server, watch)
        alive = server.proc is not None and server.proc.poll() is None
        after = process_tree_rss(watch.pid) - base if alive else 0
    add_latencies(results, watch)
    title = f"abuse table: {_commit(args.source)} on {cpu}"
    print(table(results, title))
    print(
        f"\n/healthz p99 over the whole run: {watch.p99() * 1000:.1f} ms; bystander steps {watch.steps}, "
        f"errors {len(watch.errors)}; resident after, over before: {after / (1 << 20):.0f} MiB"
    )
    for error in watch.errors[:5]:
        print(f"  bystander: {error}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
