"""Actors: a task with a bounded mailbox, ``tell``/``ask`` through an `ActorRef`, supervised.

Subclass `Actor` and implement `Actor.receive`. Its return value answers an ``ask``; an
exception it raises is re-raised in the asker. To hand a request to another actor without
answering it here, return `Forward` (the other actor answers the original asker). With
``max_concurrency`` above 1, messages are handled concurrently, each in its own task, at most
that many at a time; the mailbox then fills and pushes back on senders.

Cancelling an ``ask`` (a cancel scope, a timeout) withdraws the request: the actor skips it if
it has not started, or cancels the handler that runs it.

An actor whose messages need no task of their own (``Actor.inline``, concurrent actors only)
may run them in the sender's task instead: `ActorRef.call` hands the message straight to the
running instance's `Actor.receive`, skipping the mailbox, the hand-off to a handler task and
the wake-up of the sender (measured: most of an in-process call's cost). Such calls are still
the actor's: a stop waits for them (graceful) or cancels them with `ActorStoppedError`, as it
does its handlers' messages.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import anyio
import anyio.lowlevel
import msgspec

from flash_actors._logging import get_logger
from flash_actors.actors.mailbox import Envelope, Mailbox, Reply
from flash_actors.errors import ActorStoppedError, AskTimeoutError, MailboxFullError

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

    from anyio.abc import TaskGroup

    from flash_actors.actors.supervision import RestartPolicy

__all__ = ["Actor", "ActorCell", "ActorRef", "ActorStatistics", "Forward"]

M = TypeVar("M")
log = get_logger(__name__)


class Actor(Generic[M]):
    """Base class of actors. Instances are made by the supervisor, once per (re)start.

    Attributes:
        inline: `ActorRef.call` may run `receive` in the caller's task, concurrently with
            the actor's other messages (honoured only with ``max_concurrency`` above 1, and
            not bounded by it: such an actor bounds its own work). ``receive`` must then
            never return `Forward`.
    """

    ref: ActorRef[M]
    inline: ClassVar[bool] = False

    async def on_start(self) -> None:
        """Run before the first message; an exception here is a crash (restart policy)."""

    async def receive(self, message: M) -> Any:
        """Handle one message; return the answer (or `Forward`)."""
        raise NotImplementedError

    async def on_stop(self) -> None:
        """Run once this instance handles no more messages (stop, crash or shutdown).

        Runs shielded from cancellation; keep it short.
        """


class Forward:
    """Returned by `Actor.receive`: deliver ``message`` to ``target``, which answers instead."""

    __slots__ = ("message", "target")

    def __init__(self, target: ActorRef[Any], message: Any) -> None:
        self.target = target
        self.message = message


class ActorStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of one actor."""

    name: str
    queued: int
    mailbox_size: int
    in_flight: int
    restarts: int
    running: bool


_STOP = object()
_BURST = 64  # messages an actor handles back to back before it checkpoints


class _Handlers:
    """Book-keeping of a concurrent actor's handler tasks."""

    __slots__ = ("_idle_event", "busy", "crash", "idle", "stopping", "total")

    def __init__(self) -> None:
        self.total = 0
        self.idle = 0
        self.busy = 0
        self.crash: Exception | None = None
        self.stopping = anyio.Event()
        self._idle_event: anyio.Event | None = None

    def stop(self) -> None:
        self.stopping.set()

    def done_one(self) -> None:
        self.busy -= 1
        if self.busy == 0 and self._idle_event is not None:
            self._idle_event.set()
            self._idle_event = None

    async def wait_idle(self) -> None:
        if self.busy:
            if self._idle_event is None:
                self._idle_event = anyio.Event()
            await self._idle_event.wait()


class ActorRef(Generic[M]):
    """The handle to send messages to an actor. Safe to share between tasks."""

    __slots__ = ("_cell",)

    def __init__(self, cell: ActorCell[M]) -> None:
        self._cell = cell

    @property
    def name(self) -> str:
        """The actor's name."""
        return self._cell.name

    @property
    def is_stopped(self) -> bool:
        """True once the actor has stopped for good."""
        return self._cell.stopped.is_set()

    @property
    def inline_ready(self) -> bool:
        """True while `call` runs in the caller's task (see `Actor.inline`)."""
        cell = self._cell
        return cell.serving is not None and not cell.stop_requested

    def __repr__(self) -> str:
        return f"<ActorRef {self._cell.name!r}>"

    async def tell(self, message: M) -> None:
        """Send without waiting for an answer; waits while the mailbox is full.

        Raises:
            ActorStoppedError: the actor is stopped.
        """
        await self._cell.mailbox.put(Envelope(message, None))

    def tell_nowait(self, message: M) -> None:
        """Send without waiting at all.

        Raises:
            MailboxFullError: the mailbox is full.
            ActorStoppedError: the actor is stopped.
        """
        self._cell.mailbox.put_nowait(Envelope(message, None))

    async def ask(self, message: M, *, timeout: float | None = None) -> Any:  # noqa: ASYNC109 (an ask deadline, as in pykka; a cancel scope works too)
        """Send and wait for the answer.

        Args:
            message: the request.
            timeout: seconds to wait for the answer (the wait in a full mailbox included);
                ``None`` waits as long as the actor lives.

        Raises:
            AskTimeoutError: no answer within ``timeout``; the request was withdrawn.
            ActorStoppedError: the actor stopped or crashed before answering.
            Exception: whatever the handler raised.
        """
        reply = Reply(self._cell.event_class)
        mailbox = self._cell.mailbox
        if timeout is None:
            try:
                await mailbox.put(Envelope(message, reply))
                return await reply.wait()
            except BaseException:
                reply.cancel()
                raise
        with anyio.move_on_after(timeout):
            try:
                await mailbox.put(Envelope(message, reply))
                return await reply.wait()
            except BaseException:
                reply.cancel()
                raise
        reply.cancel()
        msg = f"actor {self._cell.name!r} did not answer within {timeout} s"
        raise AskTimeoutError(msg)

    def call(self, message: M) -> Coroutine[Any, Any, Any]:
        """`ask` without a deadline, run in the caller's task where the actor allows it.

        An `Actor.inline` actor that is serving handles the message in this task (see the
        module docstring); otherwise, or while it starts, restarts or stops, this is `ask`.
        Cancelling the caller cancels the handling, as it withdraws an ``ask``. (A plain
        function returning the coroutine to await: one frame less per call in flight.)

        Raises:
            ActorStoppedError: the actor stopped or crashed before answering.
            Exception: whatever the handler raised.
        """
        cell = self._cell
        actor = cell.serving
        if actor is None or cell.stop_requested:
            return self.ask(message)
        return cell.run_inline(actor, message)

    def new_reply(self) -> Reply:
        """A fresh answer slot for an envelope to this actor (see `forward`)."""
        return Reply(self._cell.event_class)

    async def forward(self, envelope: Envelope) -> None:
        """Deliver an envelope whose reply belongs to someone else (see `Forward`).

        Raises:
            ActorStoppedError: the actor is stopped; the envelope was not delivered.
        """
        await self._cell.mailbox.put(envelope)

    def forward_nowait(self, envelope: Envelope) -> None:
        """`forward` without waiting; raises `MailboxFullError` when full."""
        self._cell.mailbox.put_nowait(envelope)

    def stop(self) -> None:
        """Stop after the messages already queued; later messages fail with ActorStoppedError."""
        self._cell.request_stop()

    async def wait_stopped(self) -> None:
        """Wait until the actor has stopped for good."""
        await self._cell.stopped.wait()

    def statistics(self) -> ActorStatistics:
        """A snapshot of the actor."""
        return self._cell.statistics()


class _InlineReply(Reply):
    """The in-flight record of an inline call: the error a stop answers it with, its scope."""

    __slots__ = ()

    def __init__(self) -> None:  # no event: the caller waits on the handling itself
        self._error = None
        self.done = False
        self.cancelled = False
        self.scope = None

    def set_exception(self, error: BaseException) -> None:
        if not self.done:
            self.done = True
            self._error = error


class ActorCell(Generic[M]):
    """The runtime side of one actor: mailbox, supervision loop, requests in flight.

    Made by `flash_actors.actors.ActorSystem.spawn`; not used directly.
    """

    def __init__(
        self,
        name: str,
        factory: Callable[[], Actor[M]],
        *,
        mailbox_size: int,
        max_concurrency: int,
        restart: RestartPolicy,
    ) -> None:
        if max_concurrency < 1:
            msg = f"actor {name!r}: max_concurrency must be at least 1"
            raise ValueError(msg)
        self.name = name
        self.factory = factory
        self.mailbox = Mailbox(name, mailbox_size)
        self.max_concurrency = max_concurrency
        self.restart = restart
        self.ref: ActorRef[M] = ActorRef(self)
        self.in_flight: set[Reply] = set()
        self.restarts = 0
        self.running = False
        self.stopped = anyio.Event()
        # The backend's own classes, looked up once: ``anyio.Event()`` and
        # ``anyio.CancelScope()`` ask sniffio for the running backend on every call.
        self.event_class: type[anyio.Event] = type(self.stopped)
        self._scope_class: type[anyio.CancelScope] = anyio.CancelScope
        self.stop_requested = False
        # The instance that handles inline calls (`ActorRef.call`) while it serves, and
        # how many such calls run.
        self.serving: Actor[M] | None = None
        self._inline = 0
        self._inline_idle: anyio.Event | None = None

    def request_stop(self) -> None:
        """Stop once the messages already queued are handled (see `ActorRef.stop`)."""
        if self.stop_requested or self.mailbox.closed:
            return
        self.stop_requested = True
        try:
            self.mailbox.put_nowait(Envelope(_STOP, None))
        except MailboxFullError:
            # Full: the marker cannot queue behind the backlog. Refuse new messages and let
            # the serve loop stop once the backlog is drained (`_drained_after_stop`).
            self.mailbox.closed = True

    def _drained_after_stop(self) -> bool:
        if not self.stop_requested:
            return False
        stats = self.mailbox.statistics()
        return stats.queued == 0 and stats.waiting_senders == 0

    def statistics(self) -> ActorStatistics:
        """A snapshot of the actor."""
        stats = self.mailbox.statistics()
        return ActorStatistics(
            name=self.name,
            queued=stats.queued,
            mailbox_size=stats.max_size,
            in_flight=len(self.in_flight),
            restarts=self.restarts,
            running=self.running,
        )

    async def run_inline(self, actor: Actor[M], message: M) -> Any:
        """Handle ``message`` with the serving ``actor`` in the caller's task (`ActorRef.call`).

        Raises:
            ActorStoppedError: the actor stopped or crashed meanwhile (it cancels the call).
            Exception: whatever the handler raised.
        """
        reply = _InlineReply()
        self.in_flight.add(reply)
        self._inline += 1
        try:
            with self._scope_class() as scope:
                reply.scope = scope
                result = await actor.receive(message)
        finally:
            self.in_flight.discard(reply)
            self._inline -= 1
            if not self._inline and self._inline_idle is not None:
                self._inline_idle.set()
                self._inline_idle = None
        if (
            scope.cancelled_caught
        ):  # cancelled by a stop or a crash, which set the error
            # A fresh error per call: the stop's one is shared by every call it cancels.
            cause = reply._error  # noqa: SLF001 (our own record)
            raise ActorStoppedError(
                str(cause) if cause else f"actor {self.name!r} stopped before answering"
            )
        if isinstance(result, Forward):
            msg = f"actor {self.name!r} is inline: its receive cannot return Forward"
            raise TypeError(msg)
        return result

    async def _inline_drained(self) -> None:
        """Wait until no inline call runs."""
        while self._inline:
            if self._inline_idle is None:
                self._inline_idle = self.event_class()
            await self._inline_idle.wait()

    async def run(self) -> None:
        """Supervise the actor until it stops for good; then fail whatever still waits."""
        crashes: deque[float] = deque()
        in_a_row = 0
        start_error: Exception | None = None
        self._scope_class = type(anyio.CancelScope())
        try:
            while True:
                actor = self.factory()
                actor.ref = self.ref
                try:
                    self.running = True
                    start_error = None
                    try:
                        await actor.on_start()
                    except Exception as exc:
                        start_error = exc
                        raise
                    in_a_row = 0
                    await self._serve(actor)
                    return
                except Exception as exc:
                    self.running = False
                    self._fail_in_flight(
                        ActorStoppedError(f"actor {self.name!r} crashed: {exc!r}")
                    )
                    now = time.monotonic()
                    crashes.append(now)
                    while crashes and now - crashes[0] > self.restart.window_s:
                        crashes.popleft()
                    if len(crashes) > self.restart.max_restarts:
                        log.error(
                            "actor.gave_up",
                            actor=self.name,
                            crashes=len(crashes),
                            exc_info=exc,
                        )
                        if start_error is not None:
                            # what waits was never handled because the actor cannot start:
                            # its callers get that reason, not a bare "stopped"
                            self._fail_waiting(start_error)
                        return
                    in_a_row += 1
                    delay = self.restart.delay(in_a_row)
                    log.warning(
                        "actor.restart", actor=self.name, delay_s=delay, exc_info=exc
                    )
                    self.restarts += 1
                    await anyio.sleep(delay)
                finally:
                    self.running = False
                    with anyio.CancelScope(shield=True):
                        try:
                            await actor.on_stop()
                        except Exception as exc:
                            log.warning(
                                "actor.on_stop_failed", actor=self.name, exc_info=exc
                            )
        finally:
            self._close()

    def _close(self) -> None:
        stopped = ActorStoppedError(f"actor {self.name!r} stopped before answering")
        self._fail_in_flight(stopped)
        for envelope in self.mailbox.close():
            if envelope.reply is not None:
                envelope.reply.set_exception(
                    ActorStoppedError(
                        f"actor {self.name!r} stopped; the message was not handled"
                    )
                )
        self.stopped.set()

    def _fail_waiting(self, error: Exception) -> None:
        """Fail every queued message with ``error`` (and close the mailbox)."""
        for envelope in self.mailbox.close():
            if envelope.reply is not None:
                envelope.reply.set_exception(error)

    def _fail_in_flight(self, error: ActorStoppedError) -> None:
        for reply in list(self.in_flight):
            reply.set_exception(error)
            if reply.scope is not None:
                reply.scope.cancel()
        self.in_flight.clear()

    async def _serve(self, actor: Actor[M]) -> None:
        mailbox = self.mailbox
        burst = 0
        if self.max_concurrency == 1:
            while True:
                try:
                    envelope = await mailbox.get()
                except (anyio.EndOfStream, anyio.ClosedResourceError):
                    return
                if envelope.message is _STOP:
                    return
                await self._handle(actor, envelope)
                if self._drained_after_stop():
                    return
                burst += 1
                if burst == _BURST:  # a flooded actor still lets other tasks run
                    burst = 0
                    await anyio.lowlevel.checkpoint()
        # Concurrent actors keep an elastic set of handler tasks that each take messages
        # from the mailbox: a new task starts only when none is idle (a task spawn per
        # message measured 51 us here against 16 us to wake a waiting handler).
        handlers = _Handlers()
        try:
            async with anyio.create_task_group() as tg:
                handlers.total = 1
                tg.start_soon(self._handler_loop, actor, handlers, tg)
                if actor.inline:
                    self.serving = actor
                await handlers.stopping.wait()
                self.serving = None
                while handlers.busy:  # a graceful stop lets the calls in flight finish
                    await handlers.wait_idle()
                await self._inline_drained()
                tg.cancel_scope.cancel()
        finally:
            self.serving = None
            if self._inline:  # cancelled or crashed: inline calls stop with it
                self._fail_in_flight(
                    ActorStoppedError(f"actor {self.name!r} stopped before answering")
                )
        if handlers.crash is not None:
            raise handlers.crash

    async def _handler_loop(
        self, actor: Actor[M], handlers: _Handlers, tg: TaskGroup
    ) -> None:
        mailbox = self.mailbox
        burst = 0
        while True:
            handlers.idle += 1
            try:
                envelope = await mailbox.get()
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                handlers.stop()
                return
            finally:
                handlers.idle -= 1
            if envelope.message is _STOP:
                handlers.stop()
                return
            if handlers.stopping.is_set():  # arrived behind the stop: not handled
                if envelope.reply is not None:
                    envelope.reply.set_exception(
                        ActorStoppedError(
                            f"actor {self.name!r} stopped; the message was not handled"
                        )
                    )
                continue
            if handlers.idle == 0 and handlers.total < self.max_concurrency:
                handlers.total += 1
                tg.start_soon(self._handler_loop, actor, handlers, tg)
            handlers.busy += 1
            try:
                await self._handle(actor, envelope)
            except Exception as exc:  # noqa: BLE001 (any escaping error is a crash, supervised)
                # A crash: fail the other calls in flight with its cause, stop serving.
                if handlers.crash is None:
                    handlers.crash = exc
                    self._fail_in_flight(
                        ActorStoppedError(f"actor {self.name!r} crashed: {exc!r}")
                    )
                handlers.stop()
                tg.cancel_scope.cancel()
                return
            finally:
                handlers.done_one()
            if self._drained_after_stop():
                handlers.stop()
            burst += 1
            if burst == _BURST:  # a flooded actor still lets other tasks run
                burst = 0
                await anyio.lowlevel.checkpoint()

    async def _handle(self, actor: Actor[M], envelope: Envelope) -> None:
        reply = envelope.reply
        if reply is None:
            # A tell: an exception escaping here is a crash of the actor.
            result = await actor.receive(envelope.message)
            if isinstance(result, Forward):
                await result.target.forward(Envelope(result.message, None))
            return
        if reply.cancelled or reply.done:
            return
        self.in_flight.add(reply)
        forwarded = False
        try:
            with self._scope_class() as scope:
                reply.scope = scope
                try:
                    result = await actor.receive(envelope.message)
                except Exception as exc:  # noqa: BLE001 (the handler's error is the answer)
                    reply.set_exception(exc)
                    return
                if isinstance(result, Forward):
                    forwarded = True
                    reply.scope = None
                    reply.forwarded_to = result.target
                    self.in_flight.discard(reply)
                    envelope = Envelope(result.message, reply)
                    try:
                        try:
                            result.target.forward_nowait(envelope)
                        except MailboxFullError:
                            await result.target.forward(envelope)
                    except ActorStoppedError as exc:
                        reply.set_exception(exc)
                    return
                reply.set_result(result)
        finally:
            self.in_flight.discard(reply)
            if not (reply.settled() or forwarded):
                reply.set_exception(
                    ActorStoppedError(f"actor {self.name!r} stopped before answering")
                )
