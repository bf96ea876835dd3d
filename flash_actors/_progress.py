"""A one-line progress display on a terminal, for provisioning that takes a while.

Only when standard error is a terminal (and ``FLASH_NO_PROGRESS`` is unset): the line shows
what is being done and for how long, and is cleared when it ends. Structured log events are
emitted either way by the callers.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["progress"]


def _enabled() -> bool:
    return sys.stderr.isatty() and not os.environ.get("FLASH_NO_PROGRESS")


@contextmanager
def progress(text: str) -> Iterator[None]:
    """Show ``flash: <text> ...`` while the block runs, then ``done in N s``."""
    if not _enabled():
        yield
        return
    started = time.monotonic()
    sys.stderr.write(f"\rflash: {text} ...")
    sys.stderr.flush()
    try:
        yield
    finally:
        sys.stderr.write(
            f"\rflash: {text}: done in {time.monotonic() - started:.1f} s\n"
        )
        sys.stderr.flush()
