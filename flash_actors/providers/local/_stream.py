"""A loopback TCP byte stream for asyncio, leaner than anyio's on the hot path.

anyio's asyncio `SocketStream` yields to the event loop on every ``send`` (a checkpoint:
one more pass of the loop) and turns reading on and off around every ``receive`` (two
``epoll_ctl`` calls). For a request and its answer that is four loop passes and four system
calls more than the work needs. `LoopbackStream` keeps reading on, with a limit on what it
buffers (`READ_LIMIT`, then the transport pauses), and waits only when there is nothing to
read or the transport's write buffer is full. It raises what anyio's stream raises
(`anyio.EndOfStream`, `anyio.BrokenResourceError`, `anyio.ClosedResourceError`), so the
client code above it is the same on trio, where anyio's own stream is used.
"""

from __future__ import annotations

import asyncio  # noqa: TID251 (the asyncio fast path; trio uses anyio's stream)
from collections import deque
from typing import cast

import anyio

__all__ = ["READ_LIMIT", "LoopbackStream", "open_loopback_stream"]

READ_LIMIT = 4 * 1024 * 1024
"""Bytes received and not yet read after which reading pauses (resumed at half)."""


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.reading_paused = False
        self.ended = False  # EOF or the connection is gone
        self.error: BaseException | None = None
        self.reader: asyncio.Future[None] | None = None
        self.writer: asyncio.Future[None] | None = None
        self.writing_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A TCP transport (uvloop's, in a worker, does not subclass asyncio.Transport).
        self.transport = cast("asyncio.Transport", transport)

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self.buffered += len(data)
        if self.buffered > READ_LIMIT and not self.reading_paused:
            assert self.transport is not None  # noqa: S101
            self.reading_paused = True
            self.transport.pause_reading()
        self._wake_reader()

    def eof_received(self) -> bool:
        self.ended = True
        self._wake_reader()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended = True
        self.error = exc
        self._wake_reader()
        self.writing_paused = False
        self._wake_writer()

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._wake_writer()

    def _wake_reader(self) -> None:
        reader, self.reader = self.reader, None
        if reader is not None and not reader.done():
            reader.set_result(None)

    def _wake_writer(self) -> None:
        writer, self.writer = self.writer, None
        if writer is not None and not writer.done():
            writer.set_result(None)


class LoopbackStream:
    """One TCP connection (asyncio only); ``send``, ``receive`` and ``aclose`` as anyio's."""

    def __init__(self, transport: asyncio.Transport, protocol: _Protocol) -> None:
        self._transport = transport
        self._protocol = protocol
        self._closed = False
        self._loop = asyncio.get_running_loop()

    async def send(self, item: bytes | memoryview) -> None:
        """Write ``item``; wait only while the transport's buffer is full."""
        protocol = self._protocol
        if self._closed:
            raise anyio.ClosedResourceError
        if protocol.ended and protocol.error is not None:
            raise anyio.BrokenResourceError from protocol.error
        if self._transport.is_closing():
            raise anyio.BrokenResourceError
        self._transport.write(item)
        while protocol.writing_paused:
            waiter = self._loop.create_future()
            protocol.writer = waiter
            await waiter
            if self._closed:
                raise anyio.ClosedResourceError
            if protocol.ended:
                raise anyio.BrokenResourceError from protocol.error

    async def receive(self) -> bytes:
        """The bytes received since the last call (waits for some)."""
        protocol = self._protocol
        while not protocol.chunks:
            if self._closed:
                raise anyio.ClosedResourceError
            if protocol.ended:
                if protocol.error is not None:
                    raise anyio.BrokenResourceError from protocol.error
                raise anyio.EndOfStream
            waiter = self._loop.create_future()
            protocol.reader = waiter
            try:
                await waiter
            finally:
                protocol.reader = None
        chunk = protocol.chunks.popleft()
        protocol.buffered -= len(chunk)
        if protocol.reading_paused and protocol.buffered <= READ_LIMIT // 2:
            protocol.reading_paused = False
            self._transport.resume_reading()
        return chunk

    async def aclose(self) -> None:
        """Close the connection at once (what is unsent is dropped)."""
        self._closed = True
        self._transport.abort()
        self._protocol._wake_reader()  # noqa: SLF001 (its own protocol)
        self._protocol._wake_writer()  # noqa: SLF001


async def open_loopback_stream(port: int) -> LoopbackStream:
    """Connect to ``127.0.0.1:port`` (``TCP_NODELAY``, as asyncio sets it).

    Raises:
        OSError: the connection was refused or failed.
    """
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_connection(_Protocol, "127.0.0.1", port)
    return LoopbackStream(transport, protocol)
