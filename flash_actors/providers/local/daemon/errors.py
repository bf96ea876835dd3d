"""The daemon's refusal of a request: `GatewayError`, an HTTP status and a message."""

from __future__ import annotations

__all__ = ["GatewayError"]


class GatewayError(Exception):
    """A request the gateway refuses: HTTP ``status`` and the message for ``{"error": ...}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
