"""p50 and p99 of one awaited call, made sequentially, on each path, against a Ray actor call.

Paths: ``local=True`` (in this process, serialization round trip included); the in-process
endpoint (Router -> Endpoint actor -> executor -> reply, no worker process); a warm local
worker over loopback HTTP; a `flash local` daemon through the runtime's client and through
the RunPod provider (``_daemon_paths``); and, as the reference, a Ray actor method call on this machine
(``ray`` from the bench extra). Under the warm worker's figure, its floors measured in the
same run (`_floors`): a bare loopback echo, a hand-written HTTP request to an aiohttp server,
and aiohttp's own client-to-server round trip.

Targets (issue "Benchmarks"): in-process path p50 under 50 us; warm worker p50 at least 3x
faster than the Ray actor call.

Run: ``python benchmarks/bench_call_latency.py [-n CALLS] [--json] [--no-ray]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from _daemon_paths import PATHS, daemon_provider
from _floors import floors
from _ray_reference import ray_session

from flash_actors import CpuLiveServerless, remote, runtime

ENDPOINT = CpuLiveServerless(name="bench-latency", workersMin=1)


@remote(ENDPOINT)
async def inc(x: int) -> int:
    return x + 1


@remote(ENDPOINT, local=True)
async def inc_local(x: int) -> int:
    return x + 1


async def _sample(call: Callable[[int], Awaitable[Any]], n: int) -> dict[str, float]:
    for i in range(min(200, n)):  # warm-up
        await call(i)
    samples = []
    for i in range(n):
        start = time.perf_counter()
        await call(i)
        samples.append(time.perf_counter() - start)
    samples.sort()
    return {
        "p50_us": statistics.median(samples) * 1e6,
        "p99_us": samples[int(len(samples) * 0.99) - 1] * 1e6,
    }


async def _ray(n: int) -> dict[str, float] | None:
    with ray_session() as ray:
        if ray is None:
            return None

        class Counter:
            def inc(self, x: int) -> int:
                return x + 1

        counter_actor: Any = ray.remote(
            Counter
        )  # the call form: typed with or without ray
        actor = counter_actor.remote()

        async def call(x: int) -> Any:
            return await actor.inc.remote(x)

        return await _sample(call, n)


async def run(n: int, with_ray: bool, with_daemon: bool = True) -> dict[str, Any]:
    rows: dict[str, Any] = {"local=True": await _sample(inc_local, n)}
    async with runtime(provider="inprocess"):
        rows["in-process endpoint"] = await _sample(inc, n)
    async with runtime(provider="local"):
        rows["warm local worker"] = await _sample(inc, n)
    async with floors() as round_trips:
        for name, round_trip in round_trips.items():
            rows[name] = await _sample(lambda _: round_trip(), n)
    if with_daemon:
        for path in PATHS:
            async with daemon_provider(path) as provider, runtime(provider=provider):
                rows[f"{path} (flash local)"] = await _sample(inc, n)
    if with_ray:
        rows["Ray actor call"] = await _ray(n)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2000, help="calls per path")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray reference")
    parser.add_argument(
        "--no-daemon", action="store_true", help="skip the flash local paths"
    )
    args = parser.parse_args()
    rows = asyncio.run(run(args.n, not args.no_ray, not args.no_daemon))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'path':<32}{'p50':>12}{'p99':>12}")
    for path, row in rows.items():
        if row is None:
            print(f"{path:<32}{'(not installed)':>24}")
            continue
        print(f"{path:<32}{row['p50_us']:>10.0f}us{row['p99_us']:>10.0f}us")
    ray_row, worker = rows.get("Ray actor call"), rows["warm local worker"]
    floor = rows["floor: raw request -> aiohttp"]["p50_us"]
    print(
        f"warm worker p50 over its floor (a raw request to aiohttp): "
        f"+{worker['p50_us'] - floor:.0f} us ({worker['p50_us'] / floor:.2f}x)"
    )
    if ray_row:
        print(
            f"warm worker p50 vs Ray actor call: {ray_row['p50_us'] / worker['p50_us']:.1f}x faster"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
