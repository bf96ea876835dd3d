"""The seeds' error handling: JobOutput.error for queues, try/except for load balancers.

Run: python examples/error_handling.py
"""

import asyncio

from flash_actors import (
    CpuLiveLoadBalancer,
    CpuLiveServerless,
    RemoteExecutionError,
    remote,
)

queue = CpuLiveServerless(name="errors-queue")
api = CpuLiveLoadBalancer(name="errors-api")


@remote(resource_config=queue)
async def parse(text):
    return int(text)


@remote(api, method="POST", path="/parse")
async def parse_api(text):
    return {"value": int(text)}


async def main():
    job_output = await parse("not a number")
    if job_output.error:
        print(f"Failed: {job_output.error.strip().splitlines()[-1]}")
    else:
        print(job_output.output)

    try:
        await parse_api("nope")
    except ValueError as e:  # the remote ValueError keeps its type
        print(
            f"Error: {type(e).__name__} {isinstance(e, RemoteExecutionError)}: {e.args[0]}"
        )


if __name__ == "__main__":
    asyncio.run(main())
