"""Worker processes of handler endpoints: stock ``runpod`` workers running the user's file.

Each worker is ``python -m flash_actors.providers.local.daemon.launch <handler.py>``: the launcher only ties
the process's life to the daemon's (so a killed daemon leaves no worker behind) and then runs
the unmodified handler file as ``__main__``; ``runpod.serverless.start`` inside it finds the
gateway through RunPod's own environment variables (PROTOCOL.md section 2).

The pool keeps ``workersMin`` workers, starts more (up to ``workersMax``) while jobs wait and
no worker is free to take them, stops workers idle for ``idleTimeout`` seconds, recycles a
worker that asked for it (``stopPod``), and puts the jobs of a worker that died back in the
queue.

A worker that exits before it has asked for a job (a missing handler file, one that raises
at import) is a start failure: the next start waits for an exponential backoff (0.5 s,
doubled per failure in a row, at most ``FLASH_LOCAL_START_BACKOFF_MAX_S``, 30 s by default)
and appends to the same log file, and after `START_TRIES` failures in a row the queued jobs
fail with the cause (the exit code and the end of the worker's log), as do jobs queued while
the backoff lasts. The first job queued after it starts a worker again; the first worker that
asks for a job ends the failure streak.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio

from flash_actors._logging import get_logger
from flash_actors._private import open_private, private_dir
from flash_actors.providers.local._processes import stop_process
from flash_actors.providers.local.daemon import launch
from flash_actors.providers.local.daemon.catalog import HandlerWorker
from flash_actors.providers.local.pool import default_start_backoff_max_s, log_tail
from flash_actors.providers.local.volumes import apply_volume

if TYPE_CHECKING:
    from pathlib import Path

    from anyio.abc import Process

    from flash_actors.providers.local.daemon.catalog import Endpoint
    from flash_actors.providers.local.daemon.gateway import Gateway

__all__ = ["run_handler_pool", "stop_launched", "stop_workers", "worker_env"]

log = get_logger(__name__)

TICK_S = 0.1
START_TRIES = 3
"""Failed starts in a row after which the endpoint's queued jobs fail with the cause."""
START_BACKOFF_S = 0.5


@dataclass
class _Starts:
    """The start-up record of one handler endpoint's workers (see the module docstring)."""

    failures: int = 0
    cause: str = ""
    next_start: float = 0.0
    logs: dict[str, Path] = field(default_factory=dict)  # worker id -> its log file
    reuse_log: Path | None = None

    def failed(self, endpoint: str, worker_id: str, code: int) -> None:
        self.failures += 1
        delay = min(
            default_start_backoff_max_s(),
            START_BACKOFF_S * 2 ** min(self.failures - 1, 30),
        )
        self.next_start = time.monotonic() + delay
        log_path = self.logs.get(worker_id)
        tail = log_tail(log_path) if log_path is not None else None
        self.cause = (
            f"handler worker {worker_id} exited with code {code} before it took a job"
        )
        if tail:
            self.cause += f"; its log {log_path} ends with:\n{tail}"
        if tail is not None:
            self.reuse_log = log_path
        log.warning(
            "worker.start_failed",
            endpoint=endpoint,
            worker=worker_id,
            code=code,
            failures=self.failures,
            retry_in_s=round(delay, 3),
        )

    def succeeded(self) -> None:
        self.failures = 0
        self.cause = ""
        self.next_start = 0.0
        self.reuse_log = None

    def backing_off(self) -> bool:
        return time.monotonic() < self.next_start


def worker_env(gateway: Gateway, endpoint: Endpoint, worker_id: str) -> dict[str, str]:
    """RunPod's worker environment, pointed at this gateway."""
    base = f"{gateway.base_url}/v2/{endpoint.name}"
    env = dict(os.environ)
    env.update(endpoint.resource.worker_env())
    env.update(
        {
            "RUNPOD_WEBHOOK_GET_JOB": f"{base}/job-take/$ID?gpu=local",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{base}/job-done/$RUNPOD_POD_ID/$ID?gpu=local",
            "RUNPOD_WEBHOOK_POST_STREAM": f"{base}/job-stream/$RUNPOD_POD_ID/$ID?gpu=local",
            "RUNPOD_WEBHOOK_PING": f"{base}/ping/$RUNPOD_POD_ID?gpu=local",
            "RUNPOD_POD_ID": worker_id,
            "RUNPOD_ENDPOINT_ID": endpoint.name,
            "RUNPOD_AI_API_KEY": gateway.api_key,
            "RUNPOD_PING_INTERVAL": "10000",
            "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
            "RUNPOD_SKIP_GPU_CHECK": "true",
            "FLASH_PARENT_PID": str(os.getpid()),
            "PYTHONUNBUFFERED": "1",
        }
    )
    apply_volume(endpoint.resource, env)  # its network volume, if it has one
    return env


async def _start(gateway: Gateway, endpoint: Endpoint, starts: _Starts) -> None:
    handler = endpoint.resource.handler
    assert handler is not None  # noqa: S101 (handler endpoints only)
    worker_id = f"{endpoint.name}-{secrets.token_hex(4)}"
    log_dir = gateway.state_dir / "logs" / endpoint.name
    private_dir(log_dir)
    log_path, starts.reuse_log = starts.reuse_log or log_dir / f"{worker_id}.log", None
    starts.logs[worker_id] = log_path
    with os.fdopen(open_private(log_path), "ab") as out:
        process = await anyio.open_process(
            [
                sys.executable,
                "-m",
                "flash_actors.providers.local.daemon.launch",
                handler,
            ],
            env=worker_env(gateway, endpoint, worker_id),
            cwd=os.path.dirname(handler) or None,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: see launch.py
        )
    endpoint.workers[worker_id] = HandlerWorker(worker_id, process=process)
    log.info(
        "worker.started", endpoint=endpoint.name, worker=worker_id, pid=process.pid
    )


async def _terminate(worker: HandlerWorker) -> None:
    """Stop a worker we started (`stop_launched`)."""
    if worker.process is not None:
        await stop_launched(worker.process)


async def stop_launched(process: Process) -> None:
    """Stop a process started under the launcher, and its whole group; always reaped.

    SIGTERM to the launcher (it stops its group, see `launch`), SIGKILL to the group if that
    takes longer than the launcher's grace. Shielded: it finishes even when cancelled.
    """
    with anyio.CancelScope(shield=True):
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            with anyio.move_on_after(launch.GRACE_S + 2):
                await process.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # the group outlives its leader
        await stop_process(process, 0)


def _reap(
    gateway: Gateway, endpoint: Endpoint, worker: HandlerWorker, why: str
) -> None:
    """Forget a worker; its running jobs go back to the queue."""
    endpoint.workers.pop(worker.id, None)
    for job_id in list(worker.jobs):
        job = endpoint.jobs.get(job_id)
        if job is not None and job.status == "IN_PROGRESS":
            gateway.book.requeue(endpoint, job, reason=f"worker {worker.id} {why}")
    worker.jobs.clear()


async def run_handler_pool(gateway: Gateway, endpoint: Endpoint) -> None:
    """Keep the endpoint's workers matched to its queue until cancelled."""
    starts = _Starts()
    with endpoint.scope:
        while True:
            try:
                await _tick(gateway, endpoint, starts)
            except Exception:  # the daemon outlives one failing pool; try again
                log.exception("worker.pool_failed", endpoint=endpoint.name)
                await anyio.sleep(1)
            await anyio.sleep(TICK_S)


async def _tick(gateway: Gateway, endpoint: Endpoint, starts: _Starts) -> None:
    """Reap dead workers, start the ones the queue needs, stop idle ones."""
    resource = endpoint.resource
    now = time.monotonic()
    for worker in list(endpoint.workers.values()):
        process = worker.process
        if process is not None and worker.state != "initializing":
            starts.logs.pop(worker.id, None)
            if starts.failures:
                starts.succeeded()  # it asked for a job: the handler starts again
        if process is not None and process.returncode is not None:
            log.warning(
                "worker.exited",
                endpoint=endpoint.name,
                worker=worker.id,
                code=process.returncode,
            )
            if worker.state == "initializing" and worker.id in starts.logs:
                starts.failed(endpoint.name, worker.id, process.returncode)
            starts.logs.pop(worker.id, None)
            _reap(
                gateway,
                endpoint,
                worker,
                f"exited with code {process.returncode}",
            )
            await process.aclose()
        elif process is None and now - worker.last_seen > 120:
            _reap(gateway, endpoint, worker, "stopped polling")
        elif worker.recycle and not worker.jobs:
            _reap(gateway, endpoint, worker, "was recycled (stopPod)")
            await _terminate(worker)
    own = [w for w in endpoint.workers.values() if w.process is not None]
    if starts.failures >= START_TRIES and not own and starts.backing_off():
        # the handler cannot start: its jobs fail with why, until the backoff has passed
        for job in list(endpoint.queue):
            if job.status == "IN_QUEUE":
                gateway.book.fail(
                    job,
                    f"endpoint {endpoint.name!r} cannot start its handler workers "
                    f"({starts.failures} failed starts in a row): {starts.cause}",
                )
    waiting = sum(1 for job in endpoint.queue if job.status == "IN_QUEUE")
    free = sum(1 for w in own if w.state in {"initializing", "idle"})
    want = max(resource.workersMin, min(resource.workersMax, len(own) - free + waiting))
    if starts.failures:  # while it fails: one start at a time, spaced out
        trying = starts.backing_off() or any(w.state == "initializing" for w in own)
        want = min(want, len(own) + (0 if trying else 1))
    for _ in range(max(0, want - len(own))):
        await _start(gateway, endpoint, starts)
    spare = len(own) - resource.workersMin
    for worker in own:
        if spare <= 0:
            break
        if (
            worker.state == "idle"
            and not worker.jobs
            and now - worker.last_active > resource.idleTimeout
        ):
            endpoint.workers.pop(worker.id, None)
            log.info("worker.idle_stop", endpoint=endpoint.name, worker=worker.id)
            await _terminate(worker)
            spare -= 1


async def stop_workers(gateway: Gateway, endpoint: Endpoint) -> None:
    """Stop every worker the gateway started for the endpoint."""
    for worker in list(endpoint.workers.values()):
        if worker.process is not None:
            _reap(gateway, endpoint, worker, "was stopped")
            await _terminate(worker)
