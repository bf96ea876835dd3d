"""An aiohttp service that runs the flash-actors runtime for its whole life and awaits remote
functions from its request handlers.

Run: python examples/embedded_aiohttp.py (serves on 127.0.0.1, calls its own routes, stops)
"""

import asyncio

import aiohttp
from aiohttp import web

import flash_actors
from flash_actors import CpuLiveServerless, remote

config = CpuLiveServerless(name="embedded-aiohttp", workersMax=2)


@remote(resource_config=config)
async def score(text):
    return {"text": text, "words": len(text.split())}


async def flash_runtime(app):
    # started with the app; leaving it stops every worker
    async with flash_actors.runtime():
        yield


async def score_one(request):
    job = await score(request.query["text"])  # queue resources return a JobOutput
    return web.json_response(job.output)


async def score_many(request):
    texts = await request.json()
    jobs = await asyncio.gather(*(score(text) for text in texts))
    return web.json_response([job.output["words"] for job in jobs])


def make_app():
    app = web.Application()
    app.cleanup_ctx.append(flash_runtime)
    app.add_routes([web.get("/score", score_one), web.post("/score", score_many)])
    return app


async def main():
    # handler_cancellation: a client that goes away cancels its handler, and so its job
    runner = web.AppRunner(make_app(), handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)  # a free port
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as client:
            params = {"text": "hello remote world"}
            async with client.get("/score", params=params) as answer:
                print(await answer.json())
            async with client.post("/score", json=["a", "b c", "d e f"]) as answer:
                print(await answer.json())
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
