"""A stock RunPod handler taking 4 jobs at once (so the worker uses job-take-batch)."""

import asyncio
import os

import runpod

running = 0
most = 0


async def handler(job):
    global running, most
    running += 1
    most = max(most, running)
    try:
        await asyncio.sleep(float(job["input"].get("seconds", 0.5)))
    finally:
        running -= 1
    return {"pid": os.getpid(), "most_at_once": most}


runpod.serverless.start({"handler": handler, "concurrency_modifier": lambda current: 4})
