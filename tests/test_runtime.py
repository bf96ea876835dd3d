"""The implicit runtime: plain ``asyncio.run``/``trio.run`` programs, fan-out, clean exit."""

from __future__ import annotations

import asyncio
import gc
import warnings

import pytest
import trio

from flash_actors import CpuLiveServerless, JobOutput, current_runtime, remote, runtime

FANOUT = CpuLiveServerless(name="runtime-fanout", workersMax=2)


@remote(FANOUT)
async def inc(x: int) -> int:
    return x + 1


def test_thousand_calls_with_asyncio_gather_and_implicit_runtime() -> None:
    async def main() -> list[JobOutput]:
        assert current_runtime() is None
        results = await asyncio.gather(*(inc(i) for i in range(1000)))
        assert current_runtime() is not None
        return results

    results = asyncio.run(main())
    assert [r.output for r in results] == list(range(1, 1001))


def test_thousand_calls_in_trio_nursery_with_implicit_runtime() -> None:
    async def main() -> dict[int, int]:
        out: dict[int, int] = {}

        async def one(i: int) -> None:
            out[i] = (await inc(i)).output

        async with trio.open_nursery() as nursery:
            for i in range(1000):
                nursery.start_soon(one, i)
        return out

    out = trio.run(main)
    assert out == {i: i + 1 for i in range(1000)}


def test_each_event_loop_gets_its_own_runtime_and_it_shuts_down() -> None:
    seen = []

    async def main() -> int:
        job = await inc(1)
        seen.append(current_runtime())
        return int(job.output)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert asyncio.run(main()) == 2
        assert asyncio.run(main()) == 2
        gc.collect()
    assert seen[0] is not seen[1]
    assert seen[0] is not None
    assert not seen[0].system.running  # the first loop's runtime was stopped at its end


async def test_explicit_runtime_is_used_inside_the_block() -> None:
    async with runtime() as rt:
        assert current_runtime() is rt
        assert (await inc(41)).output == 42
        assert rt.system.get("endpoint:runtime-fanout") is not None
    assert not rt.system.running


async def test_runtime_block_propagates_user_errors_unwrapped() -> None:
    with pytest.raises(LookupError, match=r"^user error$"):
        async with runtime():
            await inc(1)
            raise LookupError("user error")
