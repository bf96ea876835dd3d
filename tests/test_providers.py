"""The provider layer: providers found by name, and one owner for each policy.

A backend declares in ``enforces`` the policies it applies itself; the Endpoint actor applies
only the others. The backends here are small in-process ones at the provider boundary (the
seam a new provider plugs into), not stand-ins for our own components.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio
import pytest

from flash_actors import CpuLiveServerless, JobStatus, remote, runtime
from flash_actors.errors import ConfigurationError, ExecutionTimeoutError
from flash_actors.providers.base import ENFORCES_ALL, ENFORCES_NONE
from flash_actors.providers.inprocess import InProcessBackend, InProcessProvider
from flash_actors.providers.registry import (
    make_provider,
    provider_names,
    register_provider,
)

if TYPE_CHECKING:
    from flash_actors.messages import Call, FunctionResponse
    from flash_actors.resources import ServerlessResource


class SlowBackend(InProcessBackend):
    """Answers after ``delay`` seconds, declaring ``enforces`` as told."""

    def __init__(self, key: bytes, enforces: Any, delay: float) -> None:
        super().__init__(key, capacity=8)
        self.enforces = enforces
        self.delay = delay

    async def execute(
        self, call: Call, *, job_id: str, chunks: Any = None
    ) -> FunctionResponse:
        await anyio.sleep(self.delay)
        return await super().execute(call, job_id=job_id, chunks=chunks)


class SlowProvider(InProcessProvider):
    name = "slow"

    def __init__(self, enforces: Any, delay: float) -> None:
        super().__init__()
        self.enforces = enforces
        self.delay = delay

    async def open_endpoint(
        self, resource: ServerlessResource, key: bytes | None
    ) -> SlowBackend:
        assert key is not None
        return SlowBackend(key, self.enforces, self.delay)


timed = CpuLiveServerless(name="providers-timed", executionTimeoutMs=300)


@remote(resource_config=timed)
async def quick() -> str:
    return "done"


def test_unknown_provider_names_the_known_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(
        ConfigurationError, match=r"^unknown provider 'nope'; available: "
    ):
        make_provider("nope")
    monkeypatch.setenv("FLASH_PROVIDER", "elsewhere")
    with pytest.raises(
        ConfigurationError, match=r"'elsewhere' \(from FLASH_PROVIDER\)"
    ):
        make_provider()
    assert {"inprocess", "local", "runpod"} <= set(provider_names())


def test_providers_are_found_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLASH_PROVIDER", "inprocess")
    assert isinstance(make_provider(), InProcessProvider)
    monkeypatch.setenv("FLASH_LOCAL", "0")
    assert make_provider("local").name == "local"


async def test_a_registered_provider_is_used_by_name() -> None:
    made: list[SlowProvider] = []

    def factory() -> SlowProvider:
        made.append(SlowProvider(ENFORCES_NONE, 0.0))
        return made[-1]

    register_provider("slow-test", factory)
    async with runtime(provider="slow-test") as rt:
        job = await quick()
    assert rt.provider is made[0]
    assert job.output == "done"


async def test_the_actor_applies_the_timeout_a_backend_leaves_to_it() -> None:
    async with runtime(provider=SlowProvider(ENFORCES_NONE, 5.0)):
        job = await quick()
    assert job.status is JobStatus.TIMED_OUT
    assert isinstance(job.exception, ExecutionTimeoutError)


async def test_the_actor_leaves_the_timeout_to_a_backend_that_enforces_it() -> None:
    """A backend that owns the timeout is not timed out a second time by the actor."""
    async with runtime(provider=SlowProvider(ENFORCES_ALL, 0.6)):
        job = await quick()
    assert job.status is JobStatus.COMPLETED
    assert job.output == "done"
