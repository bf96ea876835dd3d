"""``flash local`` as RunPod's control plane: GraphQL at ``POST /graphql`` (see `schema`).

`ControlPlane` answers the requests; `language` reads GraphQL, `schema` answers endpoints and
templates, `flash` Flash apps, environments and builds (`uploads` receives their archives,
`deployments` unpacks and runs them), `state` keeps the records, `images` decides what an
endpoint's image runs as.
"""

from __future__ import annotations

from flash_actors.providers.local.controlplane.flash import (
    ControlPlane as ControlPlane,
)

__all__ = ["ControlPlane"]
