"""Throughput of calls with 1 MB and 7 MB arguments end to end through a warm local worker.

Each call sends the bytes to a worker and gets their length back (signed base64 cloudpickle
in a batched HTTP request). The reference, measured in the same run: a bare aiohttp echo
server in another process, posted the same raw bytes by an aiohttp client on loopback.
Reported as MB/s of argument payload.

Run: ``python benchmarks/bench_payload.py [-n CALLS] [--json]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import socket
import sys
import time
from typing import Any

from flash_actors import CpuLiveServerless, remote, runtime

ENDPOINT = CpuLiveServerless(name="bench-payload", workersMin=1)
SIZES = {"1MB": 1024 * 1024, "7MB": 7 * 1024 * 1024}


@remote(ENDPOINT)
async def size_of(blob: bytes) -> int:
    return len(blob)


def _echo_server(sock: socket.socket) -> None:
    from aiohttp import web

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.Response(body=body[:16])

    app = web.Application(client_max_size=64 * 2**20)
    app.router.add_post("/echo", echo)
    web.run_app(app, sock=sock, print=None, handle_signals=True)


async def _aiohttp_rate(port: int, size: int, n: int) -> float:
    import aiohttp

    blob = bytes(size)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://127.0.0.1:{port}/echo", data=blob) as r:
            await r.read()
        start = time.perf_counter()
        for _ in range(n):
            async with session.post(f"http://127.0.0.1:{port}/echo", data=blob) as r:
                await r.read()
        return n * size / (time.perf_counter() - start) / 2**20


async def _ours(size: int, n: int) -> float:
    blob = bytes(size)
    await size_of(blob)
    start = time.perf_counter()
    for _ in range(n):
        job = await size_of(blob)
        assert job.output == size, job.error
    return n * size / (time.perf_counter() - start) / 2**20


async def run(n: int) -> dict[str, Any]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    server = multiprocessing.get_context("spawn").Process(
        target=_echo_server, args=(sock,)
    )
    server.start()
    rows: dict[str, Any] = {}
    try:
        async with runtime(provider="local"):
            for label, size in SIZES.items():
                rows[label] = {
                    "ours_mb_s": await _ours(size, n),
                    "aiohttp_echo_mb_s": await _aiohttp_rate(port, size, n),
                }
                rows[label]["fraction"] = (
                    rows[label]["ours_mb_s"] / rows[label]["aiohttp_echo_mb_s"]
                )
    finally:
        server.terminate()
        server.join()
        sock.close()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20, help="calls per size")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args()
    rows = asyncio.run(run(args.n))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'argument':<10}{'ours':>12}{'aiohttp echo':>16}{'ours / echo':>14}")
    for label, row in rows.items():
        print(
            f"{label:<10}{row['ours_mb_s']:>8.0f}MB/s{row['aiohttp_echo_mb_s']:>12.0f}MB/s"
            f"{row['fraction']:>13.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
