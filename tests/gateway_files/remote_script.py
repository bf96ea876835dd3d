"""A Flash-style script for the gateway tests: run it where a daemon's .flash/ record is."""

import json
import sys

import anyio

from flash_actors import CpuLiveServerless, remote

cfg = CpuLiveServerless(name="gw-remote")


@remote(resource_config=cfg)
async def where(x):
    import os

    return {"pid": os.getpid(), "x": x}


@remote(resource_config=cfg)
async def count(n):
    for i in range(n):
        yield i


@remote(resource_config=cfg)
async def boom():
    raise KeyError("missing")


async def main():
    job = await where(1)
    streamed = [c async for c in count.stream(3)]
    failed = await boom()
    try:
        failed.raise_for_error()
    except KeyError:
        error = "KeyError"
    print(
        json.dumps(
            {
                "pid": job.output["pid"],
                "x": job.output["x"],
                "stream": streamed,
                "error": error,
            }
        )
    )


anyio.run(main, backend=sys.argv[1])
