"""The running event loop's clock, read without a backend lookup per call."""

from __future__ import annotations

import asyncio  # noqa: TID251 (only to read the running loop's clock; trio falls back)
from typing import TYPE_CHECKING

import anyio

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["loop_clock"]


def loop_clock() -> Callable[[], float]:
    """The running event loop's clock: what `anyio.current_time` reads, as a plain callable.

    ``anyio.current_time()`` asks sniffio for the backend on every call (~1 us, several
    times per call on the hot path); the asyncio loop's ``time`` is that clock. Elsewhere
    (trio) it is `anyio.current_time` itself.
    """
    try:
        return asyncio.get_running_loop().time
    except RuntimeError:
        return anyio.current_time
