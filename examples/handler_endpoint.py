"""A RunPod handler file as an endpoint: dictionary payloads in, dictionaries out.

ServerlessEndpoint (the non-Live class) runs your own RunPod worker code. Name the handler
file and `await endpoint.run({"input": ...})`; locally the file runs, unmodified, as the
endpoint's workers (stock `runpod` workers; `pip install runpod`). With `flash local up`
running, the same calls go to the daemon, whose workers stay warm between runs.
"""

import asyncio
from pathlib import Path

from flash_actors import CpuServerlessEndpoint

sentiment = CpuServerlessEndpoint(
    name="sentiment",
    handler=str(Path(__file__).parent / "handlers" / "sentiment.py"),
    workersMax=2,
)


async def main():
    texts = ["I love this, it is great", "awful, I hate it"]
    jobs = await asyncio.gather(*(sentiment.run({"input": {"text": t}}) for t in texts))
    for job in jobs:
        print(job.status, job.output)


if __name__ == "__main__":
    asyncio.run(main())
