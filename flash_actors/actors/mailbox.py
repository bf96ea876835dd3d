"""Bounded mailboxes: what an actor receives, and the one-shot replies to ``ask``.

A `Mailbox` is a bounded anyio memory object stream of `Envelope`s. `Mailbox.put` waits while
it is full (back-pressure on the sender); `Mailbox.put_nowait` raises `MailboxFullError`
instead. Nothing is dropped: when the mailbox closes, every envelope still in it has its reply
failed with `ActorStoppedError`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio
import msgspec

from flash_actors.errors import ActorStoppedError, MailboxFullError

if TYPE_CHECKING:
    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

__all__ = ["Envelope", "Mailbox", "MailboxStatistics", "Reply"]


class Reply:
    """A one-shot answer slot: the asker waits on it, the actor completes it once.

    The asker may withdraw (`cancel`): an envelope not yet handled is then skipped, and one
    being handled has its cancel scope cancelled. ``forwarded_to`` names the actor a handler
    handed the request on to (see `flash_actors.actors.Forward`), for askers that want to
    learn where such requests go.

    Args:
        event_class: the running backend's `anyio.Event` class (see `event_class`), to skip
            the backend lookup that ``anyio.Event()`` makes.
    """

    __slots__ = (
        "_error",
        "_event",
        "_value",
        "cancelled",
        "done",
        "forwarded_to",
        "scope",
    )

    def __init__(self, event_class: type[anyio.Event] | None = None) -> None:
        self._event = anyio.Event() if event_class is None else event_class()
        self._value: Any = None
        self._error: BaseException | None = None
        self.done = False
        self.cancelled = False
        self.scope: anyio.CancelScope | None = None
        self.forwarded_to: Any = None

    def set_result(self, value: Any) -> None:
        """Complete with a value (ignored once done)."""
        if not self.done:
            self.done = True
            self._value = value
            self._event.set()

    def set_exception(self, error: BaseException) -> None:
        """Complete with an error (ignored once done)."""
        if not self.done:
            self.done = True
            self._error = error
            self._event.set()

    def settled(self) -> bool:
        """True once answered or withdrawn."""
        return self.done or self.cancelled

    def cancel(self) -> None:
        """Withdraw the request: its handler is cancelled, or skipped if not yet started."""
        self.cancelled = True
        if self.scope is not None:
            self.scope.cancel()

    async def wait(self) -> Any:
        """Wait for the answer; return it or raise its error."""
        await self._event.wait()
        if self._error is not None:
            raise self._error
        return self._value


class Envelope:
    """A message and, for ``ask``, the reply slot its answer goes to."""

    __slots__ = ("message", "reply")

    def __init__(self, message: Any, reply: Reply | None) -> None:
        self.message = message
        self.reply = reply


class MailboxStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of a mailbox: its bound, how many envelopes wait, how many senders wait."""

    max_size: int
    queued: int
    waiting_senders: int
    closed: bool


class Mailbox:
    """A bounded FIFO of envelopes for one actor.

    Args:
        name: the owning actor's name, for error messages.
        max_size: how many envelopes may wait before `put` blocks.
    """

    def __init__(self, name: str, max_size: int) -> None:
        if max_size < 1:
            msg = f"mailbox of {name!r}: max_size must be at least 1, got {max_size}"
            raise ValueError(msg)
        self.name = name
        self.max_size = max_size
        send: MemoryObjectSendStream[Envelope]
        receive: MemoryObjectReceiveStream[Envelope]
        send, receive = anyio.create_memory_object_stream[Envelope](max_size)
        self._send = send
        self._receive = receive
        self.closed = False

    def _stopped(self) -> ActorStoppedError:
        return ActorStoppedError(
            f"actor {self.name!r} is stopped; the message was not delivered"
        )

    async def put(self, envelope: Envelope) -> None:
        """Enqueue, waiting while the mailbox is full.

        Raises:
            ActorStoppedError: the mailbox is closed (before or while waiting).
        """
        if self.closed:
            raise self._stopped()
        try:
            # Fast path without a checkpoint: each event-loop pass costs 10-20 us here, and
            # the asker yields right after, waiting for its reply.
            self._send.send_nowait(envelope)
        except anyio.WouldBlock:
            pass
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise self._stopped() from None
        else:
            return
        try:
            await self._send.send(envelope)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise self._stopped() from None

    def put_nowait(self, envelope: Envelope) -> None:
        """Enqueue without waiting.

        Raises:
            MailboxFullError: the mailbox holds ``max_size`` envelopes.
            ActorStoppedError: the mailbox is closed.
        """
        if self.closed:
            raise self._stopped()
        try:
            self._send.send_nowait(envelope)
        except anyio.WouldBlock:
            msg = f"mailbox of actor {self.name!r} is full ({self.max_size} messages waiting)"
            raise MailboxFullError(msg) from None
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise self._stopped() from None

    async def get(self) -> Envelope:
        """Take the next envelope, waiting for one.

        Takes a waiting envelope without a checkpoint (the actor loop checkpoints when it
        handles the message); waits, with a checkpoint, only when the mailbox is empty.

        Raises:
            anyio.EndOfStream: the mailbox was closed and is empty.
        """
        try:
            return self._receive.receive_nowait()
        except anyio.WouldBlock:
            return await self._receive.receive()

    def get_nowait(self) -> Envelope:
        """Take the next envelope or raise `anyio.WouldBlock`/`anyio.EndOfStream`."""
        return self._receive.receive_nowait()

    def close(self) -> list[Envelope]:
        """Refuse further puts; return the envelopes that were still waiting, in order.

        Senders blocked in `put` are woken with `ActorStoppedError`.
        """
        self.closed = True
        leftovers: list[Envelope] = []
        while True:
            try:
                leftovers.append(self._receive.receive_nowait())
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                break
        self._send.close()
        self._receive.close()
        return leftovers

    def statistics(self) -> MailboxStatistics:
        """A snapshot of the mailbox."""
        stats = self._send.statistics()
        return MailboxStatistics(
            max_size=self.max_size,
            queued=stats.current_buffer_used,
            waiting_senders=stats.tasks_waiting_send,
            closed=self.closed,
        )
