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

from flash_actors._logging import get_logger
from flash_actors._private import private_dir

if TYPE_CHECKING:
    from pathlib import Path

__all__ = [
    "DEPLOYMENTS",
    "deployment_dir",
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


async def start_environment(
    *,
    app_name: str,
    environment_name: str,
    environment_id: str,
    folder: Path,
    manifest: Any,
) -> dict[str, str | None]:
    """Run the resources of the build unpacked in ``folder`` as local workers.

    Args:
        app_name: the Flash app (``X-Flash-App`` of deployed-mode calls).
        environment_name: the environment (``X-Flash-Environment``).
        environment_id: its id.
        folder: the unpacked archive (handlers, ``flash_manifest.json``, dependencies).
        manifest: the build's manifest (its ``resources`` are what to start).

    Returns:
        Every resource of the manifest mapped to the id of the endpoint it now runs as, or
        to None when it was not started. The control plane reports exactly this (an
        environment with a None here is ``NOT_STARTED``), so it must never claim more
        than runs.

    TODO(coordinator): wire the daemon's "deployed endpoint served from an unpacked
    archive folder" feature (helper ``preview``) here: register one endpoint per resource
    from ``folder`` and return their ids. Until then this starts nothing, logs what it
    would start, and reports every resource as not started.
    """
    names = resource_names(manifest)
    log.warning(
        "controlplane.environment_not_started",
        app=app_name,
        environment=environment_name,
        environment_id=environment_id,
        folder=str(folder),
        resources=",".join(names),
        reason="serving deployed archives is not wired into this daemon yet",
    )
    return dict.fromkeys(names)


async def stop_environment(
    *, environment_id: str, resources: dict[str, str | None]
) -> None:
    """Stop what `start_environment` started for an environment (its endpoint ids).

    TODO(coordinator): unregister the endpoints of ``resources`` once
    `start_environment` registers them; nothing runs until then.
    """
    running = [endpoint for endpoint in resources.values() if endpoint]
    if running:
        log.warning(
            "controlplane.environment_stop_skipped",
            environment_id=environment_id,
            endpoints=",".join(running),
        )
