"""A one-shot wake-up with one waiter, lighter than `anyio.Event` on asyncio.

A call in flight holds one (the pool's job waits on it). `anyio.Event` on asyncio wraps an
`asyncio.Event`, which allocates a deque (~600 bytes) and waits through two coroutine frames;
at 10,000 calls in flight that is most of a kilobyte each, all of it tracked by the garbage
collector. `wake_class` gives, on asyncio, a wake whose waiter awaits a bare future made when
it starts waiting (~150 bytes, no frame); elsewhere (trio) anyio's own Event.

Only ONE task may wait on a wake at a time: cancelling a waiter cancels the future it awaits.
"""

from __future__ import annotations

import asyncio  # noqa: TID251 (the asyncio fast path; trio falls back to anyio.Event)
from typing import TYPE_CHECKING, Protocol

import anyio
import anyio.lowlevel

if TYPE_CHECKING:
    from collections.abc import Awaitable

__all__ = ["Wake", "wake_class"]


class Wake(Protocol):
    """What the hot path needs of an event: set, is_set, and one waiter."""

    def set(self) -> None: ...

    def is_set(self) -> bool: ...

    def wait(self) -> Awaitable[None]: ...


class _FutureWake:
    """`Wake` on asyncio: a future, made when its one waiter starts waiting."""

    __slots__ = ("_future", "_set")

    def __init__(self) -> None:
        self._set = False
        self._future: asyncio.Future[None] | None = None

    def set(self) -> None:
        if self._set:
            return
        self._set = True
        future = self._future
        if future is not None and not future.done():  # done: its waiter was cancelled
            future.set_result(None)

    def is_set(self) -> bool:
        return self._set

    def wait(self) -> Awaitable[None]:
        if self._set:
            return (
                anyio.lowlevel.checkpoint()
            )  # as anyio.Event: a checkpoint all the same
        future = self._future
        if future is None or future.done():
            future = self._future = asyncio.get_running_loop().create_future()
        return future


def wake_class() -> type[Wake]:
    """The `Wake` class for the running event loop (call it in a task of that loop)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return type(anyio.Event())
    return _FutureWake
