"""A stock RunPod handler for the gateway tests: echo, sleep, fail, progress, recycle."""

import asyncio
import os

import runpod


async def handler(job):
    data = job["input"]
    op = data.get("op", "echo")
    if op == "sleep":
        await asyncio.sleep(float(data.get("seconds", 1)))  # a stop signal cancels it
        return {"slept": data.get("seconds", 1)}
    if op == "fail":
        raise ValueError(data.get("message", "bad input"))
    if op == "progress":
        runpod.serverless.progress_update(job, "half way")
        await asyncio.sleep(float(data.get("seconds", 1)))
        return {"done": True}
    if op == "recycle":
        return {"pid": os.getpid(), "refresh_worker": True}
    return {"echo": data, "pid": os.getpid()}


runpod.serverless.start({"handler": handler})
