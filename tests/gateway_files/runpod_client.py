"""Drive a gateway with the stock `runpod` client, sync and asyncio; print one JSON result.

Run with RUNPOD_ENDPOINT_BASE_URL and RUNPOD_API_KEY set (the package reads them at import).
"""

import asyncio
import json
import os
import sys
import time

import aiohttp
import runpod
from runpod.endpoint.asyncio.asyncio_runner import Endpoint as AsyncEndpoint

runpod.api_key = os.environ["RUNPOD_API_KEY"]
out = {}


def wait_status(job, want, limit=30):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        status = job.status()
        if status in want:
            return status
        time.sleep(0.1)
    return job.status()


def sync_part():
    echo = runpod.Endpoint("echo")
    out["run_sync"] = echo.run_sync({"input": {"x": 1}}, timeout=60)
    job = echo.run({"x": 2})
    out["run_output"] = job.output(timeout=60)
    out["run_status"] = job.status()
    out["health"] = echo.health()
    slow = echo.run({"op": "sleep", "seconds": 30})
    out["slow_started"] = wait_status(slow, {"IN_PROGRESS"})
    queued = [echo.run({"op": "sleep", "seconds": 30}) for _ in range(2)]
    out["purge"] = echo.purge_queue()
    out["purged_status"] = [job.status() for job in queued]
    out["cancel"] = slow.cancel()
    out["after_cancel"] = echo.run_sync({"input": {"x": 3}}, timeout=60)
    failing = echo.run({"op": "fail", "message": "no such thing"})
    failing.output(timeout=60)
    out["failed"] = failing._fetch_job()
    gen = runpod.Endpoint("gen")
    job = gen.run({"n": 3})
    out["stream"] = list(job.stream())
    out["stream_output"] = job.output(timeout=60)


async def async_part():
    async with aiohttp.ClientSession() as session:
        echo = AsyncEndpoint("echo", session)
        job = await echo.run({"x": 4})
        out["async_output"] = await job.output(timeout=60)
        out["async_status"] = await job.status()
        out["async_health"] = await echo.health()
        slow = await echo.run({"op": "sleep", "seconds": 30})
        for _ in range(300):
            if await slow.status() == "IN_PROGRESS":
                break
            await asyncio.sleep(0.1)
        out["async_cancel"] = await slow.cancel()
        out["async_purge"] = await echo.purge_queue()
        gen = AsyncEndpoint("gen", session)
        job = await gen.run({"n": 2})
        out["async_stream"] = [chunk async for chunk in job.stream()]


sync_part()
asyncio.run(async_part())
json.dump(out, sys.stdout)
