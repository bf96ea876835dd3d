"""The local provider: endpoints as pools of real worker processes on this machine."""

from __future__ import annotations

from flash_actors.providers.local.provider import LocalProvider as LocalProvider

__all__ = ["LocalProvider"]
