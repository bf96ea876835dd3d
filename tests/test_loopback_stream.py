"""`LoopbackStream` (the asyncio stream under the local HTTP client) against real sockets.

A peer served by anyio on 127.0.0.1 sends, stops reading, closes or resets; the stream must
raise what anyio's own stream raises, never lose or reorder bytes, and bound what it buffers.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from typing import TYPE_CHECKING

import anyio
import anyio.abc
import pytest

from flash_actors.providers.local import _stream
from flash_actors.providers.local._stream import open_loopback_stream

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

pytestmark = pytest.mark.anyio


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {}), id="asyncio"),
        # Workers run uvloop (their nested calls use this stream): its transports are not
        # asyncio.Transport subclasses.
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, bool]]:
    """asyncio only: the stream is asyncio's fast path; trio uses anyio's stream."""
    backend: tuple[str, dict[str, bool]] = request.param
    return backend


@contextlib.asynccontextmanager
async def served(
    handler: Callable[[anyio.abc.SocketStream], Awaitable[None]],
) -> AsyncIterator[int]:
    """Serve ``handler`` on a free loopback port while the block runs: the port."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handler)
        yield listener.extra(anyio.abc.SocketAttribute.local_port)  # noqa: S610
        tg.cancel_scope.cancel()


async def _read_all(stream: _stream.LoopbackStream) -> bytes:
    data = bytearray()
    with contextlib.suppress(anyio.EndOfStream):
        while True:
            data += await stream.receive()
    return bytes(data)


async def test_bytes_arrive_whole_and_in_order_in_both_directions() -> None:
    async def echo(peer: anyio.abc.SocketStream) -> None:
        async with peer:
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                while True:
                    await peer.send(await peer.receive())

    payload = os.urandom(3 * 1024 * 1024)
    async with served(echo) as port:
        stream = await open_loopback_stream(port)
        got = bytearray()

        async def read() -> None:
            while len(got) < len(payload):
                got.extend(await stream.receive())

        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            with memoryview(payload) as view:
                for start in range(0, len(payload), 100_000):
                    await stream.send(view[start : start + 100_000])
        await stream.aclose()
    assert bytes(got) == payload


async def test_a_peer_that_closes_ends_the_stream_after_what_it_sent() -> None:
    async def say_and_close(peer: anyio.abc.SocketStream) -> None:
        async with peer:
            await peer.send(b"last words")

    async with served(say_and_close) as port:
        stream = await open_loopback_stream(port)
        assert await _read_all(stream) == b"last words"
        with pytest.raises(anyio.EndOfStream):
            await stream.receive()
        await stream.aclose()


async def test_a_peer_that_resets_breaks_the_stream() -> None:
    async def reset(peer: anyio.abc.SocketStream) -> None:
        raw = peer.extra(anyio.abc.SocketAttribute.raw_socket)  # noqa: S610
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await peer.aclose()  # RST, not FIN

    async with served(reset) as port:
        stream = await open_loopback_stream(port)
        with pytest.raises((anyio.BrokenResourceError, anyio.EndOfStream)):
            with anyio.fail_after(10):
                await stream.receive()
        with pytest.raises(anyio.BrokenResourceError):
            for _ in range(100):  # the kernel may take the first writes
                await stream.send(b"x" * 65536)
        await stream.aclose()


async def test_closing_wakes_a_waiting_receive_and_later_calls_say_closed() -> None:
    async def silent(peer: anyio.abc.SocketStream) -> None:
        async with peer:
            await anyio.sleep_forever()

    async with served(silent) as port:
        stream = await open_loopback_stream(port)
        async with anyio.create_task_group() as tg:

            async def receive() -> None:
                with pytest.raises(anyio.ClosedResourceError):
                    await stream.receive()

            tg.start_soon(receive)
            await anyio.wait_all_tasks_blocked()
            await stream.aclose()
        with pytest.raises(anyio.ClosedResourceError):
            await stream.send(b"x")
        with pytest.raises(anyio.ClosedResourceError):
            await stream.receive()


async def test_a_cancelled_receive_loses_nothing_that_comes_after() -> None:
    gate = anyio.Event()

    async def late(peer: anyio.abc.SocketStream) -> None:
        async with peer:
            await gate.wait()
            await peer.send(b"after")

    async with served(late) as port:
        stream = await open_loopback_stream(port)
        with anyio.move_on_after(0.05) as scope:
            await stream.receive()
        assert scope.cancelled_caught
        gate.set()
        assert await _read_all(stream) == b"after"
        await stream.aclose()


async def test_reading_pauses_past_the_limit_and_resumes_as_the_reader_catches_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_stream, "READ_LIMIT", 64 * 1024)
    total = 8 * 1024 * 1024
    sent = 0

    async def flood(peer: anyio.abc.SocketStream) -> None:
        nonlocal sent
        async with peer:
            block = b"y" * 65536
            while sent < total:
                await peer.send(block)
                sent += len(block)

    async with served(flood) as port:
        stream = await open_loopback_stream(port)
        first = await stream.receive()
        await anyio.sleep(0.3)  # the peer fills the socket buffers, then has to wait
        assert sent < total  # the stream did not read it all into memory meanwhile
        assert stream._protocol.buffered <= 64 * 1024 + 2 * 65536
        rest = await _read_all(stream)
        await stream.aclose()
    assert len(first) + len(rest) == total
