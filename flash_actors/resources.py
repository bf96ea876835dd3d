"""Resource configurations: where a remote function runs (the seeds' eight classes and enums).

Each config names an endpoint. The class says how calls are delivered (queue jobs returning
`JobOutput`, or load-balancer HTTP calls returning the value), whether it is a GPU or CPU
endpoint, and whether it runs our image with remote code (``Live*``) or a custom image with
dictionary payloads. Field names are Flash's (camelCase, as the RunPod API spells them), so a
Flash program runs after changing only its import line.

Configs are checked when they are built: a bad value raises `ConfigurationError` naming the
resource, the field and the fix.
"""

from __future__ import annotations

import os
import re
from enum import Enum, StrEnum
from typing import TYPE_CHECKING, Any, ClassVar

import anyio
import msgspec

from flash_actors.errors import ConfigurationError
from flash_actors.policies import (
    DEFAULT_EXECUTION_TIMEOUT_S,
    DEFAULT_PAYLOAD_LIMIT,
    DEFAULT_TTL_S,
    CallPolicy,
    RetryPolicy,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from flash_actors.jobs import JobOutput

__all__ = [
    "ENDPOINT_NAME_MAX",
    "CpuInstanceType",
    "CpuLiveLoadBalancer",
    "CpuLiveServerless",
    "CpuLoadBalancerSlsResource",
    "CpuServerlessEndpoint",
    "DataCenter",
    "GpuGroup",
    "LiveLoadBalancer",
    "LiveServerless",
    "LoadBalancerResource",
    "LoadBalancerSlsResource",
    "NetworkVolume",
    "PodTemplate",
    "ServerlessEndpoint",
    "ServerlessResource",
    "ServerlessScalerType",
    "check_endpoint_name",
    "check_volume_id",
]

_submitter: (
    Callable[[ServerlessResource, dict[str, Any]], Awaitable[JobOutput]] | None
) = None
"""How `ServerlessResource.run` reaches the runtime: set by `flash_actors.runtime` when it
is imported (the runtime depends on resources, never the other way round)."""


def set_submitter(
    submit: Callable[[ServerlessResource, dict[str, Any]], Awaitable[JobOutput]],
) -> None:
    """Make ``submit`` run `ServerlessResource.run`'s jobs (the runtime's `submit_payload`)."""
    global _submitter
    _submitter = submit


class GpuGroup(StrEnum):
    """RunPod GPU pools; each member knows its GPU models and memory per GPU."""

    ANY = "any"
    AMPERE_16 = "AMPERE_16"
    AMPERE_24 = "AMPERE_24"
    AMPERE_48 = "AMPERE_48"
    AMPERE_80 = "AMPERE_80"
    ADA_24 = "ADA_24"
    ADA_32_PRO = "ADA_32_PRO"
    ADA_48_PRO = "ADA_48_PRO"
    ADA_80_PRO = "ADA_80_PRO"
    HOPPER_141 = "HOPPER_141"

    @property
    def models(self) -> tuple[str, ...]:
        """The GPU models in this pool (empty for `ANY`)."""
        return _GPU_MODELS[self][0]

    @property
    def memory_gb(self) -> int | None:
        """Memory of one GPU in GB (``None`` for `ANY`)."""
        return _GPU_MODELS[self][1]

    @classmethod
    def all(cls) -> list[GpuGroup]:
        """Every concrete pool (all but `ANY`)."""
        return [g for g in cls if g is not cls.ANY]


_GPU_MODELS: dict[GpuGroup, tuple[tuple[str, ...], int | None]] = {
    GpuGroup.ANY: ((), None),
    GpuGroup.AMPERE_16: (("NVIDIA RTX A4000",), 16),
    GpuGroup.AMPERE_24: (("NVIDIA RTX A5000",), 24),
    GpuGroup.AMPERE_48: (("NVIDIA A40", "NVIDIA RTX A6000"), 48),
    GpuGroup.AMPERE_80: (("NVIDIA A100 80GB",), 80),
    GpuGroup.ADA_24: (("NVIDIA GeForce RTX 4090",), 24),
    GpuGroup.ADA_32_PRO: (("NVIDIA GeForce RTX 5090",), 32),
    GpuGroup.ADA_48_PRO: (("NVIDIA RTX 6000 Ada Generation",), 48),
    GpuGroup.ADA_80_PRO: (("NVIDIA H100 80GB",), 80),
    GpuGroup.HOPPER_141: (("NVIDIA H200",), 141),
}

_CPU_NAME = re.compile(r"^CPU(?P<gen>\d)(?P<kind>[GC])_(?P<vcpu>\d+)_(?P<mem>\d+)$")


class CpuInstanceType(StrEnum):
    """RunPod CPU instance types, ``CPU{generation}{G|C}_{vcpu}_{memory_gb}``."""

    CPU3G_1_4 = "cpu3g-1-4"
    CPU3G_2_8 = "cpu3g-2-8"
    CPU3G_4_16 = "cpu3g-4-16"
    CPU3G_8_32 = "cpu3g-8-32"
    CPU3C_1_2 = "cpu3c-1-2"
    CPU3C_2_4 = "cpu3c-2-4"
    CPU3C_4_8 = "cpu3c-4-8"
    CPU3C_8_16 = "cpu3c-8-16"
    CPU5C_1_2 = "cpu5c-1-2"
    CPU5C_2_4 = "cpu5c-2-4"
    CPU5C_4_8 = "cpu5c-4-8"
    CPU5C_8_16 = "cpu5c-8-16"

    def _parts(self) -> re.Match[str]:
        match = _CPU_NAME.match(self.name)
        if match is None:  # pragma: no cover - every member matches; a test pins it
            msg = f"malformed CPU instance name {self.name}"
            raise AssertionError(msg)
        return match

    @property
    def generation(self) -> int:
        """CPU generation (3 or 5)."""
        return int(self._parts()["gen"])

    @property
    def kind(self) -> str:
        """``"general"`` or ``"compute"``."""
        return "general" if self._parts()["kind"] == "G" else "compute"

    @property
    def vcpu(self) -> int:
        """Number of virtual CPUs."""
        return int(self._parts()["vcpu"])

    @property
    def memory_gb(self) -> int:
        """Memory in GB."""
        return int(self._parts()["mem"])


class DataCenter(StrEnum):
    """RunPod data centers with network storage."""

    US_CA_2 = "US-CA-2"
    US_IL_1 = "US-IL-1"
    US_KS_2 = "US-KS-2"
    US_MO_1 = "US-MO-1"
    US_MO_2 = "US-MO-2"
    US_NC_2 = "US-NC-2"
    US_NE_1 = "US-NE-1"
    US_WA_1 = "US-WA-1"
    EU_CZ_1 = "EU-CZ-1"
    EU_RO_1 = "EU-RO-1"
    EUR_NO_1 = "EUR-NO-1"


class ServerlessScalerType(StrEnum):
    """How RunPod scales an endpoint: by queue delay or by request count."""

    QUEUE_DELAY = "QUEUE_DELAY"
    REQUEST_COUNT = "REQUEST_COUNT"


def _enum_list(
    owner: str, field: str, values: Any, enum: type[Enum]
) -> list[Any] | None:
    if values is None:
        return None
    if isinstance(values, (str, Enum)):
        values = [values]
    out = []
    for value in values:
        if isinstance(value, enum):
            out.append(value)
            continue
        try:
            out.append(enum(value))
        except ValueError:
            try:
                out.append(enum[str(value)])
            except KeyError:
                valid = ", ".join(m.name for m in enum)
                msg = f"{owner}: {field} has unknown value {value!r}; valid: {valid}"
                raise ConfigurationError(msg) from None
    return out


ENDPOINT_NAME_MAX = 183
"""Longest endpoint name: RunPod's 191 characters less Flash's ``live-`` and ``-fb``."""

_ENDPOINT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def check_endpoint_name(name: str, owner: str = "endpoint") -> None:
    """Refuse an endpoint name that RunPod or this machine's files cannot take.

    The rule: 1 to `ENDPOINT_NAME_MAX` (183) characters, letters, digits, ``-`` and ``_``,
    starting with a letter or digit. RunPod caps a name at 191 characters and Flash deploys it
    as ``live-<name>-fb``; locally the name is also the endpoint id in URLs and names the
    endpoint's folders and files (``.flash/logs/<name>/<name>-<id>.log``), so it holds no path
    separator, no dot (nothing can clash with the daemon's own ``gateway.log`` and friends)
    and stays far below the 255-byte limit of a file name.

    Raises:
        ConfigurationError: naming ``owner``, the rule and the fix.
    """
    if len(name) <= ENDPOINT_NAME_MAX and _ENDPOINT_NAME.fullmatch(name):
        return
    shown = name if len(name) <= 60 else f"{name[:40]}...({len(name)} characters)"
    if len(name) > ENDPOINT_NAME_MAX:
        problem = f"is {len(name)} characters long; the limit is {ENDPOINT_NAME_MAX}"
    else:
        problem = "may hold only letters, digits, '-' and '_', starting with a letter or digit"
    msg = (
        f"{owner}(name={shown!r}): the endpoint name {problem} (RunPod's endpoint name "
        "rules; the name is also the endpoint id in URLs and names its log folder): "
        "choose a shorter, plain name such as 'my-endpoint'"
    )
    raise ConfigurationError(msg)


VOLUME_ID_MAX = 64
"""Longest network volume id (RunPod's are 10 characters)."""

_VOLUME_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def check_volume_id(volume_id: object, owner: str = "endpoint") -> str:
    """Refuse a network volume id that cannot name a folder safely; the id.

    The rule: 1 to `VOLUME_ID_MAX` (64) letters, digits, ``-`` and ``_``, starting with a
    letter or digit (RunPod's ids are like ``agv6w2qcg7``). The local provider keeps each
    volume in a folder named by its id, so an id never holds a path separator, a dot or
    anything else that could lead out of the volumes folder.

    Raises:
        ConfigurationError: naming ``owner``, the rule and the fix.
    """
    if (
        isinstance(volume_id, str)
        and len(volume_id) <= VOLUME_ID_MAX
        and _VOLUME_ID.fullmatch(volume_id)
    ):
        return volume_id
    shown = repr(volume_id)
    if len(shown) > 60:
        shown = f"{shown[:40]}...({len(shown)} characters)"
    msg = (
        f"{owner}: network volume id {shown} is not a plain id: it may hold only 1 to "
        f"{VOLUME_ID_MAX} letters, digits, '-' and '_', starting with a letter or digit "
        "(it names the volume's folder on this machine); pass the volume's id as RunPod "
        "shows it, such as networkVolumeId='agv6w2qcg7'"
    )
    raise ConfigurationError(msg)


class PodTemplate(msgspec.Struct, kw_only=True):
    """Pod-level settings of an endpoint's workers.

    ``env`` is RunPod's list of ``{"key", "value"}`` pairs; a plain dict is accepted too.
    """

    name: str = ""
    imageName: str = ""
    containerDiskInGb: int = 64
    volumeInGb: int = 0
    dockerArgs: str = ""
    ports: str = ""
    startScript: str = ""
    env: list[dict[str, str]] = []
    containerRegistryAuthId: str = ""
    advancedStart: bool = False

    def __post_init__(self) -> None:
        env: object = self.env
        if isinstance(env, dict):
            self.env = [{"key": str(k), "value": str(v)} for k, v in env.items()]
        for pair in self.env:
            if set(pair) != {"key", "value"}:
                msg = f"PodTemplate.env entries must be {{'key': ..., 'value': ...}}, got {pair!r}"
                raise ConfigurationError(msg)
        if self.containerDiskInGb < 1:
            msg = f"PodTemplate.containerDiskInGb must be positive, got {self.containerDiskInGb}"
            raise ConfigurationError(msg)

    def env_dict(self) -> dict[str, str]:
        """The template's environment as a dict."""
        return {pair["key"]: pair["value"] for pair in self.env}


class NetworkVolume(msgspec.Struct, kw_only=True):
    """Persistent storage shared by an endpoint's workers (``size`` in GB)."""

    name: str
    size: int = 100
    dataCenterId: DataCenter = DataCenter.EU_RO_1
    id: str | None = None

    def __post_init__(self) -> None:
        if self.size < 1:
            msg = f"NetworkVolume {self.name!r}: size must be at least 1 GB, got {self.size}"
            raise ConfigurationError(msg)
        try:
            self.dataCenterId = DataCenter(self.dataCenterId)
        except ValueError:
            valid = ", ".join(d.value for d in DataCenter)
            msg = f"NetworkVolume {self.name!r}: unknown dataCenterId {self.dataCenterId!r}; valid: {valid}"
            raise ConfigurationError(msg) from None


class ServerlessResource(msgspec.Struct, kw_only=True):
    """Base of every endpoint config; use one of the eight concrete classes.

    Attributes:
        name: the endpoint's name, unique per program; also its id on the local provider
            (1-183 letters, digits, '-' and '_': see `check_endpoint_name`).
        gpus: acceptable GPU pools, in order of preference.
        gpuCount: GPUs per worker.
        instanceIds: CPU instance types; setting them makes the endpoint a CPU endpoint.
        workersMin: workers kept warm.
        workersMax: most workers at once.
        idleTimeout: seconds a worker may idle before it is stopped.
        executionTimeoutMs: longest run of one job, in ms (0: RunPod's default, 600000).
        ttlMs: longest wait of a queued job before it expires, in ms (0: one day).
        retryPolicy: retries of failed deliveries (queue default: 3 attempts; load balancers
            never retry).
        payloadLimitBytes: largest base64 payload of one call (default 10 MB).
        env: environment variables of the workers.
        template: pod settings, including more ``env``.
        networkVolumeId / networkVolume: persistent storage.
        scalerType / scalerValue: RunPod's autoscaler settings.
        imageName: custom worker image (non-Live classes).
        datacenter / locations: placement.
        flashboot: fast cold starts on RunPod.
        max_concurrency: jobs one worker runs at once (Flash's ``max_concurrency``, default
            1, as on RunPod); an endpoint runs ``workersMax x max_concurrency`` jobs in
            parallel. Queue endpoints only: a load balancer's worker serves its HTTP
            requests concurrently anyway.
        handler: a RunPod handler file (``runpod.serverless.start(...)``) that the local
            provider runs as the endpoint's workers; only for the non-Live queue classes
            (`ServerlessEndpoint`, `CpuServerlessEndpoint`), called with ``await
            endpoint.run({...})`` / ``runsync`` and dictionary payloads.
    """

    name: str
    gpus: list[GpuGroup] | None = None
    gpuCount: int = 1
    instanceIds: list[CpuInstanceType] | None = None
    workersMin: int = 0
    workersMax: int = 1
    idleTimeout: int = 60
    executionTimeoutMs: int = 0
    ttlMs: int = 0
    retryPolicy: RetryPolicy | None = None
    payloadLimitBytes: int = DEFAULT_PAYLOAD_LIMIT
    env: dict[str, str] | None = None
    template: PodTemplate | None = None
    networkVolumeId: str | None = None
    networkVolume: NetworkVolume | None = None
    scalerType: ServerlessScalerType = ServerlessScalerType.QUEUE_DELAY
    scalerValue: int = 4
    imageName: str = ""
    datacenter: DataCenter | None = None
    locations: str | None = None
    flashboot: bool = True
    templateId: str | None = None
    id: str | None = None
    handler: str | None = None
    max_concurrency: int = 1

    is_load_balancer: ClassVar[bool] = False
    is_live: ClassVar[bool] = True
    cpu_class: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field (run at construction and again at decoration time).

        Raises:
            ConfigurationError: naming the resource, the field and the fix.
        """
        owner = f"{type(self).__name__}(name={self.name!r})"
        if type(self) in (ServerlessResource, LoadBalancerResource):
            msg = f"{type(self).__name__} is abstract: use LiveServerless, CpuLiveServerless, LiveLoadBalancer, ..."
            raise ConfigurationError(msg)
        name: object = self.name
        if not isinstance(name, str) or not name.strip():
            msg = f"{type(self).__name__}: name must be a non-empty string, got {self.name!r}"
            raise ConfigurationError(msg)
        check_endpoint_name(self.name, type(self).__name__)
        self.gpus = _enum_list(owner, "gpus", self.gpus, GpuGroup)
        self.instanceIds = _enum_list(
            owner, "instanceIds", self.instanceIds, CpuInstanceType
        )
        for field in (
            "workersMin",
            "workersMax",
            "idleTimeout",
            "executionTimeoutMs",
            "ttlMs",
        ):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                msg = f"{owner}: {field} must be a non-negative integer, got {value!r}"
                raise ConfigurationError(msg)
        if self.workersMin > self.workersMax:
            msg = (
                f"{owner}: workersMin ({self.workersMin}) is greater than workersMax "
                f"({self.workersMax}); raise workersMax or lower workersMin"
            )
            raise ConfigurationError(msg)
        concurrency: object = self.max_concurrency
        if (
            not isinstance(concurrency, int)
            or isinstance(concurrency, bool)
            or concurrency < 1
        ):
            msg = (
                f"{owner}: max_concurrency must be an integer of at least 1 (jobs one "
                f"worker runs at once), got {concurrency!r}"
            )
            raise ConfigurationError(msg)
        if concurrency > 1 and self.is_load_balancer:
            msg = (
                f"{owner}: max_concurrency is for queue endpoints; a load balancer's "
                "worker serves its requests concurrently already: remove it"
            )
            raise ConfigurationError(msg)
        if self.gpuCount < 1:
            msg = f"{owner}: gpuCount must be at least 1, got {self.gpuCount}"
            raise ConfigurationError(msg)
        if self.payloadLimitBytes < 1:
            msg = f"{owner}: payloadLimitBytes must be positive, got {self.payloadLimitBytes}"
            raise ConfigurationError(msg)
        if self.cpu_class:
            if self.gpus:
                msg = f"{owner}: a CPU endpoint takes instanceIds, not gpus"
                raise ConfigurationError(msg)
            if not self.instanceIds:
                self.instanceIds = [CpuInstanceType.CPU3G_2_8]
        elif self.gpus is None and not self.instanceIds:
            self.gpus = [GpuGroup.ANY]
        if self.handler is not None:
            if self.is_live or self.is_load_balancer:
                msg = (
                    f"{owner}: handler= is for ServerlessEndpoint and CpuServerlessEndpoint "
                    "(a RunPod handler file taking dictionary payloads); Live classes and "
                    "load balancers run @remote code"
                )
                raise ConfigurationError(msg)
            handler: object = self.handler
            if not isinstance(handler, str) or not handler.endswith(".py"):
                msg = f"{owner}: handler must be the path of a .py file, got {self.handler!r}"
                raise ConfigurationError(msg)
        self.volume_id  # noqa: B018 (checks the volume id, raising ConfigurationError)
        if self.env is not None:
            env_values: dict[str, object] = dict(self.env)
            bad = {k: v for k, v in env_values.items() if not isinstance(v, str)}
            if bad:
                msg = f"{owner}: env values must be strings, got {bad!r}"
                raise ConfigurationError(msg)

    @property
    def is_cpu(self) -> bool:
        """True for CPU endpoints: the Cpu* classes, or any config given ``instanceIds``."""
        return self.cpu_class or bool(self.instanceIds)

    @property
    def volume_id(self) -> str | None:
        """The network volume the workers mount, or ``None``.

        ``networkVolumeId``, else ``networkVolume``'s ``id``, else (for the local providers,
        which need no RunPod id) ``networkVolume``'s ``name``; checked by `check_volume_id`.

        Raises:
            ConfigurationError: a bad id, or two different ids given.
        """
        owner = f"{type(self).__name__}(name={self.name!r})"
        volume = self.networkVolume
        given = self.networkVolumeId
        if volume is not None and volume.id is not None:
            if given is not None and given != volume.id:
                msg = (
                    f"{owner}: networkVolumeId {given!r} and networkVolume's id "
                    f"{volume.id!r} differ: give one of them"
                )
                raise ConfigurationError(msg)
            given = volume.id
        if given is None and volume is not None:
            given = volume.name
        if given is None:
            return None
        return check_volume_id(given, owner)

    @property
    def delivery(self) -> str:
        """``"load_balancer"`` or ``"queue"``."""
        return "load_balancer" if self.is_load_balancer else "queue"

    def worker_env(self) -> dict[str, str]:
        """Environment for the endpoint's workers: the template's, then ``env`` on top."""
        env = self.template.env_dict() if self.template else {}
        env.update(self.env or {})
        return env

    def call_policy(self) -> CallPolicy:
        """The `CallPolicy` every call to this endpoint carries."""
        if self.is_load_balancer:
            retry = RetryPolicy.never()
        else:
            retry = self.retryPolicy or RetryPolicy.queue_default()
        return CallPolicy(
            delivery="load_balancer" if self.is_load_balancer else "queue",
            payload_limit=self.payloadLimitBytes,
            retry=retry,
            execution_timeout_s=(self.executionTimeoutMs / 1000.0)
            if self.executionTimeoutMs
            else DEFAULT_EXECUTION_TIMEOUT_S,
            ttl_s=(self.ttlMs / 1000.0) if self.ttlMs else DEFAULT_TTL_S,
        )

    async def run(self, payload: dict[str, Any]) -> JobOutput:
        """Run one job with a dictionary payload on this endpoint's handler file.

        ``payload`` is ``{"input": {...}}`` as RunPod's ``/run`` takes it (a dictionary
        without an ``input`` key is sent as the input itself). Returns when the job ends: a
        `JobOutput` whose ``output`` is the handler's JSON result; a handler's exception is
        in ``error``, and ``raise_for_error()`` raises it typed.

        Raises:
            ConfigurationError: the endpoint has no ``handler`` file.
        """
        if self.handler is None:
            msg = (
                f"{type(self).__name__}(name={self.name!r}) has no handler file: pass "
                "handler='handler.py' (a RunPod handler) to send it dictionary payloads, "
                "or decorate functions with @remote(resource_config=...)"
            )
            raise ConfigurationError(msg)
        if not await anyio.Path(self.handler).is_file():
            msg = (
                f"{type(self).__name__}(name={self.name!r}): handler file "
                f"{self.handler!r} does not exist (relative paths start at {os.getcwd()!r})"
            )
            raise ConfigurationError(msg)
        if _submitter is None:  # pragma: no cover - set when flash_actors is imported
            msg = "no runtime: import flash_actors (its runtime runs handler jobs)"
            raise ConfigurationError(msg)
        return await _submitter(self, payload)

    async def runsync(self, payload: dict[str, Any]) -> JobOutput:
        """`run`, named as in Flash (both wait for the job's end)."""
        return await self.run(payload)

    def same_config(self, other: ServerlessResource) -> bool:
        """True when ``other`` describes the same endpoint (same class and fields)."""
        return type(self) is type(other) and self == other


class LiveServerless(ServerlessResource, kw_only=True):
    """GPU queue endpoint running remote code (dev): returns `JobOutput`, retries."""


class CpuLiveServerless(ServerlessResource, kw_only=True):
    """CPU queue endpoint running remote code (dev): returns `JobOutput`, retries."""

    cpu_class: ClassVar[bool] = True


class ServerlessEndpoint(ServerlessResource, kw_only=True):
    """GPU queue endpoint on a custom image (prod): dictionary payloads."""

    is_live: ClassVar[bool] = False


class CpuServerlessEndpoint(ServerlessResource, kw_only=True):
    """CPU queue endpoint on a custom image (prod): dictionary payloads."""

    is_live: ClassVar[bool] = False
    cpu_class: ClassVar[bool] = True


class LoadBalancerResource(ServerlessResource, kw_only=True):
    """Base of the four load-balancer classes: HTTP routes, values returned, no retries."""

    is_load_balancer: ClassVar[bool] = True


class LiveLoadBalancer(LoadBalancerResource, kw_only=True):
    """GPU load-balanced HTTP endpoint (dev): returns the value, never retries."""


class CpuLiveLoadBalancer(LoadBalancerResource, kw_only=True):
    """CPU load-balanced HTTP endpoint (dev): returns the value, never retries."""

    cpu_class: ClassVar[bool] = True


class LoadBalancerSlsResource(LoadBalancerResource, kw_only=True):
    """GPU load-balanced HTTP endpoint (prod)."""

    is_live: ClassVar[bool] = False


class CpuLoadBalancerSlsResource(LoadBalancerResource, kw_only=True):
    """CPU load-balanced HTTP endpoint (prod)."""

    is_live: ClassVar[bool] = False
    cpu_class: ClassVar[bool] = True
