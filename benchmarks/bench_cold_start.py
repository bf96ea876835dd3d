"""Time from the first call to the first result on a new endpoint, and per extra worker.

For the local provider, with workers forked from the template process (the default) and,
as the reference in the same run, with fresh interpreters (``fast_start=False``):

- first call: from ``await f()`` on a new endpoint (no dependencies) to its result;
- each later worker: start-to-ready time of the workers the pool adds when calls queue up
  (``workersMax`` workers, one job slot each).

Targets (issue "Benchmarks"): first worker under 1 s; each later worker under 100 ms.

Run: ``python benchmarks/bench_cold_start.py [-n WORKERS] [--json]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from typing import Any

import anyio

from flash_actors import CpuLiveServerless, remote, runtime
from flash_actors.providers.local import LocalProvider


async def measure(fast_start: bool, workers: int) -> dict[str, Any]:
    name = f"bench-cold-{'fork' if fast_start else 'spawn'}"
    config = CpuLiveServerless(name=name, workersMax=workers, idleTimeout=300)

    @remote(config)
    def hold(seconds: float) -> int:
        import os
        import time

        time.sleep(seconds)
        return os.getpid()

    with tempfile.TemporaryDirectory() as state:
        provider = LocalProvider(state_dir=state, batch_size=1, fast_start=fast_start)
        async with runtime(provider=provider):
            started = time.perf_counter()
            await hold(0)
            first = time.perf_counter() - started
            async with anyio.create_task_group() as tg:
                for _ in range(workers * 2):
                    tg.start_soon(hold, 0.5)
            pool = provider.pools[name]
            later = pool.start_seconds[1:]
    return {
        "mode": "template fork" if fast_start else "fresh interpreter",
        "first_call_s": first,
        "later_workers": len(later),
        "later_worker_median_s": statistics.median(later) if later else None,
        "later_worker_max_s": max(later) if later else None,
    }


async def main_async(workers: int) -> list[dict[str, Any]]:
    return [await measure(True, workers), await measure(False, workers)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=4, help="workersMax of the endpoint")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args()
    rows = anyio.run(main_async, args.n)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(
        f"{'mode':<20}{'first call':>12}{'later workers':>15}{'median':>10}{'max':>10}"
    )
    for r in rows:
        median = r["later_worker_median_s"]
        peak = r["later_worker_max_s"]
        print(
            f"{r['mode']:<20}{r['first_call_s'] * 1e3:>10.0f}ms{r['later_workers']:>15}"
            f"{(median or 0) * 1e3:>8.0f}ms{(peak or 0) * 1e3:>8.0f}ms"
        )
    fork, spawn = rows
    if fork["later_worker_median_s"] and spawn["later_worker_median_s"]:
        ratio = spawn["later_worker_median_s"] / fork["later_worker_median_s"]
        print(
            f"later workers: template fork is {ratio:.1f}x faster than a fresh interpreter"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
