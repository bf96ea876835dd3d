"""A ``@remote`` class: one remote instance per handle, its state kept between calls.

Run: python examples/class_endpoint.py
"""

import asyncio

from flash_actors import CpuLiveServerless, remote

config = CpuLiveServerless(name="class-worker")


@remote(resource_config=config)
class Counter:
    def __init__(self, start):
        self.value = start

    async def increment(self, by=1):
        self.value += by
        return self.value


async def main():
    counter = Counter(10)
    await counter.increment()
    job = await counter.increment(by=5)
    print(job.output)


if __name__ == "__main__":
    asyncio.run(main())
