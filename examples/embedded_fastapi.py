"""A FastAPI service that runs the flash-actors runtime in its lifespan and awaits remote
functions from its endpoints.

Needs: pip install fastapi uvicorn
Run: python examples/embedded_fastapi.py (serves on 127.0.0.1, calls its own routes, stops)
"""

import asyncio
import socket
from contextlib import asynccontextmanager

import httpx
import uvicorn
from fastapi import FastAPI

import flash_actors
from flash_actors import CpuLiveServerless, remote

config = CpuLiveServerless(name="embedded-fastapi", workersMax=2)


@remote(resource_config=config)
async def score(text):
    return {"text": text, "words": len(text.split())}


@asynccontextmanager
async def lifespan(app):
    # started with the app; leaving it stops every worker
    async with flash_actors.runtime():
        yield


app = FastAPI(lifespan=lifespan)


@app.get("/score")
async def score_one(text: str):
    job = await score(text)  # queue resources return a JobOutput
    return job.output


@app.post("/score")
async def score_many(texts: list[str]):
    jobs = await asyncio.gather(*(score(text) for text in texts))
    return [job.output["words"] for job in jobs]


async def main():
    sock = socket.create_server(
        ("127.0.0.1", 0)
    )  # a free port, listening: requests wait
    port = sock.getsockname()[1]  # in its backlog until the lifespan has started
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            one = await client.get("/score", params={"text": "hello remote world"})
            print(one.json())
            many = await client.post("/score", json=["a", "b c", "d e f"])
            print(many.json())
    finally:
        server.should_exit = True
        await serving


if __name__ == "__main__":
    asyncio.run(main())
