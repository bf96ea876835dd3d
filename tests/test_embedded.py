"""Embedded routing (issue 11, item 7): a service enters the runtime in its own lifespan and
awaits remote functions from its request handlers.

A web server runs its lifespan in one task and each request in another, and the request tasks
do not always inherit the lifespan's context (uvicorn's do not). Calls from them must use the
runtime the lifespan opened, not start a second, implicit one that would outlive the app; a
handler cancelled because its client went away cancels its remote job; leaving the lifespan
stops every worker (checked by PID while the event loop still runs). The examples
(`examples/embedded_aiohttp.py`, `examples/embedded_fastapi.py`) run in `tests/test_examples.py`.
"""

from __future__ import annotations

import asyncio
import os
import socket
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import anyio
import httpx
import pytest
from aiohttp import web
from fastapi import (
    Request,
)  # a module global: FastAPI resolves handler annotations here

from flash_actors import CpuLiveServerless, current_runtime, remote, runtime
from flash_actors.actors._hosting import current_hosted
from flash_actors.providers.local import LocalProvider
from tests._daemon import descendants, kill_all, wait_gone
from tests.test_examples import EXPECTED

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from flash_actors.runtime import FlashRuntime

EMBEDDED = CpuLiveServerless(name="embedded-test", workersMax=2)


@remote(EMBEDDED)
async def square(x: int) -> int:
    return x * x


@remote(EMBEDDED)
async def tick(folder: str) -> None:
    import os
    import pathlib

    import anyio

    path = pathlib.Path(folder)
    (path / "pid").write_text(str(os.getpid()))
    try:
        await anyio.sleep_forever()
    finally:
        (path / "stopped").write_text("1")


async def _wait_file(path: Path, seconds: float = 20) -> str:
    with anyio.fail_after(seconds):
        while not path.exists() or not path.read_text():
            await anyio.sleep(0.01)
    return path.read_text()


def test_both_examples_run_in_test_examples() -> None:
    assert EXPECTED["embedded_aiohttp.py"] == EXPECTED["embedded_fastapi.py"]
    assert EXPECTED["embedded_fastapi.py"] == [
        "{'text': 'hello remote world', 'words': 3}",
        "[1, 2, 3]",
    ]


async def test_a_task_not_started_in_the_block_uses_the_open_runtime(
    tmp_path: Path,
) -> None:
    provider = LocalProvider(state_dir=tmp_path / ".flash")
    opened = anyio.Event()
    done = anyio.Event()
    seen: dict[str, Any] = {}
    workers: list[int] = []

    async def handler() -> (
        None
    ):  # started before the block: it does not inherit its context
        await opened.wait()
        seen["runtime"] = current_runtime()
        seen["jobs"] = [(await square(i)).output for i in range(3)]
        done.set()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(handler)
            async with runtime(provider=provider) as rt:
                opened.set()
                await done.wait()
                workers = descendants(os.getpid())
                assert workers
            assert seen == {"runtime": rt, "jobs": [0, 1, 4]}
            assert current_hosted() is None  # no implicit runtime was started
            assert current_runtime() is None
            assert wait_gone(workers) == []
    finally:
        kill_all(workers)


# -- aiohttp and FastAPI in this process (both asyncio only) -------------------------------------


@pytest.mark.parametrize("anyio_backend", [pytest.param(("asyncio", {}), id="asyncio")])
async def test_aiohttp_lifespan_handlers_and_a_client_disconnect(
    tmp_path: Path,
) -> None:
    provider = LocalProvider(state_dir=tmp_path / ".flash")
    opened: list[FlashRuntime] = []

    async def flash_runtime(app: web.Application) -> AsyncIterator[None]:
        async with runtime(provider=provider) as rt:
            opened.append(rt)
            yield

    async def squares(request: web.Request) -> web.Response:
        assert current_runtime() is opened[0]
        jobs = await asyncio.gather(*(square(i) for i in range(4)))
        return web.json_response([job.output for job in jobs])

    async def ticking(request: web.Request) -> web.Response:
        await tick(str(tmp_path))
        return web.json_response("never")

    app = web.Application()
    app.cleanup_ctx.append(flash_runtime)
    app.add_routes([web.get("/squares", squares), web.get("/tick", ticking)])
    runner = web.AppRunner(app, handler_cancellation=True)
    workers: list[int] = []
    try:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        async with aiohttp.ClientSession(url) as client:
            async with client.get("/squares") as answer:
                assert await answer.json() == [0, 1, 4, 9]
        async with aiohttp.ClientSession(url) as client:
            call = asyncio.ensure_future(client.get("/tick"))
            worker = int(await _wait_file(tmp_path / "pid"))
            call.cancel()  # the client goes away; its connection closes with the session
        # The handler was cancelled, and with it the job on its worker (its finally ran).
        await _wait_file(tmp_path / "stopped", 10)
        workers = descendants(os.getpid())
        assert worker in workers
    finally:
        await runner.cleanup()
        assert wait_gone(workers) == []
        kill_all(workers)
    assert current_hosted() is None


@pytest.mark.parametrize("anyio_backend", [pytest.param(("asyncio", {}), id="asyncio")])
async def test_fastapi_lifespan_in_its_own_task_serves_handlers(tmp_path: Path) -> None:
    import uvicorn
    from fastapi import FastAPI

    provider = LocalProvider(state_dir=tmp_path / ".flash")
    opened: list[FlashRuntime] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with runtime(provider=provider) as rt:
            opened.append(rt)
            yield

    app = FastAPI(lifespan=lifespan)
    seen: list[FlashRuntime | None] = []

    @app.get("/squares")
    async def squares() -> list[int]:
        seen.append(current_runtime())
        jobs = await asyncio.gather(*(square(i) for i in range(4)))
        return [job.output for job in jobs]

    sock = socket.create_server(
        ("127.0.0.1", 0)
    )  # requests wait here until startup ends
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    serving = asyncio.ensure_future(server.serve(sockets=[sock]))
    workers: list[int] = []
    try:
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        with anyio.fail_after(30):
            async with httpx.AsyncClient(base_url=url) as client:
                answer = await client.get("/squares")
        assert answer.json() == [0, 1, 4, 9]
        assert seen == opened  # the lifespan's runtime, not an implicit second one
        workers = descendants(os.getpid())
        assert workers
    finally:
        server.should_exit = True
        await serving
        sock.close()
        assert (
            wait_gone(workers) == []
        )  # the loop still runs: the lifespan stopped them
        kill_all(workers)
    assert current_hosted() is None


@pytest.mark.parametrize("anyio_backend", [pytest.param(("asyncio", {}), id="asyncio")])
async def test_fastapi_client_disconnect_cancels_the_job_with_cancel_on_disconnect(
    tmp_path: Path,
) -> None:
    import uvicorn
    from fastapi import FastAPI

    from flash_actors.web import ClientDisconnectedError, cancel_on_disconnect

    provider = LocalProvider(state_dir=tmp_path / ".flash")
    raised: list[BaseException] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with runtime(provider=provider):
            yield

    app = FastAPI(lifespan=lifespan)

    @app.get("/tick")
    async def ticking(request: Request) -> str:
        try:
            await cancel_on_disconnect(request, tick(str(tmp_path)))
        except ClientDisconnectedError as exc:
            raised.append(exc)
            raise
        return "never"

    @app.get("/square")
    async def squared(request: Request, x: int) -> Any:
        job = await cancel_on_disconnect(request, square(x))
        return job.output

    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="critical"))
    serving = asyncio.ensure_future(server.serve(sockets=[sock]))
    workers: list[int] = []
    try:
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        async with httpx.AsyncClient(base_url=url) as client:
            assert (await client.get("/square", params={"x": 7})).json() == 49
        async with httpx.AsyncClient(base_url=url) as client:
            call = asyncio.ensure_future(client.get("/tick"))
            worker = int(await _wait_file(tmp_path / "pid"))
            call.cancel()  # the client goes away
            with pytest.raises(asyncio.CancelledError):
                await call
        # the job on its worker was cancelled (its finally ran), the handler saw why
        await _wait_file(tmp_path / "stopped", 10)
        assert len(raised) == 1
        workers = descendants(os.getpid())
        assert worker in workers
    finally:
        server.should_exit = True
        await serving
        sock.close()
        assert wait_gone(workers) == []
        kill_all(workers)
