"""Web-framework glue: a remote call that ends when the HTTP client goes away.

aiohttp cancels a request's handler when its client disconnects (``handler_cancellation=
True``), and with it the remote job the handler awaits. Starlette and FastAPI do not: the
handler, and the job, run on to the end. `cancel_on_disconnect` closes that gap::

    @app.get("/render")
    async def render(request: Request, prompt: str):
        job = await cancel_on_disconnect(request, generate(prompt))
        return job.output

It awaits the call while watching ``request.is_disconnected()`` (Starlette's, or any object
with that coroutine method); when the client is gone the call is cancelled (its job is
cancelled on the worker, as for any cancelled caller) and `ClientDisconnectedError` is
raised, which the framework's error handling sees like any other exception. Use it once the
request's body is read (FastAPI reads it before calling the handler): Starlette's check takes
the next message off the connection.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import anyio

from flash_actors.errors import FlashRuntimeError

if TYPE_CHECKING:
    from collections.abc import Awaitable

__all__ = ["ClientDisconnectedError", "cancel_on_disconnect"]

T = TypeVar("T")
POLL_S = 0.1
"""How often the client's connection is looked at."""


class ClientDisconnectedError(FlashRuntimeError):
    """The HTTP client went away; the remote call it was waiting for was cancelled."""


class _Disconnectable(Protocol):
    async def is_disconnected(self) -> bool: ...


async def cancel_on_disconnect(
    request: _Disconnectable, call: Awaitable[T], *, poll_s: float = POLL_S
) -> T:
    """Await ``call``; cancel it if ``request``'s client disconnects first.

    Raises:
        ClientDisconnectedError: the client went away (``call`` was cancelled).
    """
    outcome: list[Any] = []
    gone = False

    async def run() -> None:
        outcome.append(await call)
        tg.cancel_scope.cancel()

    async def watch() -> None:
        nonlocal gone
        # Starlette offers no disconnect event to wait on, only this non-blocking check
        while not await request.is_disconnected():  # noqa: ASYNC110
            await anyio.sleep(poll_s)
        gone = True
        tg.cancel_scope.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        tg.start_soon(watch)
    if outcome:
        result: T = outcome[0]
        return result
    if gone:
        msg = "the client disconnected; its remote call was cancelled"
        raise ClientDisconnectedError(msg)
    raise AssertionError("unreachable")  # pragma: no cover (cancelled from outside)
