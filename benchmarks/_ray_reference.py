"""Ray as the reference of the benchmarks: started quietly on this machine, or absent."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def ray_session() -> Iterator[Any]:
    """Yield the ``ray`` module, initialised with 2 CPUs, or ``None`` when not installed."""
    try:
        import ray
    except ImportError:
        yield None
        return
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,
    )
    try:
        yield ray
    finally:
        ray.shutdown()
