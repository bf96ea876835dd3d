"""Batched jobs: many calls' jobs in one request, their results on one long-polled feed.

For a server that declares `Capabilities.batch` (the ``flash local`` daemon), one `JobFeed`
per endpoint replaces a waiting ``/runsync`` per call: calls put their encoded job in an
outbox, one task sends what has gathered as one ``POST /runbatch`` (each job under the
caller's id, each accepted or refused on its own), and one task long-polls ``POST
/feed/{feed}``, whose answers carry every ended job of the feed and whose next request
acknowledges them. A fan-out of thousands of calls costs a few requests per hundred jobs
instead of one per job, on each side. A small batch (`SMALL_BATCH`: calls made one at a
time) is sent in a task of its own with ``?wait=``: its answer comes once a job of it has
ended and carries that job's envelope, so a lone call costs one request, as ``runsync``.

The guarantees are those of one ``/runsync`` per call:
- A job is sent under its caller-chosen id, so sending a batch again (the daemon was
  unreachable for a moment, or forgot the feed when it restarted: ``known: false``) attaches
  to the jobs it already has; nothing runs twice.
- While the daemon cannot be reached, sending and polling are retried through ``persist``
  (`GatewayProvider.reconnecting`: its window, then `DeliveryError`); a job refused alone (a
  bad policy: 400; a full queue: 429, retryable) fails only its own call.
- A cancelled call never leaves its job behind: one still in the outbox is simply not sent;
  one sent (or on its way) is cancelled on the server once the batch's answer is in.
- Jobs over `MAX_JOB_BYTES` and streams do not come here (`QueueBackend` sends them alone).
"""

from __future__ import annotations

import contextlib
import functools
import secrets
from collections import deque
from typing import TYPE_CHECKING, Any

import anyio
import msgspec

from flash_actors.errors import (
    DeliveryError,
    FlashRuntimeError,
    NotDeliveredError,
)
from flash_actors.providers.runpod.dataplane import Envelope

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from anyio.abc import TaskGroup

    from flash_actors.providers.runpod.dataplane import DataPlane

__all__ = ["MAX_BATCH_JOBS", "MAX_JOB_BYTES", "JobFeed"]

MAX_JOB_BYTES = 64 * 1024
"""Larger jobs travel alone (``/runsync``): a batch stays small enough to send at once."""
MAX_BATCH_JOBS = 256
MAX_BATCH_BYTES = 4 * 1024 * 1024
SMALL_BATCH = 16
"""A batch this small (calls one at a time, or a few) waits in ``runbatch`` for its first
result, `SMALL_WAIT_MS` at most: a lone call then costs one request, as ``runsync``."""
SMALL_WAIT_MS = 50
MAX_WAITING_BATCHES = 8
"""Small batches waiting so at once; beyond, batches are sent without waiting."""
FEED_WAIT_MS = 30_000
CANCEL_WITHIN_S = 10.0


class _Accepted(Envelope):
    """A ``runbatch`` answer's entry: refused (``code``), queued, or ended (its envelope)."""

    code: int = 0


class _BatchAnswer(msgspec.Struct):
    jobs: list[_Accepted]


class _FeedAnswer(msgspec.Struct):
    known: bool
    jobs: list[Envelope] = []


class _Ack(msgspec.Struct):
    ack: list[str]


_batch_answer = msgspec.json.Decoder(_BatchAnswer)
_feed_answer = msgspec.json.Decoder(_FeedAnswer)
_ack_encoder = msgspec.json.Encoder()


class _Entry:
    """One call's job: its encoded body, where it is, and how it ended."""

    __slots__ = ("body", "done", "envelope", "error", "id", "sent", "state")

    def __init__(self, job_id: str, body: bytes, done: anyio.Event) -> None:
        self.id = job_id
        self.body = body
        self.done = done
        self.state = "outbox"  # -> "sending" -> "submitted" -> "ended"
        self.sent: anyio.Event | None = None  # set once its batch's answer is in
        self.envelope: Envelope | None = None
        self.error: BaseException | None = None


def _copy(
    exc: FlashRuntimeError, *, key: str = "", job_id: str = ""
) -> FlashRuntimeError:
    """A fresh exception like ``exc`` for each call that fails with it (tracebacks stay apart).

    A message naming the ``persist`` key (the batch's) names the call's own job instead.
    """
    args = exc.args
    if key and args and isinstance(args[0], str):
        args = (args[0].replace(key, f"job {job_id}"), *args[1:])
    try:
        copy = type(exc)(*args)
    except TypeError:  # pragma: no cover - every class in the tree takes its message
        return exc
    copy.__cause__ = exc.__cause__ or exc
    return copy


class JobFeed:
    """The batched jobs of one endpoint on one server (see the module docstring).

    Args:
        plane: the data-plane client (its server declares ``batch``).
        endpoint_id: the endpoint.
        persist: repeats a safe-to-repeat attempt while the server cannot be reached
            (``persist(key, attempt)``).
    """

    max_job_bytes = MAX_JOB_BYTES

    def __init__(
        self,
        plane: DataPlane,
        endpoint_id: str,
        *,
        persist: Callable[[str, Callable[[], Awaitable[Any]]], Awaitable[Any]],
    ) -> None:
        self.plane = plane
        self.endpoint_id = endpoint_id
        self.feed_id = secrets.token_urlsafe(16)  # letters, digits, '-' and '_'
        self._persist = persist
        # what the reconnect window is kept under, and named in its error (then per job)
        self._send_key = f"the jobs sent to endpoint {endpoint_id}"
        self._poll_key = f"the jobs waited on at endpoint {endpoint_id}"
        self._entries: dict[str, _Entry] = {}
        self._outbox: deque[_Entry] = deque()
        self._submitted = 0
        self._waiting_batches = 0
        self.running = False
        self.jobs_sent = 0
        """Jobs sent through this feed (each once per ``runbatch`` that carried it)."""
        self.batches_sent = 0
        """``runbatch`` requests sent."""
        self._event: Callable[[], anyio.Event] = anyio.Event
        self._send_wake = anyio.Event()
        self._poll_wake = anyio.Event()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Send and poll until cancelled; then every call still waiting fails, saying why."""
        self._event = type(anyio.Event())  # the backend's class: no lookup per call
        self._send_wake = self._event()
        self._poll_wake = self._event()
        self.running = True
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._send_forever, tg)
                tg.start_soon(self._poll_forever)
                task_status.started()
        finally:
            self.running = False
            closed = DeliveryError(
                f"the client of {self.plane.service} was closed before the job ended"
            )
            for entry in list(self._entries.values()):
                self._end(entry, error=_copy(closed))

    async def submit_and_wait(self, job_id: str, body: bytes) -> Envelope:
        """Send ``body`` (a ``/run`` job carrying ``job_id``) and wait for its final envelope.

        Raises:
            DeliveryError: the server could not be reached within the reconnect window, or
                this client was closed.
            NotDeliveredError: the server refused the job for now (a full queue).
            FlashRuntimeError: the server refused the job (its message says why).
        """
        entry = self._entries.get(job_id)
        if entry is None:  # else the same job waited on twice: one job, two waiters
            entry = _Entry(job_id, body, self._event())
            self._entries[job_id] = entry
            self._outbox.append(entry)
            self._send_wake.set()
        try:
            await entry.done.wait()
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await self._abandon(entry)
            raise
        if entry.error is not None:
            raise entry.error
        assert entry.envelope is not None  # noqa: S101 (set with done)
        return entry.envelope

    def _end(
        self,
        entry: _Entry,
        *,
        envelope: Envelope | None = None,
        error: BaseException | None = None,
    ) -> None:
        """The job is over for its caller: wake it."""
        if entry.state == "ended":
            return
        if entry.state == "submitted":
            self._submitted -= 1
        entry.state = "ended"
        entry.envelope, entry.error = envelope, error
        if self._entries.get(entry.id) is entry:
            del self._entries[entry.id]
        entry.done.set()

    async def _abandon(self, entry: _Entry) -> None:
        """The caller left: a job not sent is dropped; a sent one is cancelled on the server."""
        if entry.state == "outbox":
            with contextlib.suppress(ValueError):
                self._outbox.remove(entry)
            self._end(entry, error=DeliveryError("cancelled before it was sent"))
            return
        with anyio.move_on_after(CANCEL_WITHIN_S):
            if entry.state == "sending" and entry.sent is not None:
                await entry.sent.wait()  # a cancel must not overtake the job it cancels
            sent = entry.state == "submitted"  # (not refused, not ended meanwhile)
            self._end(entry, error=DeliveryError("cancelled by its caller"))
            if sent:
                with contextlib.suppress(FlashRuntimeError):
                    await self.plane.cancel(self.endpoint_id, entry.id)

    # -- sending ------------------------------------------------------------------------------

    async def _send_forever(self, tg: TaskGroup) -> None:
        while True:
            while not self._outbox:
                self._send_wake = self._event()
                await self._send_wake.wait()
            batch: list[_Entry] = []
            size = 0
            outbox = self._outbox
            while outbox and len(batch) < MAX_BATCH_JOBS:
                if batch and size + len(outbox[0].body) > MAX_BATCH_BYTES:
                    break
                entry = outbox.popleft()
                entry.state = "sending"
                batch.append(entry)
                size += len(entry.body)
            sent = self._event()
            for entry in batch:
                entry.sent = sent
            if (
                len(batch) <= SMALL_BATCH
                and self._waiting_batches < MAX_WAITING_BATCHES
            ):
                # It waits for its first result: the next batch must not wait behind it.
                self._waiting_batches += 1
                tg.start_soon(self._send_and_set, batch, sent, SMALL_WAIT_MS)
            else:
                await self._send_and_set(batch, sent, 0)

    async def _send_and_set(
        self, batch: list[_Entry], sent: anyio.Event, wait_ms: int
    ) -> None:
        try:
            await self._send(batch, wait_ms)
        finally:
            sent.set()
            if wait_ms:
                self._waiting_batches -= 1

    async def _send(self, batch: list[_Entry], wait_ms: int) -> None:
        """One ``/runbatch``: each job accepted (then polled for), ended, or failed alone."""
        body = b"".join(
            (
                b'{"feed":"',
                self.feed_id.encode(),
                b'","jobs":[',
                b",".join([entry.body for entry in batch]),
                b"]}",
            )
        )
        plane, endpoint = self.plane, self.endpoint_id
        path = f"/runbatch?wait={wait_ms}" if wait_ms else "/runbatch"
        self.batches_sent += 1
        self.jobs_sent += len(batch)
        try:
            data = await self._persist(
                self._send_key,
                functools.partial(plane.call, "POST", endpoint, path, body),
            )
            answers = {a.id: a for a in _batch_answer.decode(data).jobs}
        except (FlashRuntimeError, msgspec.DecodeError) as exc:
            error = (
                exc
                if isinstance(exc, FlashRuntimeError)
                else FlashRuntimeError(f"{plane.service} answered runbatch with {exc}")
            )
            for entry in batch:
                if entry.state == "sending":
                    self._end(
                        entry, error=_copy(error, key=self._send_key, job_id=entry.id)
                    )
            return
        for entry in batch:
            if entry.state != "sending":
                continue  # its caller left meanwhile
            answer = answers.get(entry.id)
            if answer is None:
                msg = f"{plane.service} left job {entry.id} out of its runbatch answer"
                self._end(entry, error=FlashRuntimeError(msg))
            elif answer.code:
                self._end(entry, error=self._refused(entry.id, answer))
            elif answer.terminal:
                self._end(entry, envelope=answer)
            else:
                entry.state = "submitted"
                self._submitted += 1
        if self._submitted:
            self._poll_wake.set()

    def _refused(self, job_id: str, answer: _Accepted) -> FlashRuntimeError:
        """The error of a job the server refused alone (429/503: not taken, retryable)."""
        where = f"{self.plane.service} endpoint {self.endpoint_id!r}"
        if answer.code in (429, 503):
            msg = f"{where} did not take job {job_id} ({answer.code}): {answer.error}"
            return NotDeliveredError(msg)
        msg = f"{where} refused job {job_id} ({answer.code}): {answer.error}"
        return FlashRuntimeError(msg)

    # -- polling ------------------------------------------------------------------------------

    async def _poll_forever(self) -> None:
        plane, endpoint = self.plane, self.endpoint_id
        path = f"/feed/{self.feed_id}"
        ack: list[str] = []
        while True:
            if (
                not self._submitted
            ):  # (what it handed out last is acknowledged next time)
                while not self._submitted:
                    self._poll_wake = self._event()
                    await self._poll_wake.wait()
            body = _ack_encoder.encode(_Ack(ack))
            try:
                data = await self._persist(
                    self._poll_key,
                    functools.partial(
                        plane.call,
                        "POST",
                        endpoint,
                        f"{path}?wait={FEED_WAIT_MS}",
                        body,
                    ),
                )
                answer = _feed_answer.decode(data)
            except (FlashRuntimeError, msgspec.DecodeError) as exc:
                error = (
                    exc
                    if isinstance(exc, FlashRuntimeError)
                    else FlashRuntimeError(
                        f"{plane.service} answered a feed poll with {exc}"
                    )
                )
                for lost in list(self._entries.values()):
                    if lost.state == "submitted":
                        self._end(
                            lost, error=_copy(error, key=self._poll_key, job_id=lost.id)
                        )
                ack = []
                continue
            ack = []
            if not answer.known:
                self._resubmit()
                continue
            entries = self._entries
            for envelope in answer.jobs:
                ack.append(envelope.id)
                waiting = entries.get(envelope.id)
                if waiting is not None and waiting.state == "submitted":
                    self._end(waiting, envelope=envelope)

    def _resubmit(self) -> None:
        """The server does not know the feed (it restarted): send its jobs again, same ids."""
        again = [e for e in self._entries.values() if e.state == "submitted"]
        for entry in reversed(again):
            entry.state = "outbox"
            self._submitted -= 1
            self._outbox.appendleft(entry)
        if again:
            self._send_wake.set()
