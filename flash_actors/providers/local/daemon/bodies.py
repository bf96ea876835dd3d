"""Requests and answers within bounds: body limits, the large-body memory budget, JSON.

A body over its route's limit (``/run`` 10 MB, ``/runsync`` 20 MB, a worker's ``job-done``
and ``job-stream`` the 20 MB result limit plus 1 MB, anything else 1 MB) is refused from its
``Content-Length`` or as soon as the bytes read pass the limit (413); JSON nested too deeply
is a 400. Bodies and answers over 1 MB share one memory budget (`Budget`,
``FLASH_LOCAL_LARGE_BUDGET_MB``, 128 MB): beyond it, requests wait their turn unread.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
from aiohttp import web

from flash_actors.messages import wire_encoder
from flash_actors.providers.local.daemon.errors import GatewayError
from flash_actors.providers.local.daemon.jobs import RESULT_LIMIT

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

__all__ = [
    "DONE_LIMIT",
    "IDLE_TIMEOUT_S",
    "LARGE_BUDGET",
    "MB",
    "RUNSYNC_LIMIT",
    "RUN_LIMIT",
    "SMALL_LIMIT",
    "Bodies",
    "Budget",
    "TooLargeError",
    "decode",
    "json_response",
    "read_body",
    "token",
    "too_large",
    "wait_ms",
]

MB = 1024 * 1024
RUN_LIMIT = 10 * MB
RUNSYNC_LIMIT = 20 * MB
# a worker's job-done: the result plus RunPod's few fields around it
DONE_LIMIT = RESULT_LIMIT + MB
SMALL_LIMIT = MB  # every other body (registrations, stream chunks, cancels)
IDLE_TIMEOUT_S = 75.0  # aiohttp's and nginx's keep-alive default
LARGE_BUDGET = 128 * MB  # large bodies and answers at once: FLASH_LOCAL_LARGE_BUDGET_MB


class TooLargeError(Exception):
    """A body over its limit; ``size`` is what it said or what was read of it."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


async def read_body(request: web.Request, limit: int, within_s: float) -> bytes:
    """The body, refused (`TooLargeError`) from its Content-Length or once it passes ``limit``.

    Raises:
        GatewayError: 408 when the whole body has not come within ``within_s``.
    """
    length = request.content_length
    if length is not None and length > limit:
        raise TooLargeError(length)
    parts: list[bytes] = []
    size = 0
    with anyio.move_on_after(within_s):
        while chunk := await request.content.readany():
            size += len(chunk)
            if size > limit:
                raise TooLargeError(size)
            parts.append(chunk)
        return b"".join(parts)
    msg = f"the request body did not arrive within {within_s:g} s"
    raise GatewayError(408, msg)


def too_large(size: int, limit: int, what: str) -> GatewayError:
    """The 413 for a ``what`` body of ``size`` bytes over ``limit``."""
    return GatewayError(
        413,
        f"payload too large: the {what} body of {size} bytes exceeds the "
        f"{limit // MB} MB limit; send large data by reference (a URL or a volume path)",
    )


class Budget:
    """The bytes of large request bodies and answers (over 1 MB) the daemon holds at once.

    Over ``total``, a request waits (its bytes unread) for others to finish, up to
    ``wait_s``, then gets a 429: memory stays near ``total`` times a small factor (a body
    is copied once more into SQLite) however many clients send at once.
    """

    def __init__(self, total: int, wait_s: float) -> None:
        self.total = total
        self.wait_s = wait_s
        self.used = 0
        self._freed = anyio.Event()

    @contextlib.asynccontextmanager
    async def hold(self, size: int) -> AsyncIterator[None]:
        """Hold ``size`` bytes of the budget while the block runs (small sizes are free)."""
        size = min(size, self.total)
        if size <= SMALL_LIMIT:
            yield
            return
        with anyio.move_on_after(self.wait_s):
            while self.used + size > self.total:
                await self._freed.wait()
        if self.used + size > self.total:
            msg = (
                f"too many large requests at once ({self.used // MB} MB in flight, the "
                f"limit is {self.total // MB} MB); retry shortly"
            )
            raise GatewayError(429, msg)
        self.used += size
        try:
            yield
        finally:
            self.used -= size
            self._freed.set()
            self._freed = anyio.Event()


class Bodies:
    """How the routes read bodies: within ``idle_timeout_s``, under one `Budget`."""

    def __init__(self, budget: Budget, idle_timeout_s: float) -> None:
        self.budget = budget
        self.idle_timeout_s = idle_timeout_s

    async def read(self, request: web.Request, limit: int, what: str) -> bytes:
        """The body (`read_body`); one over ``limit`` is a 413 naming ``what``."""
        try:
            return await read_body(request, limit, self.idle_timeout_s)
        except TooLargeError as exc:
            raise too_large(exc.size, limit, what) from None

    def large(
        self, request: web.Request, limit: int, what: str
    ) -> contextlib.AbstractAsyncContextManager[None]:
        """Hold the budget for this request's body (refused at once if it says it is too big)."""
        length = request.content_length
        if length is not None and length > limit:
            raise too_large(length, limit, what)
        return self.budget.hold(limit if length is None else length)


def decode(decoder: Any, body: bytes, what: str) -> Any:
    """Decode JSON; malformed, mistyped or too deeply nested JSON is a 400 naming ``what``."""
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise GatewayError(400, f"invalid {what}: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise GatewayError(400, f"the {what} is not JSON: {exc}") from exc
    except RecursionError as exc:
        raise GatewayError(400, f"the {what} is nested too deeply") from exc


def json_response(payload: Any, status: int = 200) -> web.Response:
    """A JSON answer (``msgspec.Raw`` values are spliced in as they are)."""
    return web.Response(
        body=wire_encoder.encode(payload),
        status=status,
        content_type="application/json",
    )


def wait_ms(request: web.Request, default: int, low: int, high: int) -> float:
    """Seconds from the ``?wait=`` milliseconds (``default`` without it), clamped.

    Raises:
        GatewayError: 400 for a ``wait`` that is not an integer.
    """
    raw = request.query.get("wait")
    if raw is None:
        return default / 1000
    try:
        value = int(raw)
    except ValueError as exc:
        msg = f"wait must be an integer of milliseconds, got {raw!r}"
        raise GatewayError(400, msg) from exc
    return min(max(value, low), high) / 1000


def token(header: str) -> bytes:
    """A presented key as bytes; b"" for one no key can be (non-ASCII)."""
    try:
        return header.strip().encode("ascii")
    except UnicodeEncodeError:
        return b""
