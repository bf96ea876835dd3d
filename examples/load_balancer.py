"""The seeds' load-balancer routes: POST and GET, values returned directly.

Run: python examples/load_balancer.py
"""

import asyncio

from flash_actors import LiveLoadBalancer, remote

api = LiveLoadBalancer(name="api-service")


@remote(api, method="POST", path="/api/process")
async def process(x: int, y: int):
    return {"result": x + y}


@remote(api, method="GET", path="/api/health")
def health():
    return {"status": "ok"}


async def main():
    print(await process(2, 3))
    print(await health())


if __name__ == "__main__":
    asyncio.run(main())
