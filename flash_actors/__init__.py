"""flash-actors: await Python functions on remote GPU and CPU workers (the Flash API).

A Flash program runs after changing only its import line::

    from flash_actors import remote, LiveServerless

The stable public API is exactly ``__all__`` (a test pins it).
"""

from __future__ import annotations

from flash_actors._scoping import ScopeWarning as ScopeWarning
from flash_actors.errors import (
    ActorError as ActorError,
    ActorStoppedError as ActorStoppedError,
    AskTimeoutError as AskTimeoutError,
    ConfigurationError as ConfigurationError,
    DeliveryError as DeliveryError,
    DependencyInstallError as DependencyInstallError,
    ExecutionTimeoutError as ExecutionTimeoutError,
    FlashRuntimeError as FlashRuntimeError,
    GraphQLError as GraphQLError,
    GraphQLMutationError as GraphQLMutationError,
    GraphQLQueryError as GraphQLQueryError,
    InvalidRemoteTargetError as InvalidRemoteTargetError,
    MailboxFullError as MailboxFullError,
    ManifestError as ManifestError,
    ManifestServiceUnavailableError as ManifestServiceUnavailableError,
    PayloadSignatureError as PayloadSignatureError,
    PayloadTooLargeError as PayloadTooLargeError,
    RemoteExecutionError as RemoteExecutionError,
    ResultTypeUnavailableError as ResultTypeUnavailableError,
    RuntimeNotRunningError as RuntimeNotRunningError,
    SerializationError as SerializationError,
)
from flash_actors.jobs import JobOutput as JobOutput, JobStatus as JobStatus
from flash_actors.policies import CallPolicy as CallPolicy, RetryPolicy as RetryPolicy
from flash_actors.remote import (
    RemoteClass as RemoteClass,
    RemoteFunction as RemoteFunction,
    RemoteInstance as RemoteInstance,
    remote as remote,
)
from flash_actors.resources import (
    CpuInstanceType as CpuInstanceType,
    CpuLiveLoadBalancer as CpuLiveLoadBalancer,
    CpuLiveServerless as CpuLiveServerless,
    CpuLoadBalancerSlsResource as CpuLoadBalancerSlsResource,
    CpuServerlessEndpoint as CpuServerlessEndpoint,
    DataCenter as DataCenter,
    GpuGroup as GpuGroup,
    LiveLoadBalancer as LiveLoadBalancer,
    LiveServerless as LiveServerless,
    LoadBalancerSlsResource as LoadBalancerSlsResource,
    NetworkVolume as NetworkVolume,
    PodTemplate as PodTemplate,
    ServerlessEndpoint as ServerlessEndpoint,
    ServerlessResource as ServerlessResource,
    ServerlessScalerType as ServerlessScalerType,
)
from flash_actors.runtime import (
    FlashRuntime as FlashRuntime,
    current_runtime as current_runtime,
    runtime as runtime,
)
from flash_actors.volumes import volume_path as volume_path

__version__ = "0.1.0"

__all__ = [
    "ActorError",
    "ActorStoppedError",
    "AskTimeoutError",
    "CallPolicy",
    "ConfigurationError",
    "CpuInstanceType",
    "CpuLiveLoadBalancer",
    "CpuLiveServerless",
    "CpuLoadBalancerSlsResource",
    "CpuServerlessEndpoint",
    "DataCenter",
    "DeliveryError",
    "DependencyInstallError",
    "ExecutionTimeoutError",
    "FlashRuntime",
    "FlashRuntimeError",
    "GpuGroup",
    "GraphQLError",
    "GraphQLMutationError",
    "GraphQLQueryError",
    "InvalidRemoteTargetError",
    "JobOutput",
    "JobStatus",
    "LiveLoadBalancer",
    "LiveServerless",
    "LoadBalancerSlsResource",
    "MailboxFullError",
    "ManifestError",
    "ManifestServiceUnavailableError",
    "NetworkVolume",
    "PayloadSignatureError",
    "PayloadTooLargeError",
    "PodTemplate",
    "RemoteClass",
    "RemoteExecutionError",
    "RemoteFunction",
    "RemoteInstance",
    "ResultTypeUnavailableError",
    "RetryPolicy",
    "RuntimeNotRunningError",
    "ScopeWarning",
    "SerializationError",
    "ServerlessEndpoint",
    "ServerlessResource",
    "ServerlessScalerType",
    "current_runtime",
    "remote",
    "runtime",
    "volume_path",
]
