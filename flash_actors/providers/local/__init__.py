"""The local provider: endpoints as pools of real worker processes on this machine."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flash_actors.providers.local.provider import LocalProvider as LocalProvider

if TYPE_CHECKING:
    from flash_actors.providers.base import Provider

__all__ = ["LocalProvider", "local_provider"]


def local_provider() -> Provider:
    """The ``local`` provider: a running ``flash local`` daemon's queue, else embedded workers."""
    from flash_actors.providers.local.daemon.record import find_daemon

    record = find_daemon()
    if record is not None:
        from flash_actors.providers.local.daemon_client import GatewayProvider

        return GatewayProvider(record)
    return LocalProvider()
