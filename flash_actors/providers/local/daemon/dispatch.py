"""Flash endpoints: queued ``FunctionRequest`` jobs handed to the local provider's worker pools.

One dispatcher per ``flash`` endpoint opens its worker pool (retried with backoff while it
cannot start; its queued jobs then fail with why) and hands it queued jobs while its workers
have room. The pool decides which worker runs which; a job whose worker is lost is queued
again (`JobBook.requeue`), one that ran past its execution timeout ends TIMED_OUT.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import anyio
import msgspec

from flash_actors._logging import get_logger
from flash_actors.deployed.handler import job_result
from flash_actors.errors import (
    DeliveryError,
    ExecutionTimeoutError,
    FlashRuntimeError,
)
from flash_actors.messages import (
    Call,
    FunctionResponse,
    request_decoder,
    wire_encoder,
)
from flash_actors.policies import CallPolicy, RetryPolicy
from flash_actors.providers.local.pool import LocalBackend
from flash_actors.serialization import endpoint_key

if TYPE_CHECKING:
    from anyio.streams.memory import MemoryObjectReceiveStream

    from flash_actors.providers.local import LocalProvider
    from flash_actors.providers.local.daemon.catalog import Endpoint
    from flash_actors.providers.local.daemon.jobs import Job, JobBook

__all__ = ["FlashDispatch"]

_NEVER = RetryPolicy.never()

log = get_logger(__name__)


def _backoff(failures: int) -> float:
    """Seconds to wait after ``failures`` failures in a row: 0.5 s doubling, at most 30 s."""
    return float(min(30.0, 0.5 * 2 ** min(failures - 1, 10)))


class FlashDispatch:
    """Runs ``flash`` endpoints' jobs on ``provider``'s worker pools.

    Args:
        provider: opens each endpoint's worker pool.
        book: the jobs (their input, and each change of their state).
    """

    def __init__(self, provider: LocalProvider, book: JobBook) -> None:
        self.provider = provider
        self.book = book
        # the backend's class, looked up once (``anyio.CancelScope()`` asks sniffio)
        self._scope_class: type[anyio.CancelScope] = anyio.CancelScope

    async def run(self, endpoint: Endpoint) -> None:
        """Hand queued jobs to the endpoint's worker pool while it has room, until cancelled."""
        self._scope_class = type(anyio.CancelScope())
        with endpoint.scope:
            endpoint.backend = backend = await self._open_pool(endpoint)
            # As many as its workers may hold (running, and handed ahead): the pool
            # decides which worker runs which, so no job waits behind a busy worker. One
            # runner task per place, each taking jobs from a hand-over stream: a job costs
            # a hand-over, not a task of its own (a quarter of the daemon's time per job).
            places = backend.pool.capacity
            room = anyio.Semaphore(places)
            send, receive = anyio.create_memory_object_stream["Job"](places)
            try:
                async with anyio.create_task_group() as tg:
                    for _ in range(places):
                        tg.start_soon(self._runner, endpoint, backend, receive, room)
                    while True:
                        try:
                            room.acquire_nowait()
                        except anyio.WouldBlock:
                            await room.acquire()
                        job = endpoint.pop()
                        while job is None:
                            await endpoint.wait_available()
                            job = endpoint.pop()
                        self.book.start(job, None)
                        # room was taken: a runner or a buffer place is free
                        send.send_nowait(job)
            finally:
                # Handed over but not taken when the endpoint stopped: they run later.
                for left in _drain(receive):
                    self.book.requeue(
                        endpoint, left, reason="its endpoint was stopped", count=False
                    )
                send.close()
                receive.close()

    async def _runner(
        self,
        endpoint: Endpoint,
        backend: LocalBackend,
        jobs: MemoryObjectReceiveStream[Job],
        room: anyio.Semaphore,
    ) -> None:
        """Run the jobs handed over, one at a time, until cancelled."""
        while True:
            job = await jobs.receive()
            await self._run_job(endpoint, backend, job, room)

    async def _open_pool(self, endpoint: Endpoint) -> LocalBackend:
        """The endpoint's worker pool; while it cannot start, its queued jobs fail with why.

        Tries again when a job is queued, at most every so often (exponential backoff).
        """
        resource = endpoint.resource
        failures = 0
        while True:
            try:
                backend = await self.provider.open_endpoint(
                    resource, endpoint_key(endpoint.key_name), entry=endpoint.entry
                )
            except (
                Exception
            ) as exc:  # the daemon outlives one endpoint that cannot start
                failures += 1
                log.exception("gateway.endpoint_failed", endpoint=endpoint.name)
                for waiting in list(endpoint.queue):
                    if waiting.status == "IN_QUEUE":
                        self.book.fail(
                            waiting, f"endpoint {endpoint.name!r} cannot start: {exc}"
                        )
                await anyio.sleep(_backoff(failures))
                await endpoint.wait_available()
                continue
            if not isinstance(
                backend, LocalBackend
            ):  # pragma: no cover - handlers go elsewhere
                msg = f"endpoint {resource.name!r} did not get a worker pool"
                raise TypeError(msg)
            return backend

    async def _run_job(
        self, endpoint: Endpoint, backend: LocalBackend, job: Job, room: anyio.Semaphore
    ) -> None:
        book = self.book
        try:
            request = request_decoder.decode(book.input_of(job))
            call = Call(
                endpoint=endpoint.name,
                function=request.function_name or request.class_name or "?",
                request=request,
                policy=CallPolicy(
                    retry=_NEVER,  # a lost worker: requeued below
                    execution_timeout_s=job.execution_timeout_ms / 1000,
                    # what is left of the TTL: one TTL from submission to start, whether
                    # the job waited here (the janitor) or in the pool
                    ttl_s=max(
                        0.001, job.ttl_ms / 1000 - (time.time() - job.record.created)
                    ),
                ),
            )
            with self._scope_class() as scope:
                job.scope = scope
                response = await _execute(backend, call, job)
            if scope.cancelled_caught:
                # cancelled by a client (already CANCELLED) or by the endpoint stopping
                book.requeue(
                    endpoint, job, reason="its endpoint was stopped", count=False
                )
                return
            if not job.terminal:
                job.worker = response.worker_id
                if job.options.get("deployed_input"):
                    _finish_deployed(book, job, response)
                    return
                book.complete(job, wire_encoder.encode(response))
                if not response.success:
                    log.warning(
                        "job.raised",
                        job_id=job.id,
                        endpoint=endpoint.name,
                        error_type=response.error_type,
                        error=response.error_message,
                    )
        except anyio.get_cancelled_exc_class():
            # the endpoint (or the daemon) stops around the job: it runs again later
            book.requeue(endpoint, job, reason="its endpoint was stopped", count=False)
            raise
        except ExecutionTimeoutError as exc:
            book.fail(job, str(exc), status="TIMED_OUT")
        except DeliveryError as exc:
            book.requeue(endpoint, job, reason=str(exc))
        except (FlashRuntimeError, msgspec.DecodeError) as exc:
            book.fail(job, str(exc))
        except Exception as exc:  # a bug must fail one job, not the daemon
            log.exception("gateway.job_failed", job_id=job.id)
            book.fail(job, f"internal error of the local gateway: {exc!r}")
        finally:
            job.scope = None
            room.release()


def _drain(jobs: MemoryObjectReceiveStream[Job]) -> list[Job]:
    """The jobs still waiting in ``jobs``."""
    left: list[Job] = []
    while True:
        try:
            left.append(jobs.receive_nowait())
        except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
            return left


def _finish_deployed(book: JobBook, job: Job, response: FunctionResponse) -> None:
    """A deployed-mode JSON job ends as RunPod's would: the value, or the error's message."""
    if not response.success:
        book.fail(job, response.error or response.error_message or "the job failed")
        return
    result = job_result(response.json_result)
    if "error" in result:
        error = result["error"]
        book.fail(
            job,
            error if isinstance(error, str) else msgspec.json.encode(error).decode(),
        )
    else:
        book.complete(job, wire_encoder.encode(result["output"]))


async def _execute(backend: LocalBackend, call: Call, job: Job) -> FunctionResponse:
    """Run ``call``; a streaming job's chunks are buffered on the job for ``/stream``."""
    if not job.options.get("stream"):
        return await backend.execute(call, job_id=job.id)
    send, receive = anyio.create_memory_object_stream[FunctionResponse](16)

    async def collect() -> None:
        async with receive:
            async for chunk in receive:
                job.add_chunk(b'{"output":' + wire_encoder.encode(chunk) + b"}")

    async with anyio.create_task_group() as tg:
        tg.start_soon(collect)
        async with send:
            response = await backend.execute(call, job_id=job.id, chunks=send)
    return response
