"""A runpod-flash 1.21 program as a user writes it: it imports runpod_flash, not us."""

import asyncio

from runpod_flash import CpuLiveServerless, remote

config = CpuLiveServerless(name="cap-worker")


@remote(resource_config=config)
async def add(a: int, b: int) -> int:
    return a + b


@remote(resource_config=config)
async def boom(text: str) -> None:
    raise ValueError(f"boom: {text}")


async def main() -> None:
    print("ADD", await add(2, 3), flush=True)
    results = await asyncio.gather(*(add(i, i) for i in range(20)))
    print("GATHER", results, flush=True)
    try:
        await boom("x")
    except Exception as exc:  # noqa: BLE001 (runpod-flash raises a plain Exception)
        print("ERROR", type(exc).__name__, str(exc)[:300], flush=True)


asyncio.run(main())
