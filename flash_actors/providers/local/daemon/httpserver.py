"""The daemon's listening socket: aiohttp on 127.0.0.1 with the limits a long-running daemon needs.

`HttpServer` closes connections idle (or sending their head or body too slowly) for
``FLASH_LOCAL_IDLE_TIMEOUT_S`` and refuses connections beyond a cap
(``FLASH_LOCAL_MAX_CONNECTIONS``, `max_connections_default`), and keeps answering at its
open-file limit.
"""

from __future__ import annotations

import asyncio  # noqa: TID251 (the daemon runs aiohttp on its own asyncio loop)
import os
import resource
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from flash_actors._logging import get_logger
from flash_actors.providers.local.daemon.bodies import IDLE_TIMEOUT_S

if TYPE_CHECKING:
    import socket

__all__ = ["HttpServer", "max_connections_default"]

log = get_logger(__name__)


class _Throttle:
    """At most one log line per condition per ``every_s``, counting the ones held back."""

    def __init__(self, every_s: float = 60.0) -> None:
        self.every_s = every_s
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warn(self, event: str, **data: Any) -> None:
        now = time.monotonic()
        last = self._last.get(event)
        if last is not None and now - last < self.every_s:
            self._held[event] = self._held.get(event, 0) + 1
            return
        self._last[event] = now
        held = self._held.pop(event, 0)
        log.warning(event, **data, repeated=held, quiet_for_s=self.every_s)


class _Refused(asyncio.Protocol):
    """A connection over the cap: closed as soon as it is accepted."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


def max_connections_default() -> int:
    """``FLASH_LOCAL_MAX_CONNECTIONS``, else the open-file limit less room for the rest.

    The daemon's own files (the store, logs, worker pipes) need descriptors too, so the cap
    stays well below ``RLIMIT_NOFILE``.
    """
    value = os.environ.get("FLASH_LOCAL_MAX_CONNECTIONS")
    if value:
        return max(1, int(value))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 4096
    # room for the daemon's own files and for a batch of accepted-then-refused connections
    return max(8, min(4096, soft - max(128, soft // 4)))


class HttpServer:
    """The aiohttp app on a listening socket, with the limits a long-running daemon needs.

    - Idle connections, and clients that send their request head too slowly, are closed
      after ``idle_timeout_s`` (aiohttp's keep-alive timer, which also runs from the moment
      a connection opens); a request body must arrive within that time too (408).
    - At most ``max_connections`` connections at once: more are closed as soon as they are
      accepted.
    - At the open-file limit, asyncio's accept() failure (a traceback every retry) becomes
      one log line a minute; so does the cap being reached.

    Args:
        app: the application (`make_app`).
        sock: bound and listening, non-blocking.
        idle_timeout_s: see above.
        max_connections: see above.
    """

    def __init__(
        self,
        app: web.Application,
        sock: socket.socket,
        *,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        max_connections: int = 1024,
    ) -> None:
        self.runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            shutdown_timeout=5,
            keepalive_timeout=idle_timeout_s,
        )
        self.sock = sock
        self.max_connections = max_connections
        self._throttle = _Throttle()
        self._server: asyncio.Server | None = None
        self._batch = 0

    async def start(self) -> None:
        """Serve from now on."""
        await self.runner.setup()
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._loop_error)
        self._server = await loop.create_server(self._protocol, sock=self.sock)

    def _protocol(self) -> asyncio.BaseProtocol:
        # asyncio accepts a batch of connections, calls this for each, and only then makes
        # them (and aiohttp counts them): count this batch's too.
        server = self.runner.server
        assert server is not None  # noqa: S101 (start() set it up)
        if len(server.connections) + self._batch >= self.max_connections:
            self._throttle.warn("gateway.connections_full", limit=self.max_connections)
            return _Refused()
        if not self._batch:
            asyncio.get_running_loop().call_soon(self._end_batch)
        self._batch += 1
        return server()

    def _end_batch(self) -> None:
        self._batch = 0

    def _loop_error(
        self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]
    ) -> None:
        message = str(context.get("message", ""))
        if message.startswith("socket.accept() out of system resource"):
            self._throttle.warn(
                "gateway.accept_failed",
                error=str(context.get("exception")),
                hint="the open-file limit is reached: connections wait in the backlog",
            )
            return
        loop.default_exception_handler(context)

    async def stop(self) -> None:
        """Stop listening, then close every connection (5 s grace for requests)."""
        if self._server is not None:
            self._server.close()
        await self.runner.cleanup()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
