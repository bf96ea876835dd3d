"""The flash manifest (``.flash/flash_manifest.json``): which function lives on which endpoint.

`flash build` writes it; the Registry reads it so that calls find their endpoints without the
user's code being imported. The shape is Flash's (version, resources, function_registry,
routes); unknown keys are kept out of the way, not rejected. ``config`` carries a resource's
own fields so the endpoint can be rebuilt from the manifest alone.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from flash_actors.errors import ManifestError

__all__ = [
    "MANIFEST_PATH",
    "Manifest",
    "ManifestFunction",
    "ManifestResource",
    "load_manifest",
]

MANIFEST_PATH = Path(".flash") / "flash_manifest.json"


class ManifestFunction(msgspec.Struct, kw_only=True, frozen=True):
    """One ``@remote`` function or class of a resource."""

    name: str
    module: str | None = None
    is_async: bool = True
    is_class: bool = False
    http_method: str | None = None
    http_path: str | None = None


class ManifestResource(msgspec.Struct, kw_only=True, frozen=True):
    """One endpoint: its resource class, its functions and its config fields."""

    resource_type: str
    functions: list[ManifestFunction] = []
    is_load_balanced: bool = False
    is_live_resource: bool = True
    config: dict[str, object] = {}


class Manifest(msgspec.Struct, kw_only=True, frozen=True):
    """The whole manifest."""

    version: str = "1.0"
    project_name: str | None = None
    python_version: str | None = None
    generated_at: str | None = None
    resources: dict[str, ManifestResource] = {}
    function_registry: dict[str, str] = {}
    routes: dict[str, dict[str, str]] = {}


_decoder = msgspec.json.Decoder(Manifest)


def load_manifest(path: Path | str = MANIFEST_PATH) -> Manifest:
    """Read and check a manifest file.

    Raises:
        ManifestError: the file is missing, not JSON, or not a manifest (the message says
            which field is wrong).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        msg = f"no manifest at {path}: run `flash build` first"
        raise ManifestError(msg) from None
    except OSError as exc:
        msg = f"cannot read the manifest {path}: {exc}"
        raise ManifestError(msg) from exc
    try:
        manifest = _decoder.decode(data)
    except msgspec.DecodeError as exc:
        msg = f"invalid manifest {path}: {exc}"
        raise ManifestError(msg) from exc
    for function, resource in manifest.function_registry.items():
        if resource not in manifest.resources:
            msg = f"invalid manifest {path}: function {function!r} maps to unknown resource {resource!r}"
            raise ManifestError(msg)
    return manifest
