"""Deployed Flash environments on ``flash local``: each build unpacked in a folder of its own.

``deployBuildToEnvironment`` unpacks the build's archive into
``<state folder>/deployments/<environment id>/<build id>/`` (`unpack`: into a temporary
folder first, members checked by tarfile's ``"data"`` filter, then renamed into place, so a
folder that exists is whole). Folders of builds no endpoint of the environment serves any
more are removed (`prune`).

`deployed_endpoint_config` is the one seam between the control plane and the daemon's
feature that serves a deployed endpoint from an unpacked archive folder.
"""

from __future__ import annotations

import shutil
import tarfile
from typing import TYPE_CHECKING, Any

import msgspec

from flash_actors._private import private_dir
from flash_actors.build.manifest import RESOURCE_ENV
from flash_actors.providers.local.controlplane.language import RequestError

if TYPE_CHECKING:
    from pathlib import Path

    from flash_actors.providers.local.controlplane.state import (
        EndpointRecord,
        TemplateRecord,
    )

__all__ = [
    "DEPLOYMENTS",
    "DEPLOY_ENV",
    "deployed_endpoint_config",
    "deployment_dir",
    "prune",
    "resource_name",
    "resource_names",
    "unpack",
]

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


def prune(state_dir: Path, environment_id: str, keep: set[str] | None) -> None:
    """Remove an environment's unpacked builds but those in ``keep`` (None: all of them)."""
    folder = state_dir / DEPLOYMENTS / environment_id
    if keep is None:
        shutil.rmtree(folder, ignore_errors=True)
        return
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.name not in keep:
            shutil.rmtree(entry, ignore_errors=True)


def resource_names(manifest: Any) -> list[str]:
    """The resources a build's manifest declares (its ``resources`` keys), sorted."""
    resources = manifest.get("resources") if isinstance(manifest, dict) else None
    return sorted(resources) if isinstance(resources, dict) else []


def resource_name(endpoint_name: str, env: list[dict[str, str]]) -> str:
    """The resource a deployed endpoint serves: its env's ``FLASH_RESOURCE_NAME``.

    Without one, its name less the ``-fb`` FlashBoot suffix (how runpod-flash 1.21 maps an
    endpoint back to its manifest entry).
    """
    for pair in env:
        if pair.get("key") == RESOURCE_ENV and pair.get("value"):
            return pair["value"]
    from flash_actors.providers.runpod.provisioning import without_flashboot_suffix

    return without_flashboot_suffix(endpoint_name)


DEPLOY_ENV = frozenset(
    {
        RESOURCE_ENV,
        "FLASH_APP",
        "FLASH_ENV",
        "FLASH_ENVIRONMENT_ID",
        "FLASH_ENDPOINT_TYPE",
        "FLASH_MAIN_FILE",
        "FLASH_APP_VARIABLE",
        "FLASH_SECRET",
    }
)
"""Variables a deploying client puts in a deployed endpoint's env for Flash's worker image.
The daemon sets what its own workers need of them itself (below), so they are taken out of
the template rather than refused as other ``FLASH_`` variables are."""


def deployed_endpoint_config(
    record: EndpointRecord,
    template: TemplateRecord,
    handlers: dict[str, Path],
    *,
    folder: Path,
    app_name: str,
    environment_name: str,
    environment_id: str,
) -> dict[str, Any]:
    """The daemon's config for a deployed endpoint: its resource served from ``folder``.

    Its workers run ``handler_<resource>.py`` from the unpacked build (our worker's deployed
    mode) with the environment's id (``FLASH_ENVIRONMENT_ID``): they find its other
    resources through this daemon's Flash control plane, as Flash workers do on RunPod.
    The endpoint's key derives from the resource's name, as the app's callers derive it.

    Raises:
        RequestError: the build is not unpacked, or the endpoint's config cannot run.
    """
    from flash_actors.build.handlers import handler_name
    from flash_actors.providers.local.controlplane.images import resource_for
    from flash_actors.providers.local.daemon.catalog import deployed_config

    resource = resource_name(record.name, template.env)
    if not folder.is_dir():
        msg = (
            f"endpoint {record.name!r}: the build of Flash environment "
            f"{environment_name!r} it serves is not unpacked here; deploy it again"
        )
        raise RequestError(msg)
    plain = msgspec.structs.replace(
        template, env=[p for p in template.env if p.get("key") not in DEPLOY_ENV]
    )
    served = resource_for(record, plain, handlers)
    served = msgspec.structs.replace(
        served,
        env={
            **(served.env or {}),
            RESOURCE_ENV: resource,
            "FLASH_APP": app_name,
            "FLASH_ENV": environment_name,
            "FLASH_ENVIRONMENT_ID": environment_id,
        },
    )
    return deployed_config(
        served, folder, handler_name(resource), resource_name=resource
    )
