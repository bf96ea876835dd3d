"""Job results: `JobOutput` (what a queue call returns) and the job statuses.

A queue resource's call returns a `JobOutput` even when the function raised: ``error`` then
holds the remote message and traceback, and `JobOutput.raise_for_error` raises the same typed
error a load-balancer call would have raised.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from flash_actors.errors import FlashRuntimeError

if TYPE_CHECKING:
    from datetime import datetime

__all__ = ["JobOutput", "JobStatus"]


class JobStatus(StrEnum):
    """RunPod job statuses; the last four are terminal."""

    IN_QUEUE = "IN_QUEUE"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMED_OUT = "TIMED_OUT"

    @property
    def is_terminal(self) -> bool:
        """True once the job will not change any more."""
        return self not in (JobStatus.IN_QUEUE, JobStatus.IN_PROGRESS)


@dataclass(frozen=True, slots=True)
class JobOutput:
    """The outcome of one queued job.

    Attributes:
        id: the job id.
        status: a `JobStatus` value (a `str`, so ``status == "COMPLETED"`` works).
        output: the function's return value (``None`` unless COMPLETED).
        error: the error message and remote traceback; empty when the job succeeded.
        started_at: when a worker started the job (``None`` if it never started).
        ended_at: when the job reached its terminal status.
        delay_time_ms: time spent queued, in ms (RunPod's ``delayTime``).
        execution_time_ms: time spent running, in ms (RunPod's ``executionTime``).
        worker_id: the worker that ran it (locally, its log is
            ``.flash/logs/<endpoint>/<worker_id>.log``); ``None`` when no worker answered.
        stdout: what the function printed.
    """

    id: str
    status: JobStatus
    output: Any = None
    error: str = ""
    started_at: datetime | None = None
    ended_at: datetime | None = None
    delay_time_ms: int = 0
    execution_time_ms: int = 0
    worker_id: str | None = None
    stdout: str = ""
    exception: FlashRuntimeError | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        """True when the job completed without error."""
        return self.status is JobStatus.COMPLETED and not self.error

    def raise_for_error(self) -> None:
        """Raise the job's error, typed as the remote exception when it can be; else nothing.

        Raises:
            RemoteExecutionError: the function raised on the worker (also an instance of the
                remote exception's class when that class exists here).
            FlashRuntimeError: the job failed, timed out or was cancelled for another reason.
        """
        if self.ok:
            return
        if self.exception is not None:
            raise self.exception
        raise FlashRuntimeError(
            self.error or f"job {self.id} ended {self.status.value}"
        )

    def result(self) -> Any:
        """The output, or the job's error raised (see `raise_for_error`)."""
        self.raise_for_error()
        return self.output
