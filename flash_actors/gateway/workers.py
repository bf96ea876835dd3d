"""Worker processes of handler endpoints: stock ``runpod`` workers running the user's file.

Each worker is ``python -m flash_actors.gateway.launch <handler.py>``: the launcher only ties
the process's life to the daemon's (so a killed daemon leaves no worker behind) and then runs
the unmodified handler file as ``__main__``; ``runpod.serverless.start`` inside it finds the
gateway through RunPod's own environment variables (PROTOCOL.md section 2).

The pool keeps ``workersMin`` workers, starts more (up to ``workersMax``) while jobs wait and
no worker is free to take them, stops workers idle for ``idleTimeout`` seconds, recycles a
worker that asked for it (``stopPod``), and puts the jobs of a worker that died back in the
queue.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import anyio

from flash_actors._logging import get_logger
from flash_actors._private import open_private, private_dir
from flash_actors.gateway import launch
from flash_actors.gateway.core import HandlerWorker
from flash_actors.providers.local._processes import stop_process

if TYPE_CHECKING:
    from flash_actors.gateway.core import Endpoint, Gateway

__all__ = ["run_handler_pool", "stop_workers", "worker_env"]

log = get_logger(__name__)

TICK_S = 0.1


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
    return env


async def _start(gateway: Gateway, endpoint: Endpoint) -> None:
    handler = endpoint.resource.handler
    assert handler is not None  # noqa: S101 (handler endpoints only)
    worker_id = f"{endpoint.name}-{secrets.token_hex(4)}"
    log_dir = gateway.state_dir / "logs" / endpoint.name
    private_dir(log_dir)
    with os.fdopen(open_private(log_dir / f"{worker_id}.log"), "ab") as out:
        process = await anyio.open_process(
            [sys.executable, "-m", "flash_actors.gateway.launch", handler],
            env=worker_env(gateway, endpoint, worker_id),
            cwd=os.path.dirname(handler) or None,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: see gateway.launch
        )
    endpoint.workers[worker_id] = HandlerWorker(worker_id, process=process)
    log.info(
        "worker.started", endpoint=endpoint.name, worker=worker_id, pid=process.pid
    )


async def _terminate(worker: HandlerWorker) -> None:
    """SIGTERM the launcher (it stops its group); SIGKILL the group if that takes too long."""
    process = worker.process
    if process is None:
        return
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
            gateway.requeue(endpoint, job, reason=f"worker {worker.id} {why}")
    worker.jobs.clear()


async def run_handler_pool(gateway: Gateway, endpoint: Endpoint) -> None:
    """Keep the endpoint's workers matched to its queue until cancelled."""
    with endpoint.scope:
        while True:
            try:
                await _tick(gateway, endpoint)
            except Exception:  # the daemon outlives one failing pool; try again
                log.exception("worker.pool_failed", endpoint=endpoint.name)
                await anyio.sleep(1)
            await anyio.sleep(TICK_S)


async def _tick(gateway: Gateway, endpoint: Endpoint) -> None:
    """Reap dead workers, start the ones the queue needs, stop idle ones."""
    resource = endpoint.resource
    now = time.monotonic()
    for worker in list(endpoint.workers.values()):
        process = worker.process
        if process is not None and process.returncode is not None:
            log.warning(
                "worker.exited",
                endpoint=endpoint.name,
                worker=worker.id,
                code=process.returncode,
            )
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
    waiting = sum(1 for job in endpoint.queue if job.status == "IN_QUEUE")
    free = sum(1 for w in own if w.state in {"initializing", "idle"})
    want = max(resource.workersMin, min(resource.workersMax, len(own) - free + waiting))
    for _ in range(max(0, want - len(own))):
        await _start(gateway, endpoint)
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
