"""The public API: exactly these names, under the seeds' spellings."""

from __future__ import annotations

import flash_actors

EXPECTED = {
    # Flash's API (the seeds)
    "remote",
    "LiveServerless",
    "CpuLiveServerless",
    "ServerlessEndpoint",
    "CpuServerlessEndpoint",
    "LiveLoadBalancer",
    "CpuLiveLoadBalancer",
    "LoadBalancerSlsResource",
    "CpuLoadBalancerSlsResource",
    "GpuGroup",
    "CpuInstanceType",
    "DataCenter",
    "PodTemplate",
    "NetworkVolume",
    "JobOutput",
    "FlashRuntimeError",
    "RemoteExecutionError",
    "ResultTypeUnavailableError",
    "SerializationError",
    "GraphQLError",
    "GraphQLMutationError",
    "GraphQLQueryError",
    "ManifestError",
    "ManifestServiceUnavailableError",
    "PayloadTooLargeError",
    # flash-actors additions
    "ServerlessResource",
    "ServerlessScalerType",
    "JobStatus",
    "RemoteFunction",
    "RemoteClass",
    "RemoteInstance",
    "CallPolicy",
    "RetryPolicy",
    "runtime",
    "current_runtime",
    "FlashRuntime",
    "ScopeWarning",
    "PayloadSignatureError",
    "ConfigurationError",
    "InvalidRemoteTargetError",
    "ExecutionTimeoutError",
    "DeliveryError",
    "DependencyInstallError",
    "ActorError",
    "ActorStoppedError",
    "AskTimeoutError",
    "MailboxFullError",
    "RuntimeNotRunningError",
    "volume_path",
}


def test_all_is_exactly_the_public_api() -> None:
    assert set(flash_actors.__all__) == EXPECTED
    assert len(flash_actors.__all__) == len(EXPECTED)
    for name in flash_actors.__all__:
        assert getattr(flash_actors, name) is not None


def test_flash_imports_work_after_changing_the_import_line() -> None:
    namespace: dict[str, object] = {}
    exec(
        "from flash_actors import remote, LiveServerless, GpuGroup, CpuInstanceType",
        namespace,
    )
    assert namespace["remote"] is flash_actors.remote
