"""A stock RunPod Serverless handler, unchanged from what you would deploy to RunPod.

flash-actors runs it as the workers of a `ServerlessEndpoint(handler=...)` on this machine.
"""

import runpod


def handler(job):
    text = job["input"]["text"]
    good = sum(text.count(word) for word in ("good", "great", "love"))
    bad = sum(text.count(word) for word in ("bad", "awful", "hate"))
    return {"label": "positive" if good >= bad else "negative", "score": good - bad}


runpod.serverless.start({"handler": handler})
