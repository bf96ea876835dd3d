"""Structured logging: structlog bound loggers over the stdlib logger, quiet by default.

The library only emits events (fixed names such as ``"job.retry"``, data in keyword
arguments); the application, or the ``flash`` CLI, decides where they go.
"""

from __future__ import annotations

import logging
from typing import Any

import structlog

__all__ = ["get_logger"]

logging.getLogger("flash_actors").addHandler(logging.NullHandler())


def get_logger(name: str, **initial: Any) -> Any:
    """A structlog logger that forwards to the stdlib logger ``name``."""
    return structlog.wrap_logger(
        logging.getLogger(name),
        processors=[
            structlog.stdlib.filter_by_level,
            structlog.stdlib.add_log_level,
            structlog.processors.format_exc_info,
            structlog.stdlib.render_to_log_kwargs,
        ],
        wrapper_class=structlog.stdlib.BoundLogger,
        **initial,
    )
