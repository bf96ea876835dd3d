"""``dependencies=[...]``: the worker imports a package this project does not depend on.

The first run installs it into a cached virtual environment (a progress line shows on a
terminal); later runs and other endpoints reuse it.

Run: python examples/dependencies.py
"""

import asyncio

from flash_actors import CpuLiveServerless, remote

config = CpuLiveServerless(name="deps-worker")


@remote(resource_config=config, dependencies=["humanize"])
async def describe(size_in_bytes):
    import humanize

    return humanize.naturalsize(size_in_bytes)


async def main():
    job = await describe(123_456_789)
    print(job.output)


if __name__ == "__main__":
    asyncio.run(main())
