"""`flash_actors._wake`: the hot path's one-waiter wake-up, on asyncio and trio."""

from __future__ import annotations

import anyio
import pytest

from flash_actors._wake import wake_class

pytestmark = pytest.mark.anyio


async def test_a_wake_set_before_or_while_waiting_wakes_its_waiter() -> None:
    wake = wake_class()()
    assert not wake.is_set()
    woken: list[str] = []

    async def waiter() -> None:
        await wake.wait()
        woken.append("yes")

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await anyio.sleep(0.01)
        assert woken == []
        wake.set()
    assert woken == ["yes"]
    assert wake.is_set()
    wake.set()  # twice: nothing happens
    with anyio.fail_after(1):
        await wake.wait()  # already set: returns at once


async def test_a_cancelled_waiter_leaves_the_wake_usable() -> None:
    wake = wake_class()()
    with anyio.move_on_after(0.01) as scope:
        await wake.wait()
    assert scope.cancelled_caught
    wake.set()  # its waiter went away: no error
    with anyio.fail_after(1):
        await wake.wait()


async def test_a_set_wake_still_delivers_a_pending_cancellation() -> None:
    wake = wake_class()()
    wake.set()
    with anyio.CancelScope() as scope:
        scope.cancel()
        await wake.wait()
        pytest.fail("the wait should have been cancelled")  # pragma: no cover
    assert scope.cancelled_caught
