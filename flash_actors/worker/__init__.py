"""The worker side: executes FunctionRequests (in a worker process, or in-process)."""

from __future__ import annotations

__all__: list[str] = []
