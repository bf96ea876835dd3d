"""Throughput of calls with 1 MB and 7 MB arguments end to end through a warm local worker.

Each call sends the bytes to a worker and gets their length back (signed base64 cloudpickle
in a batched HTTP request). The reference, measured in the same run: a bare aiohttp echo
server in another process, posted the same raw bytes by an aiohttp client on loopback.
Reported as MB/s of argument payload.

Where we stand against the floor, also measured in the same run: the same echo posted as
many bytes as our wire carries (base64 adds a third), and the floor of the work our format
adds on top, each part timed alone: base64 encode and decode, the keyed BLAKE3 MAC on each
side, a pickle and an unpickle copy. ``floor`` = wire echo time + that work, per call.

Run: ``python benchmarks/bench_payload.py [-n CALLS] [--json]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import socket
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import pybase64
from blake3 import blake3

from flash_actors import CpuLiveServerless, remote, runtime
from flash_actors.serialization import encode_value

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


def _codec_floor_s(size: int, rounds: int = 10) -> float:
    """Seconds per call of the work our format adds, each part alone (median)."""
    raw = pybase64.b64decode(encode_value(bytes(size)))
    text = pybase64.b64encode_as_string(raw)
    key = bytes(32)
    parts: list[Callable[[], object]] = [
        lambda: bytearray(raw),  # pickling: one copy
        lambda: pybase64.b64encode_as_string(raw),
        lambda: blake3(raw, key=key).digest(),  # the caller's MAC
        lambda: pybase64.b64decode(text, validate=True),
        lambda: blake3(raw, key=key).digest(),  # the worker's MAC
        lambda: bytearray(raw),  # unpickling: one copy
    ]
    total = 0.0
    for part in parts:
        part()
        samples = []
        for _ in range(rounds):
            start = time.perf_counter()
            part()
            samples.append(time.perf_counter() - start)
        total += statistics.median(samples)
    return total


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
                wire = len(encode_value(bytes(size)))
                row = rows[label] = {
                    "ours_mb_s": await _ours(size, n),
                    "aiohttp_echo_mb_s": await _aiohttp_rate(port, size, n),
                    # the wire's bytes, counted as the argument's (MB/s of payload)
                    "wire_echo_mb_s": await _aiohttp_rate(port, wire, n) * size / wire,
                }
                row["fraction"] = row["ours_mb_s"] / row["aiohttp_echo_mb_s"]
                mb = size / 2**20
                floor_s = mb / row["wire_echo_mb_s"] + _codec_floor_s(size)
                row["floor_mb_s"] = mb / floor_s
                row["fraction_of_floor"] = row["ours_mb_s"] / row["floor_mb_s"]
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
    print(
        f"{'argument':<10}{'ours':>12}{'aiohttp echo':>16}{'ours / echo':>14}"
        f"{'wire echo':>14}{'floor':>12}{'ours / floor':>15}"
    )
    for label, row in rows.items():
        print(
            f"{label:<10}{row['ours_mb_s']:>8.0f}MB/s{row['aiohttp_echo_mb_s']:>12.0f}MB/s"
            f"{row['fraction']:>13.2f}x{row['wire_echo_mb_s']:>10.0f}MB/s"
            f"{row['floor_mb_s']:>8.0f}MB/s{row['fraction_of_floor']:>14.2f}x"
        )
    print(
        "wire echo: the echo posted as many bytes as our wire carries (base64: 4/3); floor:"
    )
    print(
        "wire echo + base64 encode and decode + two MACs + two copies, each timed alone"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
