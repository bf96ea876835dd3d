"""Providers: where endpoints' workers run (in-process for now; local processes; RunPod)."""

from __future__ import annotations

from flash_actors.providers.base import (
    EndpointBackend as EndpointBackend,
    Provider as Provider,
)

__all__ = ["EndpointBackend", "Provider"]
