"""The floors under a warm worker's call, measured in the same run as the call itself.

A call to a warm local worker is one HTTP request over loopback to an aiohttp server in
another process. Below it, in this order:

- ``loopback echo``: 100 bytes there and back over one TCP connection (asyncio streams both
  sides), no HTTP: the two processes' wake-ups and the kernel's loopback.
- ``raw request -> aiohttp``: a 100-byte POST to an aiohttp server, written and parsed by hand
  on the client (what the runtime's own client does; `flash_actors.providers.local._http`).
- ``aiohttp -> aiohttp``: the same POST with aiohttp's client (aiohttp's own round trip).

The servers run in a child process started here and stopped by its PID.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

BODY = b"x" * 100


def _serve(http_fd: int, echo_fd: int) -> None:
    """The child: an aiohttp echo route and a raw TCP echo, on the sockets handed over."""
    from aiohttp import web

    async def echo_route(request: web.Request) -> web.Response:
        return web.Response(body=await request.read())

    async def raw_echo(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while data := await reader.read(65536):
            writer.write(data)
        writer.close()

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/echo", echo_route)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.SockSite(runner, socket.socket(fileno=http_fd)).start()
        server = await asyncio.start_server(
            raw_echo, sock=socket.socket(fileno=echo_fd)
        )
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def _spawn(fds: list[int]) -> subprocess.Popen[bytes]:
    """This file as the child, serving on the listening sockets ``fds``."""
    return subprocess.Popen(  # noqa: S603 (this interpreter and this file)
        [sys.executable, __file__, *map(str, fds)], pass_fds=fds
    )


async def _connected(
    port: int,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to the child's raw echo, once it answers (its start takes a moment)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"?")
            await asyncio.wait_for(reader.readexactly(1), 5)
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
        else:
            return reader, writer


@asynccontextmanager
async def floors() -> AsyncIterator[dict[str, Callable[[], Awaitable[None]]]]:
    """One round trip of each floor, by its name, against a child process of servers."""
    import aiohttp

    listeners = [socket.socket() for _ in range(2)]
    for listener in listeners:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
    http_port, echo_port = (s.getsockname()[1] for s in listeners)
    fds = [s.fileno() for s in listeners]
    child = _spawn(fds)
    for listener in listeners:
        listener.close()
    try:
        reader, writer = await _connected(echo_port)
        http_reader, http_writer = await asyncio.open_connection("127.0.0.1", http_port)
        request = (
            f"POST /echo HTTP/1.1\r\nHost: 127.0.0.1:{http_port}\r\n"
            f"Content-Length: {len(BODY)}\r\n\r\n"
        ).encode() + BODY

        async def echo() -> None:
            writer.write(BODY)
            await reader.readexactly(len(BODY))

        async def raw_request() -> None:
            http_writer.write(request)
            head = await http_reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await http_reader.readexactly(length)

        async with aiohttp.ClientSession() as session:

            async def aiohttp_request() -> None:
                async with session.post(
                    f"http://127.0.0.1:{http_port}/echo", data=BODY
                ) as response:
                    await response.read()

            yield {
                "floor: loopback echo": echo,
                "floor: raw request -> aiohttp": raw_request,
                "floor: aiohttp -> aiohttp": aiohttp_request,
            }
        writer.close()
        http_writer.close()
    finally:
        child.terminate()
        child.wait(10)


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]))
