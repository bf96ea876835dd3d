"""A runpod-flash 1.21 program calling an app deployed with `flash deploy` (deployed mode).

It imports runpod_flash, not us, and declares the deployed app's resource and function as its
user would; with FLASH_IS_LIVE_PROVISIONING unset, runpod-flash sends one
``POST /v2/flash/runsync`` with the X-Flash-App/Environment/Endpoint headers per call.
"""

import asyncio

from runpod_flash import CpuLiveServerless, remote

twice_config = CpuLiveServerless(name="twice")


@remote(resource_config=twice_config)
async def twice(a: int, b: int) -> int:
    raise AssertionError("runs on the deployed endpoint, never here")


async def main() -> None:
    print("TWICE", await twice(4, 1), flush=True)
    print("GATHER", await asyncio.gather(*(twice(i, 0) for i in range(5))), flush=True)


asyncio.run(main())
