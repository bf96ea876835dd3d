"""A stock RunPod handler that notes each run of a job: its id, one line in ``input.log``."""

import time

import runpod


def handler(job):
    data = job["input"]
    with open(data["log"], "a") as out:
        out.write(f"{job['id']}\n")
    time.sleep(float(data.get("seconds", 0)))
    return {"id": job["id"]}


runpod.serverless.start({"handler": handler})
