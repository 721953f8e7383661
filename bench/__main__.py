"""`make bench` / `python -m bench`: every benchmark in one run, each as ratios against its baseline."""

from __future__ import annotations

import sys

from bench import bench_optim, bench_stores
from bench.common import table


def main() -> int:
    print("## Optimizer update alone (float32, 1 thread), vs torch fused Adam\n")
    print(table(bench_optim.run(), bench_optim.COLUMNS))
    print("\n## Step round trip over loopback HTTP, 1M float32 Adam params, per store\n")
    print(table(bench_stores.run(), ["store", "params", "ms", "vs memory://"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
