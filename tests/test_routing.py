"""Call sites remember the Endpoint actor the Router chose, and ask the Router again when needed."""

from __future__ import annotations

import uuid

import pytest

from flash_actors import ActorStoppedError, CpuLiveServerless, remote, runtime
from flash_actors.registry import REGISTRY, Registry

ROUTED = CpuLiveServerless(name="routing-cache")


@remote(ROUTED)
async def double(x: int) -> int:
    return 2 * x


async def test_later_calls_go_to_the_endpoint_the_router_chose() -> None:
    async with runtime(provider="inprocess") as rt:
        assert (await double(1)).output == 2
        rt.router.stop()
        await rt.router.wait_stopped()
        # The Router is gone, yet the call site still knows its answer.
        assert (await double(2)).output == 4
        # A registry change sends the next call to the Router again: here, a stopped one.
        REGISTRY.register(CpuLiveServerless(name=f"routing-{uuid.uuid4().hex}"))
        with pytest.raises(ActorStoppedError, match=r"^actor 'router' is stopped"):
            await double(3)


async def test_a_stopped_endpoint_actor_is_replaced_through_the_router() -> None:
    async with runtime(provider="inprocess") as rt:
        assert (await double(1)).output == 2
        first = rt.system.get("endpoint:routing-cache")
        assert first is not None
        first.stop()
        await first.wait_stopped()
        assert (await double(5)).output == 10
        second = rt.system.get("endpoint:routing-cache")
        assert second is not None
        assert second is not first


async def test_each_runtime_routes_its_own_calls() -> None:
    async with runtime(provider="inprocess") as first:
        assert (await double(1)).output == 2
    async with runtime(provider="inprocess") as second:
        assert (await double(2)).output == 4
        assert second.system.get("endpoint:routing-cache") is not None
    assert first.system.get("endpoint:routing-cache") is None


def test_registry_generation_counts_changes_only() -> None:
    registry = Registry()
    start = registry.generation
    resource = CpuLiveServerless(name="generation")
    registry.register(resource)
    assert registry.generation == start + 1
    registry.register(resource)  # the same config again: no change
    registry.register_function("f", "generation")
    registry.register_function("f", "generation")
    assert registry.generation == start + 2
    registry.register_function("f", "elsewhere")
    assert registry.generation == start + 3


def test_keep_warm_raises_workers_min_where_workers_max_allows() -> None:
    registry = Registry()
    registry.register(CpuLiveServerless(name="cold", workersMin=0, workersMax=3))
    registry.register(CpuLiveServerless(name="off", workersMin=0, workersMax=0))
    registry.register(CpuLiveServerless(name="hot", workersMin=2, workersMax=3))
    assert registry.resource("cold").workersMin == 0
    registry.keep_warm(1)
    assert registry.resource("cold").workersMin == 1
    assert registry.resource("off").workersMin == 0  # it may run no worker at all
    assert registry.resource("hot").workersMin == 2
    registry.keep_warm(0)
    assert registry.resource("cold").workersMin == 0
    with pytest.raises(ValueError, match="workers must be 0 or more, got -1"):
        registry.keep_warm(-1)
