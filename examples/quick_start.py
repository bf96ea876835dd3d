"""The seeds' quick start, changing only the import line (on a CPU config here).

Run: python examples/quick_start.py
"""

import asyncio

from flash_actors import CpuLiveServerless, remote

cpu_config = CpuLiveServerless(name="my-first-worker")


@remote(resource_config=cpu_config)
async def cpu_task(data):
    import statistics

    return {"sum": sum(data), "mean": statistics.mean(data)}


async def main():
    result = await cpu_task([1, 2, 3, 4, 5])
    print(result.output)


if __name__ == "__main__":
    asyncio.run(main())
