"""A stock RunPod handler for the gateway tests: returns a string of ``size`` bytes."""

import runpod


def handler(job):
    return "x" * int(job["input"]["size"])


runpod.serverless.start({"handler": handler})
