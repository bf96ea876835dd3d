"""Deployed Flash environments on ``flash local``: each build unpacked in a folder of its own.

``deployBuildToEnvironment`` unpacks the build's archive into
``<state folder>/deployments/<environment id>/<build id>/`` (`unpack`: into a temporary
folder first, members checked by tarfile's ``"data"`` filter, then renamed into place, so a
folder that exists is whole), then `start_environment` runs its resources. Folders of
builds an environment no longer runs are removed (`prune`).

`start_environment` and `stop_environment` are the one seam between the control plane and
the daemon's feature that serves a deployed endpoint from an unpacked archive folder.
"""

from __future__ import annotations

import shutil
import tarfile
from typing import TYPE_CHECKING, Any

import msgspec

from flash_actors._logging import get_logger
from flash_actors._private import private_dir
from flash_actors.build.manifest import PREFIX_ENV

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from pathlib import Path

__all__ = [
    "DEPLOYMENTS",
    "deployment_dir",
    "endpoint_prefix",
    "prune",
    "resource_names",
    "start_environment",
    "stop_environment",
    "unpack",
]

log = get_logger(__name__)

DEPLOYMENTS = "deployments"


def deployment_dir(state_dir: Path, environment_id: str, build_id: str) -> Path:
    """Where an environment's build is unpacked."""
    return state_dir / DEPLOYMENTS / environment_id / build_id


def unpack(archive: Path, target: Path) -> None:
    """Unpack ``archive`` into ``target`` (absent or left as is when it exists).

    Unpacks into a temporary sibling folder and renames it into place: ``target``, when it
    exists, is a whole unpacking. tarfile's ``"data"`` filter refuses absolute paths, paths
    leaving the folder, links pointing out of it, and device files, and drops modes that
    would make files set-uid or writable by others.

    Raises:
        tarfile.TarError: the archive is not a readable tar.gz or holds a refused member.
        OSError: it cannot be read, or the folder cannot be written.
    """
    if target.is_dir():
        return
    private_dir(target.parent)
    tmp = target.with_name(f".{target.name}.unpacking")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o700)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(tmp, filter="data")
        tmp.replace(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def prune(state_dir: Path, environment_id: str, keep: str | None) -> None:
    """Remove an environment's unpacked builds but ``keep`` (None: the whole folder)."""
    folder = state_dir / DEPLOYMENTS / environment_id
    if keep is None:
        shutil.rmtree(folder, ignore_errors=True)
        return
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.name != keep:
            shutil.rmtree(entry, ignore_errors=True)


def resource_names(manifest: Any) -> list[str]:
    """The resources a build's manifest declares (its ``resources`` keys), sorted."""
    resources = manifest.get("resources") if isinstance(manifest, dict) else None
    return sorted(resources) if isinstance(resources, dict) else []


def endpoint_prefix(environment_id: str) -> str:
    """The prefix of an environment's endpoint names: two environments never share one."""
    return f"env-{environment_id.replace('-', '')[:12]}-"


async def start_environment(
    *,
    apply: Callable[[str, dict[str, Any] | None], Awaitable[None]],
    app_name: str,
    environment_name: str,
    environment_id: str,
    folder: Path,
    manifest: Any,
) -> dict[str, str | None]:
    """Run the resources of the build unpacked in ``folder`` as deployed endpoints.

    Each resource with functions becomes the daemon endpoint ``env-<id>-<resource>`` (its
    workers run ``handler_<resource>.py`` from ``folder``, our worker's deployed mode, and
    know the prefix to reach the environment's other resources); a load balancer with
    routes runs that handler as its HTTP app, at ``Host: env-<id>-<resource>.<daemon>``.
    Registering a resource
    that runs already with another build replaces it (its workers restart with the new
    code); `stop_environment` removes the ones a new build dropped.

    Args:
        apply: registers (or with ``None`` removes) a daemon endpoint by name.
        app_name: the Flash app (``X-Flash-App`` of deployed-mode calls).
        environment_name: the environment (``X-Flash-Environment``).
        environment_id: its id.
        folder: the unpacked archive (handlers, ``flash_manifest.json``, dependencies).
        manifest: the build's manifest as uploaded (its ``resources`` are what to start).

    Returns:
        Every resource of the manifest mapped to the endpoint it now runs as, or to None
        when it was not started (a load balancer without routes has nothing to serve; a
        resource whose config does not load is logged). The control plane reports exactly
        this, so it never claims more than runs.
    """
    from flash_actors.build.handlers import handler_name
    from flash_actors.build.manifest import MANIFEST_FILE, load_manifest
    from flash_actors.errors import FlashRuntimeError
    from flash_actors.providers.local.daemon.catalog import (
        deployed_config,
        resource_from_config,
    )

    names = resource_names(manifest)
    started: dict[str, str | None] = dict.fromkeys(names)
    try:
        built = load_manifest(folder / MANIFEST_FILE)
    except FlashRuntimeError as exc:
        log.error(
            "controlplane.environment_not_started", folder=str(folder), error=str(exc)
        )
        return started
    prefix = endpoint_prefix(environment_id)
    for name, entry in sorted(built.resources.items()):
        if not entry.functions or (
            entry.is_load_balanced and not built.routes.get(name)
        ):
            continue
        try:
            resource = resource_from_config(
                {
                    "class": entry.resource_type,
                    "resource": {**entry.config, "name": prefix + name},
                }
            )
            resource = msgspec.structs.replace(
                resource, env={**(resource.env or {}), PREFIX_ENV: prefix}
            )
            await apply(
                prefix + name,
                deployed_config(
                    resource, folder, handler_name(name), resource_name=name
                ),
            )
        except Exception as exc:  # noqa: BLE001 (one resource must not stop the rest)
            log.error(
                "controlplane.resource_not_started",
                app=app_name,
                environment=environment_name,
                resource=name,
                error=getattr(exc, "message", str(exc)),
            )
            continue
        started[name] = prefix + name
    return started


async def stop_environment(
    *,
    apply: Callable[[str, dict[str, Any] | None], Awaitable[None]],
    environment_id: str,
    resources: dict[str, str | None],
) -> None:
    """Remove the daemon endpoints of ``resources`` (their workers stop, queued jobs end)."""
    for endpoint in sorted(e for e in resources.values() if e):
        try:
            await apply(endpoint, None)
        except Exception as exc:  # noqa: BLE001 (the others still go)
            log.error(
                "controlplane.endpoint_not_removed",
                environment_id=environment_id,
                endpoint=endpoint,
                error=getattr(exc, "message", str(exc)),
            )
