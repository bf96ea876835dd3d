"""Static checks of ``@remote``'s types, run by mypy (``make typecheck``), never by pytest.

Each ``# type: ignore[code]`` marks a line mypy must reject: mypy runs with
``warn_unused_ignores`` (strict), so if a bad call stopped being flagged, the unused ignore
would fail the type check.
"""

from __future__ import annotations

from typing import assert_type

from flash_actors import (
    JobOutput,
    LiveLoadBalancer,
    LiveServerless,
    RemoteClass,
    RemoteFunction,
    remote,
)

queue = LiveServerless(name="typing-queue")
api = LiveLoadBalancer(name="typing-api")


@remote(resource_config=queue)
async def scale(x: int, factor: float = 2.0) -> float:
    return x * factor


@remote(api, method="POST", path="/typed")
async def typed(x: int) -> dict[str, int]:
    return {"x": x}


@remote(queue, local=True)
def local_len(text: str) -> int:
    return len(text)


class Model:
    def __init__(self, size: int) -> None:
        self.size = size

    async def predict(self, x: int) -> int:
        return x * self.size


# mypy does not apply a class decorator's return type to the class (pyright does), so the
# typed spelling of a remote class is the call form:
RemoteModel = remote(queue)(Model)


async def checks() -> None:
    assert isinstance(scale, RemoteFunction)
    assert_type(await scale(1), JobOutput)
    assert_type(await scale(1, factor=3.0), JobOutput)
    await scale("x")  # type: ignore[arg-type]
    await scale(1, facter=3.0)  # type: ignore[call-arg]

    assert_type(await typed(1), dict[str, int])
    await typed("1")  # type: ignore[arg-type]

    assert_type(await local_len("abc"), int)
    await local_len(3)  # type: ignore[arg-type]

    assert_type(RemoteModel, RemoteClass[Model])
    handle = RemoteModel(3)
    await handle.predict(1)
