"""A pool of real worker processes for one endpoint, and the queue that feeds them.

Each worker is ``python -m flash_actors.worker`` serving HTTP on a loopback socket that this
process bound and handed over (so the port is known before the worker has started, and early
requests wait in the listen backlog). Jobs wait in the pool's FIFO queue; a dispatcher sends
them to workers with free slots in batches (one HTTP request carries up to ``batch_size`` jobs,
and the worker streams each result back as it finishes). The pool keeps ``workersMin`` workers
warm, starts more up to ``workersMax`` while jobs wait, stops workers idle longer than
``idleTimeout``, and replaces workers that die. A worker killed mid-job fails that job with
`DeliveryError`, which the Endpoint actor retries by policy.

A worker that cannot start (it exits before it answers, or cannot be spawned at all) is a
start failure: the next start waits for an exponential backoff (``start_backoff_s``, doubled
per failure in a row, capped at ``start_backoff_max_s``), and after `START_TRIES` failures in a
row the queued jobs fail with `DeliveryError` naming the cause (the end of the worker's log),
as do new jobs until the backoff has passed; then a new job tries again. The first worker that
answers ends it. Nothing that goes wrong in one pool reaches the task group it runs in.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
from collections import deque
from contextlib import aclosing, nullcontext
from typing import IO, TYPE_CHECKING, Any

import anyio
import anyio.to_thread
import msgspec

from flash_actors._logging import get_logger
from flash_actors._progress import progress
from flash_actors.errors import DeliveryError
from flash_actors.messages import Call, FunctionRequest, FunctionResponse, Route
from flash_actors.policies import expired_error, timeout_error
from flash_actors.providers.local._http import Connection
from flash_actors.providers.local._processes import PidfdProcess, stop_process
from flash_actors.worker.installer import (
    cache_root,
    ensure_environment,
    ensure_system_packages,
)

if TYPE_CHECKING:
    from pathlib import Path

    from anyio.abc import TaskGroup
    from anyio.streams.memory import MemoryObjectSendStream

    from flash_actors.providers.local._processes import Template, WorkerProcess
    from flash_actors.resources import ServerlessResource

__all__ = [
    "START_TRIES",
    "LocalBackend",
    "WorkerPool",
    "default_start_backoff_max_s",
    "log_tail",
]

log = get_logger(__name__)

START_TRIES = 3
"""Failed worker starts in a row after which the queued jobs fail with the cause."""
_LOG_TAIL_BYTES = 2000


def default_start_backoff_max_s() -> float:
    """The longest wait between starts of a worker that keeps failing to start.

    ``FLASH_LOCAL_START_BACKOFF_MAX_S`` (seconds), 30 by default; also used by the daemon's
    handler workers.
    """
    try:
        return max(0.0, float(os.environ.get("FLASH_LOCAL_START_BACKOFF_MAX_S", "30")))
    except ValueError:
        return 30.0


_encoder = msgspec.json.Encoder()


class _Done(msgspec.Struct, frozen=True):
    id: str
    response: FunctionResponse | None = None
    chunk: FunctionResponse | None = None
    refused: str | None = None


_done_decoder = msgspec.msgpack.Decoder(_Done)
_packer = msgspec.msgpack.Encoder()
MSGPACK = "application/msgpack"  # see flash_actors.worker.server


class _Job:
    __slots__ = (
        "chunks",
        "done",
        "error",
        "id",
        "request",
        "response",
        "started",
        "state",
        "worker",
    )

    def __init__(
        self,
        job_id: str,
        request: FunctionRequest,
        chunks: MemoryObjectSendStream[FunctionResponse] | None,
        event_class: type[anyio.Event],
    ) -> None:
        self.id = job_id
        self.request = request
        self.chunks = chunks
        self.done = event_class()
        self.started: anyio.Event | None = None  # made only if the job has to wait
        self.response: FunctionResponse | None = None
        self.error: BaseException | None = None
        self.state = "IN_QUEUE"
        self.worker: Worker | None = None

    def finish(
        self, response: FunctionResponse | None, error: BaseException | None
    ) -> None:
        if self.done.is_set():
            return
        self.response = response
        self.error = error
        self.state = "DONE"
        self.done.set()


class Worker:
    """One worker process and its connections."""

    def __init__(
        self, worker_id: str, port: int, token: str, process: WorkerProcess, slots: int
    ) -> None:
        self.id = worker_id
        self.port = port
        self.token = token
        self.process = process
        self.slots = slots
        self.free = slots
        self.ready = False
        self.alive = True
        self.terminated = False
        self.died = False  # exited without being stopped by the pool
        self.idle_since = anyio.current_time()
        self.connections: list[Connection] = []

    @property
    def pid(self) -> int:
        """The worker's process id."""
        return self.process.pid

    def connection(self) -> Connection:
        return (
            self.connections.pop()
            if self.connections
            else Connection(self.port, self.token)
        )


def _close_log(handle: IO[bytes]) -> None:
    with contextlib.suppress(OSError):
        handle.close()


class WorkerPool:
    """The workers of one endpoint (see the module docstring).

    Args:
        resource: the endpoint's config (``workersMin``, ``workersMax``, ``idleTimeout``,
            ``env``).
        key: the endpoint's HMAC key, given to its workers.
        log_dir: where each worker's log file goes.
        batch_size: most jobs in one request to a worker.
        slots: jobs one worker runs at once.
        template: fork workers from this template process (else fresh interpreters).
        start_backoff_s: wait before the next start after a worker failed to start (doubled
            per failure in a row).
        start_backoff_max_s: the longest such wait (default: `default_start_backoff_max_s`).
    """

    def __init__(
        self,
        resource: ServerlessResource,
        key: bytes,
        *,
        log_dir: Path,
        batch_size: int = 8,
        slots: int = 8,
        routes: list[Route] | None = None,
        template: Template | None = None,
        start_backoff_s: float = 0.5,
        start_backoff_max_s: float | None = None,
    ) -> None:
        self.resource = resource
        self.template = template
        self.routes = routes or []
        self.key = key
        self.log_dir = log_dir
        self.batch_size = batch_size
        self.slots = slots
        self.queue: deque[_Job] = deque()
        self.workers: dict[str, Worker] = {}
        self.starting = 0
        self.started_total = 0
        self.start_seconds: list[float] = []  # start-to-ready time of each worker
        self._wake = anyio.Event()
        # The backend's classes, looked up once (``anyio.Event()`` asks sniffio every time).
        self._event_class: type[anyio.Event] = anyio.Event
        self._scope_class: type[anyio.CancelScope] = anyio.CancelScope
        self._tg: TaskGroup | None = None
        self._closed = False
        self.serving = False  # True once `run` has started
        self.failure: str | None = None  # why `run` failed, until it runs again
        self._logs: dict[str, IO[bytes]] = {}
        self._provisioned: set[tuple[str, ...]] = set()
        # worker start-up failures in a row, the last one's cause, no new start before this
        self.start_backoff_s = start_backoff_s
        self.start_backoff_max_s = (
            default_start_backoff_max_s()
            if start_backoff_max_s is None
            else start_backoff_max_s
        )
        self.start_failures = 0
        self.start_error: str | None = None
        self._start_after = 0.0
        # the log of the last failed start, reused by the next start: one file per chain
        self._failed_logs: list[Path] = []

    # --- lifecycle -----------------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the dispatcher and the reaper until cancelled; stop every worker on the way out."""
        self._event_class = type(anyio.Event())
        self._scope_class = type(anyio.CancelScope())
        self._closed = False  # run again by the provider after a crash
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                for _ in range(self.resource.workersMin):
                    self._start_worker()
                tg.start_soon(self._reaper)
                task_status.started()
                self.serving = True
                self.failure = None
                await self._dispatch_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await self.stop_all()

    async def stop_all(self) -> None:
        """Stop every worker: SIGTERM, then SIGKILL after 3 s; fail the jobs still queued."""
        self._closed = True
        self._fail_queued(DeliveryError("the endpoint was stopped before the job ran"))
        workers = list(self.workers.values())
        self.workers.clear()
        for worker in workers:
            await _terminate(worker)
            self._close_worker_log(worker.id)

    def _fail_queued(self, error: DeliveryError) -> None:
        """Fail every queued job with ``error`` (their callers wake up and raise it)."""
        for job in self.queue:
            job.finish(None, error)
            if job.started is not None:
                job.started.set()
        self.queue.clear()

    def _close_worker_log(self, worker_id: str) -> None:
        handle = self._logs.pop(worker_id, None)
        if handle is not None:
            _close_log(handle)

    # --- workers -------------------------------------------------------------------------

    def _start_worker(self) -> None:
        assert self._tg is not None  # noqa: S101
        self.starting += 1
        self._tg.start_soon(self._run_worker)

    def _start_wanted(self) -> None:
        """Start the workers the queue and ``workersMin`` call for, unless backing off."""
        if self._closed or (
            self._start_after and anyio.current_time() < self._start_after
        ):
            return
        if (
            self.queue
            and self.starting == 0
            and len(self.workers) < self.resource.workersMax
        ):
            self._start_worker()
        while len(self.workers) + self.starting < self.resource.workersMin:
            self._start_worker()

    def _start_blocked(self) -> DeliveryError | None:
        """The error new jobs get while the endpoint's workers cannot start, else ``None``."""
        if self.start_failures < START_TRIES or self.start_error is None:
            return None
        if any(w.ready for w in self.workers.values()):
            return None
        wait = self._start_after - anyio.current_time()
        if wait <= 0:
            return None  # backed off long enough: this job tries again
        msg = (
            f"endpoint {self.resource.name!r} cannot start its workers ({self.start_failures} "
            f"failed starts in a row; next try in {wait:.1f} s): {self.start_error}"
        )
        return DeliveryError(msg)

    async def _run_worker(self) -> None:
        """Start one worker, wait until it answers, then watch it until it exits.

        Never raises (but for cancellation): a worker that cannot start or exits before it
        answers is a start failure (`_start_failed`), which backs off further starts.
        """
        worker_id = f"{self.resource.name}-{secrets.token_hex(3)}"
        token = secrets.token_urlsafe(24)
        log_path = (
            self._failed_logs.pop()
            if self._failed_logs
            else self.log_dir / f"{worker_id}.log"
        )
        started = anyio.current_time()
        try:
            process, port = await self._spawn(worker_id, token, log_path)
        except ProcessLookupError:  # a fork that was gone before we could follow it
            await self._start_failed(worker_id, "exited before it answered", log_path)
            return
        except Exception as exc:  # noqa: BLE001 (one endpoint's failure stays here)
            await self._start_failed(
                worker_id, f"could not be started: {exc!r}", log_path
            )
            return
        worker = Worker(worker_id, port, token, process, self.slots)
        self.workers[worker_id] = worker
        self.started_total += 1
        ready = False
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch, worker, tg.cancel_scope)
                cold = not any(w.ready for w in self.workers.values())
                with (
                    progress(f"starting a worker for endpoint {self.resource.name!r}")
                    if cold
                    else nullcontext()
                ):
                    ready = await self._wait_ready(worker)
                if ready:
                    self.start_seconds.append(anyio.current_time() - started)
                    worker.ready = True
                    worker.idle_since = anyio.current_time()
                    self.start_failures = 0
                    self.start_error = None
                    self._start_after = 0.0
                    log.info(
                        "worker.ready",
                        endpoint=self.resource.name,
                        worker=worker_id,
                        pid=worker.pid,
                        seconds=round(anyio.current_time() - started, 3),
                    )
                    self._wake.set()
        finally:
            with anyio.CancelScope(shield=True):
                await _terminate(worker)  # also when it died: its connections are ours
                self.workers.pop(worker_id, None)
                self._close_worker_log(worker_id)
                self._wake.set()
        if not ready and not self._closed and worker.died:
            code = worker.process.returncode
            what = "exited before it answered"
            if code is not None and not isinstance(worker.process, PidfdProcess):
                what += f" (exit code {code})"
            await self._start_failed(worker_id, what, log_path)

    async def _spawn(
        self, worker_id: str, token: str, log_path: Path
    ) -> tuple[WorkerProcess, int]:
        """Start the worker process (a fork of the template, or a fresh interpreter)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind(("127.0.0.1", 0))
            sock.listen(512)
            port = sock.getsockname()[1]
            await anyio.Path(self.log_dir).mkdir(parents=True, exist_ok=True)
            env = {
                **os.environ,
                **self.resource.worker_env(),
                "FLASH_ENDPOINT_KEY": self.key.hex(),
                "FLASH_WORKER_TOKEN": token,
                "FLASH_WORKER_ID": worker_id,
                "FLASH_PARENT_PID": str(os.getpid()),
                "FLASH_CACHE_DIR": str(cache_root()),
                "PYTHONUNBUFFERED": "1",
                "MALLOC_MMAP_THRESHOLD_": "67108864",
                "MALLOC_TRIM_THRESHOLD_": "268435456",
            }
            env.pop("FLASH_SECRET", None)  # workers hold their endpoint's key only
            log.info(
                "worker.start", endpoint=self.resource.name, worker=worker_id, port=port
            )
            routes_file: Path | None = None
            if self.routes:
                routes_file = self.log_dir / f"{worker_id}.routes.json"
                routes_file.write_bytes(msgspec.json.encode(self.routes))
            if self.template is not None:
                try:
                    return await self.template.fork(
                        sock, env, log_path, routes_file
                    ), port
                except ProcessLookupError:
                    raise
                except OSError as exc:
                    # The template is gone and could not be started again: this worker
                    # starts as a fresh interpreter instead.
                    log.warning(
                        "worker.template_failed",
                        endpoint=self.resource.name,
                        worker=worker_id,
                        error=repr(exc),
                    )
            command = [sys.executable, "-m", "flash_actors.worker"]
            command += ["--fd", str(sock.fileno())]
            if routes_file is not None:
                command += ["--routes", str(routes_file)]
            handle = log_path.open("ab")
            self._logs[worker_id] = handle
            process = await anyio.open_process(
                command,
                pass_fds=[sock.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                env=env,
            )
            return process, port
        except BaseException:
            self._close_worker_log(worker_id)
            raise
        finally:
            sock.close()
            self.starting -= 1

    async def _start_failed(self, worker_id: str, what: str, log_path: Path) -> None:
        """Count a failed start, back off the next one; fail the queue after a few."""
        self.start_failures += 1
        delay = min(
            self.start_backoff_max_s,
            self.start_backoff_s * 2 ** min(self.start_failures - 1, 30),
        )
        # set before any await, so that no other start slips in meanwhile
        self._start_after = anyio.current_time() + delay
        self.start_error = f"worker {worker_id} {what} (log: {log_path})"
        if self._tg is not None and not self._closed:
            self._tg.start_soon(self._wake_after, delay)
        tail = await anyio.to_thread.run_sync(log_tail, log_path)
        if tail:
            self.start_error = (
                f"worker {worker_id} {what}; its log {log_path} ends with:\n{tail}"
            )
        if tail is not None:  # the next start appends to it: one log file per chain
            self._failed_logs = [log_path]
        log.warning(
            "worker.start_failed",
            endpoint=self.resource.name,
            worker=worker_id,
            failures=self.start_failures,
            retry_in_s=round(delay, 3),
            cause=self.start_error,
        )
        error = self._start_blocked()
        if error is not None:
            self._fail_queued(error)

    async def _wake_after(self, delay: float) -> None:
        await anyio.sleep(delay)
        self._wake.set()

    async def _wait_ready(self, worker: Worker) -> bool:
        conn = Connection(worker.port, worker.token)
        try:
            while worker.alive:
                try:
                    response = await conn.request("GET", "/ping")
                    await response.read()
                    if response.status == 200:
                        worker.connections.append(conn)
                        return True
                except DeliveryError:
                    await conn.aclose()
                    await anyio.sleep(0.01)
        finally:
            if not worker.connections:
                await conn.aclose()
        return False

    async def _watch(self, worker: Worker, scope: anyio.CancelScope) -> None:
        code = await worker.process.wait()
        worker.alive = False
        worker.died = not worker.terminated
        if not self._closed and worker.died:
            log.warning(
                "worker.exited",
                endpoint=self.resource.name,
                worker=worker.id,
                pid=worker.pid,
                returncode=code,
            )
        scope.cancel()  # `_run_worker` cleans up; the dispatcher starts what is wanted

    async def _reaper(self) -> None:
        """Stop workers idle longer than ``idleTimeout``, keeping ``workersMin``."""
        while True:
            await anyio.sleep(min(1.0, max(0.05, self.resource.idleTimeout / 4)))
            now = anyio.current_time()
            idle = [
                w
                for w in self.workers.values()
                if w.ready
                and w.free == w.slots
                and now - w.idle_since > self.resource.idleTimeout
            ]
            spare = len(self.workers) - self.resource.workersMin
            for worker in idle[: max(0, spare)]:
                log.info(
                    "worker.idle_stop", endpoint=self.resource.name, worker=worker.id
                )
                worker.ready = False
                await _terminate(worker)

    # --- jobs ----------------------------------------------------------------------------

    async def execute(
        self,
        call: Call,
        job_id: str,
        chunks: MemoryObjectSendStream[FunctionResponse] | None = None,
    ) -> FunctionResponse:
        """Queue a job and wait for its response, under the call's TTL and timeout.

        A job still queued after ``ttl_s`` expires; a job running past
        ``execution_timeout_s`` is stopped by recycling its worker (a thread cannot be
        interrupted). Cancelling the caller removes a queued job, or asks its worker to stop
        a running one.

        Raises:
            ExecutionTimeoutError: the job expired in the queue or ran past its timeout.
            DeliveryError: the worker died or could not be reached, or the endpoint's workers
                cannot start (retryable; see the module docstring).
        """
        if self._closed:
            msg = f"endpoint {self.resource.name!r} is stopped"
            if self.failure is not None:
                msg += f" after a failure ({self.failure}); it starts again shortly"
            raise DeliveryError(msg)
        blocked = self._start_blocked()
        if blocked is not None:
            raise blocked
        await self._provision(call.request)
        job = _Job(job_id, call.request, chunks, self._event_class)
        self.queue.append(job)
        self._dispatch()  # a free slot takes it now, without a pass through the dispatcher
        try:
            if job.state == "IN_QUEUE":
                job.started = self._event_class()
                with self._after(call.policy.ttl_s):
                    await job.started.wait()
            if job.state == "IN_QUEUE":
                self._dequeue(job)
                raise expired_error(call, job_id)
            with self._after(call.policy.execution_timeout_s):
                await job.done.wait()
            if not job.done.is_set() and job.worker is not None:
                log.warning(
                    "job.timeout",
                    endpoint=self.resource.name,
                    job_id=job_id,
                    worker=job.worker.id,
                )
                job.finish(None, timeout_error(call, job_id))
                await _terminate(job.worker)  # recycle: the replacement starts clean
        except BaseException:
            if job.state == "IN_QUEUE":
                self._dequeue(job)
            elif not job.done.is_set() and job.worker is not None:
                with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                    await self._cancel_on_worker(job.worker, job.id)
            job.finish(None, None)
            raise
        if job.error is not None:
            raise job.error
        assert job.response is not None  # noqa: S101
        return job.response

    def _after(self, seconds: float | None) -> anyio.CancelScope:
        """``anyio.move_on_after(seconds)``, made without a backend lookup when unbounded."""
        if seconds is None:
            return self._scope_class()
        return self._scope_class(deadline=anyio.current_time() + seconds)

    async def _provision(self, request: FunctionRequest) -> None:
        """Install the request's dependencies before it queues (once per set)."""
        steps = (
            ("apt", request.system_dependencies, ensure_system_packages),
            ("pip", request.dependencies, ensure_environment),
        )
        for kind, packages, install in steps:
            key = (kind, *(packages or ()))
            if packages and key not in self._provisioned:
                await install(packages, endpoint=self.resource.name)
                self._provisioned.add(key)

    def _dequeue(self, job: _Job) -> None:
        with contextlib.suppress(ValueError):
            self.queue.remove(job)

    async def _cancel_on_worker(self, worker: Worker, job_id: str) -> None:
        conn = Connection(worker.port, worker.token)
        try:
            response = await conn.request(
                "POST", "/cancel", _encoder.encode({"ids": [job_id]})
            )
            await response.read()
        except DeliveryError:
            pass  # the worker is gone or busy: the job dies with it, or is left to finish
        finally:
            await conn.aclose()

    async def _dispatch_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            self._dispatch()

    def _dispatch(self) -> None:
        assert self._tg is not None  # noqa: S101
        while self.queue:
            worker = max(
                (
                    w
                    for w in self.workers.values()
                    if w.ready and w.alive and w.free > 0
                ),
                key=lambda w: w.free,
                default=None,
            )
            if worker is None:
                break
            batch: list[_Job] = []
            while self.queue and len(batch) < min(self.batch_size, worker.free):
                if self.queue[0].chunks is not None and batch:
                    break  # a stream travels alone: its reader must not hold up others
                job = self.queue.popleft()
                job.state = "IN_PROGRESS"
                job.worker = worker
                if job.started is not None:
                    job.started.set()
                batch.append(job)
                if job.chunks is not None:
                    break
            worker.free -= len(batch)
            self._tg.start_soon(self._send_batch, worker, batch)
        self._start_wanted()

    async def _send_batch(self, worker: Worker, batch: list[_Job]) -> None:
        pending = {job.id: job for job in batch}
        conn = worker.connection()
        reusable = False
        jobs = [
            {"id": job.id, "request": job.request, "stream": job.chunks is not None}
            for job in batch
        ]
        body = _packer.encode({"jobs": jobs})
        try:
            response = await conn.request(
                "POST", "/execute", body, content_type=MSGPACK
            )
            if response.status != 200:
                text = (await response.read()).decode(errors="replace")
                msg = f"worker {worker.id} answered HTTP {response.status}: {text}"
                raise DeliveryError(msg)
            async with aclosing(response.frames()) as frames:
                async for frame in frames:
                    done = _done_decoder.decode(frame)
                    if done.chunk is not None:
                        streaming = pending.get(done.id)
                        if streaming is not None and streaming.chunks is not None:
                            try:
                                # Waiting here is the back-pressure on the worker's generator.
                                await streaming.chunks.send(done.chunk)
                            except (
                                anyio.BrokenResourceError,
                                anyio.ClosedResourceError,
                            ):
                                # The consumer left. A stream travels alone on its connection:
                                # closing it stops the generator on the worker at its next write.
                                msg = "the stream's consumer stopped reading"
                                raise DeliveryError(msg) from None
                        continue
                    job = pending.pop(done.id, None)
                    if job is None:
                        continue
                    worker.free += 1
                    if done.refused is not None:
                        refused = f"worker {worker.id} refused the job: {done.refused}"
                        job.finish(None, DeliveryError(refused))
                    else:
                        job.finish(done.response, None)
                    self._wake.set()
            reusable = not pending
        except (DeliveryError, msgspec.DecodeError) as exc:
            error = DeliveryError(
                f"worker {worker.id} (pid {worker.pid}) failed during the job: {exc}"
            )
            for job in pending.values():
                job.finish(None, error)
        finally:
            # Jobs still pending here failed above, or their callers were cancelled; else
            # the pool itself stops around them (or failed): they are retried, not lost.
            for job in pending.values():
                job.finish(None, DeliveryError(f"worker {worker.id}'s pool stopped"))
            worker.free += len(pending)
            if reusable and worker.alive:
                worker.connections.append(conn)
            else:
                await conn.aclose()
            if worker.free == worker.slots:
                worker.idle_since = anyio.current_time()
            self._wake.set()

    def statistics(self) -> dict[str, Any]:
        """Queue depth and workers, for status displays."""
        return {
            "queued": len(self.queue),
            "workers": len(self.workers),
            "ready": sum(1 for w in self.workers.values() if w.ready),
            "starting": self.starting,
            "busy_slots": sum(w.slots - w.free for w in self.workers.values()),
        }


def log_tail(path: Path) -> str | None:
    """The last lines of a log file (a few KB at most); ``None`` when there is none."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - _LOG_TAIL_BYTES))
            data = f.read()
    except OSError:
        return None
    lines = data.decode(errors="replace").strip().splitlines()
    return "\n".join(lines[-15:])


async def _terminate(worker: Worker) -> None:
    """SIGTERM, then SIGKILL after 3 s; always reap the process (idempotent)."""
    worker.alive = False
    if worker.terminated:
        return
    worker.terminated = True
    for conn in worker.connections:
        await conn.aclose()
    worker.connections.clear()
    await stop_process(worker.process)


class LocalBackend:
    """The `EndpointBackend` of the local provider: a `WorkerPool` run in the provider's tasks."""

    capacity = 1 << 20  # the pool queues; the Endpoint actor need not hold jobs back

    def __init__(self, pool: WorkerPool, scope: anyio.CancelScope) -> None:
        self.pool = pool
        self._scope = scope

    async def execute(
        self,
        call: Call,
        *,
        job_id: str,
        chunks: MemoryObjectSendStream[FunctionResponse] | None = None,
    ) -> FunctionResponse:
        """Run the job on one of the pool's workers."""
        return await self.pool.execute(call, job_id, chunks)

    async def aclose(self) -> None:
        """Stop the pool and its workers."""
        with anyio.CancelScope(shield=True):
            await self.pool.stop_all()
        self._scope.cancel()
