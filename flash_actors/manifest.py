"""The flash manifest's public names, kept here for existing imports.

The schema, `load_manifest` and `write_manifest` live in `flash_actors.build.manifest`.
"""

from __future__ import annotations

from flash_actors.build.manifest import (
    MANIFEST_PATH,
    Manifest,
    ManifestFunction,
    ManifestResource,
    load_manifest,
)

__all__ = [
    "MANIFEST_PATH",
    "Manifest",
    "ManifestFunction",
    "ManifestResource",
    "load_manifest",
]
