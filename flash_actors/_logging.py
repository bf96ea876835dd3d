"""Structured logging: structlog bound loggers over the stdlib logger, quiet by default.

The library only emits events (fixed names such as ``"job.retry"``, data in keyword
arguments); the application, or the ``flash`` CLI, decides where they go. Each event reaches
the stdlib logger with its data rendered into the message (``job.retry job_id=j-1 attempt=1
error='worker w-1 (pid 41) failed ...'``), so plain ``logging.basicConfig()`` shows all of it;
the same data is on the record as attributes (``record.job_id``) for structured handlers, and
``exc_info`` (``log.exception``, ``exc_info=exc``) reaches the record, so the handler prints
the traceback.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from collections.abc import MutableMapping

__all__ = ["get_logger", "log_to_stderr"]

logging.getLogger("flash_actors").addHandler(logging.NullHandler())

_PASSED = ("exc_info", "stack_info", "stacklevel")
"""Keyword arguments that go to the stdlib call itself, as `logging.Logger.log` takes them."""

_RESERVED = frozenset(
    [*logging.LogRecord("", 0, "", 0, "", None, None).__dict__, "message", "asctime"]
)
"""Record attributes ``extra`` may not set (the stdlib raises on them)."""


def _text(value: Any) -> str:
    """A value as it reads in the message: bare when unambiguous, else its repr."""
    if isinstance(value, str):
        if value and not any(c.isspace() or c in "\"'=\\" for c in value):
            return value
        return repr(value)
    if isinstance(value, (int, float, bool)) or value is None:
        return str(value)
    return repr(value)


def _render(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> dict[str, Any]:
    """The last structlog processor: the event and its data as one line, for the stdlib logger.

    The message is ``event key=value ...`` in the order the data was given; the data also
    goes to ``extra`` (except names the stdlib reserves); ``exc_info``, ``stack_info`` and
    ``stacklevel`` are passed on as the stdlib's own arguments.
    """
    kwargs: dict[str, Any] = {k: event_dict.pop(k) for k in _PASSED if k in event_dict}
    event = str(event_dict.pop("event", ""))
    data = " ".join(f"{key}={_text(value)}" for key, value in event_dict.items())
    kwargs["msg"] = f"{event} {data}" if data else event
    kwargs["extra"] = {k: v for k, v in event_dict.items() if k not in _RESERVED}
    return kwargs


def get_logger(name: str, **initial: Any) -> Any:
    """A structlog logger that forwards to the stdlib logger ``name``."""
    return structlog.wrap_logger(
        logging.getLogger(name),
        processors=[structlog.stdlib.filter_by_level, _render],
        wrapper_class=structlog.stdlib.BoundLogger,
        **initial,
    )


def log_to_stderr(level: int = logging.INFO) -> None:
    """Send every event to stderr, one timestamped line each: for our own programs only.

    The ``flash local`` daemon (and the private gateway an embedded runtime starts) calls
    it: its stderr is its log file. A library user's process never does; the application
    configures logging there.
    """
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per webhook request
