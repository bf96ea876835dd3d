"""Per-job stdout capture for a worker process that runs several jobs at once.

``sys.stdout`` is replaced once by a proxy that writes everything to the worker's own stdout
(its log file) and, while a job runs, also to that job's buffer (a contextvar, inherited by
the threads ``anyio.to_thread`` starts), which goes back to the caller as the job's ``stdout``.
So what a function prints is in the worker's log whichever way it was called: a queue job, a
load-balancer call through ``@remote``, or a route requested over plain HTTP.
"""

from __future__ import annotations

import io
import sys
from contextvars import ContextVar, Token
from typing import Any, TextIO

__all__ = ["capture_stdout", "install"]

_buffer: ContextVar[list[str] | None] = ContextVar("flash_job_stdout", default=None)


class _Proxy(io.TextIOBase):
    def __init__(self, real: TextIO) -> None:
        self._real = real

    def write(self, text: str) -> int:
        parts = _buffer.get()
        if parts is not None:
            parts.append(text)
        return self._real.write(text)

    def flush(self) -> None:
        self._real.flush()

    def fileno(self) -> int:
        return self._real.fileno()

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._real.encoding

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def install() -> None:
    """Route ``print`` through the per-job proxy (idempotent)."""
    if not isinstance(sys.stdout, _Proxy):
        sys.stdout = _Proxy(sys.stdout)


class capture_stdout:  # named as the function it replaced: ``with capture_stdout() as out``
    """Collect what the current job prints; ``getvalue()`` is the text.

    A class rather than a ``contextlib.contextmanager``, and a list of what was written
    rather than a ``StringIO``: per job, no generator and no buffer object.
    """

    __slots__ = ("_parts", "_token")

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._token: Token[list[str] | None] | None = None

    def __enter__(self) -> capture_stdout:
        self._token = _buffer.set(self._parts)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            _buffer.reset(self._token)
            self._token = None

    def getvalue(self) -> str:
        """What was printed so far."""
        return "".join(self._parts)
