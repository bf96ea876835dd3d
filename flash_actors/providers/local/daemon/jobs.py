"""The daemon's jobs: `Job`, and `JobBook`, the one owner of every change of a job's state.

A job moves IN_QUEUE -> IN_PROGRESS -> COMPLETED, FAILED, CANCELLED or TIMED_OUT; `requeue`
puts a running job back (front of its queue) when its worker went away, `retry` queues a
failed one again under the same id, `purge` cancels what is still queued. Every change is
written to the `JobStore` (committed before it is reported, see its group commit), then
wakes whoever waits on the job (runsync, long-polled status and stream, job-stop). All of
it runs on the daemon's one event loop, so there are no locks.

A job's input and output live in the store. A small one (`HOLD_LIMIT`) is also kept on the
`Job` while it is about to be needed, so the common path reads nothing back: the input from
submission until the job is handed to a worker, the output from the job's end until its
first answer (runsync, status) is built. All jobs together keep at most `HOLD_BUDGET`
bytes; past it, they are read from the store as any large one, to the same answer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import msgspec

from flash_actors._logging import get_logger
from flash_actors.policies import (
    DEFAULT_EXECUTION_TIMEOUT_S,
    DEFAULT_TTL_S,
    RetryPolicy,
)
from flash_actors.providers.local.daemon.errors import GatewayError
from flash_actors.providers.local.daemon.store import TERMINAL, JobRecord, JobStore

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from flash_actors.providers.local.daemon.catalog import Endpoint

__all__ = [
    "DEFAULT_EXECUTION_TIMEOUT_MS",
    "DEFAULT_TTL_MS",
    "HOLD_BUDGET",
    "HOLD_LIMIT",
    "MAX_ATTEMPTS",
    "RESULT_LIMIT",
    "Job",
    "JobBook",
    "result_too_large",
    "stored_envelope",
]

log = get_logger(__name__)

DEFAULT_EXECUTION_TIMEOUT_MS = int(DEFAULT_EXECUTION_TIMEOUT_S * 1000)
DEFAULT_TTL_MS = int(DEFAULT_TTL_S * 1000)
MAX_ATTEMPTS = RetryPolicy.queue_default().attempts
"""A job whose worker dies is queued again, at most this many runs in all: the daemon,
standing in for RunPod, re-runs it inside one delivery, with the attempts a queue call gets."""
RESULT_LIMIT = 20 * 1024 * 1024
"""The largest result a job may have (its output as JSON): RunPod's ``/runsync`` limit, so
whatever a job returns can also be handed back in one ``/runsync`` answer."""
HOLD_LIMIT = 64 * 1024
"""The largest input or output a `Job` keeps in memory (larger ones are read back)."""
HOLD_BUDGET = 64 * 1024 * 1024
"""The most bytes of inputs and outputs that all jobs keep in memory together."""


def result_too_large(size: int) -> str:
    """The error of a job whose result is over `RESULT_LIMIT`."""
    return (
        f"result of {size / 1048576:.1f} MB exceeds the {RESULT_LIMIT // 1048576} MB limit "
        "of the local gateway; return a smaller value, or write the data to a volume (or "
        "other storage) and return where it is"
    )


@dataclass(eq=False)
class Job:
    """A job: its stored record plus what only lives while the daemon runs.

    ``held_input`` and ``held_output`` are copies of the stored input and output that
    `JobBook` keeps for a moment (see the module docstring); None when not kept.
    """

    record: JobRecord
    options: dict[str, Any]
    held_input: bytes | None = None
    held_output: bytes | None = None
    worker: str | None = None
    progress: bytes | None = None
    # A stream's chunks not read yet, and the event of whoever waits on the job: made on
    # first use. A daemon keeps every job for its retention (tens of thousands after a
    # fan-out), and each object it holds is one more for every garbage collection to walk.
    chunks: list[bytes] | None = None
    _changed: anyio.Event | None = field(default=None, repr=False)
    scope: anyio.CancelScope | None = None

    @property
    def id(self) -> str:
        """The job id."""
        return self.record.id

    @property
    def status(self) -> str:
        """IN_QUEUE, IN_PROGRESS, COMPLETED, FAILED, CANCELLED or TIMED_OUT."""
        return self.record.status

    @property
    def terminal(self) -> bool:
        """True once the job has ended."""
        return self.record.status in TERMINAL

    @property
    def execution_timeout_ms(self) -> int:
        """The job's execution timeout."""
        return int(self.options.get("executionTimeout") or DEFAULT_EXECUTION_TIMEOUT_MS)

    @property
    def ttl_ms(self) -> int:
        """How long the job may live in the queue."""
        return int(self.options.get("ttl") or DEFAULT_TTL_MS)

    @property
    def changed(self) -> anyio.Event:
        """Set at the job's next change (`notify`): what waiters wait on."""
        if self._changed is None:
            self._changed = anyio.Event()
        return self._changed

    def notify(self) -> None:
        """Wake everyone waiting on this job."""
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def add_chunk(self, chunk: bytes) -> None:
        """A stream's chunk, kept until `/stream` reads it (waiters woken)."""
        if self.chunks is None:
            self.chunks = []
        self.chunks.append(chunk)
        self.notify()

    def envelope(self, output: bytes | None = None) -> dict[str, Any]:
        """The ``/status`` answer (PROTOCOL.md section 1), with ``output`` read from the store."""
        record = self.record
        out: dict[str, Any] = {"id": record.id, "status": record.status}
        if record.started is not None:
            out["delayTime"] = int((record.started - record.created) * 1000)
            if record.finished is not None:
                out["executionTime"] = int((record.finished - record.started) * 1000)
        elif record.finished is not None:
            out["delayTime"] = int((record.finished - record.created) * 1000)
        if record.status == "COMPLETED" and output is not None:
            out["output"] = msgspec.Raw(output)
        elif record.status in TERMINAL and record.error is not None:
            out["error"] = record.error
        elif record.status == "IN_PROGRESS" and self.progress is not None:
            out["output"] = msgspec.Raw(self.progress)
        if self.worker is not None:
            out["workerId"] = self.worker
        if record.status in TERMINAL:  # runpod-flash's JobOutput requires all three
            out.setdefault("delayTime", 0)
            out.setdefault("executionTime", 0)
            out.setdefault("workerId", "")  # no worker recorded (one never took it)
        out["retries"] = record.retries
        return out


def stored_envelope(store: JobStore, job: Job) -> dict[str, Any]:
    """The job's ``/status`` answer, its output the one kept on it or read from ``store``."""
    output = None
    if job.status == "COMPLETED":
        output = job.held_output
        if output is None:
            output = store.output(job.id)
    return job.envelope(output)


class JobBook:
    """Every job of the daemon, by id, and every change of a job's state.

    Args:
        store: where each change is committed before it is reported.
        endpoints: the registered endpoints by name (shared with the `Catalog`): a job
            queued again goes to the endpoint registered under its name now.
        on_end: called with each job that has just ended (the webhooks).
        hold_budget: the most bytes of inputs and outputs kept on jobs (`HOLD_BUDGET`).
    """

    def __init__(
        self,
        store: JobStore,
        endpoints: dict[str, Endpoint],
        *,
        on_end: Callable[[Job], None] | None = None,
        hold_budget: int = HOLD_BUDGET,
    ) -> None:
        self.store = store
        self.endpoints = endpoints
        self.on_end = on_end
        self.hold_budget = hold_budget
        self.held = 0
        """Bytes of inputs and outputs kept on jobs now (at most ``hold_budget``)."""
        self.jobs: dict[str, Job] = {}

    def add(self, endpoint: Endpoint, job: Job) -> None:
        """Know the job from now on (as one of ``endpoint``'s)."""
        self.jobs[job.id] = job
        endpoint.jobs[job.id] = job

    def enqueue(
        self,
        endpoint: Endpoint,
        record: JobRecord,
        options: dict[str, Any],
        payload: bytes | memoryview,
    ) -> Job:
        """Store a new job with its input (``options`` checked), know it and queue it."""
        self.store.insert(record, payload)
        job = Job(record, options, held_input=self._hold(payload))
        self.add(endpoint, job)
        endpoint.push(job)
        return job

    def forget(self, job_ids: Iterable[str]) -> None:
        """Drop jobs whose records are gone from the store."""
        for job_id in job_ids:
            gone = self.jobs.pop(job_id, None)
            if gone is None:
                continue
            self._drop_held(gone)
            owner = self.endpoints.get(gone.record.endpoint)
            if owner is not None:
                owner.jobs.pop(job_id, None)

    # -- a job's input and output ---------------------------------------------------------

    def _hold(self, data: bytes | memoryview) -> bytes | None:
        """A copy of ``data`` to keep on a job, or None if it is too large or over budget."""
        size = data.nbytes if isinstance(data, memoryview) else len(data)
        if size > HOLD_LIMIT or self.held + size > self.hold_budget:
            return None
        self.held += size
        return bytes(data)  # a bytes object as it is; a view of a request body copied

    def _drop_held(self, job: Job) -> None:
        for data in (job.held_input, job.held_output):
            if data is not None:
                self.held -= len(data)
        job.held_input = job.held_output = None

    def envelope(self, job: Job) -> dict[str, Any]:
        """The job's ``/status`` answer; an output kept on the job is let go with it."""
        output = job.held_output
        if output is None:
            return stored_envelope(self.store, job)
        job.held_output = None
        self.held -= len(output)
        return job.envelope(output)

    def output_size(self, job: Job) -> int:
        """The size of the job's output (0 if it has none)."""
        if job.status != "COMPLETED":
            return 0
        if job.held_output is not None:
            return len(job.held_output)
        return self.store.output_size(job.id)

    def input_of(self, job: Job) -> bytes:
        """The job's input (raw JSON) as it is handed to a worker.

        The copy kept on the job is handed over and let go (a job that runs again reads
        its input from the store).
        """
        data = job.held_input
        if data is None:
            return self.store.input(job.id)
        job.held_input = None
        self.held -= len(data)
        return data

    # -- state changes ----------------------------------------------------------------------

    def start(self, job: Job, worker: str | None) -> None:
        """Mark a job taken by a worker."""
        job.record.status = "IN_PROGRESS"
        job.record.started = time.time()
        job.worker = worker
        self.store.update(job.record)
        job.notify()

    def _finish(
        self,
        job: Job,
        status: str,
        *,
        output: bytes | None = None,
        error: str | None = None,
    ) -> None:
        record = job.record
        record.status = status
        record.finished = time.time()
        record.error = error
        job.progress = None
        self.store.update(record, output=output)
        self._drop_held(job)  # an input not handed out (the job ended while queued)
        if status == "COMPLETED" and output is not None:
            job.held_output = self._hold(output)
        job.notify()
        if status == "CANCELLED":
            log.info("job.cancelled", job_id=job.id, endpoint=record.endpoint)
        elif status != "COMPLETED":
            log.warning(
                "job.failed",
                job_id=job.id,
                endpoint=record.endpoint,
                status=status,
                worker=job.worker,
                error=error,
            )
        if self.on_end is not None:
            self.on_end(job)

    def complete(self, job: Job, output: bytes | None) -> None:
        """The job finished with ``output`` (raw JSON); one over `RESULT_LIMIT` fails it."""
        if output is not None and len(output) > RESULT_LIMIT:
            self.fail(job, result_too_large(len(output)))
            return
        self._finish(job, "COMPLETED", output=output)

    def fail(self, job: Job, error: str, *, status: str = "FAILED") -> None:
        """The job failed (or timed out) with ``error``."""
        self._finish(job, status, error=error)

    def requeue(
        self, endpoint: Endpoint, job: Job, *, reason: str, count: bool = True
    ) -> None:
        """Its worker went away: queue the job again (front), or fail it after the last try.

        The job goes to the endpoint registered under its name now: a replaced config's
        jobs, requeued once its old workers are stopped, run on the new ones.
        """
        if job.terminal:
            return
        endpoint = self.endpoints.get(job.record.endpoint, endpoint)
        record = job.record
        if count:
            record.retries += 1
            if record.retries >= MAX_ATTEMPTS:
                self.fail(job, f"{reason}; gave up after {MAX_ATTEMPTS} attempts")
                return
            endpoint.retried += 1
        log.warning(
            "job.requeued", job_id=job.id, endpoint=endpoint.name, reason=reason
        )
        record.status = "IN_QUEUE"
        record.started = None
        job.worker = None
        job.scope = None
        self.store.update(record)
        endpoint.push(job, front=True)
        job.notify()

    def cancel(
        self, endpoint: Endpoint, job: Job, reason: str = "cancelled by a client"
    ) -> None:
        """Cancel a queued or running job (a finished job is left as it is)."""
        if job.terminal:
            return
        worker = endpoint.workers.get(job.worker or "")
        self._finish(job, "CANCELLED", error=reason)
        if job.scope is not None:
            job.scope.cancel()
        if worker is not None:
            worker.jobs.discard(job.id)
            worker.stops.append(job.id)
            worker.stop_wake.set()

    def retry(self, endpoint: Endpoint, job: Job) -> None:
        """Queue a FAILED or TIMED_OUT job again, same id.

        Raises:
            GatewayError: 400 for a job in any other state.
        """
        if job.status not in {"FAILED", "TIMED_OUT"}:
            msg = f"only FAILED or TIMED_OUT jobs can be retried; this one is {job.status}"
            raise GatewayError(400, msg)
        record = job.record
        record.status = "IN_QUEUE"
        record.started = record.finished = None
        record.error = None
        record.retries += 1
        record.created = time.time()
        job.worker = None
        job.progress = None
        job.chunks = None
        self._drop_held(job)
        self.store.update(record, output=None)
        endpoint.retried += 1
        endpoint.push(job)
        job.notify()

    def purge(self, endpoint: Endpoint) -> int:
        """Remove every queued job (they end CANCELLED); running jobs go on."""
        removed = 0
        for job in list(endpoint.queue):
            if job.status == "IN_QUEUE":
                self._finish(job, "CANCELLED", error="removed by purge-queue")
                removed += 1
        endpoint.queue.clear()
        if endpoint.available.is_set():  # never replace an event someone may wait on
            endpoint.available = anyio.Event()
        return removed
