"""Large bodies on the loopback hot path: sent in slices, read once into one buffer."""

from __future__ import annotations

import hashlib
import io
from typing import TYPE_CHECKING

import aiohttp
import msgspec
import pytest
from aiohttp import web

from flash_actors.providers.local._http import Connection
from flash_actors.worker.server import read_body

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

ASYNCIO = pytest.mark.parametrize(
    "anyio_backend", [pytest.param(("asyncio", {}), id="asyncio")]
)


async def _digest(request: web.Request) -> web.Response:
    body = await read_body(request)
    return web.json_response(
        {"size": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    )


async def _serve(max_size: int) -> tuple[web.AppRunner, str]:
    app = web.Application(client_max_size=max_size)
    app.router.add_post("/", _digest)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}/"


@ASYNCIO
@pytest.mark.parametrize("size", [0, 100, 65536, 3 * 1024 * 1024 + 7])
async def test_bodies_arrive_whole_whatever_their_size(size: int) -> None:
    runner, url = await _serve(8 * 1024 * 1024)
    data = bytes(i % 251 for i in range(size))
    try:
        async with (
            aiohttp.ClientSession() as client,
            client.post(url, data=io.BytesIO(data)) as r,
        ):
            assert r.status == 200
            assert await r.json() == {
                "size": size,
                "sha256": hashlib.sha256(data).hexdigest(),
            }
    finally:
        await runner.cleanup()


@ASYNCIO
async def test_a_chunked_body_is_read_the_usual_way() -> None:
    runner, url = await _serve(8 * 1024 * 1024)
    parts = [bytes([i]) * 300_000 for i in range(5)]

    async def chunks() -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    try:
        async with aiohttp.ClientSession() as client:
            async with client.post(url, data=chunks()) as r:
                assert r.status == 200
                joined = b"".join(parts)
                assert await r.json() == {
                    "size": len(joined),
                    "sha256": hashlib.sha256(joined).hexdigest(),
                }
    finally:
        await runner.cleanup()


@ASYNCIO
async def test_a_body_over_the_limit_is_refused_before_it_is_read() -> None:
    runner, url = await _serve(1024 * 1024)
    try:
        async with aiohttp.ClientSession() as client:
            async with client.post(url, data=io.BytesIO(bytes(2 * 1024 * 1024))) as r:
                assert r.status == 413
    finally:
        await runner.cleanup()


@ASYNCIO
@pytest.mark.parametrize("size", [1000, 65536, 3 * 1024 * 1024 + 7])
async def test_the_loopback_client_sends_large_bodies_whole_and_in_order(
    size: int,
) -> None:
    runner, _ = await _serve(8 * 1024 * 1024)
    port = runner.addresses[0][1]
    data = b"".join(
        hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(size // 32 + 1)
    )[:size]
    conn = Connection(port, "token")
    try:
        for _ in range(2):  # and again on the same keep-alive connection
            response = await conn.request("POST", "/", data)
            assert response.status == 200
            assert msgspec.json.decode(await response.read()) == {
                "size": size,
                "sha256": hashlib.sha256(data).hexdigest(),
            }
    finally:
        await conn.aclose()
        await runner.cleanup()
