"""RunPod's worker protocol for handler endpoints: what stock ``runpod`` workers ask for.

``job-take`` (and its batch form) hands queued jobs to a worker, long-polled; ``job-done``
ends a job with a result or an error, or records progress; ``job-stream`` buffers a chunk
for ``/stream``; ``ping`` keeps a worker known; ``job-stop`` long-polls the ids of jobs a
worker should stop (cancelled or timed out). A worker started by hand is known from its
first request. A post about a job the worker does not hold is refused (409), so a late or
stray post never ends a job that runs elsewhere.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import anyio
import msgspec

from flash_actors._logging import get_logger
from flash_actors.providers.local.daemon.catalog import HandlerWorker
from flash_actors.providers.local.daemon.errors import GatewayError
from flash_actors.providers.local.daemon.jobs import result_too_large

if TYPE_CHECKING:
    from flash_actors.providers.local.daemon.catalog import Endpoint
    from flash_actors.providers.local.daemon.jobs import Job, JobBook

__all__ = ["WorkerProtocol"]

log = get_logger(__name__)


class _Done(msgspec.Struct):
    output: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)
    error: Any = None
    status: str | None = None
    stopPod: bool = False


class WorkerProtocol:
    """The daemon's side of the worker protocol.

    Args:
        book: the jobs.
        closing: set when the daemon stops: long polls answer at once.
        take_wait_s: how long job-take and job-stop polls are held open.
    """

    def __init__(
        self, book: JobBook, closing: anyio.Event, *, take_wait_s: float
    ) -> None:
        self.book = book
        self.closing = closing
        self.take_wait_s = take_wait_s

    @staticmethod
    def worker(endpoint: Endpoint, worker_id: str) -> HandlerWorker:
        """The worker of that id, known from now on if it was started by hand."""
        worker = endpoint.workers.get(worker_id)
        if worker is None:
            worker = endpoint.workers[worker_id] = HandlerWorker(worker_id)
            log.info("worker.joined", endpoint=endpoint.name, worker=worker_id)
        worker.last_seen = time.monotonic()
        return worker

    async def take(self, endpoint: Endpoint, worker_id: str, count: int) -> list[Job]:
        """Up to ``count`` queued jobs for a worker, waiting up to ``take_wait_s`` for one."""
        if endpoint.kind != "handler":
            msg = f"endpoint {endpoint.name!r} runs Flash workers; it has no job-take"
            raise GatewayError(400, msg)
        worker = self.worker(endpoint, worker_id)
        if worker.recycle:
            return []
        if not worker.jobs:
            worker.state = "idle"
        with anyio.move_on_after(self.take_wait_s):
            while not any(j.status == "IN_QUEUE" for j in endpoint.queue):
                if self.closing.is_set():
                    return []
                with anyio.move_on_after(1):  # also notice the daemon closing
                    await endpoint.wait_available()
        jobs: list[Job] = []
        while len(jobs) < count:
            job = endpoint.pop()
            if job is None:
                break
            self.book.start(job, worker_id)
            worker.jobs.add(job.id)
            jobs.append(job)
        if jobs:
            worker.state = "running"
        worker.last_seen = time.monotonic()
        return jobs

    def untake(self, endpoint: Endpoint, worker_id: str, jobs: list[Job]) -> None:
        """Jobs handed to a worker that hung up before getting them: back to the queue front."""
        worker = endpoint.workers.get(worker_id)
        for job in reversed(jobs):
            if worker is not None:
                worker.jobs.discard(job.id)
            self.book.requeue(
                endpoint, job, reason=f"worker {worker_id} hung up", count=False
            )
        if worker is not None and not worker.jobs:
            worker.state = "idle"

    def done(
        self, endpoint: Endpoint, worker_id: str, job_id: str, body: bytes
    ) -> None:
        """A worker's job-done post: a result, an error, or a progress update (idempotent)."""
        worker = self.worker(endpoint, worker_id)
        job = endpoint.jobs.get(job_id)
        if job is None or job.terminal:
            worker.jobs.discard(job_id)
            return
        self._check_holder(endpoint, job, worker_id)
        try:
            message = msgspec.json.decode(body, type=_Done)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise GatewayError(
                400, f"job-done body is not the JSON RunPod sends: {exc}"
            ) from exc
        output = bytes(message.output) or None
        if output == b"null":
            output = None
        if message.status == "IN_PROGRESS":
            if output is not None:
                job.progress = output
                job.notify()
            return
        worker.jobs.discard(job_id)
        worker.last_active = time.monotonic()
        if not worker.jobs:
            worker.state = "idle"
        if message.stopPod:
            worker.recycle = True
        if message.error is not None:
            error = (
                message.error
                if isinstance(message.error, str)
                else json.dumps(message.error)
            )
            self.book.fail(job, error)
        else:
            self.book.complete(job, output)

    @staticmethod
    def _check_holder(endpoint: Endpoint, job: Job, worker_id: str) -> None:
        """Refuse a worker's post about a running job that it does not hold.

        Raises:
            GatewayError: 409 for a job queued, held by another worker, or run by Flash
                workers (a late or stray post must not end a job that runs elsewhere).
        """
        if endpoint.kind == "handler" and job.worker == worker_id:
            return
        msg = f"job {job.id} is not held by worker {worker_id!r}; nothing was changed"
        raise GatewayError(409, msg)

    def refuse_result(
        self, endpoint: Endpoint, worker_id: str, job_id: str, size: int
    ) -> None:
        """A worker's job-done too large to read (``size`` bytes): the job fails with why."""
        worker = self.worker(endpoint, worker_id)
        worker.jobs.discard(job_id)
        if not worker.jobs:
            worker.state = "idle"
        job = endpoint.jobs.get(job_id)
        if job is not None and not job.terminal:
            self._check_holder(endpoint, job, worker_id)
            self.book.fail(job, result_too_large(size))

    def stream_chunk(
        self, endpoint: Endpoint, worker_id: str, job_id: str, body: bytes
    ) -> None:
        """A worker's job-stream post: buffer the chunk for ``/stream``."""
        self.worker(endpoint, worker_id)
        job = endpoint.jobs.get(job_id)
        if job is None or job.terminal:
            return
        self._check_holder(endpoint, job, worker_id)
        try:
            msgspec.json.decode(body)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise GatewayError(400, f"job-stream body is not JSON: {exc}") from exc
        job.add_chunk(body)

    async def stop_signals(self, endpoint: Endpoint, worker_id: str) -> list[str]:
        """The job-stop long poll: ids this worker should stop, once they exist."""
        worker = self.worker(endpoint, worker_id)
        with anyio.move_on_after(self.take_wait_s):
            while not worker.stops and not self.closing.is_set():
                with anyio.move_on_after(1):
                    await worker.stop_wake.wait()
                if worker.stop_wake.is_set():
                    worker.stop_wake = anyio.Event()
        stops, worker.stops = worker.stops, []
        return stops
