"""``flash local`` as RunPod's control plane: GraphQL at ``POST /graphql`` (see `schema`).

`ControlPlane` answers the requests; `language` reads GraphQL, `state` keeps endpoints and
templates, `images` decides what an endpoint's image runs as.
"""

from __future__ import annotations

from flash_actors.providers.local.controlplane.schema import (
    ControlPlane as ControlPlane,
)

__all__ = ["ControlPlane"]
