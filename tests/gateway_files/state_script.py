"""Many gathered remote calls through a daemon, each noting its runs in a file.

``python state_script.py BACKEND LOG N SECONDS``: call ``mark(i)`` for i in 0..N-1 at once;
each run appends ``start i`` and, ``SECONDS`` later, ``end i`` to LOG. Prints JSON: the ids
that completed and the error of each call that failed.
"""

import json
import sys

import anyio

from flash_actors import CpuLiveServerless, remote

cfg = CpuLiveServerless(name="gw-state", workersMax=2)


@remote(resource_config=cfg)
async def mark(i, log, seconds):
    import asyncio

    with open(log, "a") as out:
        out.write(f"start {i}\n")
    await asyncio.sleep(seconds)
    with open(log, "a") as out:
        out.write(f"end {i}\n")
    return i


async def main():
    log, n, seconds = sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    ok, failed = [], {}

    async def one(i):
        try:
            job = await mark(i, log, seconds)
            if job.error:
                failed[i] = job.error
            else:
                ok.append(job.output)
        except Exception as exc:  # noqa: BLE001 (reported, not raised)
            failed[i] = f"{type(exc).__name__}: {exc}"

    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(one, i)
    print(json.dumps({"ok": sorted(ok), "failed": failed}))


anyio.run(main, backend=sys.argv[1])
