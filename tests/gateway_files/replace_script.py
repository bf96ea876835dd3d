"""One call on endpoint gw-replace with the given workersMax: run where a daemon's .flash/ is."""

import json
import sys

import anyio

from flash_actors import CpuLiveServerless, remote

cfg = CpuLiveServerless(name="gw-replace", workersMax=int(sys.argv[1]))


@remote(resource_config=cfg)
async def nap(seconds):
    import anyio

    await anyio.sleep(seconds)
    return seconds


async def main():
    job = await nap(float(sys.argv[2]))
    print(json.dumps({"status": job.status, "output": job.output}))


anyio.run(main)
