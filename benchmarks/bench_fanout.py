"""10,000 small calls gathered at once through an endpoint with workersMax=2, calls per second.

Under asyncio (``asyncio.gather``) and trio (a nursery), against 10,000 Ray tasks gathered
the same way on this machine (``ray`` from the bench extra). Also reports the calling
process's peak RSS and its growth per call in flight. The same fan-out also runs through a
`flash local` daemon (the runtime's client) and through the RunPod provider against a daemon
answering RunPod's protocol only (see ``_daemon_paths``).

Targets (issue "Performance"): the local provider at 10x Ray's calls per second, the daemon at
5x; 4 KB of peak RSS per call in flight.

Run: ``python benchmarks/bench_fanout.py [-n CALLS] [--json] [--no-ray] [--no-daemon]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from typing import Any

import trio
from _daemon_paths import PATHS, daemon_provider
from _ray_reference import ray_session

from flash_actors import CpuLiveServerless, remote, runtime

ENDPOINT = CpuLiveServerless(name="bench-fanout", workersMin=2, workersMax=2)


@remote(ENDPOINT)
async def inc(x: int) -> int:
    return x + 1


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


async def _asyncio(n: int) -> dict[str, Any]:
    async with runtime():
        elapsed, before = await _gathered(n)
    peak = _rss_bytes()  # the process's peak so far: the local path runs first
    return {
        "calls_per_s": n / elapsed,
        "peak_rss_mb": peak / 2**20,
        "bytes_per_call_in_flight": max(0, peak - before) / n,
    }


async def _daemon(n: int, path: str) -> dict[str, Any]:
    async with daemon_provider(path) as provider, runtime(provider=provider):
        elapsed, _ = await _gathered(n)
    return {"calls_per_s": n / elapsed}


async def _gathered(n: int) -> tuple[float, int]:
    """Seconds for ``n`` gathered calls (after a warm-up), and the peak RSS before them."""
    await asyncio.gather(*(inc(i) for i in range(100)))  # workers warm
    before = _rss_bytes()
    start = time.perf_counter()
    results = await asyncio.gather(*(inc(i) for i in range(n)))
    elapsed = time.perf_counter() - start
    assert all(r.status == "COMPLETED" for r in results), results[0].error
    assert [r.output for r in results[:3]] == [1, 2, 3]
    return elapsed, before


async def _trio(n: int) -> dict[str, Any]:
    async with runtime():
        out: list[int] = [0] * n

        async def one(i: int) -> None:
            out[i] = (await inc(i)).output

        async with trio.open_nursery() as nursery:
            for i in range(100):
                nursery.start_soon(one, i)
        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, i)
        elapsed = time.perf_counter() - start
    assert out[:3] == [1, 2, 3]
    return {"calls_per_s": n / elapsed}


async def _ray(n: int) -> dict[str, Any] | None:
    with ray_session() as ray:
        if ray is None:
            return None

        def inc_plain(x: int) -> int:
            return x + 1

        ray_inc: Any = ray.remote(inc_plain)  # the call form: typed with or without ray

        await asyncio.gather(*(ray_inc.remote(i) for i in range(100)))
        start = time.perf_counter()
        await asyncio.gather(*(ray_inc.remote(i) for i in range(n)))
        return {"calls_per_s": n / (time.perf_counter() - start)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=10_000, help="calls gathered at once")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray reference")
    parser.add_argument(
        "--no-daemon", action="store_true", help="skip the flash local paths"
    )
    args = parser.parse_args()
    rows: dict[str, Any] = {
        "asyncio.gather": asyncio.run(_asyncio(args.n)),
        "trio nursery": trio.run(_trio, args.n),
    }
    if not args.no_daemon:
        for path in PATHS:
            rows[f"{path} (flash local)"] = asyncio.run(_daemon(args.n, path))
    if not args.no_ray:
        rows["Ray tasks"] = asyncio.run(_ray(args.n))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for name, row in rows.items():
        if row is None:
            print(f"{name:<22} (not installed)")
            continue
        extra = ""
        if "peak_rss_mb" in row:
            extra = (
                f"  peak RSS {row['peak_rss_mb']:.0f} MB, "
                f"{row['bytes_per_call_in_flight'] / 1024:.1f} KB per call in flight "
                "(target 4 KB)"
            )
        print(f"{name:<22}{row['calls_per_s']:>10.0f} calls/s{extra}")
    if rows.get("Ray tasks"):
        ray = rows["Ray tasks"]["calls_per_s"]
        for name, row in rows.items():
            if row is not None and name != "Ray tasks":
                print(f"{name} vs Ray: {row['calls_per_s'] / ray:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
