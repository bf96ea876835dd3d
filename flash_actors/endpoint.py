"""The Endpoint actor: one per resource config; applies each call's policies and runs it.

For every `Call` it checks the payload limit (before anything is sent), queues the job until
the provider has capacity, retries failed deliveries with backoff and jitter, applies the TTL
and the execution timeout where the backend does not (its ``enforces``: one owner per policy,
see `flash_actors.providers.base`), and turns the worker's
`FunctionResponse` into what the caller gets: a `JobOutput` for queue resources, the value (or
the typed remote error) for load-balancer resources.
"""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import anyio

from flash_actors._clock import loop_clock
from flash_actors._logging import get_logger
from flash_actors.actors import Actor
from flash_actors.errors import (
    ConfigurationError,
    DeliveryError,
    ExecutionTimeoutError,
    FlashRuntimeError,
    RemoteExecutionError,
)
from flash_actors.jobs import JobOutput, JobStatus
from flash_actors.messages import Call, FunctionResponse, PayloadCall, Routed
from flash_actors.policies import check_payload, expired_error, timeout_error
from flash_actors.serialization import decode_result

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine

    from anyio.streams.memory import MemoryObjectSendStream

    from flash_actors.providers.base import EndpointBackend, Provider
    from flash_actors.resources import ServerlessResource

__all__ = ["EndpointActor", "new_job_id", "response_value"]

log = get_logger(__name__)


async def _acquire(slots: anyio.Semaphore) -> None:
    try:
        slots.acquire_nowait()
    except anyio.WouldBlock:
        await slots.acquire()


def new_job_id() -> str:
    """A fresh job id (RunPod-style opaque string)."""
    return secrets.token_hex(12)


def response_value(
    response: FunctionResponse, key: bytes | None, call: Call | None = None
) -> Any:
    """The value of a successful response, or raise the remote error it carries.

    ``call`` names the endpoint and function in a result's decoding errors.

    Raises:
        RemoteExecutionError: the function raised (typed as the remote exception).
        PayloadSignatureError: the result's signature does not match.
        ResultTypeUnavailableError: the call succeeded, but its result's type cannot be
            loaded in this process.
    """
    if response.success:
        if response.result is None:
            return response.json_result
        source = f"{call.function}() on endpoint {call.endpoint!r}" if call else ""
        return decode_result(response.result, response.signature, key, source=source)
    error = response.error or "the remote function failed without an error message"
    message = response.error_message
    if message is None:
        message = error.strip().splitlines()[-1] if error.strip() else error
    raise RemoteExecutionError.from_remote(message, response.error_type or "", error)


def _job_output(
    call: Call,
    job_id: str,
    queued: float,
    started: float | None,
    outcome: FunctionResponse | FlashRuntimeError,
    key: bytes | None = None,
) -> JobOutput:
    """The `JobOutput` of a queue job: ``outcome`` is its response, or why it has none.

    ``started``: when it left the queue (monotonic), ``None`` if it never did (expired).
    """
    ended = time.monotonic()
    ended_at = datetime.now(UTC)
    if started is None:
        assert isinstance(outcome, FlashRuntimeError)  # noqa: S101
        return JobOutput(
            id=job_id,
            status=JobStatus.TIMED_OUT,
            error=str(outcome),
            ended_at=ended_at,
            delay_time_ms=int((ended - queued) * 1000),
            exception=outcome,
        )
    started_at = ended_at - timedelta(seconds=ended - started)
    delay_ms = int((started - queued) * 1000)
    execution_ms = int((ended - started) * 1000)
    if isinstance(outcome, FlashRuntimeError):
        return JobOutput(
            id=job_id,
            status=JobStatus.TIMED_OUT
            if isinstance(outcome, ExecutionTimeoutError)
            else JobStatus.FAILED,
            error=str(outcome),
            started_at=started_at,
            ended_at=ended_at,
            delay_time_ms=delay_ms,
            execution_time_ms=execution_ms,
            exception=outcome,
        )
    status, value, error, exception = JobStatus.COMPLETED, None, "", None
    try:
        value = response_value(outcome, key, call)
    except FlashRuntimeError as exc:
        status, error, exception = JobStatus.FAILED, outcome.error or str(exc), exc
    return JobOutput(
        id=job_id,
        status=status,
        output=value,
        error=error,
        started_at=started_at,
        ended_at=ended_at,
        delay_time_ms=delay_ms,
        execution_time_ms=execution_ms,
        stdout=outcome.stdout or "",
        worker_id=outcome.worker_id,
        exception=exception,
    )


class EndpointActor(Actor[Routed]):
    """Runs the calls of one endpoint on its provider's backend.

    Args:
        resource: the endpoint's config.
        provider: where its workers run.
    """

    inline = True  # calls run in their caller's task; the backend bounds the work

    def __init__(self, resource: ServerlessResource, provider: Provider) -> None:
        self.resource = resource
        self.provider = provider
        self.key = provider.signing_key(resource.name)
        self.backend: EndpointBackend | None = None
        self._slots: anyio.Semaphore | None = None
        self._ttl = True  # the backend leaves the TTL to us
        self._timeout = True  # the backend leaves the execution timeout to us
        # The backend's scope class and the loop's clock, looked up once (see _execute).
        self._scope_class: type[anyio.CancelScope] = anyio.CancelScope
        self._clock: Callable[[], float] = anyio.current_time

    async def on_start(self) -> None:
        """Provision the endpoint on the provider."""
        self._scope_class = type(anyio.CancelScope())
        self._clock = loop_clock()
        self.backend = await self.provider.open_endpoint(self.resource, self.key)
        self._slots = anyio.Semaphore(max(1, self.backend.capacity))
        self._ttl = "ttl" not in self.backend.enforces
        self._timeout = "execution_timeout" not in self.backend.enforces

    async def on_stop(self) -> None:
        """Stop the endpoint's workers."""
        if self.backend is not None:
            await self.backend.aclose()

    def receive(self, message: Routed) -> Coroutine[Any, Any, Any]:
        """Run one call under its policies; see the module docstring for what comes back.

        A plain function returning the coroutine that runs the call (one frame less per
        call in flight); a payload over the limit raises here, before anything runs.
        """
        if isinstance(message, PayloadCall):
            return self._run_payload(message)
        check_payload(
            message.request,
            message.policy.payload_limit,
            function=message.function,
            arg_names=message.arg_names,
        )
        if message.stream_to is not None:
            return self._run_stream(message)
        if message.policy.delivery == "load_balancer":
            return self._run_direct(message)
        return self._run_job(message)

    async def _run_stream(self, call: Call) -> None:
        """``f.stream(...)``: forward each chunk, decoded, to the caller's stream.

        Not retried (chunks may already have been consumed); the end of the stream is the
        caller's stream closing, an error is raised to the caller.
        """
        assert self.backend is not None  # noqa: S101 (set in on_start)
        job_id = new_job_id()
        send, receive = anyio.create_memory_object_stream[FunctionResponse](16)
        async with call.stream_to as out:

            async def pump() -> None:
                async with receive:
                    async for chunk in receive:
                        await out.send(response_value(chunk, self.key, call))

            async with anyio.create_task_group() as tg:
                tg.start_soon(pump)
                async with send:
                    final = await self._execute(call, job_id, send)
        response_value(final, self.key, call)  # raises the remote error, if any

    async def _run_direct(self, call: Call) -> Any:
        """A load-balancer call: straight to a worker, no queue, no retry; value or error."""
        assert self._slots is not None  # noqa: S101 (set in on_start)
        await _acquire(self._slots)
        try:
            response = await self._attempts(call, new_job_id())
        finally:
            self._slots.release()
        return response_value(response, self.key, call)

    async def _run_job(self, call: Call) -> JobOutput:
        """A queue job: wait for capacity within the TTL, run with retries, wrap in JobOutput.

        Lean on purpose, as its frame waits with every call in flight: the waits and the
        answer's wrapping are helpers, and the start's wall-clock time is worked out at the
        end from the monotonic clock.
        """
        assert self._slots is not None  # noqa: S101 (set in on_start)
        job_id = new_job_id()
        queued = time.monotonic()
        try:
            self._slots.acquire_nowait()
        except anyio.WouldBlock:
            if not await self._slot_within_ttl(call):
                return _job_output(
                    call, job_id, queued, None, expired_error(call, job_id)
                )
        started = time.monotonic()
        try:
            try:  # the first attempt here: one frame less per call in flight
                response = await self._execute(call, job_id)
            except DeliveryError as exc:
                response = await self._retry(call, job_id, exc)
        except FlashRuntimeError as exc:
            return _job_output(call, job_id, queued, started, exc)
        finally:
            self._slots.release()
        return _job_output(call, job_id, queued, started, response, self.key)

    async def _slot_within_ttl(self, call: Call) -> bool:
        """Wait for a free slot, within the call's TTL (if this endpoint applies it)."""
        assert self._slots is not None  # noqa: S101 (set in on_start)
        with anyio.move_on_after(call.policy.ttl_s if self._ttl else None) as waiting:
            await self._slots.acquire()
        return not waiting.cancelled_caught

    async def _run_payload(self, job: PayloadCall) -> JobOutput:
        """A dictionary job for a handler endpoint: retried deliveries, a `JobOutput` back."""
        run = getattr(self.backend, "run_payload", None)
        if run is None:
            msg = (
                f"endpoint {self.resource.name!r} runs a RunPod handler file, which needs "
                "the local provider (or a `flash local` daemon); this runtime uses "
                f"{getattr(self.provider, 'name', 'another provider')!r}"
            )
            raise ConfigurationError(msg)
        policy = job.policy
        job_policy = policy.job_policy()
        job_id = new_job_id()
        for attempt in range(1, policy.retry.attempts + 1):
            try:
                result: JobOutput = await run(job.input, job_policy, job_id)
            except DeliveryError:
                if attempt == policy.retry.attempts:
                    raise
                await anyio.sleep(policy.retry.delay(attempt))
            else:
                return result
        raise AssertionError("unreachable")  # pragma: no cover

    async def _attempts(self, call: Call, job_id: str) -> FunctionResponse:
        """Deliver with the policy's timeout and retries.

        Raises:
            ExecutionTimeoutError: an attempt ran past the execution timeout (not retried).
            DeliveryError: the last attempt could not be delivered.
        """
        try:
            return await self._execute(call, job_id)
        except DeliveryError as exc:
            return await self._retry(call, job_id, exc)

    async def _retry(
        self, call: Call, job_id: str, failed: DeliveryError
    ) -> FunctionResponse:
        """The attempts after a first one that failed with ``failed`` (see `_attempts`)."""
        policy = call.policy
        attempts = policy.retry.attempts
        error = failed
        for attempt in range(1, attempts):  # ``attempt`` attempts have failed
            delay = policy.retry.delay(attempt)
            log.warning(
                "job.retry",
                job_id=job_id,
                endpoint=call.endpoint,
                attempt=attempt,
                delay_s=round(delay, 3),
                error=str(error),
            )
            await anyio.sleep(delay)
            try:
                return await self._execute(call, job_id)
            except DeliveryError as exc:
                error = exc
        raise error

    def _execute(
        self,
        call: Call,
        job_id: str,
        chunks: MemoryObjectSendStream[FunctionResponse] | None = None,
    ) -> Awaitable[FunctionResponse]:
        """One attempt on the backend, under the execution timeout when it leaves that to us.

        Without a timeout to apply, the backend's own awaitable (one frame less per call).
        """
        assert self.backend is not None  # noqa: S101 (set in on_start)
        timeout = call.policy.execution_timeout_s
        if not self._timeout or timeout is None:
            return self.backend.execute(call, job_id=job_id, chunks=chunks)
        return self._execute_timed(call, job_id, timeout, chunks)

    async def _execute_timed(
        self,
        call: Call,
        job_id: str,
        seconds: float,
        chunks: MemoryObjectSendStream[FunctionResponse] | None,
    ) -> FunctionResponse:
        assert self.backend is not None  # noqa: S101 (set in on_start)
        # ``anyio.move_on_after``, without its two backend lookups per call
        with self._scope_class(deadline=self._clock() + seconds):
            return await self.backend.execute(call, job_id=job_id, chunks=chunks)
        raise timeout_error(call, job_id)
