"""Transports: how data-plane and control-plane requests travel (placeholder; see helper)."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Protocol

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["Response", "Transport"]


class Response(NamedTuple):
    """An HTTP answer: status, body, headers (lower-case names)."""

    status: int
    body: bytes
    headers: Mapping[str, str]


class Transport(Protocol):
    """Sends one HTTP request to an absolute URL; raises `DeliveryError` when unreachable."""

    async def request(
        self,
        method: str,
        url: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> Response:
        """Send it; HTTP error statuses are returned, not raised."""
        ...

    async def aclose(self) -> None:
        """Close connections."""
        ...
