"""Streaming: ``async for chunk in f.stream(...)`` while the generator runs, with back-pressure."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from flash_actors import CpuLiveServerless, remote, runtime
from flash_actors.providers.inprocess import InProcessProvider
from flash_actors.providers.local import LocalProvider

STREAMS = CpuLiveServerless(name="streams")


@remote(STREAMS)
async def count_to(n: int, folder: str, size: int = 0) -> object:
    import pathlib

    for i in range(n):
        (pathlib.Path(folder) / f"produced-{i}").touch()
        yield (i, b"x" * size) if size else i


@remote(STREAMS)
def words(text: str) -> object:
    yield from text.split()


@remote(STREAMS)
async def fails_midway() -> object:
    yield "first"
    raise ValueError("broken stream")


@remote(STREAMS, local=True)
async def local_chunks(n: int) -> object:
    for i in range(n):
        yield {"i": i}


@pytest.fixture(params=["local", "inprocess"])
def provider(request: pytest.FixtureRequest, tmp_path: Path) -> object:
    if request.param == "local":
        return LocalProvider(state_dir=tmp_path / ".flash")
    return InProcessProvider()


async def test_chunks_arrive_while_the_generator_runs(
    provider: object, tmp_path: Path
) -> None:
    async with runtime(provider=provider):  # type: ignore[arg-type]
        seen = []
        async for i, _ in count_to.stream(200, str(tmp_path), 256 * 1024):
            seen.append(i)
            if i == 0:
                # Back-pressure: the generator runs ahead only by the bounded buffers on the
                # way (16 chunks per stage, plus the socket's), not to the end.
                await anyio.sleep(0.3)
                produced = len(list(tmp_path.glob("produced-*")))
                assert produced < 200
        assert seen == list(range(200))
        assert (await words("a b c")).output == ["a", "b", "c"]  # awaited: the list


async def test_sync_generators_stream_and_errors_are_typed(provider: object) -> None:
    async with runtime(provider=provider):  # type: ignore[arg-type]
        assert [w async for w in words.stream("one two three")] == [
            "one",
            "two",
            "three",
        ]
        got = []
        with pytest.raises(ValueError, match=r"^broken stream"):
            async for chunk in fails_midway.stream():
                got.append(chunk)
        assert got == ["first"]


async def test_breaking_out_stops_the_job(provider: object, tmp_path: Path) -> None:
    async with runtime(provider=provider):  # type: ignore[arg-type]
        async for chunk in count_to.stream(100_000, str(tmp_path)):
            if chunk == 3:
                break
        await anyio.sleep(0.3)
        before = len(list(tmp_path.glob("produced-*")))
        await anyio.sleep(0.3)
        assert len(list(tmp_path.glob("produced-*"))) == before < 100_000


async def test_local_streaming_round_trips_each_chunk() -> None:
    assert [c async for c in local_chunks.stream(3)] == [{"i": 0}, {"i": 1}, {"i": 2}]
