"""RunPod's GraphQL control plane, answered by ``flash local``: `ControlPlane`.

The operations RunPod's clients send to provision serverless endpoints, with RunPod's
answer shapes, each answer cut to the fields the request selects:

- mutations: ``saveEndpoint(input)`` (creates; with ``id`` updates, the input replacing
  the endpoint's settings: those left out take their defaults, its name and template
  stay unless given), ``saveTemplate(input)`` (the same with templates), ``deleteEndpoint(id)`` (refused, as RunPod
  refuses it, until ``workersMin`` and ``workersMax`` are 0), ``deleteTemplate(templateName)``
  (refused while an endpoint runs it), ``updateEndpointTemplate(input)``;
- queries: ``myself { id endpoints {...} endpoint(id) {...} podTemplates {...} ... }``,
  ``podTemplate(id)``, and the stock queries Flash asks while it waits for workers:
  ``gpuTypes(input) { ... lowestPrice(input) { stockStatus } }`` and
  ``cpuFlavors(input) { ... specifics(input) { stockStatus } }`` (``HIGH`` for every GPU
  pool or model and CPU instance type this version knows, null for others).

Both request forms work: ``variables`` (runpod-flash) and values written inline (the
``runpod`` package's builders). The whole operation is checked against the schema before
anything runs, so a mistyped field cannot leave a half-made endpoint behind. A request
that cannot be read as GraphQL-over-HTTP (not JSON, not an object, no ``query``) is a
400; anything refused after that is a 200 with ``{"errors": [{"message"}], "data": null}``,
as GraphQL servers answer.

Every saved endpoint is registered in the daemon under its id through the ``apply``
callback (`ControlPlane`), and stored (`state`) only once that worked; requests are
served one at a time, and their changes are not cancelled half-way.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import msgspec

from flash_actors import resources
from flash_actors._logging import get_logger
from flash_actors.providers.local.controlplane.images import config_for, image_map
from flash_actors.providers.local.controlplane.language import (
    Field,
    RequestError,
    parse,
    resolve,
    variable_values,
)
from flash_actors.providers.local.controlplane.state import (
    ControlPlaneState,
    EndpointRecord,
    TemplateRecord,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from pathlib import Path

__all__ = ["TYPES", "USER_ID", "ControlPlane"]

log = get_logger(__name__)

USER_ID = "user_flash_local"
NAME_MAX = 191  # RunPod's longest endpoint name
STOCK = "HIGH"

_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1


# -- input types ------------------------------------------------------------------------------


def _show(value: Any) -> str:
    text = msgspec.json.encode(value).decode()
    return text if len(text) <= 60 else text[:57] + "..."


def _string(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    msg = f"{where}: String cannot represent a non string value: {_show(value)}"
    raise RequestError(msg)


def _int(value: Any, where: str) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if _INT_MIN <= value <= _INT_MAX:
            return value
        msg = f"{where}: Int cannot represent non 32-bit signed integer value: {value}"
        raise RequestError(msg)
    msg = f"{where}: Int cannot represent non-integer value: {_show(value)}"
    raise RequestError(msg)


def _bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    msg = f"{where}: Boolean cannot represent a non boolean value: {_show(value)}"
    raise RequestError(msg)


def _enum(type_name: str, *names: str) -> Callable[[Any, str], str]:
    def coerce(value: Any, where: str) -> str:
        if isinstance(value, str) and value in names:
            return value
        msg = (
            f'{where}: Value {_show(value)} does not exist in "{type_name}" enum '
            f"(valid: {', '.join(names)})"
        )
        raise RequestError(msg)

    return coerce


def _list(item: Callable[[Any, str], Any]) -> Callable[[Any, str], list[Any]]:
    def coerce(value: Any, where: str) -> list[Any]:
        if not isinstance(value, list):
            return [
                item(value, where)
            ]  # GraphQL: one value for a list is a list of one
        return [item(entry, f"{where}[{i}]") for i, entry in enumerate(value)]

    return coerce


def _opaque(value: Any, where: str) -> Any:
    """A JSON value this server accepts and does not read (Flash's ``template.config``)."""
    return value


@dataclass(frozen=True)
class _InputObject:
    """An input object type: its fields, which are required, and those accepted unread."""

    name: str
    fields: dict[str, Callable[[Any, str], Any]]
    required: frozenset[str] = frozenset()

    def __call__(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            msg = f'{where}: Expected value of type "{self.name}", found {_show(value)}'
            raise RequestError(msg)
        out: dict[str, Any] = {}
        for key, item in value.items():
            coerce = self.fields.get(key)
            if coerce is None:
                msg = f'{where}: Field "{key}" is not defined by type "{self.name}".'
                raise RequestError(msg)
            if item is not None:  # an explicit null is the field left out
                out[key] = coerce(item, f"{where}.{key}")
        for key in sorted(self.required - set(out)):
            msg = f'{where}: Field "{self.name}.{key}" is required, but it was not provided.'
            raise RequestError(msg)
        return out


def _loose(value: Any, where: str) -> dict[str, Any]:
    """A filter input of the stock queries: any object (RunPod's have many fields)."""
    if isinstance(value, dict):
        return value
    msg = f"{where}: Expected an input object, found {_show(value)}"
    raise RequestError(msg)


_ENV_PAIR = _InputObject(
    "EnvironmentVariableInput", {"key": _string, "value": _string}, frozenset({"key"})
)

TEMPLATE_INPUT = _InputObject(
    "SaveTemplateInput",
    {
        "id": _string,
        "name": _string,
        "imageName": _string,
        "dockerArgs": _string,
        "containerDiskInGb": _int,
        "volumeInGb": _int,
        "volumeMountPath": _string,
        "ports": _string,
        "env": _list(_ENV_PAIR),
        "isServerless": _bool,
        "containerRegistryAuthId": _string,
        "readme": _string,
        "startScript": _string,
        "startSsh": _bool,
        "isPublic": _bool,
        "advancedStart": _bool,
        "config": _opaque,
        "category": _string,
    },
)

ENDPOINT_INPUT = _InputObject(
    "EndpointInput",
    {
        "id": _string,
        "name": _string,
        "templateId": _string,
        "template": TEMPLATE_INPUT,
        "gpuIds": _string,
        "gpuCount": _int,
        "instanceIds": _list(_string),
        "networkVolumeId": _string,
        "networkVolumeIds": _list(
            _InputObject(
                "NetworkVolumeIdInput",
                {"networkVolumeId": _string, "dataCenterId": _string},
                frozenset({"networkVolumeId"}),
            )
        ),
        "locations": _string,
        "idleTimeout": _int,
        "scalerType": _enum("ScalerType", "QUEUE_DELAY", "REQUEST_COUNT"),
        "scalerValue": _int,
        "workersMin": _int,
        "workersMax": _int,
        "workersPFBTarget": _int,
        "allowedCudaVersions": _string,
        "minCudaVersion": _string,
        "executionTimeoutMs": _int,
        "type": _enum("EndpointType", "QB", "LB"),
        "flashBootType": _string,
        "flashEnvironmentId": _string,
        "computeType": _enum("ComputeType", "CPU", "GPU"),
    },
)

UPDATE_TEMPLATE_INPUT = _InputObject(
    "UpdateEndpointTemplateInput",
    {"endpointId": _string, "templateId": _string},
    frozenset({"endpointId", "templateId"}),
)


# -- output types -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    """A field of an output type: its type (None for a scalar), arguments and resolver."""

    type: str | None = None
    args: frozenset[str] = frozenset()
    required: frozenset[str] = frozenset()
    resolver: str | None = None  # a ControlPlane method: (parent, args) -> value


def _scalars(*names: str) -> dict[str, _Spec]:
    return {name: _Spec() for name in names}


def _one(type_name: str, *args: str, required: tuple[str, ...] = (), via: str) -> _Spec:
    return _Spec(type_name, frozenset(args), frozenset(required), via)


TYPES: dict[str, dict[str, _Spec]] = {
    "Query": {
        "myself": _one("User", via="_myself"),
        "podTemplate": _one("PodTemplate", "id", required=("id",), via="_pod_template"),
        "gpuTypes": _one("GpuType", "input", via="_gpu_types"),
        "cpuFlavors": _one("CpuFlavor", "input", via="_cpu_flavors"),
    },
    "Mutation": {
        "saveEndpoint": _one(
            "Endpoint", "input", required=("input",), via="_save_endpoint"
        ),
        "saveTemplate": _one(
            "PodTemplate", "input", required=("input",), via="_save_template"
        ),
        "deleteEndpoint": _Spec(
            None, frozenset({"id"}), frozenset({"id"}), "_delete_endpoint"
        ),
        "deleteTemplate": _Spec(
            None,
            frozenset({"templateName"}),
            frozenset({"templateName"}),
            "_delete_template",
        ),
        "updateEndpointTemplate": _one(
            "Endpoint", "input", required=("input",), via="_update_endpoint_template"
        ),
    },
    "User": {
        **_scalars("id", "email", "pubKey", "currentSpendPerHr", "clientBalance"),
        "networkVolumes": _Spec("NetworkVolume"),
        "endpoints": _Spec("Endpoint"),
        "endpoint": _one("Endpoint", "id", required=("id",), via="_user_endpoint"),
        "podTemplates": _Spec("PodTemplate"),
    },
    "Endpoint": {
        **_scalars(
            "id",
            "name",
            "templateId",
            "gpuIds",
            "gpuCount",
            "instanceIds",
            "networkVolumeId",
            "locations",
            "idleTimeout",
            "scalerType",
            "scalerValue",
            "workersMin",
            "workersMax",
            "workersStandby",
            "workersPFBTarget",
            "allowedCudaVersions",
            "minCudaVersion",
            "executionTimeoutMs",
            "type",
            "flashBootType",
            "flashEnvironmentId",
            "computeType",
            "aiKey",
            "userId",
            "version",
            "createdAt",
            "activeBuildid",
            "idePodId",
        ),
        "template": _Spec("PodTemplate"),
        "env": _Spec("EnvironmentVariable"),
        "networkVolume": _Spec("NetworkVolume"),
        "networkVolumeIds": _Spec("NetworkVolumeId"),
    },
    "PodTemplate": {
        **_scalars(
            "id",
            "name",
            "imageName",
            "dockerArgs",
            "containerDiskInGb",
            "volumeInGb",
            "volumeMountPath",
            "ports",
            "isServerless",
            "containerRegistryAuthId",
            "readme",
            "startScript",
            "startSsh",
            "isPublic",
            "advancedStart",
        ),
        "env": _Spec("EnvironmentVariable"),
    },
    "EnvironmentVariable": _scalars("key", "value"),
    "NetworkVolume": _scalars("id", "name", "size", "dataCenterId"),
    "NetworkVolumeId": _scalars("networkVolumeId", "dataCenterId"),
    "GpuType": {
        **_scalars(
            "id",
            "displayName",
            "manufacturer",
            "memoryInGb",
            "maxGpuCount",
            "cudaCores",
            "secureCloud",
            "communityCloud",
            "securePrice",
            "communityPrice",
            "oneMonthPrice",
            "threeMonthPrice",
            "oneWeekPrice",
            "communitySpotPrice",
            "secureSpotPrice",
        ),
        "lowestPrice": _one("LowestPrice", "input", via="_lowest_price"),
    },
    "LowestPrice": _scalars(
        "stockStatus",
        "minimumBidPrice",
        "uninterruptablePrice",
        "minVcpu",
        "minMemory",
    ),
    "CpuFlavor": {
        **_scalars(
            "id", "groupId", "displayName", "minVcpu", "maxVcpu", "ramMultiplier"
        ),
        "specifics": _one("CpuSpecifics", "input", via="_cpu_specifics"),
    },
    "CpuSpecifics": _scalars("stockStatus", "securePrice", "slsPrice"),
}


def _check(type_name: str, fields: tuple[Field, ...]) -> None:
    """Check a selection against the schema before anything runs.

    Raises:
        RequestError: an unknown field or argument, a missing required argument, a leaf
            with a selection or an object without one, or two fields with one answer key.
    """
    specs = TYPES[type_name]
    seen: dict[str, Field] = {}
    for item in fields:
        earlier = seen.setdefault(item.key, item)
        if earlier is not item and (
            earlier.name != item.name or earlier.arguments != item.arguments
        ):
            msg = (
                f'Fields "{item.key}" conflict because they select different fields '
                "or arguments. Use different aliases on the fields."
            )
            raise RequestError(msg)
        if item.name == "__typename":
            if item.arguments or item.selections:
                raise RequestError('"__typename" takes no arguments or selection.')
            continue
        spec = specs.get(item.name)
        if spec is None:
            msg = f'Cannot query field "{item.name}" on type "{type_name}".'
            raise RequestError(msg)
        given = {name for name, _ in item.arguments}
        for name in sorted(given - spec.args):
            msg = f'Unknown argument "{name}" on field "{type_name}.{item.name}".'
            raise RequestError(msg)
        for name in sorted(spec.required - given):
            msg = (
                f'Field "{item.name}" argument "{name}" is required, but it was not '
                "provided."
            )
            raise RequestError(msg)
        if spec.type is None and item.selections is not None:
            msg = f'Field "{item.name}" must not have a selection since it is a scalar.'
            raise RequestError(msg)
        if spec.type is not None:
            if item.selections is None:
                msg = (
                    f'Field "{item.name}" of type "{spec.type}" must have a selection '
                    f'of subfields. Did you mean "{item.name} {{ ... }}"?'
                )
                raise RequestError(msg)
            _check(spec.type, item.selections)


# -- the stock the stock queries report ---------------------------------------------------------


def _gpu_models() -> dict[str, resources.GpuGroup]:
    return {m: g for g in resources.GpuGroup.all() for m in g.models}


def _gpu_type(gpu_id: str) -> dict[str, Any] | None:
    models = _gpu_models()
    if gpu_id in models:
        group = models[gpu_id]
        name = gpu_id.removeprefix("NVIDIA ")
    else:
        try:
            group = resources.GpuGroup(gpu_id)
        except ValueError:
            return None
        name = gpu_id
    return {
        "id": gpu_id,
        "displayName": name,
        "manufacturer": "Nvidia",
        "memoryInGb": group.memory_gb,
        "maxGpuCount": 8,
        "secureCloud": True,
        "communityCloud": False,
    }


def _cpu_flavors() -> dict[str, list[resources.CpuInstanceType]]:
    flavors: dict[str, list[resources.CpuInstanceType]] = {}
    for kind in resources.CpuInstanceType:
        flavors.setdefault(kind.value.split("-", 1)[0], []).append(kind)
    return flavors


def _cpu_flavor(flavor: str, kinds: list[resources.CpuInstanceType]) -> dict[str, Any]:
    first = kinds[0]
    return {
        "id": flavor,
        "groupId": flavor,
        "displayName": f"{first.kind.title()} Purpose, generation {first.generation}",
        "minVcpu": min(k.vcpu for k in kinds),
        "maxVcpu": max(k.vcpu for k in kinds),
        "ramMultiplier": first.memory_gb // first.vcpu,
    }


# -- the service ----------------------------------------------------------------------------


class _BadRequest(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class _Request(msgspec.Struct):
    query: str
    variables: dict[str, Any] | None = None
    operationName: str | None = None
    extensions: Any = None


_request_decoder = msgspec.json.Decoder(_Request)
_encoder = msgspec.json.Encoder()


def _answer(status: int, payload: dict[str, Any]) -> tuple[int, bytes]:
    return status, _encoder.encode(payload)


def _errors(message: str) -> dict[str, Any]:
    return {"errors": [{"message": message}], "data": None}


@dataclass
class _Change:
    """What one mutation changes: records to write, records to remove."""

    endpoints: list[EndpointRecord] = field(default_factory=list)
    templates: list[TemplateRecord] = field(default_factory=list)
    drop_endpoint: str | None = None
    drop_template: str | None = None


class ControlPlane:
    """RunPod's GraphQL control plane over the daemon's state folder.

    Args:
        state_dir: the daemon's state folder (records in ``controlplane.json``, the
            local user's image map in ``images.json``).
        apply: ``await apply(endpoint_id, config)`` registers an endpoint in the daemon
            under its id, with ``config`` as `config_of` makes it (``None``: remove it,
            stopping its workers and cancelling its queued jobs). What it raises is
            reported to the caller as the reason the change was refused.

    Raises:
        ConfigurationError: the stored state cannot be read.
    """

    def __init__(
        self,
        state_dir: Path,
        apply: Callable[[str, dict[str, Any] | None], Awaitable[None]],
    ) -> None:
        self.state_dir = state_dir
        self.state = ControlPlaneState(state_dir)
        self._apply = apply
        self._lock = anyio.Lock()

    async def restore(self) -> None:
        """Register every stored endpoint again (at start; one that cannot run is logged)."""
        async with self._lock:
            handlers: dict[str, Any] | None = None
            for record in list(self.state.endpoints.values()):
                try:
                    if handlers is None:
                        handlers = image_map(self.state_dir)
                    template = self.state.templates[record.templateId]
                    await self._apply(
                        record.id, self._config(record, template, handlers)
                    )
                except Exception as exc:  # noqa: BLE001 (one endpoint must not stop the rest)
                    log.error(
                        "controlplane.restore_failed",
                        endpoint=record.id,
                        name=record.name,
                        error=getattr(exc, "message", str(exc)),
                    )

    async def handle(self, body: bytes) -> tuple[int, bytes]:
        """Answer one ``POST /graphql`` body: the HTTP status and the JSON answer."""
        try:
            request = self._request(body)
        except _BadRequest as exc:
            return _answer(400, _errors(exc.message))
        try:
            operation = parse(request.query, request.operationName)
            variables = variable_values(operation, request.variables)
            root = "Mutation" if operation.kind == "mutation" else "Query"
            _check(root, operation.selections)
            async with self._lock:
                data = await self._select(root, None, operation.selections, variables)
        except RequestError as exc:
            log.info("controlplane.refused", error=exc.message)
            return _answer(200, _errors(exc.message))
        return _answer(200, {"data": data})

    @staticmethod
    def _request(body: bytes) -> _Request:
        try:
            generic = msgspec.json.decode(body)
        except (msgspec.DecodeError, RecursionError) as exc:
            msg = f"the request body is not JSON: {exc}"
            raise _BadRequest(msg) from None
        if not isinstance(generic, dict) or not isinstance(generic.get("query"), str):
            msg = (
                'the request body must be a JSON object {"query": "...", '
                '"variables": {...}} with the query as a string'
            )
            raise _BadRequest(msg)
        try:
            return msgspec.convert(generic, _Request)
        except msgspec.ValidationError as exc:
            msg = f"invalid GraphQL request: {exc}"
            raise _BadRequest(msg) from None

    # -- execution --------------------------------------------------------------------------

    async def _select(
        self,
        type_name: str,
        parent: Any,
        fields: tuple[Field, ...],
        variables: dict[str, Any],
    ) -> dict[str, Any]:
        specs = TYPES[type_name]
        out: dict[str, Any] = {}
        for item in fields:
            if item.name == "__typename":
                out[item.key] = type_name
                continue
            spec = specs[item.name]
            if spec.resolver is not None:
                args = {name: resolve(v, variables) for name, v in item.arguments}
                value = getattr(self, spec.resolver)(parent, args)
                if inspect.isawaitable(value):
                    value = await value
            else:
                value = parent.get(item.name) if isinstance(parent, dict) else None
            if spec.type is None or value is None:
                out[item.key] = value
            elif isinstance(value, list):
                assert item.selections is not None  # noqa: S101 (checked by _check)
                out[item.key] = [
                    await self._select(spec.type, entry, item.selections, variables)
                    for entry in value
                ]
            else:
                assert item.selections is not None  # noqa: S101 (checked by _check)
                out[item.key] = await self._select(
                    spec.type, value, item.selections, variables
                )
        return out

    # -- views ------------------------------------------------------------------------------

    def _template_view(self, template: TemplateRecord) -> dict[str, Any]:
        view = msgspec.structs.asdict(template)
        view["env"] = [dict(pair) for pair in template.env]
        return view

    def _endpoint_view(self, endpoint: EndpointRecord) -> dict[str, Any]:
        view = msgspec.structs.asdict(endpoint)
        template = self.state.templates.get(endpoint.templateId)
        view.update(
            template=self._template_view(template) if template else None,
            env=[dict(pair) for pair in template.env] if template else [],
            networkVolume=(
                {"id": endpoint.networkVolumeId, "name": None, "size": None}
                if endpoint.networkVolumeId
                else None
            ),
            computeType="CPU" if endpoint.instanceIds else "GPU",
            aiKey=None,
            userId=USER_ID,
            workersStandby=0,
            activeBuildid=None,
            idePodId=None,
        )
        return view

    # -- queries ----------------------------------------------------------------------------

    def _myself(self, parent: Any, args: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": USER_ID,
            "email": None,
            "pubKey": "",
            "currentSpendPerHr": 0,
            "clientBalance": 0,
            "networkVolumes": [],
            "endpoints": [
                self._endpoint_view(e) for e in self.state.endpoints.values()
            ],
            "podTemplates": [
                self._template_view(t) for t in self.state.templates.values()
            ],
        }

    def _user_endpoint(self, parent: Any, args: dict[str, Any]) -> Any:
        endpoint_id = _string(args.get("id"), "endpoint(id)")
        record = self.state.endpoints.get(endpoint_id)
        return self._endpoint_view(record) if record else None

    def _pod_template(self, parent: Any, args: dict[str, Any]) -> Any:
        template_id = _string(args.get("id"), "podTemplate(id)")
        record = self.state.templates.get(template_id)
        return self._template_view(record) if record else None

    def _gpu_types(self, parent: Any, args: dict[str, Any]) -> list[dict[str, Any]]:
        filters = _loose(args.get("input") or {}, "gpuTypes(input)")
        wanted: list[str] | None = None
        if filters.get("ids") is not None:
            wanted = _list(_string)(filters["ids"], "gpuTypes(input).ids")
        elif filters.get("id") is not None:
            wanted = [_string(filters["id"], "gpuTypes(input).id")]
        if wanted is None:
            wanted = list(_gpu_models())
        return [entry for gpu in wanted if (entry := _gpu_type(gpu)) is not None]

    def _lowest_price(self, parent: Any, args: dict[str, Any]) -> dict[str, Any]:
        _loose(args.get("input") or {}, "lowestPrice(input)")
        return {
            "stockStatus": STOCK,
            "minimumBidPrice": None,
            "uninterruptablePrice": None,
        }

    def _cpu_flavors(self, parent: Any, args: dict[str, Any]) -> list[dict[str, Any]]:
        filters = _loose(args.get("input") or {}, "cpuFlavors(input)")
        flavors = _cpu_flavors()
        wanted = filters.get("id")
        if wanted is not None:
            wanted = _string(wanted, "cpuFlavors(input).id")
            flavors = {k: v for k, v in flavors.items() if k == wanted}
        return [_cpu_flavor(name, kinds) for name, kinds in flavors.items()]

    def _cpu_specifics(self, parent: Any, args: dict[str, Any]) -> dict[str, Any]:
        filters = _loose(args.get("input") or {}, "specifics(input)")
        instance = filters.get("instanceId")
        known = {k.value for k in _cpu_flavors().get(str(parent.get("id")), [])}
        stock = STOCK if instance in (None, "") or instance in known else None
        return {"stockStatus": stock, "securePrice": None, "slsPrice": None}

    # -- mutations --------------------------------------------------------------------------

    async def _save_endpoint(self, parent: Any, args: dict[str, Any]) -> dict[str, Any]:
        data = ENDPOINT_INPUT(args.get("input"), "saveEndpoint(input)")
        known: EndpointRecord | None = None
        if data.get("id"):
            known = self.state.endpoints.get(data["id"])
            if known is None:
                msg = f'saveEndpoint: endpoint "{data["id"]}" not found'
                raise RequestError(msg)
        name = data.get("name") or (known.name if known else "")
        if not name.strip():
            raise RequestError("saveEndpoint(input).name is required")
        if not name.isprintable():
            msg = (
                "saveEndpoint(input).name holds control characters; use printable text"
            )
            raise RequestError(msg)
        if len(name) > NAME_MAX:
            msg = f"saveEndpoint(input).name is {len(name)} characters long; the limit is {NAME_MAX}"
            raise RequestError(msg)
        change = _Change()
        if "template" in data and "templateId" in data:
            msg = "saveEndpoint(input): give templateId or template, not both"
            raise RequestError(msg)
        if "template" in data:
            template = self._template_from(
                data["template"], f"{name}__template", inline=True
            )
            change.templates.append(template)
        elif "templateId" in data:
            found = self.state.templates.get(data["templateId"])
            if found is None:
                msg = f'saveEndpoint: template "{data["templateId"]}" not found'
                raise RequestError(msg)
            template = found
        elif known is not None:
            template = self.state.templates[known.templateId]
        else:
            msg = "saveEndpoint(input) needs templateId, or a template written inline"
            raise RequestError(msg)
        fields = {
            key: value
            for key, value in data.items()
            if key not in {"id", "name", "template", "templateId", "computeType"}
        }
        if fields.get("networkVolumeId") == "":
            fields["networkVolumeId"] = None
        try:
            record = EndpointRecord(
                id=known.id if known else self.state.new_endpoint_id(),
                name=name,
                templateId=template.id,
                createdAt=known.createdAt
                if known
                else time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
                version=known.version + 1 if known else 0,
                **fields,
            )
        except TypeError as exc:  # pragma: no cover - ENDPOINT_INPUT lists the fields
            raise RequestError(f"saveEndpoint(input): {exc}") from None
        change.endpoints.append(self._pin(record, template))
        await self._commit(change)
        log.info(
            "controlplane.endpoint_saved",
            endpoint=record.id,
            name=record.name,
            image=template.imageName,
            updated=known is not None,
        )
        return self._endpoint_view(record)

    def _template_from(
        self, raw: dict[str, Any], default_name: str, *, inline: bool
    ) -> TemplateRecord:
        """A template record from a (checked) input: new, or replacing the one it names.

        An inline template (``saveEndpoint``'s ``template``) whose name exists replaces that
        template, as Flash re-sends the same template when it provisions again.
        """
        known: TemplateRecord | None = None
        if raw.get("id"):
            known = self.state.templates.get(raw["id"])
            if known is None:
                msg = f'saveTemplate: template "{raw["id"]}" not found'
                raise RequestError(msg)
        name = raw.get("name") or (known.name if known else default_name)
        same_name = self.state.template_named(name)
        if same_name is not None and (known is None or same_name.id != known.id):
            if not inline:
                msg = f'Template name must be unique: a template named "{name}" exists'
                raise RequestError(msg)
            known = same_name
        image = raw.get("imageName") or (known.imageName if known else "")
        if not image.strip():
            raise RequestError(f"template {name!r}: imageName is required")
        fields = {
            key: value
            for key, value in raw.items()
            if key not in {"id", "name", "imageName", "config", "category"}
        }
        fields["env"] = [
            {"key": pair["key"], "value": pair.get("value", "")}
            for pair in fields.get("env", [])
        ]
        return TemplateRecord(
            id=known.id if known else self.state.new_template_id(),
            name=name,
            imageName=image,
            **fields,
        )

    async def _save_template(self, parent: Any, args: dict[str, Any]) -> dict[str, Any]:
        data = TEMPLATE_INPUT(args.get("input"), "saveTemplate(input)")
        if not data.get("id") and not data.get("name"):
            raise RequestError("saveTemplate(input).name is required")
        template = self._template_from(data, "", inline=False)
        await self._commit(_Change(templates=[template]))
        log.info(
            "controlplane.template_saved", template=template.id, name=template.name
        )
        return self._template_view(template)

    async def _update_endpoint_template(
        self, parent: Any, args: dict[str, Any]
    ) -> dict[str, Any]:
        data = UPDATE_TEMPLATE_INPUT(args.get("input"), "updateEndpointTemplate(input)")
        known = self.state.endpoints.get(data["endpointId"])
        if known is None:
            msg = f'updateEndpointTemplate: endpoint "{data["endpointId"]}" not found'
            raise RequestError(msg)
        if data["templateId"] not in self.state.templates:
            msg = f'updateEndpointTemplate: template "{data["templateId"]}" not found'
            raise RequestError(msg)
        record = msgspec.structs.replace(
            known, templateId=data["templateId"], version=known.version + 1
        )
        await self._commit(_Change(endpoints=[record]))
        return self._endpoint_view(record)

    async def _delete_endpoint(self, parent: Any, args: dict[str, Any]) -> None:
        endpoint_id = _string(args.get("id"), "deleteEndpoint(id)")
        known = self.state.endpoints.get(endpoint_id)
        if known is None:
            msg = f'deleteEndpoint: endpoint "{endpoint_id}" not found'
            raise RequestError(msg)
        if known.workersMin or known.workersMax:
            msg = (
                f'deleteEndpoint: endpoint "{endpoint_id}" still has workers '
                f"(workersMin {known.workersMin}, workersMax {known.workersMax}); set "
                "both to 0 with saveEndpoint first, then delete it"
            )
            raise RequestError(msg)
        await self._commit(_Change(drop_endpoint=endpoint_id))
        log.info("controlplane.endpoint_deleted", endpoint=endpoint_id, name=known.name)

    async def _delete_template(self, parent: Any, args: dict[str, Any]) -> None:
        name = _string(args.get("templateName"), "deleteTemplate(templateName)")
        template = self.state.template_named(name)
        if template is None:
            msg = f'deleteTemplate: template "{name}" not found'
            raise RequestError(msg)
        users = self.state.users_of(template.id)
        if users:
            ids = ", ".join(e.id for e in users)
            msg = (
                f'deleteTemplate: template "{name}" is used by endpoint(s) {ids}; '
                "delete them (or give them another template) first"
            )
            raise RequestError(msg)
        await self._commit(_Change(drop_template=template.id))

    # -- hooks (the Flash control plane's deployed endpoints) --------------------------------

    def _pin(self, record: EndpointRecord, template: TemplateRecord) -> EndpointRecord:
        """``record`` (saved with ``template``) as it is stored (here: unchanged).

        Raises:
            RequestError: it cannot be saved.
        """
        return record

    def _config(
        self,
        record: EndpointRecord,
        template: TemplateRecord,
        handlers: dict[str, Path],
    ) -> dict[str, Any]:
        """The daemon's registration config for ``record`` (`images.config_for`).

        Raises:
            RequestError: it cannot run here.
        """
        return config_for(record, template, handlers)

    # -- changes ----------------------------------------------------------------------------

    async def _commit(self, change: _Change) -> None:
        """Apply a change to the daemon, then store it; all of it, or (as far as can be) none.

        Every endpoint the change touches (saved, or running a changed template) gets its
        config first, so a refused image or setting changes nothing. Then each is
        registered, then the state is written. When a registration or the write fails,
        the endpoints already re-registered get their old config back. The change is
        shielded from cancellation: a client hanging up does not cut it in half.

        Raises:
            RequestError: a config cannot run, or the daemon refused it.
        """
        state = self.state
        templates = {**state.templates, **{t.id: t for t in change.templates}}
        endpoints = {**state.endpoints, **{e.id: e for e in change.endpoints}}
        if change.drop_template is not None:
            templates.pop(change.drop_template, None)
        if change.drop_endpoint is not None:
            endpoints.pop(change.drop_endpoint, None)
        saved = {e.id for e in change.endpoints}
        touched = {t.id for t in change.templates}
        affected = [
            e for e in endpoints.values() if e.id in saved or e.templateId in touched
        ]
        configs: dict[str, dict[str, Any]] = {}
        if affected:
            handlers = image_map(self.state_dir)
            for record in affected:
                configs[record.id] = self._config(
                    record, templates[record.templateId], handlers
                )
        old_configs = self._configs(
            [state.endpoints[i] for i in configs if i in state.endpoints]
        )
        done: list[str] = []
        with anyio.CancelScope(shield=True):
            try:
                for endpoint_id, config in configs.items():
                    done.append(endpoint_id)
                    await self._apply(endpoint_id, config)
                if change.drop_endpoint is not None:
                    await self._apply(change.drop_endpoint, None)
                previous = (state.endpoints, state.templates)
                state.endpoints, state.templates = endpoints, templates
                try:
                    state.save()
                except OSError as exc:
                    state.endpoints, state.templates = previous
                    msg = f"the control-plane state could not be written: {exc}"
                    raise RequestError(msg) from exc
            except Exception as exc:
                for endpoint_id in done:
                    await self._undo(endpoint_id, old_configs.get(endpoint_id))
                if isinstance(exc, RequestError):
                    raise
                msg = f"the daemon refused the endpoint: {exc}"
                raise RequestError(msg) from exc

    def _configs(self, records: list[EndpointRecord]) -> dict[str, dict[str, Any]]:
        """The configs ``records`` run with now (those that cannot be made are left out)."""
        out: dict[str, dict[str, Any]] = {}
        try:
            handlers = image_map(self.state_dir) if records else {}
        except RequestError:
            return out
        for record in records:
            template = self.state.templates.get(record.templateId)
            if template is None:
                continue
            try:
                out[record.id] = self._config(record, template, handlers)
            except RequestError:
                continue
        return out

    async def _undo(self, endpoint_id: str, config: dict[str, Any] | None) -> None:
        try:
            await self._apply(endpoint_id, config)
        except Exception as exc:  # noqa: BLE001 (undo is best effort; the cause is raised)
            log.error("controlplane.undo_failed", endpoint=endpoint_id, error=str(exc))
