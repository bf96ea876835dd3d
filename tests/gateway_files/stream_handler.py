"""A stock RunPod generator handler for the gateway tests: yields n chunks."""

import time

import runpod


def handler(job):
    for i in range(int(job["input"].get("n", 3))):
        time.sleep(0.05)
        yield {"chunk": i}


runpod.serverless.start({"handler": handler, "return_aggregate_stream": True})
