"""What an image saved through GraphQL runs as: Flash's worker images as our Flash workers.

There is no Docker here, so an endpoint's image decides what runs:

- Flash's worker images (`FLASH_IMAGES`: ``runpod/flash``, ``runpod/flash-cpu``,
  ``runpod/flash-lb``, ``runpod/flash-lb-cpu``, any tag, with or without ``docker.io/``)
  run as our Flash workers, which execute the code each request carries: a
  ``LiveServerless``-family resource.
- An image the local user mapped to a RunPod handler file, in ``<state folder>/images.json``
  (``{"my/image:tag": "path/to/handler.py"}``, relative paths from the folder that holds
  the state folder), runs that handler with stock ``runpod`` workers: a
  ``ServerlessEndpoint`` with ``handler=``. Only the local user can write there (the state
  folder is private), so a GraphQL caller never chooses what code a mapped image loads.
- Any other image is refused, with a message saying how to map it.

`resource_for` turns a stored endpoint and its template into our `ServerlessResource`,
named by the endpoint's id (its name in the daemon, so ``/v2/{id}/run`` works).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from flash_actors import resources
from flash_actors.errors import ConfigurationError
from flash_actors.providers.local.controlplane.language import RequestError
from flash_actors.providers.local.daemon.catalog import UNSAFE_ENV, config_of

if TYPE_CHECKING:
    from pathlib import Path

    from flash_actors.providers.local.controlplane.state import (
        EndpointRecord,
        TemplateRecord,
    )

__all__ = [
    "FLASH_IMAGES",
    "IMAGES_FILE",
    "RUNTIME_ENV",
    "config_for",
    "flash_image_kind",
    "image_map",
    "resource_for",
]

FLASH_IMAGES: dict[str, str] = {
    "runpod/flash": "gpu",
    "runpod/flash-cpu": "cpu",
    "runpod/flash-lb": "lb",
    "runpod/flash-lb-cpu": "lb-cpu",
}
"""Flash's worker images (repository, without tag) and the kind of endpoint each serves."""

IMAGES_FILE = "images.json"
"""The local user's image -> handler file map, in the state folder."""

IMAGES_FILE_LIMIT = 1024 * 1024

RUNTIME_ENV = frozenset({"RUNPOD_API_KEY", "FLASH_MODULE_PATH"})
"""Variables Flash puts in every template for its own worker runtime; ours does not read
them, so they are dropped rather than handed to the workers."""

_REGISTRY_PREFIXES = ("docker.io/", "registry-1.docker.io/", "index.docker.io/")


def _repository(image: str) -> str:
    name = image.strip().split("@", 1)[0]
    for prefix in _REGISTRY_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name = name[:colon]
    return name


def flash_image_kind(image: str) -> str | None:
    """``"gpu"``, ``"cpu"``, ``"lb"`` or ``"lb-cpu"`` for a Flash worker image, else None."""
    return FLASH_IMAGES.get(_repository(image))


def image_map(state_dir: Path) -> dict[str, Path]:
    """The local user's image -> handler map (empty when there is no file).

    Raises:
        RequestError: the file cannot be read, is not a JSON object of strings, or names
            something other than a ``.py`` file.
    """
    path = state_dir / IMAGES_FILE
    try:
        with path.open("rb") as source:
            data = source.read(IMAGES_FILE_LIMIT + 1)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        msg = f"the image map {str(path)!r} cannot be read: {exc}"
        raise RequestError(msg) from exc
    try:
        if len(data) > IMAGES_FILE_LIMIT:
            msg = f"larger than {IMAGES_FILE_LIMIT} bytes"
            raise ValueError(msg)
        mapping = json.loads(data)
        if not isinstance(mapping, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()
        ):
            msg = 'it must be a JSON object {"image": "path/to/handler.py", ...}'
            raise ValueError(msg)
    except (ValueError, RecursionError) as exc:
        msg = f"the image map {str(path)!r} is not valid: {exc}"
        raise RequestError(msg) from None
    base = state_dir.parent
    return {image.strip(): base / handler for image, handler in mapping.items()}


def _gpus(gpu_ids: str) -> list[resources.GpuGroup]:
    """RunPod's ``gpuIds`` (pools and GPU models, ``-model`` excluding one) as our pools.

    Pools this version does not know are skipped; none known means any GPU.
    """
    by_model = {
        model: group for group in resources.GpuGroup.all() for model in group.models
    }
    found: list[resources.GpuGroup] = []
    for part in gpu_ids.split(","):
        item = part.strip()
        if not item or item.startswith("-"):
            continue
        group = by_model.get(item)
        if group is None:
            try:
                group = resources.GpuGroup(item)
            except ValueError:
                continue
        if group not in found:
            found.append(group)
    return found or [resources.GpuGroup.ANY]


def _cpus(endpoint: EndpointRecord) -> list[resources.CpuInstanceType] | None:
    if not endpoint.instanceIds:
        return None
    out = []
    for item in endpoint.instanceIds:
        try:
            out.append(resources.CpuInstanceType(item))
        except ValueError:
            valid = ", ".join(t.value for t in resources.CpuInstanceType)
            msg = f'instanceIds: unknown CPU instance type "{item}"; valid: {valid}'
            raise RequestError(msg) from None
    return out


def _env(template: TemplateRecord) -> dict[str, str]:
    env = {
        pair["key"]: pair["value"]
        for pair in template.env
        if pair["key"] not in RUNTIME_ENV
    }
    unsafe = sorted(key for key in env if UNSAFE_ENV.fullmatch(key))
    if unsafe:
        msg = (
            f"template {template.name!r}: env {', '.join(unsafe)} would change the code "
            "its workers load, and over the API such variables cannot be set; remove "
            "them, or set them in the environment of `flash local up` instead"
        )
        raise RequestError(msg)
    return env


def resource_for(
    endpoint: EndpointRecord, template: TemplateRecord, handlers: dict[str, Path]
) -> resources.ServerlessResource:
    """The resource config that runs ``endpoint`` here, named by its id.

    A CPU endpoint is one given ``instanceIds``, or one on a CPU Flash image; a load
    balancer one of ``type`` LB or on an LB image. RunPod-only settings (scaler,
    locations, CUDA versions, FlashBoot) are kept in the record and change nothing here.

    Raises:
        RequestError: the image is neither Flash's nor mapped to a handler, or a setting
            cannot run (an unknown CPU type, unsafe env, workersMin > workersMax, ...).
    """
    image = template.imageName.strip()
    kind = flash_image_kind(image)
    cpus = _cpus(endpoint)
    env = _env(template)
    cpu = bool(cpus) or (kind is not None and kind.endswith("cpu"))
    balanced = endpoint.type == "LB" or kind in {"lb", "lb-cpu"}
    handler = handlers.get(image)
    cls: type[resources.ServerlessResource]
    if kind is not None:
        if balanced:
            cls = resources.CpuLiveLoadBalancer if cpu else resources.LiveLoadBalancer
        else:
            cls = resources.CpuLiveServerless if cpu else resources.LiveServerless
    elif handler is not None:
        if balanced:
            msg = (
                f"image {image!r} is mapped to the handler file {str(handler)!r}, which "
                "serves queue jobs; a load-balancer endpoint (type LB) needs a Flash "
                "image (runpod/flash-lb or runpod/flash-lb-cpu)"
            )
            raise RequestError(msg)
        if not handler.is_file() or handler.suffix != ".py":
            msg = (
                f"image {image!r} is mapped to {str(handler)!r} in {IMAGES_FILE}, which "
                "is not an existing .py file"
            )
            raise RequestError(msg)
        cls = resources.CpuServerlessEndpoint if cpu else resources.ServerlessEndpoint
    else:
        shown = image or "(none)"
        msg = (
            f"image {shown!r} cannot run on flash local: it runs no containers (there "
            "is no Docker here), only Flash's worker images (runpod/flash, "
            "runpod/flash-cpu, runpod/flash-lb, runpod/flash-lb-cpu). To serve a RunPod "
            f"handler under this image, map it to the handler file in the state "
            f'folder\'s {IMAGES_FILE}: {{"{image}": "path/to/handler.py"}}'
        )
        raise RequestError(msg)
    try:
        return cls(
            name=endpoint.id,
            gpus=None if cpu else _gpus(endpoint.gpuIds),
            gpuCount=max(1, endpoint.gpuCount),
            instanceIds=cpus if cpu else None,
            workersMin=endpoint.workersMin,
            workersMax=endpoint.workersMax,
            idleTimeout=endpoint.idleTimeout,
            executionTimeoutMs=endpoint.executionTimeoutMs,
            env=env or None,
            # one data center here: the first of networkVolumeIds when no networkVolumeId
            networkVolumeId=endpoint.networkVolumeId
            or next(
                (
                    v["networkVolumeId"]
                    for v in endpoint.networkVolumeIds
                    if v.get("networkVolumeId")
                ),
                None,
            ),
            scalerType=resources.ServerlessScalerType(endpoint.scalerType),
            scalerValue=endpoint.scalerValue,
            imageName=image,
            locations=endpoint.locations,
            flashboot=endpoint.flashBootType is not None,
            handler=None if handler is None or kind is not None else str(handler),
        )
    except (ConfigurationError, ValueError) as exc:
        raise RequestError(f"endpoint {endpoint.name!r}: {exc}") from None


def config_for(
    endpoint: EndpointRecord, template: TemplateRecord, handlers: dict[str, Path]
) -> dict[str, Any]:
    """The daemon's registration config for ``endpoint`` (`resource_for`, then `config_of`).

    Raises:
        RequestError: as `resource_for`.
    """
    return config_of(resource_for(endpoint, template, handlers))
