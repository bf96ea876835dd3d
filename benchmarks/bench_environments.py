"""Dependency environments: a large package installed once, then shared by a second list.

With an empty cache root (a temporary ``FLASH_CACHE_DIR``), through
`flash_actors.worker.installer.ensure_environment`, the installer the library picks (uv, or pip
with ``FLASH_INSTALLER=pip``):

- first: an environment for ``[PACKAGE...]`` (default ``scipy``, which brings numpy), the
  packages downloaded and unpacked;
- second: a different list that shares them (``[PACKAGE..., EXTRA]``, default extra ``idna``);
  target: under 10% of the first, and no second copy on disk;
- warm: the first list again in a new process, the environment already there.

Each is printed in seconds and as a ratio to the first, with the bytes on disk each adds
(files counted once per inode, so hard links to uv's cache cost nothing). The first's time
includes the download, so it depends on the network as much as on this machine.

Run: ``python benchmarks/bench_environments.py [--package scipy] [--extra idna] [-n 1]
[--json]`` (``--package torch`` is the issue's case: about 5 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from flash_actors.worker.installer import ensure_environment, installer

WARM = """
import sys, time, anyio
from flash_actors.worker.installer import ensure_environment
started = time.perf_counter()
anyio.run(ensure_environment, sys.argv[1:])
print(time.perf_counter() - started)
"""


def disk_bytes(paths: list[Path], seen: set[tuple[int, int]]) -> int:
    """Bytes on disk under ``paths`` not yet in ``seen`` (inodes), adding them to it."""
    total = 0
    for root in paths:
        for folder, _, files in os.walk(root):
            for name in files:
                st = os.lstat(os.path.join(folder, name))
                key = (st.st_dev, st.st_ino)
                if key not in seen:
                    seen.add(key)
                    total += st.st_blocks * 512
    return total


async def timed(deps: list[str]) -> tuple[float, Path]:
    started = time.perf_counter()
    env = await ensure_environment(deps, endpoint="bench")
    assert env is not None
    return time.perf_counter() - started, env


def one_round(packages: list[str], extra: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="flash-bench-env-") as root:
        os.environ["FLASH_CACHE_DIR"] = root
        cache = Path(root) / "uv"
        seen: set[tuple[int, int]] = set()
        first_s, first_env = anyio.run(timed, packages)
        first_bytes = disk_bytes([cache, first_env], seen)
        second_s, second_env = anyio.run(timed, [*packages, extra])
        second_bytes = disk_bytes([cache, second_env], seen)
        warm = subprocess.run(  # noqa: S603 (our own interpreter)
            [sys.executable, "-c", WARM, *packages],
            capture_output=True,
            text=True,
            check=True,
            env=os.environ,
        )
        warm_s = float(warm.stdout.split()[-1])
    return {
        "first_s": first_s,
        "first_bytes": first_bytes,
        "second_s": second_s,
        "second_bytes": second_bytes,
        "warm_s": warm_s,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--package",
        action="append",
        help="the large package(s) (repeatable; default scipy)",
    )
    parser.add_argument("--extra", default="idna", help="what the second list adds")
    parser.add_argument(
        "-n", type=int, default=1, help="rounds, each with an empty cache"
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args()
    packages = args.package or ["scipy"]
    chosen = installer()
    rounds = [one_round(packages, args.extra) for _ in range(args.n)]
    row = {
        key: statistics.median(r[key] for r in rounds)
        for key in ("first_s", "first_bytes", "second_s", "second_bytes", "warm_s")
    }
    row.update(
        installer=chosen.name, packages=packages, extra=args.extra, rounds=args.n
    )
    if args.json:
        print(json.dumps(row, indent=2))
        return 0
    first = row["first_s"]
    label = ", ".join(packages)
    print(
        f"installer: {chosen.name}{f' ({chosen.reason})' if chosen.reason else ''}; "
        f"median of {args.n} round(s), each from an empty cache"
    )
    print(f"{'environment':<44}{'seconds':>10}{'ratio':>9}{'disk added':>14}")
    lines = [
        (f"first: [{label}]", first, row["first_bytes"]),
        (f"second: [{label}, {args.extra}]", row["second_s"], row["second_bytes"]),
        (f"warm start: [{label}], new process", row["warm_s"], None),
    ]
    for name, seconds, size in lines:
        added = f"{size / 1e6:.1f} MB" if size is not None else "-"
        print(f"{name:<44}{seconds:>10.3f}{seconds / first:>9.1%}{added:>14}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
