"""The flash manifest (``.flash/flash_manifest.json``): which function lives on which endpoint.

`write_manifest` scans a project (`flash_actors.build.scanner`, no user code runs) and writes
it; the Registry reads it with `load_manifest` so that calls find their endpoints without the
user's code being imported. The shape is runpod-flash 1.21's (``version``, ``resources`` with
a per-resource ``config``, ``function_registry``, ``routes``), with functions keyed by
``module:qualname`` so that same-named functions in two modules do not collide. It also records
which endpoints call which (``endpoint_calls``), the target Python version and a fingerprint of
the sources. Unknown keys are ignored, not rejected; a wrong field is a `ManifestError` naming
it (msgspec's ``$.path``) and the file.

Deterministic: the same tree gives the same bytes (sorted keys, no wall-clock time;
``generated_at`` comes from ``SOURCE_DATE_EPOCH`` when set, else is left out).
"""

from __future__ import annotations

import os
import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from flash_actors import resources
from flash_actors.errors import BuildError, ManifestError

if TYPE_CHECKING:
    from flash_actors.build.scanner import ScanResult

__all__ = [
    "MANIFEST_ENV",
    "MANIFEST_FILE",
    "MANIFEST_PATH",
    "MANIFEST_VERSION",
    "RESOURCE_ENV",
    "Manifest",
    "ManifestFunction",
    "ManifestResource",
    "build_manifest",
    "deployed_resource",
    "encode_manifest",
    "find_manifest",
    "load_manifest",
    "write_manifest",
]

MANIFEST_FILE = "flash_manifest.json"
"""The manifest's name (runpod-flash's), at the root of a build folder or in ``.flash/``."""
MANIFEST_PATH = Path(".flash") / MANIFEST_FILE
MANIFEST_ENV = "FLASH_MANIFEST_PATH"
"""Where a deployed process reads its manifest (runpod-flash's name for it)."""
RESOURCE_ENV = "FLASH_RESOURCE_NAME"
"""The resource a deployed process serves (runpod-flash's name for it)."""
#: ``1.0`` is runpod-flash's; ``1.1`` adds module-qualified keys, calls and the fingerprint.
MANIFEST_VERSION = "1.1"
_KNOWN_MAJOR = "1"
_LOAD_BALANCED = frozenset(
    {
        "LiveLoadBalancer",
        "CpuLiveLoadBalancer",
        "LoadBalancerSlsResource",
        "CpuLoadBalancerSlsResource",
    }
)
_LIVE = frozenset(
    {"LiveServerless", "CpuLiveServerless", "LiveLoadBalancer", "CpuLiveLoadBalancer"}
)
_RESERVED_PATHS = frozenset({"/execute", "/ping"})
_PYTHON_VERSION = re.compile(r"3\.\d{1,2}")


class ManifestFunction(msgspec.Struct, kw_only=True, frozen=True):
    """One ``@remote`` function or class of a resource."""

    name: str
    module: str | None = None
    qualname: str | None = None
    is_async: bool = True
    is_class: bool = False
    http_method: str | None = None
    http_path: str | None = None
    dependencies: list[str] | None = None
    system_dependencies: list[str] | None = None
    #: ``module:qualname`` keys of the remote functions its body references
    calls: list[str] = []


class ManifestResource(msgspec.Struct, kw_only=True, frozen=True):
    """One endpoint: its resource class, its functions and its config fields."""

    resource_type: str
    functions: list[ManifestFunction] = []
    is_load_balanced: bool = False
    is_live_resource: bool = True
    config: dict[str, object] = {}
    #: config keywords whose values are not literals, as source text (set at run time)
    unresolved_config: dict[str, str] = {}
    file_path: str | None = None
    module_path: str | None = None
    config_variable: str | None = None
    makes_remote_calls: bool = False
    target_python_version: str | None = None


class Manifest(msgspec.Struct, kw_only=True, frozen=True):
    """The whole manifest."""

    version: str = "1.0"
    project_name: str | None = None
    python_version: str | None = None
    generated_at: str | None = None
    source_fingerprint: str | None = None
    resources: dict[str, ManifestResource] = {}
    #: ``module:qualname`` -> resource name
    function_registry: dict[str, str] = {}
    #: resource name -> ``"METHOD /path"`` -> ``module:qualname`` (load balancers)
    routes: dict[str, dict[str, str]] = {}
    #: resource name -> the other resources its functions call
    endpoint_calls: dict[str, list[str]] = {}


_decoder = msgspec.json.Decoder(Manifest)


def deployed_resource() -> str | None:
    """The resource this process serves as deployed code (``FLASH_RESOURCE_NAME``), or None."""
    return os.environ.get(RESOURCE_ENV) or None


def find_manifest(folder: Path | None = None) -> Path:
    """The manifest a deployed process reads.

    ``FLASH_MANIFEST_PATH`` when set, else ``flash_manifest.json`` in ``folder`` (default:
    the working folder, where an unpacked archive has it), else ``.flash/flash_manifest.json``
    there. When none exists, the first (`load_manifest` then says it is missing).
    """
    configured = os.environ.get(MANIFEST_ENV)
    if configured:
        return Path(configured)
    base = Path.cwd() if folder is None else folder
    for candidate in (base / MANIFEST_FILE, base / MANIFEST_PATH):
        if candidate.is_file():
            return candidate
    return base / MANIFEST_FILE


def load_manifest(path: Path | str = MANIFEST_PATH) -> Manifest:
    """Read and check a manifest file.

    Raises:
        ManifestError: the file is missing, not JSON, or not a manifest (the message names the
            file and the wrong field).
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
    except msgspec.ValidationError as exc:
        msg = f"invalid manifest {path}: {_keyed(data) or exc}"
        raise ManifestError(msg) from exc
    except msgspec.DecodeError as exc:
        msg = f"invalid manifest {path}: {exc}"
        raise ManifestError(msg) from exc
    if manifest.version.partition(".")[0] != _KNOWN_MAJOR:
        msg = (
            f"invalid manifest {path}: unsupported version {manifest.version!r} - at `$.version` "
            f"(this flash-actors reads {_KNOWN_MAJOR}.x): rebuild it with `flash build`"
        )
        raise ManifestError(msg)
    for function, resource in manifest.function_registry.items():
        if resource not in manifest.resources:
            msg = (
                f"invalid manifest {path}: function {function!r} maps to unknown resource "
                f"{resource!r} - at `$.function_registry`"
            )
            raise ManifestError(msg)
    return manifest


_KEYED_FIELDS: dict[str, object] = {
    "resources": ManifestResource,
    "function_registry": str,
    "routes": dict[str, str],
    "endpoint_calls": list[str],
}


def _keyed(data: bytes) -> str | None:
    """The msgspec error, with the dict key it hides as ``[...]`` filled in, when one is to blame."""
    raw = msgspec.json.decode(data)
    if not isinstance(raw, dict):
        return None
    for field, kind in _KEYED_FIELDS.items():
        value = raw.get(field)
        if not isinstance(value, dict):
            continue
        for key, item in value.items():
            try:
                msgspec.convert(item, kind)
            except msgspec.ValidationError as exc:
                where = f"$.{field}[{msgspec.json.encode(key).decode()}]"
                text = str(exc)
                if " - at `$" in text:
                    return text.replace(" - at `$", f" - at `{where}", 1)
                return f"{text} - at `{where}`"
    return None


def _generated_at() -> str | None:
    raw = os.environ.get("SOURCE_DATE_EPOCH")
    if raw is None or raw == "":
        return None
    try:
        stamp = datetime.fromtimestamp(int(raw), tz=UTC)
    except (ValueError, OverflowError, OSError):
        msg = f"SOURCE_DATE_EPOCH={raw!r} is not a Unix time in seconds: set an integer or unset it"
        raise BuildError(msg) from None
    return stamp.strftime("%Y-%m-%dT%H:%M:%SZ")


def _enum_values(value: object) -> object:
    """``"GpuGroup.ADA_24"`` -> the member's value, so that the config converts back."""
    if isinstance(value, str):
        enum_name, dot, member = value.partition(".")
        if dot and enum_name in {
            "GpuGroup",
            "CpuInstanceType",
            "DataCenter",
            "ServerlessScalerType",
        }:
            enum = getattr(resources, enum_name)
            if member in enum.__members__:
                return enum[member].value
        return value
    if isinstance(value, list):
        return [_enum_values(item) for item in value]
    if isinstance(value, dict):
        return {key: _enum_values(item) for key, item in value.items()}
    return value


def build_manifest(
    scan: ScanResult,
    *,
    python_version: str | None = None,
    project_name: str | None = None,
) -> Manifest:
    """The manifest of a scanned project.

    Raises:
        BuildError: a bad Python version, or a load balancer's function without a method and
            path, on a reserved path, or two functions on one route.
    """
    version = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
    if not _PYTHON_VERSION.fullmatch(version):
        msg = f"python version {version!r} is not of the form 3.X (e.g. 3.12)"
        raise BuildError(msg)
    by_resource: dict[str, list[ManifestFunction]] = {}
    routes: dict[str, dict[str, str]] = {}
    registry: dict[str, str] = {}
    for fn in scan.functions:
        config = scan.resources[fn.resource]
        if config.resource_type in _LOAD_BALANCED:
            if not fn.http_method or not fn.http_path:
                msg = f"{fn.file}:{fn.line}: {fn.qualname} is on the load balancer {fn.resource!r}: give @remote method= and path="
                raise BuildError(msg)
            if fn.http_path in _RESERVED_PATHS:
                msg = f"{fn.file}:{fn.line}: {fn.qualname}'s path {fn.http_path} is reserved: choose another"
                raise BuildError(msg)
            route = f"{fn.http_method} {fn.http_path}"
            taken = routes.setdefault(fn.resource, {}).get(route)
            if taken is not None:
                msg = f"{fn.file}:{fn.line}: route {route!r} of {fn.resource!r} is taken by {taken}: change one path"
                raise BuildError(msg)
            routes[fn.resource][route] = fn.key
        registry[fn.key] = fn.resource
        by_resource.setdefault(fn.resource, []).append(
            ManifestFunction(
                name=fn.qualname,
                module=fn.module,
                qualname=fn.qualname,
                is_async=fn.is_async,
                is_class=fn.kind == "class",
                http_method=fn.http_method,
                http_path=fn.http_path,
                dependencies=fn.dependencies,
                system_dependencies=fn.system_dependencies,
                calls=fn.calls,
            )
        )
    resources = {}
    for name, config in scan.resources.items():
        enum_fixed = _enum_values(config.config)
        assert isinstance(enum_fixed, dict)  # noqa: S101
        resources[name] = ManifestResource(
            resource_type=config.resource_type,
            functions=by_resource.get(name, []),
            is_load_balanced=config.resource_type in _LOAD_BALANCED,
            is_live_resource=config.resource_type in _LIVE,
            config=enum_fixed,
            unresolved_config=config.unresolved,
            file_path=config.file,
            module_path=config.module,
            config_variable=config.variable,
            makes_remote_calls=name in scan.endpoint_calls,
            target_python_version=version,
        )
    return Manifest(
        version=MANIFEST_VERSION,
        project_name=project_name,
        python_version=version,
        generated_at=_generated_at(),
        source_fingerprint=scan.fingerprint,
        resources=resources,
        function_registry=registry,
        routes=routes,
        endpoint_calls=scan.endpoint_calls,
    )


def encode_manifest(manifest: Manifest) -> bytes:
    """The manifest as stable JSON: sorted keys, two-space indent, a final newline."""
    return (
        msgspec.json.format(msgspec.json.encode(manifest, order="sorted"), indent=2)
        + b"\n"
    )


def write_manifest(
    project_dir: Path | str,
    out_path: Path | str | None = None,
    *,
    python_version: str | None = None,
    project_name: str | None = None,
) -> Manifest:
    """Scan ``project_dir`` and write its manifest (default ``<project>/.flash/flash_manifest.json``).

    ``python_version`` is the target's ``3.X`` (default: the running interpreter's). The file
    is replaced atomically.

    Raises:
        BuildError: the scan failed (see `scan_project`) or the manifest cannot be written.
    """
    from flash_actors.build.scanner import (
        scan_project,
    )  # keeps ast and pathspec off the worker path

    root = Path(project_dir)
    manifest = build_manifest(
        scan_project(root),
        python_version=python_version,
        project_name=project_name or root.resolve().name,
    )
    out = Path(out_path) if out_path is not None else root / MANIFEST_PATH
    tmp = out.with_name(out.name + ".tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(encode_manifest(manifest))
        tmp.replace(out)
    except OSError as exc:
        msg = f"cannot write the manifest {out}: {exc}"
        raise BuildError(msg) from exc
    return manifest
