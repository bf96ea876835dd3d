"""Providers by name: ``runtime(provider="runpod")`` and ``FLASH_PROVIDER`` look them up here.

A provider is registered with a factory (a callable returning a new `Provider`), so the next
provider (a cluster engine, say) is one `register_provider` call away, with no change to the
runtime or the call path. The built-in ones are imported only when chosen.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from flash_actors.build.manifest import RESOURCE_ENV
from flash_actors.errors import ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Callable

    from flash_actors.providers.base import Provider

__all__ = ["DEFAULT_PROVIDER", "make_provider", "provider_names", "register_provider"]

DEFAULT_PROVIDER = "local"

_factories: dict[str, Callable[[], Provider]] = {}


def register_provider(name: str, factory: Callable[[], Provider]) -> None:
    """Make ``factory`` the provider called ``name`` (replacing one of that name)."""
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        msg = f"a provider name is letters, digits, '-' and '_', got {name!r}"
        raise ConfigurationError(msg)
    _factories[name] = factory


def provider_names() -> list[str]:
    """The names that `make_provider` accepts, sorted."""
    return sorted(_factories)


def make_provider(name: str | None = None) -> Provider:
    """A new provider: ``name``, else ``FLASH_PROVIDER``, else ``"local"``.

    In deployed code (``FLASH_RESOURCE_NAME`` set) the default is ``"deployed"``: calls to
    the app's other resources go to their deployed endpoints
    (`flash_actors.providers.deployed`).

    Raises:
        ConfigurationError: no provider has that name (the message lists those that do).
    """
    default = "deployed" if os.environ.get(RESOURCE_ENV) else DEFAULT_PROVIDER
    chosen = (name or os.environ.get("FLASH_PROVIDER", "").strip() or default).lower()
    factory = _factories.get(chosen)
    if factory is None:
        known = ", ".join(repr(n) for n in provider_names())
        source = "" if name else " (from FLASH_PROVIDER)"
        msg = f"unknown provider {chosen!r}{source}; available: {known}"
        raise ConfigurationError(msg)
    return factory()


def _inprocess() -> Provider:
    from flash_actors.providers.inprocess import InProcessProvider

    return InProcessProvider()


def _local() -> Provider:
    """A running ``flash local`` daemon's provider when there is one, else embedded workers."""
    from flash_actors.providers.local import local_provider

    return local_provider()


def _deployed() -> Provider:
    from flash_actors.providers.deployed import DeployedProvider

    return DeployedProvider()


def _runpod() -> Provider:
    from flash_actors.providers.runpod.provider import RunPodProvider

    return RunPodProvider()


register_provider("inprocess", _inprocess)
register_provider("local", _local)
register_provider("runpod", _runpod)
register_provider("deployed", _deployed)
