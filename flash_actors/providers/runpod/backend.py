"""An endpoint reached through RunPod's data plane, as its Endpoint actor sees it.

`QueueBackend` is shared by the RunPod provider and the ``flash local`` daemon's provider: a
call becomes a job whose ``input`` is the Flash ``FunctionRequest``; the answer is its
``output``. The server applies the job's TTL and execution timeout (``enforces``), and re-runs
a job whose worker died; the Endpoint actor retries only deliveries that failed.

Submitting follows the server's `Capabilities`: with caller-chosen job ids a submission (and
the wait after it) is simply repeated until the server is reached again; without them the job
is created once with ``/runsync`` (which hands back a job that ends within `RUNSYNC_WAIT_MS`
at once), then, if it has not ended, its status is polled, and losing track of it ends the
call with `DeliveryUncertainError` after a best-effort cancel, never with a second job.
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import msgspec

from flash_actors.errors import (
    ConfigurationError,
    DeliveryError,
    DeliveryUncertainError,
    ExecutionTimeoutError,
    FlashRuntimeError,
    RemoteExecutionError,
)
from flash_actors.jobs import JobOutput, JobStatus
from flash_actors.messages import FunctionResponse, response_decoder
from flash_actors.providers.base import ENFORCES_ALL
from flash_actors.providers.runpod.dataplane import LONG_WAIT_MS, TERMINAL

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from anyio.streams.memory import MemoryObjectSendStream

    from flash_actors.messages import Call
    from flash_actors.providers.runpod.dataplane import DataPlane, Envelope
    from flash_actors.providers.runpod.feed import JobFeed

__all__ = [
    "QUEUE_CAPACITY",
    "RUNSYNC_WAIT_MS",
    "QueueBackend",
    "job_output",
    "keep_trying",
    "response_of",
]

_T = TypeVar("_T")
CANCEL_WITHIN_S = 10.0
FEED_CAPACITY = 16_384
QUEUE_CAPACITY = 4096
"""Jobs a `QueueBackend` lets through to its server at once by default."""
RUNSYNC_WAIT_MS = 1_000
"""How long a job submitted without a caller-chosen id is waited for in its submission.

Without caller ids a job is submitted with ``/runsync?wait=`` this long (RunPod takes 1 to
300 s): a job that ends within it costs one request and no sleep; one still queued or running
then is polled (`Backoff`, ``/status`` is safe to repeat). Longer would hand more jobs back in
one request, but the submission is the one request that cannot be repeated, and for its whole
wait the job's id is unknown: a connection that breaks then ends the call with
`DeliveryUncertainError` (the job may run, never twice), and a caller cancelled then waits
out the answer to cancel the job by id: RunPod's shortest wait, 1 s, bounds both. It covers a
warm worker's typical call; for a longer job, polling (sleeps of 1 s at most) adds little to
what it takes anyway.
RunPod keeps a runsync job's result 60 s after it ends (a ``/run`` job's 30 min): polls come
within 1 s of that, and `keep_trying` gives up on an unreachable server after 30 s.
"""


async def keep_trying(
    window_s: float, key: str, attempt: Callable[[], Awaitable[_T]]
) -> _T:
    """Run ``attempt`` again (backoff to 1 s) while it raises `DeliveryError`, for ``window_s``.

    ``attempt`` must be safe to repeat (a status poll is).

    Raises:
        DeliveryError: the last attempt's, once the window has passed.
    """
    del key
    delay = 0.05
    first_failure: float | None = None
    while True:
        started = anyio.current_time()
        try:
            return await attempt()
        except DeliveryError:
            if first_failure is None:
                first_failure = started
            if started - first_failure >= window_s:
                raise
            await anyio.sleep(delay)
            delay = min(1.0, delay * 2)


class QueueBackend:
    """One endpoint on a data-plane server.

    Args:
        plane: the data-plane client.
        endpoint_id: the endpoint's id on that server.
        persist: repeats a safe-to-repeat attempt while the server cannot be reached
            (``persist(key, attempt)``); default `keep_trying` for 30 s.
        job_policy: adds server-specific fields to each job's ``policy``.
        capacity: jobs let through to the server at once (it queues the rest).
        feed: where small jobs go, batched, while it runs (a server declaring ``batch``);
            without it each job waits on a request of its own.
    """

    enforces = ENFORCES_ALL

    def __init__(
        self,
        plane: DataPlane,
        endpoint_id: str,
        *,
        persist: Callable[[str, Callable[[], Awaitable[Any]]], Awaitable[Any]]
        | None = None,
        job_policy: Callable[[dict[str, int]], dict[str, int]] | None = None,
        capacity: int = QUEUE_CAPACITY,
        feed: JobFeed | None = None,
    ) -> None:
        self.plane = plane
        self.feed = feed
        self.endpoint_id = endpoint_id
        # Batched jobs cost the server a few bytes each while they wait: let more through.
        self.capacity = capacity if feed is None else max(capacity, FEED_CAPACITY)
        self._persist = persist or (
            lambda key, attempt: keep_trying(30.0, key, attempt)
        )
        self._job_policy = job_policy or (lambda policy: policy)

    async def _submit_and_wait(
        self, payload: Any, policy: dict[str, int], job_id: str, known: list[str]
    ) -> Envelope:
        plane, endpoint = self.plane, self.endpoint_id
        if plane.capabilities.job_ids:
            body = plane.job_body(payload, policy=policy, job_id=job_id)
            feed = self.feed
            if feed is not None and feed.running and len(body) <= feed.max_job_bytes:
                return await feed.submit_and_wait(job_id, body)  # it cancels its own
            known.append(job_id)

            async def attempt() -> Envelope:
                envelope = await plane.run_body(
                    endpoint, body, with_id=True, sync_wait_ms=LONG_WAIT_MS
                )
                return await plane.wait(endpoint, envelope)

            result: Envelope = await self._persist(f"job {job_id}", attempt)
            return result
        # The job's id comes only with the answer: a caller cancelled meanwhile waits for it
        # (at most the wait, bounded by the transport's timeout) so that its job can be
        # cancelled by id rather than left running unseen.
        with anyio.CancelScope(shield=True):
            envelope = await plane.run(
                endpoint, payload, policy=policy, sync_wait_ms=RUNSYNC_WAIT_MS
            )
        known.append(envelope.id)
        if envelope.terminal:
            return envelope
        try:
            waited: Envelope = await self._persist(
                f"job {envelope.id}", lambda: plane.wait(endpoint, envelope)
            )
        except DeliveryError as exc:
            await self._cancel(envelope.id)
            msg = (
                f"lost track of job {envelope.id} on {plane.service} endpoint "
                f"{endpoint!r} ({exc}); it was cancelled if it could be reached, and was "
                "not sent again"
            )
            raise DeliveryUncertainError(msg) from exc
        return waited

    async def _cancel(self, job_id: str) -> None:
        """Cancel the job on the server (best effort, shielded, bounded)."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(CANCEL_WITHIN_S):
            with contextlib.suppress(FlashRuntimeError):
                await self.plane.cancel(self.endpoint_id, job_id)

    async def run_payload(
        self, payload: Any, policy: dict[str, int], job_id: str
    ) -> JobOutput:
        """A dictionary job (handler endpoints), waited for: its `JobOutput`."""
        known: list[str] = []
        try:
            envelope = await self._submit_and_wait(
                payload, self._job_policy(policy), job_id, known
            )
        except anyio.get_cancelled_exc_class():
            for submitted in known:
                await self._cancel(submitted)
            raise
        return job_output(envelope)

    async def execute(
        self,
        call: Call,
        *,
        job_id: str,
        chunks: MemoryObjectSendStream[FunctionResponse] | None = None,
    ) -> FunctionResponse:
        """Run ``call.request`` as a job; see `EndpointBackend.execute`."""
        policy = self._job_policy(call.policy.job_policy())
        known: list[str] = []
        try:
            if chunks is None:
                envelope = await self._submit_and_wait(
                    call.request, policy, job_id, known
                )
            else:
                envelope = await self._stream(call, policy, job_id, chunks, known)
        except anyio.get_cancelled_exc_class():
            for submitted in known:
                await self._cancel(submitted)
            raise
        return response_of(envelope, self.plane.service)

    async def _stream(
        self,
        call: Call,
        policy: dict[str, int],
        job_id: str,
        chunks: MemoryObjectSendStream[FunctionResponse],
        known: list[str],
    ) -> Envelope:
        plane, endpoint = self.plane, self.endpoint_id
        if not plane.capabilities.stream_flag:
            msg = (
                f"{call.function}.stream(): {plane.service} does not stream a Flash "
                "function's chunks (its Flash workers return them all at the end); await "
                "the function instead to get the list of chunks"
            )
            raise ConfigurationError(msg)
        if plane.capabilities.job_ids:
            known.append(job_id)
            envelope = await self._persist(
                f"job {job_id}",
                lambda: plane.run(
                    endpoint, call.request, policy=policy, job_id=job_id, stream=True
                ),
            )
        else:
            envelope = await plane.run(
                endpoint, call.request, policy=policy, stream=True
            )
            known.append(envelope.id)
        submitted = envelope.id
        try:
            while True:
                envelope = await plane.stream(endpoint, submitted, wait_ms=30_000)
                for chunk in envelope.stream:
                    await chunks.send(response_decoder.decode(chunk.output))
                if envelope.status in TERMINAL and not envelope.stream:
                    return await plane.status(endpoint, submitted)
        except DeliveryError as exc:
            # Chunks already went to the caller: no second run.
            await self._persist(
                f"job {submitted}", lambda: plane.cancel(endpoint, submitted)
            )
            msg = f"lost the stream of job {submitted} ({exc}); it was cancelled"
            raise DeliveryUncertainError(msg) from exc

    async def aclose(self) -> None:
        """Nothing to stop: the server keeps the endpoint's workers for the next run."""


def job_output(envelope: Envelope) -> JobOutput:
    """A handler job's final envelope as a `JobOutput`; a handler's exception comes back typed."""
    ended = datetime.now(UTC)
    execution_ms = envelope.executionTime or 0
    started = (
        ended - timedelta(milliseconds=execution_ms)
        if envelope.delayTime is not None
        else None
    )
    output = msgspec.json.decode(envelope.output) if envelope.output else None
    status = JobStatus(envelope.status)
    error = envelope.error or ""
    exception: FlashRuntimeError | None = None
    if status is JobStatus.COMPLETED and error:
        status = JobStatus.FAILED
    if status is not JobStatus.COMPLETED:
        exception = _handler_error(error) or FlashRuntimeError(
            error or f"job {envelope.id} ended {status.value}"
        )
    return JobOutput(
        id=envelope.id,
        status=status,
        output=output if status is JobStatus.COMPLETED else None,
        error=error,
        started_at=started,
        ended_at=ended,
        delay_time_ms=envelope.delayTime or 0,
        execution_time_ms=execution_ms,
        worker_id=envelope.workerId or None,
        exception=exception,
    )


def _handler_error(error: str) -> RemoteExecutionError | None:
    """A stock worker's error JSON (``error_type`` like ``<class 'ValueError'>``), typed."""
    try:
        info = msgspec.json.decode(error)
    except msgspec.DecodeError:
        return None
    if not isinstance(info, dict) or "error_message" not in info:
        return None
    kind = str(info.get("error_type", ""))
    if kind.startswith("<class '") and kind.endswith("'>"):
        kind = kind[len("<class '") : -2]
    if "." not in kind:
        kind = f"builtins.{kind}"
    return RemoteExecutionError.from_remote(
        str(info["error_message"]), kind, str(info.get("error_traceback", ""))
    )


def response_of(envelope: Envelope, service: str = "the server") -> FunctionResponse:
    """A Flash job's final envelope as the worker's `FunctionResponse` (or its error)."""
    if envelope.status == "COMPLETED":
        if not envelope.output:
            msg = f"job {envelope.id} completed on {service} without an output"
            raise FlashRuntimeError(msg)
        try:
            return response_decoder.decode(envelope.output)
        except msgspec.DecodeError as exc:
            msg = (
                f"job {envelope.id} completed on {service}, but its output is not a Flash "
                f"FunctionResponse ({exc}); is the endpoint running Flash workers?"
            )
            raise FlashRuntimeError(msg) from exc
    error = envelope.error or f"job {envelope.id} ended {envelope.status}"
    if envelope.status == "TIMED_OUT":
        raise ExecutionTimeoutError(error)
    if envelope.status == "CANCELLED":
        msg = f"job {envelope.id} was cancelled on {service} ({error})"
        raise FlashRuntimeError(msg)
    handler = _handler_error(error)
    if handler is not None:
        raise handler
    raise FlashRuntimeError(error)
