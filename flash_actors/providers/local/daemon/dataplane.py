"""What RunPod's data plane does for clients: queue a job, wait on it, stream it, health.

`DataPlane.submit` is ``/run`` and ``/runsync``: checks the job's policy and input, commits
it, queues it. `wait` and `drain_stream` hold a long poll (runsync, ``status?wait=``,
``/stream``) until the job changes, or the daemon closes. Cancel, retry and purge are
changes of state, in `flash_actors.providers.local.daemon.jobs`.
"""

from __future__ import annotations

import re
import secrets
import time
from typing import TYPE_CHECKING, Any

import anyio
import msgspec

from flash_actors.errors import FlashRuntimeError
from flash_actors.providers.local.daemon.errors import GatewayError
from flash_actors.providers.local.daemon.store import JobRecord
from flash_actors.providers.local.daemon.webhooks import check_webhook
from flash_actors.providers.local.signing import (
    sign_deployed_input,
    sign_for_workers,
)

if TYPE_CHECKING:
    from flash_actors.providers.local.daemon.catalog import Endpoint
    from flash_actors.providers.local.daemon.jobs import Job, JobBook

__all__ = ["MAX_POLICY_MS", "DataPlane"]

MAX_POLICY_MS = 7 * 86_400_000

_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


def _policy_ms(options: dict[str, Any], name: str) -> int | None:
    value = options.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        msg = f"policy.{name} must be a positive integer of milliseconds, got {value!r}"
        raise GatewayError(400, msg)
    if value > MAX_POLICY_MS:
        msg = f"policy.{name} may be at most 7 days ({MAX_POLICY_MS} ms), got {value}"
        raise GatewayError(400, msg)
    return value


class DataPlane:
    """The client operations on the daemon's jobs.

    Args:
        book: the jobs.
        closing: set when the daemon stops: long polls answer at once.
        max_queue: most queued jobs per endpoint; more are refused with 429.
    """

    def __init__(self, book: JobBook, closing: anyio.Event, *, max_queue: int) -> None:
        self.book = book
        self.closing = closing
        self.max_queue = max_queue

    def submit(
        self,
        endpoint: Endpoint,
        raw_input: bytes | memoryview,
        options: dict[str, Any],
        job_id: str | None = None,
    ) -> Job:
        """Queue a job (committed before it is reported); an existing ``job_id`` is returned.

        Raises:
            GatewayError: 400 for a bad policy or input, or a load balancer's app (it takes
                no jobs).
        """
        if endpoint.serves_app:
            msg = (
                f"endpoint {endpoint.name!r} is a load balancer: it takes no jobs; call its "
                f"routes with Host: {endpoint.name}.<this daemon's host:port>"
            )
            raise GatewayError(400, msg)
        if job_id is not None:
            if not _JOB_ID.fullmatch(job_id):
                msg = f"job id {job_id!r} must be 1-128 letters, digits, '-' or '_'"
                raise GatewayError(400, msg)
            known = self.book.jobs.get(job_id)
            if known is not None:
                if known.record.endpoint != endpoint.name:
                    raise GatewayError(400, f"job id {job_id!r} is already in use")
                return known
        if len(endpoint.queue) >= self.max_queue:
            waiting = sum(1 for job in endpoint.queue if job.status == "IN_QUEUE")
            if waiting >= self.max_queue:
                msg = (
                    f"too many requests: endpoint {endpoint.name!r} already has {waiting} "
                    "queued jobs; retry later"
                )
                raise GatewayError(429, msg)
        clean: dict[str, Any] = {}
        for name in ("executionTimeout", "ttl", "abandonAfter"):
            value = _policy_ms(options, name)
            if value is not None:
                clean[name] = value
        if options.get("webhook"):
            clean["webhook"] = check_webhook(str(options["webhook"]))
        if options.get("stream"):
            clean["stream"] = True
        if endpoint.kind == "flash":
            # Checked, and signed for the workers when a stock client sent it unsigned.
            try:
                raw_input = sign_for_workers(raw_input, endpoint.key_name)
            except FlashRuntimeError as exc:
                raise GatewayError(400, str(exc)) from exc
        elif endpoint.kind == "deployed":
            # Deployed-mode JSON (wrapped for the workers) or a signed request; no code.
            try:
                raw_input, plain = sign_deployed_input(raw_input, endpoint.key_name)
            except FlashRuntimeError as exc:
                raise GatewayError(400, str(exc)) from exc
            if plain:
                clean["deployed_input"] = True
        record = JobRecord(
            id=job_id or f"{secrets.token_hex(4)}-{secrets.token_hex(8)}",
            endpoint=endpoint.name,
            status="IN_QUEUE",
            options=msgspec.json.encode(clean).decode(),
            created=time.time(),
        )
        return self.book.enqueue(endpoint, record, clean, raw_input)

    async def wait(self, job: Job, seconds: float) -> None:
        """Until the job ends or ``seconds`` pass."""
        with anyio.move_on_after(seconds):
            while not job.terminal and not self.closing.is_set():
                await job.changed.wait()

    async def drain_stream(self, job: Job, seconds: float) -> list[bytes]:
        """The chunks buffered since the last call, waiting up to ``seconds`` for one."""
        with anyio.move_on_after(seconds):
            while not job.chunks and not job.terminal and not self.closing.is_set():
                await job.changed.wait()
        chunks, job.chunks = job.chunks or [], None
        return chunks

    @staticmethod
    def health(endpoint: Endpoint) -> dict[str, Any]:
        """The ``/health`` answer."""
        return {"jobs": endpoint.counts(), "workers": endpoint.worker_counts()}
