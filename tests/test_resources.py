"""Resource configs, GPU groups, CPU instance types, templates and volumes."""

from __future__ import annotations

import pytest

from flash_actors import (
    ConfigurationError,
    CpuInstanceType,
    CpuLiveLoadBalancer,
    CpuLiveServerless,
    CpuLoadBalancerSlsResource,
    CpuServerlessEndpoint,
    DataCenter,
    GpuGroup,
    LiveLoadBalancer,
    LiveServerless,
    LoadBalancerSlsResource,
    NetworkVolume,
    PodTemplate,
    RetryPolicy,
    ServerlessEndpoint,
    ServerlessResource,
)


def test_gpu_groups_know_models_and_memory() -> None:
    assert len(GpuGroup) == 10
    expected = {
        "AMPERE_16": ("RTX A4000", 16),
        "AMPERE_24": ("RTX A5000", 24),
        "AMPERE_48": ("A40", 48),
        "AMPERE_80": ("A100", 80),
        "ADA_24": ("RTX 4090", 24),
        "ADA_32_PRO": ("RTX 5090", 32),
        "ADA_48_PRO": ("RTX 6000 Ada", 48),
        "ADA_80_PRO": ("H100", 80),
        "HOPPER_141": ("H200", 141),
    }
    for name, (model, memory) in expected.items():
        group = GpuGroup[name]
        assert any(model in m for m in group.models), name
        assert group.memory_gb == memory
    assert GpuGroup.ANY.models == ()
    assert GpuGroup.ANY.memory_gb is None
    assert GpuGroup.ANY not in GpuGroup.all()


def test_cpu_instance_types_parse_their_names() -> None:
    assert len(CpuInstanceType) == 12
    t = CpuInstanceType.CPU5C_4_8
    assert (t.generation, t.kind, t.vcpu, t.memory_gb) == (5, "compute", 4, 8)
    g = CpuInstanceType.CPU3G_8_32
    assert (g.generation, g.kind, g.vcpu, g.memory_gb) == (3, "general", 8, 32)
    for member in CpuInstanceType:
        assert (
            member.value
            == f"cpu{member.generation}{member.name[4].lower()}-{member.vcpu}-{member.memory_gb}"
        )


def test_seed_example_config() -> None:
    cfg = LiveServerless(
        name="worker-name",
        gpus=[GpuGroup.AMPERE_80],
        workersMin=0,
        workersMax=3,
        idleTimeout=300,
        networkVolumeId="vol_abc123",
        env={"KEY": "value"},
        template=PodTemplate(containerDiskInGb=100),
    )
    assert cfg.gpus == [GpuGroup.AMPERE_80]
    assert not cfg.is_cpu
    assert cfg.worker_env() == {"KEY": "value"}
    assert cfg.call_policy().delivery == "queue"
    assert cfg.call_policy().retry.attempts == 3


def test_classes_by_delivery_and_hardware() -> None:
    queue = [
        LiveServerless,
        CpuLiveServerless,
        ServerlessEndpoint,
        CpuServerlessEndpoint,
    ]
    lb = [
        LiveLoadBalancer,
        CpuLiveLoadBalancer,
        LoadBalancerSlsResource,
        CpuLoadBalancerSlsResource,
    ]
    for cls in queue:
        assert not cls.is_load_balancer
        assert cls(name=f"q-{cls.__name__}").call_policy().retry.attempts > 1
    for cls in lb:
        assert cls.is_load_balancer
        assert (
            cls(name=f"l-{cls.__name__}").call_policy().retry.attempts == 1
        )  # never retries
    assert CpuLiveServerless(name="c").is_cpu
    assert CpuLiveServerless(name="c").instanceIds == [CpuInstanceType.CPU3G_2_8]
    assert LiveServerless(name="x", instanceIds=[CpuInstanceType.CPU5C_4_8]).is_cpu
    assert not ServerlessEndpoint.is_live
    assert LiveServerless.is_live


def test_strings_become_enums() -> None:
    cfg = LiveServerless(name="s", gpus=["AMPERE_80", "ADA_24"])  # type: ignore[list-item]
    assert cfg.gpus == [GpuGroup.AMPERE_80, GpuGroup.ADA_24]
    cpu = CpuLiveServerless(name="c", instanceIds=["CPU5C_2_4"])  # type: ignore[list-item]
    assert cpu.instanceIds == [CpuInstanceType.CPU5C_2_4]


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (
            {"name": "w", "workersMin": 3, "workersMax": 1},
            r"workersMin \(3\) is greater than workersMax \(1\)",
        ),
        ({"name": ""}, r"name must be a non-empty string"),
        ({"name": "has space"}, r"name may hold only letters"),
        (
            {"name": "w", "idleTimeout": -1},
            r"idleTimeout must be a non-negative integer",
        ),
        ({"name": "w", "gpus": ["TITAN_X"]}, r"gpus has unknown value 'TITAN_X'"),
        ({"name": "w", "env": {"A": 1}}, r"env values must be strings"),
    ],
)
def test_bad_values_are_refused_with_clear_errors(
    kwargs: dict[str, object], pattern: str
) -> None:
    with pytest.raises(ConfigurationError, match=pattern):
        LiveServerless(**kwargs)  # type: ignore[arg-type]


def test_cpu_class_refuses_gpus_and_base_is_abstract() -> None:
    with pytest.raises(
        ConfigurationError, match=r"a CPU endpoint takes instanceIds, not gpus"
    ):
        CpuLiveServerless(name="c", gpus=[GpuGroup.AMPERE_16])
    with pytest.raises(ConfigurationError, match=r"ServerlessResource is abstract"):
        ServerlessResource(name="base")


def test_pod_template_and_network_volume() -> None:
    template = PodTemplate(
        containerDiskInGb=100, env=[{"key": "PYTHONPATH", "value": "/workspace"}]
    )
    assert template.env_dict() == {"PYTHONPATH": "/workspace"}
    assert PodTemplate(env={"A": "1"}).env_dict() == {"A": "1"}  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"PodTemplate.env entries"):
        PodTemplate(env=[{"name": "A"}])
    cfg = LiveServerless(name="t", env={"B": "2"}, template=template)
    assert cfg.worker_env() == {"PYTHONPATH": "/workspace", "B": "2"}
    volume = NetworkVolume(
        name="model-storage", size=100, dataCenterId=DataCenter.EU_RO_1
    )
    assert volume.dataCenterId is DataCenter.EU_RO_1
    with pytest.raises(ConfigurationError, match=r"unknown dataCenterId"):
        NetworkVolume(name="v", dataCenterId="MARS-1")  # type: ignore[arg-type]


def test_policies_follow_the_config() -> None:
    cfg = LiveServerless(
        name="p",
        executionTimeoutMs=1500,
        ttlMs=2000,
        retryPolicy=RetryPolicy(attempts=5),
        payloadLimitBytes=1024,
    )
    policy = cfg.call_policy()
    assert (
        policy.execution_timeout_s,
        policy.ttl_s,
        policy.retry.attempts,
        policy.payload_limit,
    ) == (1.5, 2.0, 5, 1024)


def test_retry_delay_is_exponential_with_jitter_bounds() -> None:
    policy = RetryPolicy(backoff_s=0.1, backoff_max_s=1.0, jitter=0.5)
    for retry, base in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (9, 1.0)]:
        for _ in range(20):
            assert base * 0.5 <= policy.delay(retry) <= base
    assert RetryPolicy(jitter=0.0, backoff_s=0.3).delay(1) == 0.3
    with pytest.raises(ValueError, match=r"attempts must be at least 1"):
        RetryPolicy(attempts=0)
