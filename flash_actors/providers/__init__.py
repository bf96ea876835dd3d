"""Providers: where endpoints' workers run (in-process; local processes; RunPod; deployed).

``deployed`` (`flash_actors.providers.deployed`) is what deployed code uses to reach the
app's other resources at their deployed endpoints.
"""

from __future__ import annotations

from flash_actors.providers.base import (
    EndpointBackend as EndpointBackend,
    Provider as Provider,
)

__all__ = ["EndpointBackend", "Provider"]
