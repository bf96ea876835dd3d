"""Provisioning RunPod endpoints: the EndpointInput runpod-flash 1.21 sends, and its lifecycle.

`endpoint_input` turns one of our resource configs into the ``saveEndpoint`` input that an
unmodified runpod-flash 1.21 program in live mode (``FLASH_IS_LIVE_PROVISIONING=true``, what
``flash run`` sets) sends for the same config, key for key and in the same order:

- ``name`` is ``live-<name>`` (a trailing ``-fb`` dropped when ``flashboot`` is on, as 1.21
  does), so flash-actors and ``flash run`` share the endpoint of a name.
- The template travels inline: Flash's worker image (``runpod/flash``, ``runpod/flash-cpu``,
  ``runpod/flash-lb``, ``runpod/flash-lb-cpu`` at ``py3.12-latest``; ``FLASH_GPU_IMAGE``,
  ``FLASH_CPU_IMAGE``, ``FLASH_LB_IMAGE``, ``FLASH_CPU_LB_IMAGE`` and ``FLASH_IMAGE_TAG``
  override them as in Flash) unless the config names an image, the container disk (CPU
  endpoints sized to their instance type's limit), the workers' env as ``[{key, value}]``
  with ``RUNPOD_API_KEY`` added (Flash's workers call other endpoints with it), and 1.21's
  template name ``<Class>_<md5>__PodTemplate_<md5>``.
- ``gpuIds`` (from `GpuGroup`; `GpuGroup.ANY` is every pool 1.21 knows), ``gpuCount``,
  ``minCudaVersion`` and ``allowedCudaVersions`` for GPU endpoints; ``instanceIds`` (from
  `CpuInstanceType`) for CPU ones; ``type`` ``"QB"`` or ``"LB"`` (load balancers scale by
  ``REQUEST_COUNT``, the only scaler 1.21 accepts for them); ``flashBootType``.

Two deliberate differences: a config with both ``template.env`` and ``env`` sends both merged
(``env`` on top, as our local provider runs it) where 1.21 keeps only ``env``; and
``networkVolume=NetworkVolume(...)`` must carry the volume's ``id`` (this module creates no
volumes; 1.21 creates it through RunPod's REST API).

`ensure_endpoint`, `list_endpoints` and `remove_endpoint` are the library calls behind the
provider's first call to an endpoint and behind ``flash undeploy``. The endpoints this
package manages are those named ``live-...``: the ones it created and the ones
runpod-flash's ``flash run`` created, which are the same kind of endpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import TYPE_CHECKING, Any

from flash_actors._logging import get_logger
from flash_actors.errors import ConfigurationError, GraphQLError
from flash_actors.resources import (
    CpuInstanceType,
    DataCenter,
    GpuGroup,
    ServerlessScalerType,
)

if TYPE_CHECKING:
    from collections.abc import Mapping

    from flash_actors.providers.runpod.graphql import ControlPlane
    from flash_actors.resources import PodTemplate, ServerlessResource

__all__ = [
    "LIVE_PREFIX",
    "config_differences",
    "endpoint_input",
    "ensure_endpoint",
    "list_endpoints",
    "live_name",
    "remove_endpoint",
    "same_config",
    "update_endpoint",
    "without_flashboot_suffix",
]

log = get_logger(__name__)

LIVE_PREFIX = "live-"
"""runpod-flash's prefix for live-provisioned endpoints; marks the endpoints we manage."""

PYTHON_VERSION = "3.12"
"""The Python of Flash's worker images (1.21's default)."""

_IMAGE_REPOS = {
    "gpu": "runpod/flash",
    "cpu": "runpod/flash-cpu",
    "lb": "runpod/flash-lb",
    "lb-cpu": "runpod/flash-lb-cpu",
}
_IMAGE_ENV = {
    "gpu": "FLASH_GPU_IMAGE",
    "cpu": "FLASH_CPU_IMAGE",
    "lb": "FLASH_LB_IMAGE",
    "lb-cpu": "FLASH_CPU_LB_IMAGE",
}

ALL_GPU_POOLS = (
    "ADA_24",
    "ADA_32_PRO",
    "ADA_48_PRO",
    "ADA_80_PRO",
    "AMPERE_16",
    "AMPERE_24",
    "AMPERE_48",
    "AMPERE_80",
    "BLACKWELL_180",
    "BLACKWELL_96",
    "HOPPER_141",
)
"""What 1.21 sends as ``gpuIds`` for `GpuGroup.ANY`: every pool it knows."""

MIN_CUDA_VERSION = "12.8"
"""1.21's default ``minCudaVersion`` for GPU endpoints."""

_TEMPLATE_DISK_DEFAULT = 64
_PLATFORM_ENV = frozenset({"PORT", "PORT_HEALTH"})
"""Env keys RunPod adds to a load balancer's template itself; never a difference."""


def without_flashboot_suffix(name: str) -> str:
    """``name`` less any trailing ``-fb`` (the FlashBoot suffix older Flash versions added)."""
    while name.endswith("-fb"):
        name = name[:-3]
    return name


def live_name(name: str, *, flashboot: bool = True) -> str:
    """The RunPod name of our endpoint ``name``: ``live-<name>``, as 1.21 names it.

    A leading ``live-`` is not doubled; with ``flashboot`` a trailing ``-fb`` (the suffix
    older Flash versions added) is dropped.
    """
    while name.startswith(LIVE_PREFIX):
        name = name[len(LIVE_PREFIX) :]
    name = f"{LIVE_PREFIX}{name}"
    return without_flashboot_suffix(name) if flashboot else name


def _md5(text: str) -> str:
    return hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()


def _json(value: Any) -> str:
    """Compact JSON as pydantic's ``model_dump_json`` writes it (what 1.21 hashes)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _image(kind: str) -> str:
    override = os.environ.get(_IMAGE_ENV[kind])
    if override:
        return override
    tag = os.environ.get("FLASH_IMAGE_TAG", "latest")
    return f"{_IMAGE_REPOS[kind]}:py{PYTHON_VERSION}-{tag}"


def _cpu_disk_limit(instances: list[CpuInstanceType]) -> int:
    """The largest container disk every one of ``instances`` allows (RunPod's rule)."""
    return min(i.vcpu * (15 if i.generation == 5 else 10) for i in instances)


def _gpu_ids(gpus: list[GpuGroup]) -> str:
    pools = {
        p for g in gpus for p in (ALL_GPU_POOLS if g is GpuGroup.ANY else [g.value])
    }
    return ",".join(
        sorted(pools, key=lambda p: (p.startswith("-"), p.lstrip("-").lower()))
    )


def _template_fields(template: PodTemplate | None) -> dict[str, Any]:
    """A template's fields in 1.21's order, as its ``PodTemplate`` holds them."""
    if template is None:
        return {
            "advancedStart": False,
            "config": {},
            "containerDiskInGb": _TEMPLATE_DISK_DEFAULT,
            "containerRegistryAuthId": "",
            "dockerArgs": "",
            "env": [],
            "imageName": "",
            "name": "",
            "ports": "",
            "startScript": "",
        }
    return {
        "advancedStart": template.advancedStart,
        "config": {},
        "containerDiskInGb": template.containerDiskInGb,
        "containerRegistryAuthId": template.containerRegistryAuthId,
        "dockerArgs": template.dockerArgs,
        "env": [dict(pair) for pair in template.env],
        "imageName": template.imageName,
        "name": template.name,
        "ports": template.ports,
        "startScript": template.startScript,
    }


def endpoint_input(
    resource: ServerlessResource,
    *,
    api_key: str | None = None,
    environment_id: str | None = None,
) -> dict[str, Any]:
    """The ``saveEndpoint`` input runpod-flash 1.21 sends for ``resource``.

    Args:
        resource: the endpoint's config.
        api_key: added to the template's env as ``RUNPOD_API_KEY`` unless the config sets
            that variable itself (1.21 adds the caller's key the same way); ``None`` adds
            nothing.
        environment_id: ``None`` for a live endpoint (``live-<name>``, what ``flash run``
            provisions); else the Flash environment a deployed resource's endpoint belongs
            to (``flash deploy``): it is named as the resource and carries
            ``flashEnvironmentId``, as 1.21's deploy sends it.

    Raises:
        ConfigurationError: the config cannot run on RunPod (no image for a non-Live class,
            idleTimeout outside 1-3600, a CPU container disk over the instance's limit, a
            network volume without an id); the message names the resource and the fix.
    """
    kind = type(resource).__name__
    owner = f"{kind}(name={resource.name!r})"
    if not 1 <= resource.idleTimeout <= 3600:
        msg = f"{owner}: idleTimeout must be 1 to 3600 seconds on RunPod, got {resource.idleTimeout}"
        raise ConfigurationError(msg)
    network_volume_id = resource.networkVolumeId
    if network_volume_id is None and resource.networkVolume is not None:
        if resource.networkVolume.id is None:
            msg = (
                f"{owner}: networkVolume {resource.networkVolume.name!r} has no id; create "
                "the volume on RunPod first and pass networkVolumeId='<its id>'"
            )
            raise ConfigurationError(msg)
        network_volume_id = resource.networkVolume.id
    cpu_shape = type(resource).cpu_class  # 1.21's Cpu* classes leave out the GPU fields
    instances = list(resource.instanceIds or [])
    gpus = list(resource.gpus or [])
    if resource.is_load_balancer:
        image_kind = "lb-cpu" if cpu_shape else "lb"
    else:
        image_kind = "cpu" if cpu_shape else "gpu"
    image = resource.imageName or (_image(image_kind) if resource.is_live else "")
    template = resource.template
    if not (image or (template and template.imageName) or resource.templateId):
        detail = (
            "; handler= runs only on the local provider"
            if resource.handler is not None
            else ""
        )
        msg = (
            f"{owner}: a {kind} on RunPod needs its worker image: pass "
            f"imageName='<registry/image:tag>' (or templateId=){detail}"
        )
        raise ConfigurationError(msg)

    locations = os.environ.get("RUNPOD_DEFAULT_LOCATIONS") or resource.locations
    if not locations:
        default_dc = os.environ.get("RUNPOD_DEFAULT_DATACENTER")
        if default_dc:
            locations = default_dc
        elif resource.datacenter is not None:
            locations = DataCenter(resource.datacenter).value
    scaler = (
        ServerlessScalerType.REQUEST_COUNT
        if resource.is_load_balancer
        else ServerlessScalerType(resource.scalerType)
    )
    if environment_id is None:
        name = live_name(resource.name, flashboot=resource.flashboot)
    else:
        name = resource.name
        if resource.flashboot:
            name = without_flashboot_suffix(name)
    gpu_count: int | None
    gpu_ids: str | None
    cuda: str | None
    if (
        instances
    ):  # a CPU endpoint: 1.21 zeroes the GPU fields (and leaves them out on Cpu*)
        gpu_count, gpu_ids, cuda = 0, "", None if cpu_shape else MIN_CUDA_VERSION
    else:
        gpu_count, gpu_ids, cuda = resource.gpuCount, _gpu_ids(gpus), MIN_CUDA_VERSION

    # 1.21's resource id: md5 over its hashed fields, in its model's field order
    hashed: dict[str, Any] = {}
    if resource.env is not None:
        hashed["env"] = dict(resource.env)
    if resource.datacenter is not None:
        hashed["datacenter"] = [DataCenter(resource.datacenter).value]
    hashed["executionTimeoutMs"] = resource.executionTimeoutMs
    hashed["gpuCount"] = gpu_count
    if cuda is not None:
        hashed["minCudaVersion"] = cuda
    if locations:
        hashed["locations"] = locations
    hashed["name"] = name
    if network_volume_id is not None:
        hashed["networkVolumeId"] = network_volume_id
    hashed.update(
        scalerType=scaler.value,
        scalerValue=resource.scalerValue,
        type="LB" if resource.is_load_balancer else "QB",
        workersMax=resource.workersMax,
        workersMin=resource.workersMin,
        workersPFBTarget=0,
        allowedCudaVersions="",
        gpuIds=gpu_ids,
    )
    resource_id = f"{kind}_{_md5(f'{kind}:{_json(hashed)}')}"

    payload: dict[str, Any] = {"executionTimeoutMs": resource.executionTimeoutMs}
    if environment_id is not None:
        payload["flashEnvironmentId"] = environment_id
    if not cpu_shape:
        payload["gpuCount"] = gpu_count
    payload["idleTimeout"] = resource.idleTimeout
    if not cpu_shape:
        payload["minCudaVersion"] = cuda
    if instances:
        payload["instanceIds"] = [i.value for i in instances]
    if locations:
        payload["locations"] = locations
    payload["name"] = name
    if network_volume_id is not None:
        payload["networkVolumeId"] = network_volume_id
    payload["scalerType"] = scaler.value
    payload["scalerValue"] = resource.scalerValue
    if resource.templateId:
        payload["templateId"] = resource.templateId
    payload["type"] = hashed["type"]
    payload["workersMax"] = resource.workersMax
    payload["workersMin"] = resource.workersMin
    payload["workersPFBTarget"] = 0
    if not cpu_shape:
        payload["allowedCudaVersions"] = ""
        payload["gpuIds"] = gpu_ids
    if not resource.templateId:
        payload["template"] = _template(
            resource, resource_id, image, instances, api_key
        )
    if resource.flashboot:
        payload["flashBootType"] = "FLASHBOOT"
    return payload


def _template(
    resource: ServerlessResource,
    resource_id: str,
    image: str,
    instances: list[CpuInstanceType],
    api_key: str | None,
) -> dict[str, Any]:
    """The inline template of `endpoint_input`, named as 1.21 names it."""
    owner = f"{type(resource).__name__}(name={resource.name!r})"
    fields = _template_fields(resource.template)
    if resource.template is None:
        fields["name"] = resource_id
        fields["imageName"] = image
        if resource.env is not None:
            fields["env"] = [{"key": k, "value": v} for k, v in resource.env.items()]
    template_id = f"PodTemplate_{_md5(f'PodTemplate:{_json(fields)}')}"
    fields["name"] = f"{resource_id}__{template_id}"
    if image:
        fields["imageName"] = image
    env = resource.worker_env()
    if api_key and "RUNPOD_API_KEY" not in env:
        env["RUNPOD_API_KEY"] = api_key
    fields["env"] = [{"key": k, "value": v} for k, v in env.items()]
    if instances:
        limit = _cpu_disk_limit(instances)
        if fields["containerDiskInGb"] == _TEMPLATE_DISK_DEFAULT:
            fields["containerDiskInGb"] = limit
        elif fields["containerDiskInGb"] > limit:
            msg = (
                f"{owner}: containerDiskInGb {fields['containerDiskInGb']} is over the "
                f"{limit} GB that instance types {', '.join(i.value for i in instances)} "
                "allow: lower it or choose larger instances"
            )
            raise ConfigurationError(msg)
    return fields


def _blank(value: Any) -> bool:
    return value is None or value in ("", [])


def _env_of(pairs: Any) -> dict[str, str]:
    if not isinstance(pairs, list):
        return {}
    return {
        str(p.get("key")): str(p.get("value", ""))
        for p in pairs
        if isinstance(p, dict) and p.get("key")
    }


def _ids(value: Any) -> set[str]:
    """``gpuIds`` (a comma-separated string) or ``instanceIds`` (a list) as a set."""
    items = value.split(",") if isinstance(value, str) else (value or [])
    return {str(item).strip() for item in items if str(item).strip()}


def config_differences(
    existing: Mapping[str, Any], desired: Mapping[str, Any]
) -> list[str]:
    """The fields in which the RunPod endpoint ``existing`` differs from ``desired``.

    ``existing`` is an endpoint as `ControlPlane.find_endpoints` returns it, ``desired`` an
    `endpoint_input`. Fields the server did not return count as equal (there is nothing to
    compare); ``gpuIds`` and ``instanceIds`` compare as sets, an empty string and ``None``
    as the same, ``executionTimeoutMs`` 0 as RunPod's default (600000), and the env keys
    RunPod adds to a load balancer's template (``PORT``, ``PORT_HEALTH``) are ignored.
    Template fields are named ``template.<field>``.
    """
    differ: list[str] = []
    for key in (
        "idleTimeout",
        "locations",
        "networkVolumeId",
        "scalerType",
        "scalerValue",
        "workersMin",
        "workersMax",
        "type",
        "templateId",
    ):
        if key not in existing or (key == "templateId" and key not in desired):
            continue
        have, want = existing[key], desired.get(key)
        if have != want and not (_blank(have) and _blank(want)):
            differ.append(key)
    differ.extend(
        key
        for key in ("gpuIds", "instanceIds")
        if key in existing and _ids(existing[key]) != _ids(desired.get(key))
    )
    if (
        "gpuCount" in existing
        and "gpuCount" in desired
        and existing["gpuCount"] != desired["gpuCount"]
    ):
        differ.append("gpuCount")
    if "executionTimeoutMs" in existing:
        have_ms = existing["executionTimeoutMs"] or 0
        want_ms = desired["executionTimeoutMs"]
        if have_ms != want_ms and {have_ms, want_ms} != {0, 600_000}:
            differ.append("executionTimeoutMs")
    if "flashBootType" in existing and (existing["flashBootType"] == "FLASHBOOT") != (
        "flashBootType" in desired
    ):
        differ.append("flashBootType")
    template, have_template = desired.get("template"), existing.get("template")
    if isinstance(template, dict) and isinstance(have_template, dict):
        for key in ("imageName", "containerDiskInGb", "dockerArgs"):
            if key not in have_template:
                continue
            have, want = have_template[key], template[key]
            if have != want and not (_blank(have) and _blank(want)):
                differ.append(f"template.{key}")
        if "env" in have_template:
            have_env = _env_of(have_template["env"])
            want_env = _env_of(template["env"])
            for key in _PLATFORM_ENV - want_env.keys():
                have_env.pop(key, None)
            if have_env != want_env:
                differ.append("template.env")
    return differ


def same_config(existing: Mapping[str, Any], desired: Mapping[str, Any]) -> bool:
    """True when the RunPod endpoint ``existing`` already has the config ``desired``.

    See `config_differences` for how fields compare.
    """
    return not config_differences(existing, desired)


async def ensure_endpoint(
    cp: ControlPlane, resource: ServerlessResource
) -> dict[str, Any]:
    """Make sure RunPod has the endpoint ``resource`` describes, and return it.

    Reuses an endpoint named ``live-<name>`` whose config is the same (`same_config`);
    updates one whose config changed, keeping its id (``saveEndpoint`` with ``id`` and its
    ``templateId``, then ``saveTemplate`` for the template, as 1.21 updates); creates it
    otherwise (one ``saveEndpoint`` with the inline template). With several endpoints of
    that name the first one listed is used.

    Safe to retry after a `DeliveryError`: it looks the endpoint up by name first, so a
    save that did reach RunPod is found and reused, not repeated. Not safe to run twice at
    once for the same name (both may create it): the provider calls it once per endpoint.

    Returns:
        The endpoint as RunPod describes it (``id``, ``name``, ``templateId``, ...).

    Raises:
        ConfigurationError: the config cannot run on RunPod, or the API key was rejected.
        DeliveryError: RunPod could not be reached or answered 429/5xx (retry by policy).
        GraphQLQueryError, GraphQLMutationError: RunPod refused the request.
    """
    desired = endpoint_input(resource, api_key=cp.api_key)
    name = desired["name"]
    found = [e for e in await cp.find_endpoints() if e.get("name") == name]
    if not found:
        created = await cp.save_endpoint(desired)
        log.info(
            "runpod.endpoint.created", endpoint=name, endpoint_id=created.get("id")
        )
        return created
    if len(found) > 1:
        log.warning("runpod.endpoint.duplicates", endpoint=name, count=len(found))
    existing = found[0]
    differ = config_differences(existing, desired)
    if not differ:
        log.debug(
            "runpod.endpoint.reused", endpoint=name, endpoint_id=existing.get("id")
        )
        return existing
    return await update_endpoint(cp, existing, desired, differ)


async def update_endpoint(
    cp: ControlPlane,
    existing: Mapping[str, Any],
    desired: Mapping[str, Any],
    differ: list[str] | None = None,
) -> dict[str, Any]:
    """Give the endpoint ``existing`` the config ``desired``, keeping its id, as 1.21 does.

    ``saveEndpoint`` with its ``id`` and ``templateId``, then ``saveTemplate`` for its
    template (the platform's env keys it has kept).

    Raises:
        as `ensure_endpoint`.
    """
    name = desired["name"]
    update = dict(desired)
    update["id"] = existing["id"]
    template = update.pop("template", None) if existing.get("templateId") else None
    if template is not None:
        update["templateId"] = existing["templateId"]
    saved = await cp.save_endpoint(update)
    template_id = saved.get("templateId") or existing.get("templateId")
    if template is not None and template_id:
        env = list(template["env"])
        have = existing.get("template")
        live_env = _env_of(have.get("env")) if isinstance(have, dict) else {}
        wanted = {pair["key"] for pair in env}
        env += [
            {"key": k, "value": v}
            for k, v in live_env.items()
            if k in _PLATFORM_ENV and k not in wanted
        ]
        await cp.save_template(
            {  # 1.21's template update: these fields, in this order
                "containerDiskInGb": template["containerDiskInGb"],
                "dockerArgs": template["dockerArgs"],
                "env": env,
                "imageName": template["imageName"],
                "name": template["name"],
                "volumeInGb": 0,
                "id": template_id,
            }
        )
    log.info(
        "runpod.endpoint.updated",
        endpoint=name,
        endpoint_id=existing["id"],
        changed=",".join(differ or config_differences(existing, desired)),
    )
    return saved


async def list_endpoints(cp: ControlPlane) -> list[dict[str, Any]]:
    """The account's live endpoints (named ``live-...``): the ones this package manages."""
    return [
        e
        for e in await cp.find_endpoints()
        if str(e.get("name", "")).startswith(LIVE_PREFIX)
    ]


async def remove_endpoint(cp: ControlPlane, endpoint_id: str) -> bool:
    """Delete the endpoint ``endpoint_id``: scale it to zero workers, then ``deleteEndpoint``.

    The template stays, as runpod-flash 1.21 leaves it.

    Returns:
        True when it was deleted, False when no such endpoint exists (already gone).

    Raises:
        ConfigurationError: the API key was rejected.
        DeliveryError: RunPod could not be reached or answered 429/5xx (retry by policy).
        GraphQLMutationError: RunPod refused to scale or delete it.
    """
    found = [e for e in await cp.find_endpoints() if e.get("id") == endpoint_id]
    if not found:
        return False
    endpoint = found[0]
    if endpoint.get("workersMin") or endpoint.get("workersMax") != 0:
        await cp.scale_to_zero(endpoint)
    try:
        await cp.delete_endpoint(endpoint_id)
    except GraphQLError:
        if any(e.get("id") == endpoint_id for e in await cp.find_endpoints()):
            raise
        return False  # removed meanwhile (a concurrent undeploy)
    log.info(
        "runpod.endpoint.removed",
        endpoint=endpoint.get("name"),
        endpoint_id=endpoint_id,
    )
    return True
