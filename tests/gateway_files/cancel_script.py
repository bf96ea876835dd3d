"""Cancellation and timeouts of @remote calls through a daemon: run where its .flash/ is."""

import json
import sys
from pathlib import Path

import anyio

from flash_actors import CpuLiveServerless, remote

cfg = CpuLiveServerless(name="gw-cancel", executionTimeoutMs=3000)


@remote(resource_config=cfg)
async def slow(folder, seconds):
    import pathlib

    import anyio

    pathlib.Path(folder, "started").write_text("1")
    await anyio.sleep(seconds)
    pathlib.Path(folder, "finished").write_text("1")


async def main():
    folder = Path(sys.argv[2]).resolve()
    with anyio.move_on_after(40) as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(slow, str(folder), 0.5)  # warm the worker first
        async with anyio.create_task_group() as tg:
            (folder / "started").unlink()
            tg.start_soon(slow, str(folder), 0.5)
            while not (folder / "started").exists():
                await anyio.sleep(0.01)
            tg.cancel_scope.cancel()  # the caller leaves: the job must stop on the worker
    timed_out = await slow(str(folder / "t"), 10)  # past executionTimeoutMs=3000
    print(
        json.dumps(
            {
                "hung": scope.cancelled_caught,
                "status": timed_out.status,
                "error": timed_out.error,
            }
        )
    )


anyio.run(main, backend=sys.argv[1])
