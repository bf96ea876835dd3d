"""The same remote functions awaited from a trio program, fanned out in a nursery.

Run: python examples/trio_app.py
"""

import trio

from flash_actors import CpuLiveServerless, remote

config = CpuLiveServerless(name="trio-worker")


@remote(resource_config=config)
async def double(x):
    return 2 * x


async def main():
    results = {}

    async def one(i):
        results[i] = (await double(i)).output

    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(one, i)
    print([results[i] for i in range(10)])


if __name__ == "__main__":
    trio.run(main)
