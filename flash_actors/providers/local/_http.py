"""A small HTTP/1.1 client over anyio streams, for the hot path to our own workers.

It speaks only what our aiohttp workers answer (``Content-Length`` or chunked bodies,
keep-alive) and works on asyncio and trio alike (on asyncio over `LoopbackStream`, which
spares anyio's per-call loop passes and system calls; on trio over anyio's stream). The
measured alternatives: httpx's pool collapses beyond ~16 concurrent requests on one client
and costs ~1.9 ms per request here, and aiohttp's client is asyncio-only (PERF.md). One `Connection` carries one request at a
time; the pool keeps one per worker and in-flight request.
"""

from __future__ import annotations

import re
import struct
from contextlib import aclosing
from typing import TYPE_CHECKING, Protocol

import anyio
import sniffio

from flash_actors.errors import DeliveryError, NotDeliveredError
from flash_actors.providers.local._stream import open_loopback_stream
from flash_actors.providers.runpod.transport import Response as TransportResponse

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, Mapping

__all__ = ["Connection", "LoopbackTransport", "Response"]

_MAX_HEADER = 64 * 1024
_HOST = re.compile(r"[A-Za-z0-9._:\[\]-]+")
_FRAME = struct.Struct(">I")
_SEND_SLICE = 1 << 20


class _Stream(Protocol):
    """What the client needs of a byte stream (anyio's, or `LoopbackStream`)."""

    async def send(self, item: bytes) -> None: ...
    async def receive(self) -> bytes: ...
    async def aclose(self) -> None: ...


async def _connect_tcp(port: int) -> _Stream:
    if sniffio.current_async_library() == "asyncio":
        return await open_loopback_stream(port)
    return await anyio.connect_tcp("127.0.0.1", port)


class _Reader:
    """Buffered reads from a byte stream."""

    def __init__(self, stream: _Stream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def _fill(self) -> None:
        try:
            data = await self._stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError) as exc:
            msg = "the worker closed the connection"
            raise DeliveryError(msg) from exc
        self._buffer += data

    async def line(self) -> bytes:
        while True:
            end = self._buffer.find(b"\r\n")
            if end >= 0:
                out = bytes(self._buffer[:end])
                del self._buffer[: end + 2]
                return out
            if len(self._buffer) > _MAX_HEADER:
                msg = "malformed HTTP answer from the worker (line too long)"
                raise DeliveryError(msg)
            await self._fill()

    async def exactly(self, size: int) -> bytes:
        while len(self._buffer) < size:
            await self._fill()
        out = bytes(self._buffer[:size])
        del self._buffer[:size]
        return out


class Response:
    """Status, headers and the body of one answer (read once, as bytes or by chunks)."""

    def __init__(self, status: int, headers: dict[str, str], reader: _Reader) -> None:
        self.status = status
        self.headers = headers
        self._reader = reader
        self.complete = False

    async def chunks(self) -> AsyncGenerator[bytes]:
        """The body, piece by piece."""
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size_line = await self._reader.line()
                size = int(size_line.split(b";", 1)[0], 16)
                if size == 0:
                    while await self._reader.line():  # trailers, then the empty line
                        pass
                    break
                data = await self._reader.exactly(size)
                await self._reader.exactly(2)
                yield data
        else:
            length = int(self.headers.get("content-length", "0"))
            if length:
                yield await self._reader.exactly(length)
        self.complete = True

    async def frames(self) -> AsyncGenerator[bytes]:
        """The body split into frames, each prefixed by its length (4 bytes, big-endian)."""
        buffer = bytearray()
        async with aclosing(self.chunks()) as chunks:
            async for chunk in chunks:
                buffer += chunk
                while len(buffer) >= _FRAME.size:
                    (size,) = _FRAME.unpack_from(buffer)
                    end = _FRAME.size + size
                    if len(buffer) < end:
                        break
                    yield bytes(buffer[_FRAME.size : end])
                    del buffer[:end]
        if buffer:
            msg = "the worker's answer ended in the middle of a frame"
            raise DeliveryError(msg)

    async def read(self) -> bytes:
        """The whole body."""
        async with aclosing(self.chunks()) as chunks:
            return b"".join([chunk async for chunk in chunks])


class Connection:
    """One keep-alive connection to ``127.0.0.1:port``.

    Raises `DeliveryError` whenever the worker cannot be reached or goes away mid-answer.
    """

    def __init__(self, port: int, token: str) -> None:
        self.port = port
        self._auth = f"Bearer {token}"
        self._stream: _Stream | None = None
        self._reader: _Reader | None = None

    async def _connect(self) -> tuple[_Stream, _Reader]:
        if self._stream is None or self._reader is None:
            try:
                stream = await _connect_tcp(self.port)
            except OSError as exc:
                msg = f"cannot connect to the worker on 127.0.0.1:{self.port}: {exc}"
                raise NotDeliveredError(msg) from exc
            self._stream = stream
            self._reader = _Reader(stream)
        return self._stream, self._reader

    async def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        content_type: str = "application/json",
        host: str | None = None,
    ) -> Response:
        """Send a request and read the status line and headers of the answer.

        ``host`` is its ``Host`` header (default ``127.0.0.1:port``): a ``flash local``
        daemon tells load-balancer endpoints apart by it.
        """
        if host is not None and not _HOST.fullmatch(host):
            msg = f"not a valid Host header: {host!r}"
            raise ValueError(msg)
        stream, reader = await self._connect()
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {host or f'127.0.0.1:{self.port}'}\r\n"
            f"Authorization: {self._auth}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        try:
            await stream.send(head + body if len(body) < 65536 else head)
            if len(body) >= 65536:
                # In slices: a transport that cannot send all at once copies the rest into
                # its buffer (asyncio's, twice on 3.11); a slice's rest is small. anyio's
                # streams take any buffer; only their annotation says bytes.
                with memoryview(body) as view:
                    for start in range(0, len(body), _SEND_SLICE):
                        piece = view[start : start + _SEND_SLICE]
                        await stream.send(piece)  # type: ignore[arg-type]
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            await self.aclose()
            msg = f"the worker on 127.0.0.1:{self.port} closed the connection: {exc}"
            raise DeliveryError(msg) from exc
        try:
            status_line = await reader.line()
            parts = status_line.split(b" ", 2)
            status = int(parts[1])
            headers: dict[str, str] = {}
            while line := await reader.line():
                name, _, value = line.partition(b":")
                headers[name.decode("latin-1").strip().lower()] = value.decode(
                    "latin-1"
                ).strip()
        except DeliveryError:
            await self.aclose()
            raise
        except (IndexError, ValueError) as exc:
            await self.aclose()
            msg = f"malformed HTTP answer from the worker: {exc}"
            raise DeliveryError(msg) from exc
        return Response(status, headers, reader)

    async def aclose(self) -> None:
        """Close the connection (a later request reconnects)."""
        stream, self._stream, self._reader = self._stream, None, None
        if stream is not None:
            with anyio.CancelScope(shield=True):
                await stream.aclose()


class LoopbackTransport:
    """The fast transport to the ``flash local`` daemon: pooled keep-alive `Connection`s.

    It implements `flash_actors.providers.runpod.transport.Transport` for one
    ``http://127.0.0.1:port`` origin (only the URL's path is sent) with the daemon's API key
    (the ``Authorization`` header given per request is not needed; a ``Host`` header is
    sent, for the daemon's load-balancer endpoints). At most ``limit`` requests are in
    flight at once.
    """

    def __init__(self, port: int, api_key: str, *, limit: int = 256) -> None:
        self.port = port
        self.api_key = api_key
        self.origin = f"http://127.0.0.1:{port}"
        self._idle: list[Connection] = []
        self._limit = anyio.Semaphore(limit)

    async def request(
        self,
        method: str,
        url: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> TransportResponse:
        """One request on a pooled connection: the status, body and headers of its answer.

        Raises:
            NotDeliveredError: the daemon refused the connection.
            DeliveryError: it went away in the middle of the request or its answer.
        """
        del timeout_s
        host = next(
            (v for k, v in (headers or {}).items() if k.lower() == "host"), None
        )
        if not url.startswith(self.origin):
            msg = f"the loopback transport serves {self.origin}, not {url!r}"
            raise ValueError(msg)
        path = url[len(self.origin) :] or "/"
        payload = body or b""
        async with self._limit:
            reused = bool(self._idle)
            conn = self._idle.pop() if reused else Connection(self.port, self.api_key)
            try:
                try:
                    response = await conn.request(method, path, payload, host=host)
                except DeliveryError:
                    if not reused:
                        raise
                    # The daemon closes keep-alive connections idle past its timeout (never
                    # one with a request in flight): send again on a new connection.
                    await conn.aclose()
                    response = await conn.request(method, path, payload, host=host)
                data = await response.read()
            except BaseException:
                await conn.aclose()
                raise
            self._idle.append(conn)
            return TransportResponse(response.status, data, response.headers)

    async def aclose(self) -> None:
        """Close the idle connections."""
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.aclose()
