"""Hosting a runtime in the running event loop itself, for code that never opened one.

A task group must be entered and left by the same task, so the implicit runtime lives in a
task of its own that the event loop owns: on asyncio a task that ``asyncio.run`` cancels when
the main coroutine returns; on trio a system task, cancelled when the main task ends. Either
way the runtime's ``async with`` exits normally through cancellation and cleans up (worker
processes included) before the loop closes. One runtime per event loop; concurrent first
calls share it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import sniffio

from flash_actors._logging import get_logger
from flash_actors.errors import RuntimeNotRunningError

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine
    from contextlib import AbstractAsyncContextManager

__all__ = ["current_hosted", "hosted", "loop_identity"]

T = TypeVar("T")
log = get_logger(__name__)


class _Hosted:
    __slots__ = ("error", "ready", "value")

    def __init__(self) -> None:
        self.ready = anyio.Event()
        self.value: Any = None
        self.error: BaseException | None = None


_hosted: dict[int, tuple[object, _Hosted]] = {}


def loop_identity() -> tuple[str, object]:
    """The running async library and its loop (asyncio) or trio token: one per event loop."""
    library = sniffio.current_async_library()
    if library == "asyncio":
        import asyncio

        return library, asyncio.get_running_loop()
    if library == "trio":
        import trio

        return library, trio.lowlevel.current_trio_token()
    msg = f"flash-actors runs on asyncio or trio, not on {library!r}"
    raise RuntimeNotRunningError(msg)


def current_hosted() -> Any | None:
    """The value hosted in the running loop, or ``None`` (cheap: no await)."""
    library = sniffio.current_async_library()
    if library == "asyncio":
        import asyncio

        loop: object = asyncio.get_running_loop()
    else:
        loop = loop_identity()[1]
    entry = _hosted.get(id(loop))
    if entry is None or entry[0] is not loop or not entry[1].ready.is_set():
        return None
    return entry[1].value


async def hosted(factory: Callable[[], AbstractAsyncContextManager[T]]) -> T:
    """The value of ``factory()``'s context, entered in a task the running loop owns.

    The first caller in a loop starts the host task; later (or concurrent) callers get the
    same value. The context is exited when the loop ends its tasks (``asyncio.run`` returning,
    trio's main task ending).

    Raises:
        RuntimeNotRunningError: the host could not enter the context (the cause is chained).
    """
    library, loop = loop_identity()
    entry = _hosted.get(id(loop))
    if entry is None or entry[0] is not loop:
        state = _Hosted()
        _hosted[id(loop)] = (loop, state)
        _spawn(library, loop, _host(factory, state, loop))
    else:
        state = entry[1]
    await state.ready.wait()
    if state.error is not None:
        msg = "the flash-actors runtime could not start"
        raise RuntimeNotRunningError(msg) from state.error
    return state.value  # type: ignore[no-any-return]


def _spawn(
    library: str, loop: object, coro_fn: Callable[[], Coroutine[Any, Any, None]]
) -> None:
    if library == "asyncio":
        import asyncio

        assert isinstance(loop, asyncio.AbstractEventLoop)  # noqa: S101
        task: asyncio.Task[None] = loop.create_task(
            coro_fn(), name="flash-actors runtime"
        )
        _tasks.add(task)
        task.add_done_callback(_tasks.discard)
    else:
        import trio

        trio.lowlevel.spawn_system_task(coro_fn, name="flash-actors runtime")


_tasks: set[Any] = set()  # strong references to asyncio host tasks


def _host(
    factory: Callable[[], AbstractAsyncContextManager[T]], state: _Hosted, loop: object
) -> Callable[[], Coroutine[Any, Any, None]]:
    async def run() -> None:
        try:
            async with factory() as value:
                state.value = value
                state.ready.set()
                await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            raise
        except (
            Exception
        ) as exc:  # reported to every waiting caller; must not crash the loop
            log.error("runtime.host_failed", exc_info=exc)
            state.error = exc
        finally:
            state.ready.set()
            entry = _hosted.get(id(loop))
            if entry is not None and entry[1] is state:
                del _hosted[id(loop)]

    return run
