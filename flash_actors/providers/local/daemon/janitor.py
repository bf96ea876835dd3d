"""The daemon's janitor: queue TTLs, handler jobs' execution timeouts, and result retention.

Every half second it ends queued jobs older than their ``ttl`` (TIMED_OUT), ends handler
jobs running past their ``executionTimeout`` (TIMED_OUT, and tells their worker to stop
them; Flash jobs' timeouts are enforced by the worker pool), and forgets finished jobs older
than the retention time.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import anyio

from flash_actors._logging import get_logger

if TYPE_CHECKING:
    from flash_actors.providers.local.daemon.catalog import Endpoint
    from flash_actors.providers.local.daemon.jobs import JobBook

__all__ = ["Janitor"]

log = get_logger(__name__)


class Janitor:
    """Sweeps the daemon's jobs (see the module docstring).

    Args:
        endpoints: the registered endpoints by name.
        book: the jobs.
        retention_s: how long finished jobs stay readable.
    """

    def __init__(
        self, endpoints: dict[str, Endpoint], book: JobBook, *, retention_s: float
    ) -> None:
        self.endpoints = endpoints
        self.book = book
        self.retention_s = retention_s

    async def run(self) -> None:
        """Every half second, `sweep`; a failing sweep is logged and tried again."""
        while True:
            await anyio.sleep(0.5)
            try:
                self.sweep()
            except Exception:  # the daemon must outlive a bad sweep
                log.exception("gateway.sweep_failed")

    def sweep(self) -> None:
        """Expire queued jobs past their TTL, time out handler jobs, forget old results."""
        book = self.book
        now = time.time()
        for endpoint in self.endpoints.values():
            # Only jobs that may still expire: the queued ones, and those running on
            # handler workers (every finished job stays in ``endpoint.jobs`` for its
            # retention: tens of thousands after a fan-out, too many to walk twice a second).
            pending = [job for job in endpoint.queue if job.status == "IN_QUEUE"]
            for held in endpoint.workers.values():
                pending += [
                    job
                    for job_id in held.jobs
                    if (job := endpoint.jobs.get(job_id)) is not None
                ]
            for job in pending:
                record = job.record
                if (
                    record.status == "IN_QUEUE"
                    and now - record.created > job.ttl_ms / 1000
                ):
                    book.fail(
                        job,
                        f"job {job.id} expired: it waited in the queue longer than its "
                        f"ttl of {job.ttl_ms} ms",
                        status="TIMED_OUT",
                    )
                elif (
                    record.status == "IN_PROGRESS"
                    and endpoint.kind == "handler"
                    and record.started is not None
                    and now - record.started > job.execution_timeout_ms / 1000
                ):
                    worker = endpoint.workers.get(job.worker or "")
                    book.fail(
                        job,
                        f"job {job.id} ran past its execution timeout of "
                        f"{job.execution_timeout_ms} ms",
                        status="TIMED_OUT",
                    )
                    if worker is not None:
                        worker.jobs.discard(job.id)
                        worker.stops.append(job.id)
                        worker.stop_wake.set()
        expired = book.store.expired(self.retention_s, now)
        if expired:
            book.store.delete(expired)
            book.forget(expired)
