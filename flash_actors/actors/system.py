"""The actor system: owns the task group every actor runs in, spawns and stops actors."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from flash_actors.actors.actor import Actor, ActorCell, ActorRef
from flash_actors.actors.supervision import RestartPolicy
from flash_actors.errors import RuntimeNotRunningError

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import TracebackType

    from anyio.abc import TaskGroup

__all__ = ["ActorSystem"]

M = TypeVar("M")


class ActorSystem:
    """A task group of supervised actors; use as ``async with ActorSystem() as system``.

    Leaving the block stops every actor. On a normal exit each actor first handles what was
    already in its mailbox (for at most ``grace_s`` seconds); on an exception or cancellation
    it stops at once. Whatever is left fails with `ActorStoppedError`, `Actor.on_stop` runs,
    and the block is left only when every actor task has finished.

    Args:
        grace_s: how long a normal exit waits for queued messages.
    """

    def __init__(self, *, grace_s: float = 10.0) -> None:
        self.grace_s = grace_s
        self._tg: TaskGroup | None = None
        self._cells: dict[str, ActorCell[Any]] = {}
        self._closing = False

    @property
    def running(self) -> bool:
        """True between entering and leaving the block."""
        return self._tg is not None and not self._closing

    async def __aenter__(self) -> ActorSystem:
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        tg = self._tg
        assert tg is not None  # noqa: S101 (entered above)
        self._closing = True
        for cell in list(self._cells.values()):
            cell.request_stop()
        if exc is None:
            # Let actors finish what they had queued (for a while), then stop.
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.grace_s):
                for cell in list(self._cells.values()):
                    await cell.stopped.wait()
        tg.cancel_scope.cancel()
        try:
            # The block's own exception was answered by cancelling the actors; it propagates
            # unwrapped (actor tasks catch their own failures, so nothing else can come out).
            await tg.__aexit__(None, None, None)
        finally:
            self._tg = None
        return None

    def spawn(
        self,
        factory: Callable[[], Actor[M]],
        *,
        name: str,
        mailbox_size: int = 1024,
        max_concurrency: int = 1,
        restart: RestartPolicy | None = None,
    ) -> ActorRef[M]:
        """Start an actor; messages sent before its task runs wait in its mailbox.

        Args:
            factory: makes a fresh instance, at start and at every restart.
            name: unique within this system.
            mailbox_size: bound of its mailbox.
            max_concurrency: messages handled at once.
            restart: supervision policy (default `RestartPolicy()`).

        Raises:
            RuntimeNotRunningError: the system is not running.
            ValueError: the name is taken by a running actor.
        """
        if self._tg is None or self._closing:
            msg = f"cannot spawn actor {name!r}: the actor system is not running"
            raise RuntimeNotRunningError(msg)
        old = self._cells.get(name)
        if old is not None and not old.stopped.is_set():
            msg = f"an actor named {name!r} is already running"
            raise ValueError(msg)
        cell: ActorCell[M] = ActorCell(
            name,
            factory,
            mailbox_size=mailbox_size,
            max_concurrency=max_concurrency,
            restart=restart or RestartPolicy(),
        )
        self._cells[name] = cell
        self._tg.start_soon(cell.run, name=f"actor:{name}")
        return cell.ref

    def get(self, name: str) -> ActorRef[Any] | None:
        """The running actor of that name, if any."""
        cell = self._cells.get(name)
        if cell is None or cell.stopped.is_set():
            return None
        return cell.ref

    def actors(self) -> list[ActorRef[Any]]:
        """Every actor spawned and not yet stopped."""
        return [c.ref for c in self._cells.values() if not c.stopped.is_set()]

    def start_soon(self, fn: Callable[[], Any], *, name: str) -> None:
        """Run a background task of the runtime in the system's task group."""
        if self._tg is None:
            msg = "the actor system is not running"
            raise RuntimeNotRunningError(msg)
        self._tg.start_soon(fn, name=name)
