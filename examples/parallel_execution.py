"""The seeds' parallel-execution pattern: ``asyncio.gather`` over remote calls.

Run: python examples/parallel_execution.py
"""

import asyncio

from flash_actors import CpuLiveServerless, remote

config = CpuLiveServerless(name="parallel-worker", workersMax=2)


@remote(resource_config=config)
async def process_item(item):
    return {"item": item, "square": item * item}


async def main():
    results = await asyncio.gather(
        process_item(1),
        process_item(2),
        process_item(3),
    )
    print([job.output["square"] for job in results])
    many = await asyncio.gather(*(process_item(i) for i in range(100)))
    print(sum(job.output["square"] for job in many))


if __name__ == "__main__":
    asyncio.run(main())
