"""A pool of real worker processes for one endpoint, and the queue that feeds them.

Each worker is ``python -m flash_actors.worker`` serving HTTP on a loopback socket that this
process bound and handed over (so the port is known before the worker has started, and early
requests wait in the listen backlog). Jobs wait in the pool's FIFO queue. A worker runs at
most ``max_concurrency`` jobs at once (the endpoint's setting, default 1, as on RunPod), so
an endpoint runs ``workersMax x max_concurrency`` jobs in parallel. The dispatcher sends a
worker the jobs it can start now; only when every worker is busy and no more can be started
does it hand workers a few more to start next (up to ``batch_size`` each, in the same HTTP
request as the jobs that worker starts now, and at least half a batch at a time to a worker
that still has jobs waiting there; the worker streams each result back as it finishes: that
is where fan-out throughput comes from). A worker that frees up while jobs wait in another's
batch takes them back (``/withdraw``), so no job waits on a busy worker while another is
idle.

The pool keeps ``workersMin`` workers warm, starts more up to ``workersMax`` while jobs wait,
stops workers idle longer than ``idleTimeout``, and replaces workers that die. A worker killed
mid-job fails that job with `DeliveryError`, which the Endpoint actor retries by policy; jobs
it had not started yet go back to the queue. A cancelled or timed-out job is cancelled on its
worker; if it cannot be interrupted (a sync function in a thread), the worker is recycled, and
its slot counts as busy until the process is gone.

A worker that cannot start (it exits before it answers, or within `EARLY_EXIT_S` of
answering before any job reached it, or cannot be spawned at all) is a start failure: the
next start waits for an exponential backoff (``start_backoff_s``, doubled per failure in a
row, capped at ``start_backoff_max_s``), and after `START_TRIES` failures in a row the
queued jobs fail with `DeliveryError` naming the cause (the end of the worker's log),
as do new jobs until the backoff has passed; then a new job tries again. The first worker that
answers ends it. Nothing that goes wrong in one pool reaches the task group it runs in.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
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

from flash_actors._clock import loop_clock
from flash_actors._logging import get_logger
from flash_actors._private import open_private, private_dir, write_private
from flash_actors._progress import progress
from flash_actors._wake import Wake, wake_class
from flash_actors.errors import (
    DeliveryError,
    PayloadSignatureError,
    SerializationError,
)
from flash_actors.messages import Call, FunctionRequest, FunctionResponse, Route
from flash_actors.policies import expired_error, timeout_error
from flash_actors.providers.base import ENFORCES_ALL
from flash_actors.providers.local._http import Connection
from flash_actors.providers.local._processes import PidfdProcess, stop_process
from flash_actors.providers.local.volumes import apply_volume
from flash_actors.serialization import master_secret, verify_request
from flash_actors.worker import isolation
from flash_actors.worker.installer import (
    cache_root,
    ensure_environment,
    ensure_system_packages,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine
    from pathlib import Path

    from anyio.abc import TaskGroup
    from anyio.streams.memory import MemoryObjectSendStream

    from flash_actors.providers.local._processes import Template, WorkerProcess
    from flash_actors.providers.local.gpus import EndpointGpus, GpuLease
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
EARLY_EXIT_S = 1.0
"""A worker that dies this soon after it answered, before any job reached it, failed to
start (a deployed module that ends the process, say): it backs off like one."""
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


class _Done(msgspec.Struct, frozen=True, gc=False):
    id: str
    response: FunctionResponse | None = None
    chunk: FunctionResponse | None = None
    refused: str | None = None
    started: bool = False
    withdrawn: bool = False


_done_decoder = msgspec.msgpack.Decoder(_Done)
_packer = msgspec.msgpack.Encoder()
MSGPACK = "application/msgpack"  # see flash_actors.worker.server


class _Job:
    __slots__ = (
        "chunks",
        "deadline",
        "delivered",
        "error",
        "finished",
        "id",
        "request",
        "response",
        "running",
        "state",
        "ticket",
        "timeout",
        "waiting",
        "wake",
        "withdrawing",
        "worker",
    )

    def __init__(
        self,
        job_id: str,
        request: FunctionRequest,
        chunks: MemoryObjectSendStream[FunctionResponse] | None,
        wake_class: type[Wake],
    ) -> None:
        self.id = job_id
        self.request = request
        self.chunks = chunks
        self.finished = False  # answered, failed or given up: see `finish`
        self.wake = wake_class()  # set by `finish`, or when a deadline has passed
        self.response: FunctionResponse | None = None
        self.error: BaseException | None = None
        self.state = "IN_QUEUE"  # then SENT (waiting on a worker), IN_PROGRESS, DONE
        self.worker: Worker | None = None
        # The worker's side, kept apart from ``state`` (a caller may give up first):
        self.running = False  # started on its worker, no answer yet
        self.delivered = False  # its worker has it (a withdrawal can find it)
        self.withdrawing = False
        # The caller's one wait: until the TTL while queued, then until the execution
        # timeout from the start (``deadline`` moves when the job starts; see `start`).
        self.timeout: float | None = None
        self.deadline = math.inf
        self.waiting = False  # its caller waits on ``wake``
        self.ticket: list[_Job | None] | None = None  # its entries in the deadline heap

    def start(self, now: float) -> None:
        """It runs on its worker now (``now``: the event loop's clock)."""
        if self.state == "SENT":
            self.state = "IN_PROGRESS"
        self.deadline = math.inf if self.timeout is None else now + self.timeout

    def finish(
        self, response: FunctionResponse | None, error: BaseException | None
    ) -> None:
        if self.finished:
            return
        self.response = response
        self.error = error
        self.state = "DONE"
        self.finished = True
        self.wake.set()


class Worker:
    """One worker process and its connections.

    ``slots`` is the endpoint's ``max_concurrency``: jobs it runs at once. ``jobs`` holds
    every job sent to it and not answered yet, started (``running`` of them) or waiting
    there for a slot.
    """

    def __init__(
        self, worker_id: str, port: int, token: str, process: WorkerProcess, slots: int
    ) -> None:
        self.id = worker_id
        self.port = port
        self.token = token
        self.process = process
        self.slots = slots
        self.jobs: dict[str, _Job] = {}
        self.running = 0
        self.ready = False
        self.alive = True
        self.terminated = False
        self.died = False  # exited without being stopped by the pool
        self.idle_since = anyio.current_time()
        self.connections: list[Connection] = []
        self.served = False  # a job was sent to it
        self.prior_failures = 0  # the pool's failed starts in a row when it answered

    @property
    def pid(self) -> int:
        """The worker's process id."""
        return self.process.pid

    @property
    def free(self) -> int:
        """Jobs it could start now (negative while jobs wait there)."""
        return self.slots - len(self.jobs)

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
        batch_size: most jobs in one request to a worker, and most jobs handed to a busy
            worker to start next (only while every worker is busy and no more can start).
        template: fork workers from this template process (else fresh interpreters).
        start_backoff_s: wait before the next start after a worker failed to start (doubled
            per failure in a row).
        start_backoff_max_s: the longest such wait (default: `default_start_backoff_max_s`).
        gpus: the devices its workers may hold (`flash_actors.providers.local.gpus`): each
            worker starts only with a lease of its own, given back when its process is gone.
        entry: a generated ``handler_<resource>.py`` in an unpacked build: each worker is
            then ``python handler_<resource>.py`` in that folder (our worker in deployed
            mode, with the build's runtime and dependencies; never forked from the
            template), and holds the app's secret (``FLASH_SECRET``) to sign its calls to
            the app's other resources.
    """

    def __init__(
        self,
        resource: ServerlessResource,
        key: bytes,
        *,
        log_dir: Path,
        batch_size: int = 8,
        routes: list[Route] | None = None,
        template: Template | None = None,
        start_backoff_s: float = 0.5,
        start_backoff_max_s: float | None = None,
        gpus: EndpointGpus | None = None,
        worker_env: Callable[[], Awaitable[dict[str, str]]] | None = None,
        entry: Path | None = None,
    ) -> None:
        self.resource = resource
        self.entry = entry
        self.worker_env = worker_env
        self.gpus = gpus
        if gpus is not None:
            gpus.on_release(lambda: self._wake.set())  # a device to start a worker with
        self.template = template
        self.routes = routes or []
        self.key = key
        self.log_dir = log_dir
        self.batch_size = max(1, batch_size)
        self.slots = resource.max_concurrency  # jobs one worker runs at once
        self.queue: deque[_Job] = deque()
        self.workers: dict[str, Worker] = {}
        self.starting = 0
        self.started_total = 0
        self.start_seconds: list[float] = []  # start-to-ready time of each worker
        self._wake = anyio.Event()
        # The backend's classes, looked up once (``anyio.Event()`` asks sniffio every time).
        self._event_class: type[anyio.Event] = anyio.Event
        self._wake_class: type[Wake] = anyio.Event  # a job's (one waiter: its caller)
        self._scope_class: type[anyio.CancelScope] = anyio.CancelScope
        self._clock: Callable[[], float] = anyio.current_time
        # The callers' deadlines (TTL, then execution timeout), watched by one task
        # (`_watch_deadlines`) instead of a timer per job: (deadline, seq, ticket).
        self._deadlines: list[tuple[float, int, list[_Job | None]]] = []
        self._deadline_seq = itertools.count()
        self._next_deadline = math.inf
        self._deadline_wake = anyio.Event()
        self._waiting = 0  # callers waiting on their jobs
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
        self._wake_class = wake_class()
        self._scope_class = type(anyio.CancelScope())
        self._clock = loop_clock()
        self._deadline_wake = self._event_class()
        self._next_deadline = math.inf
        self._closed = False  # run again by the provider after a crash
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                for _ in range(self.resource.workersMin):
                    self._start_worker()
                tg.start_soon(self._reaper)
                tg.start_soon(self._watch_deadlines)
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
        self.queue.clear()

    def _close_worker_log(self, worker_id: str) -> None:
        handle = self._logs.pop(worker_id, None)
        if handle is not None:
            _close_log(handle)

    # --- workers -------------------------------------------------------------------------

    def _start_worker(self) -> bool:
        """Start a worker; False when its GPUs are held by others (a release wakes us)."""
        assert self._tg is not None  # noqa: S101
        lease = self.gpus.take() if self.gpus is not None else None
        if self.gpus is not None and lease is None:
            return False
        self.starting += 1
        self._tg.start_soon(self._run_leased, lease)
        return True

    async def _run_leased(self, lease: GpuLease | None) -> None:
        """`_run_worker` with the worker's GPUs, given back once its process is gone."""
        try:
            await self._run_worker(lease.env if lease is not None else {})
        finally:
            if lease is not None:
                lease.release()

    def _may_start(self) -> bool:
        """False while the pool is closed or backing off after failed starts."""
        return not self._closed and not (
            self._start_after and anyio.current_time() < self._start_after
        )

    def _start_min(self) -> None:
        """Start the workers ``workersMin`` calls for, unless backing off."""
        if self._may_start():
            while len(self.workers) + self.starting < self.resource.workersMin:
                if not self._start_worker():
                    break

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

    async def _run_worker(self, gpu_env: dict[str, str]) -> None:
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
            process, port = await self._spawn(worker_id, token, log_path, gpu_env)
        except ProcessLookupError:  # a fork that was gone before we could follow it
            if self.template is not None and self.template.lost(self.template.pid):
                self._lost_with_template(worker_id)
            else:
                await self._start_failed(
                    worker_id, "exited before it answered", log_path
                )
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
                    worker.prior_failures = self.start_failures
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
        early = (
            ready
            and not worker.served
            and anyio.current_time() - worker.idle_since < EARLY_EXIT_S
        )
        if (early or not ready) and not self._closed and worker.died:
            if (
                self.template is not None
                and isinstance(worker.process, PidfdProcess)
                and self.template.lost(worker.process.template_pid)
            ):
                self._lost_with_template(worker_id)
                return
            code = worker.process.returncode
            what = (
                "exited right after it started"
                if early
                else "exited before it answered"
            )
            if code is not None and not isinstance(worker.process, PidfdProcess):
                what += f" (exit code {code})"
            if early:  # the chain of failed starts goes on
                self.start_failures = max(self.start_failures, worker.prior_failures)
            await self._start_failed(worker_id, what, log_path)

    async def _spawn(
        self, worker_id: str, token: str, log_path: Path, gpu_env: dict[str, str]
    ) -> tuple[WorkerProcess, int]:
        """Start the worker process (a fork of the template, or a fresh interpreter)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind(("127.0.0.1", 0))
            sock.listen(512)
            port = sock.getsockname()[1]
            private_dir(self.log_dir)
            env = {
                **os.environ,
                **self.resource.worker_env(),
                **isolation.endpoint_env(self.resource),  # its RunPod image's kind
                **gpu_env,  # CUDA_VISIBLE_DEVICES: its own GPUs, or "" (none)
                "FLASH_ENDPOINT_KEY": self.key.hex(),
                "FLASH_WORKER_TOKEN": token,
                "FLASH_WORKER_ID": worker_id,
                "FLASH_ENDPOINT_NAME": self.resource.name,
                "FLASH_PARENT_PID": str(os.getpid()),
                "FLASH_CACHE_DIR": str(cache_root()),
                "PYTHONUNBUFFERED": "1",
                "MALLOC_MMAP_THRESHOLD_": "67108864",
                "MALLOC_TRIM_THRESHOLD_": "268435456",
            }
            env.pop("FLASH_SECRET", None)  # workers hold their endpoint's key only
            if self.worker_env is not None:
                env.update(await self.worker_env())
            if (
                self.entry is not None
            ):  # a deployed app's worker: see the class docstring
                env.pop("PYTHONPATH", None)  # the build's packages, nothing else's
                env.pop("PYTHONSAFEPATH", None)  # the handler imports from its folder
                env["FLASH_SECRET"] = master_secret().hex()
            apply_volume(self.resource, env)  # its network volume, if it has one
            log.info(
                "worker.start", endpoint=self.resource.name, worker=worker_id, port=port
            )
            routes_file: Path | None = None
            if self.routes:
                routes_file = self.log_dir / f"{worker_id}.routes.json"
                write_private(routes_file, msgspec.json.encode(self.routes))
            if self.template is not None and self.entry is None:
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
            command = (
                [sys.executable, "-m", "flash_actors.worker"]
                if self.entry is None
                else [sys.executable, str(self.entry)]
            )
            command += ["--fd", str(sock.fileno())]
            if routes_file is not None:
                command += ["--routes", str(routes_file)]
            handle = os.fdopen(open_private(log_path), "ab")
            self._logs[worker_id] = handle
            process = await anyio.open_process(
                command,
                pass_fds=[sock.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.entry.parent if self.entry is not None else None,
            )
            return process, port
        except BaseException:
            self._close_worker_log(worker_id)
            raise
        finally:
            sock.close()
            self.starting -= 1

    def _lost_with_template(self, worker_id: str) -> None:
        """A worker died with its template: not a failed start; the next one may go."""
        log.warning(
            "worker.lost_with_template", endpoint=self.resource.name, worker=worker_id
        )
        self._wake.set()

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
                and not w.jobs
                and now - w.idle_since > self.resource.idleTimeout
            ]
            spare = len(self.workers) - self.resource.workersMin
            for worker in idle[: max(0, spare)]:
                if worker.jobs or not worker.ready:
                    continue  # it took a job while the one before was stopping
                log.info(
                    "worker.idle_stop", endpoint=self.resource.name, worker=worker.id
                )
                worker.ready = False
                await _terminate(worker)

    # --- jobs ----------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Most jobs this pool's workers hold at once: running, and handed ahead."""
        return max(1, self.resource.workersMax) * (self.slots + self.batch_size)

    async def execute(
        self,
        call: Call,
        job_id: str,
        chunks: MemoryObjectSendStream[FunctionResponse] | None = None,
    ) -> FunctionResponse:
        """Queue a job and wait for its response, under the call's TTL and timeout.

        A job not started on a worker after ``ttl_s`` expires; a job running past
        ``execution_timeout_s`` is stopped. Cancelling the caller removes a queued job, or
        stops a sent one on its worker before this returns: an async function is cancelled;
        code that cannot be interrupted (a sync function in a thread) is stopped by
        recycling its worker, whose slot stays busy until the process is gone.

        Raises:
            ExecutionTimeoutError: the job expired in the queue or ran past its timeout.
            DeliveryError: the worker died or could not be reached, or the endpoint's workers
                cannot start (retryable; see the module docstring).
        """
        # Its frame waits with every call in flight: few locals (see `_check_open`).
        self._check_open()
        if call.request.dependencies or call.request.system_dependencies:
            await self._provision(call.request)
        job = _Job(job_id, call.request, chunks, self._wake_class)
        job.timeout = call.policy.execution_timeout_s
        self.queue.append(job)
        if len(self.queue) == 1:
            self._dispatch()  # a free slot takes it now, without the dispatcher's pass
        else:  # jobs wait already: one dispatcher pass for all that queue meanwhile
            self._wake.set()
        ticket: list[_Job | None] = [job]
        self._waiting += 1
        try:
            if job.state in ("IN_QUEUE", "SENT"):
                job.deadline = (
                    math.inf
                    if call.policy.ttl_s is None
                    else self._clock() + call.policy.ttl_s
                )
            # One wait: `_start_job` moves the deadline from the TTL to the execution
            # timeout, and `_watch_deadlines` wakes the caller once it has passed. A
            # deadline moved after it fired is waited for again.
            job.ticket = ticket
            while not job.finished:
                self._watch_deadline(ticket, job.deadline)
                job.waiting = True
                await job.wake.wait()
                job.waiting = False
                if self._clock() >= job.deadline:
                    break
                if job.wake.is_set():  # woken for a deadline that moved meanwhile
                    job.wake = self._wake_class()
            if job.state in ("IN_QUEUE", "SENT"):
                raise expired_error(call, job_id)  # removed below
            if not job.finished and job.worker is not None:
                log.warning(
                    "job.timeout",
                    endpoint=self.resource.name,
                    job_id=job_id,
                    worker=job.worker.id,
                )
                job.finish(None, timeout_error(call, job_id))
                await self._stop_job(job)
        except BaseException:
            job.waiting = False
            ticket[0] = job.ticket = None
            await self._abandon(job)
            raise
        finally:
            self._waiting -= 1
        ticket[0] = job.ticket = None
        if job.error is not None:
            raise job.error
        assert job.response is not None  # noqa: S101
        return job.response

    def _check_open(self) -> None:
        """Refuse a job while the endpoint is stopped or cannot start its workers.

        Raises:
            DeliveryError: why (retryable; see the module docstring).
        """
        if self._closed:
            msg = f"endpoint {self.resource.name!r} is stopped"
            if self.failure is not None:
                msg += f" after a failure ({self.failure}); it starts again shortly"
            raise DeliveryError(msg)
        blocked = self._start_blocked()
        if blocked is not None:
            raise blocked
        if self.gpus is not None:
            self.gpus.check()  # no local GPU can serve the endpoint: say so

    async def _abandon(self, job: _Job) -> None:
        """The caller of ``job`` is gone (cancelled): drop it from the queue, or stop it."""
        queued, sent = job.state == "IN_QUEUE", not job.finished
        # Finished first: a job its worker gives back meanwhile (withdrawn, or the worker
        # recycled) is not requeued, so a cancelled job never starts elsewhere.
        job.finish(None, None)
        if queued:
            self._dequeue(job)
        elif sent:
            await self._stop_job(job)

    def _watch_deadline(self, ticket: list[_Job | None], deadline: float) -> None:
        """Have `_watch_deadlines` cancel the wait of ``ticket``'s job at ``deadline``."""
        if deadline == math.inf:
            return
        heapq.heappush(self._deadlines, (deadline, next(self._deadline_seq), ticket))
        if deadline < self._next_deadline:
            self._next_deadline = deadline
            self._deadline_wake.set()

    def _start_job(self, job: _Job, now: float) -> None:
        """``job`` runs on its worker now: its caller waits until its execution timeout."""
        job.start(now)
        if job.ticket is not None and job.waiting:
            self._watch_deadline(job.ticket, job.deadline)

    async def _watch_deadlines(self) -> None:
        """Wake the callers whose job's deadline has passed (see `execute`).

        One task and one heap for every job (a timer per job cost ~10 us of the caller's
        time each, most of it in the event loop's timer heap).
        """
        heap = self._deadlines
        while True:
            now = self._clock()
            while heap and heap[0][0] <= now:
                deadline, _, ticket = heapq.heappop(heap)
                job = ticket[0]
                if job is not None and job.deadline == deadline and job.waiting:
                    job.wake.set()
            if len(heap) > 2 * self._waiting + 1024:  # mostly answered jobs' entries
                heap[:] = [entry for entry in heap if entry[2][0] is not None]
                heapq.heapify(heap)
            self._next_deadline = heap[0][0] if heap else math.inf
            self._deadline_wake = self._event_class()
            with self._scope_class(deadline=self._next_deadline):
                await self._deadline_wake.wait()

    async def _provision(self, request: FunctionRequest) -> None:
        """Install the request's dependencies before it queues (once per set).

        A request that would install something is authenticated first (the dependency lists
        are signed with the code), so an unsigned or altered request installs nothing; a set
        already provisioned costs one set lookup, not a signature check.

        Raises:
            PayloadSignatureError: the request is unsigned or its signature does not match.
            ConfigurationError: a package spec is not a plain requirement or package name.
            DependencyInstallError: pip or apt-get could not install them.
        """
        steps = (
            ("apt", request.system_dependencies, ensure_system_packages),
            ("pip", request.dependencies, ensure_environment),
        )
        verified = False
        for kind, packages, install in steps:
            key = (kind, *(packages or ()))
            if packages and key not in self._provisioned:
                if not verified:
                    verify_request(request, self.key)
                    verified = True
                await install(packages, endpoint=self.resource.name)
                self._provisioned.add(key)

    def _dequeue(self, job: _Job) -> None:
        with contextlib.suppress(ValueError):
            self.queue.remove(job)

    async def _stop_job(self, job: _Job) -> None:
        """Stop a job sent to a worker; recycle the worker if the job cannot be interrupted.

        Shielded, and bounded: 2 s for the worker's answer, then `_terminate`'s own bound.
        """
        worker = job.worker
        if worker is None or job.id not in worker.jobs:
            return  # answered already
        with anyio.CancelScope(shield=True):
            stopped = False
            with anyio.move_on_after(2):
                answer = await self._post(worker, "/cancel", {"ids": [job.id]})
                stopped = answer is not None and job.id not in answer.get("stuck", [])
            if not stopped and not worker.terminated:
                log.warning(
                    "job.recycle",
                    endpoint=self.resource.name,
                    job_id=job.id,
                    worker=worker.id,
                    pid=worker.pid,
                    reason="the cancelled job cannot be interrupted",
                )
                await _terminate(worker)  # the replacement starts clean

    async def _post(
        self, worker: Worker, path: str, payload: dict[str, Any]
    ) -> dict[str, Any] | None:
        """A small control request to a worker; ``None`` when it cannot be reached."""
        conn = Connection(worker.port, worker.token)
        try:
            response = await conn.request("POST", path, _encoder.encode(payload))
            body = await response.read()
            if response.status != 200:
                return None
            answer: dict[str, Any] = msgspec.json.decode(body)
        except (DeliveryError, msgspec.DecodeError):
            return None  # the worker is gone or broken
        finally:
            await conn.aclose()
        return answer

    async def _dispatch_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            self._dispatch()

    def _dispatch(self) -> None:
        """Hand queued jobs to workers (see the module docstring for the rule)."""
        self._start_min()
        ready = [w for w in self.workers.values() if w.ready and w.alive]
        outgoing: dict[Worker, list[tuple[list[_Job], bool]]] = {}
        try:
            self._assign(ready, outgoing)
        finally:
            self._send_all(outgoing)

    def _assign(
        self, ready: list[Worker], outgoing: dict[Worker, list[tuple[list[_Job], bool]]]
    ) -> None:
        """Take jobs off the queue for ``ready`` workers into ``outgoing``."""
        # 1. Jobs a worker can start now, to the worker with the most free slots.
        while self.queue:
            worker = max(ready, key=lambda w: w.free, default=None)
            if worker is None or worker.free <= 0:
                break
            self._take(worker, min(self.batch_size, worker.free), outgoing, ahead=False)
        if not self.queue:
            self._rebalance(ready)
            return
        # 2. More workers, while the endpoint may have them; the jobs wait for them here.
        coming = self.starting + sum(
            1 for w in self.workers.values() if w.alive and not w.ready
        )
        room = self.resource.workersMax - len(self.workers) - self.starting
        if room > 0:
            if self._may_start():
                wanted = -(-len(self.queue) // self.slots) - coming
                for _ in range(min(room, wanted)):
                    if not self._start_worker():
                        break  # its GPUs are held elsewhere: a release wakes us
            return
        if coming:
            return
        # 3. Every worker busy, none can start: hand each a few jobs to start next, topped
        # up once half of them have started (fewer, fuller requests), shared out evenly.
        # They travel in the same request as the jobs that worker starts now, if any. A
        # worker that still has jobs waiting there is topped up only with half a batch or
        # more: jobs that come one at a time (through the daemon, one per finished job)
        # would otherwise go one per request, which costs the worker more than the job.
        low = max(1, self.batch_size // 2)
        while self.queue:
            enough = len(self.queue) >= low
            ahead = [
                w
                for w in ready
                if w.free + self.batch_size >= low
                and (enough or len(w.jobs) <= w.running)
            ]
            if not ahead:
                break
            share = -(-len(self.queue) // len(ahead))
            for worker in sorted(ahead, key=lambda w: -w.free):
                if self.queue:
                    self._take(
                        worker,
                        min(share, worker.free + self.batch_size),
                        outgoing,
                        ahead=True,
                    )

    def _take(
        self,
        worker: Worker,
        count: int,
        outgoing: dict[Worker, list[tuple[list[_Job], bool]]],
        *,
        ahead: bool,
    ) -> None:
        """Take up to ``count`` queued jobs for ``worker`` (sent by `_send_all`)."""
        batch: list[_Job] = []
        now = self._clock()
        while self.queue and len(batch) < count:
            if self.queue[0].chunks is not None and batch:
                break  # a stream travels alone: its reader must not hold up others
            job = self.queue.popleft()
            job.worker = worker
            worker.served = True
            job.delivered = job.withdrawing = False
            worker.jobs[job.id] = job
            if ahead:
                job.state = "SENT"
            else:
                job.state = "IN_PROGRESS"
                job.running = True
                worker.running += 1
                self._start_job(job, now)
            batch.append(job)
            if job.chunks is not None:
                break
        if batch:
            outgoing.setdefault(worker, []).append((batch, ahead))

    def _send_all(self, outgoing: dict[Worker, list[tuple[list[_Job], bool]]]) -> None:
        """One request per worker for the jobs `_assign` took (a stream's goes alone)."""
        assert self._tg is not None  # noqa: S101
        for worker, batches in outgoing.items():
            jobs: list[_Job] = []
            ahead: list[bool] = []
            for batch, handed_ahead in batches:
                alone = batch[0].chunks is not None
                if jobs and (alone or jobs[0].chunks is not None):
                    self._tg.start_soon(self._send_batch, worker, jobs, ahead)
                    jobs, ahead = [], []
                jobs += batch
                ahead += [handed_ahead] * len(batch)
            self._tg.start_soon(self._send_batch, worker, jobs, ahead)

    def _rebalance(self, ready: list[Worker]) -> None:
        """Let workers with free slots take back jobs waiting in other workers' batches."""
        assert self._tg is not None  # noqa: S101
        room = sum(max(0, w.free) for w in ready)
        if not room:
            return
        donors = [
            (w, [j for j in w.jobs.values() if j.delivered and not j.running])
            for w in self.workers.values()
            if w.running < len(w.jobs)
        ]
        for worker, waiting in sorted(donors, key=lambda d: -len(d[1])):
            # The newest: the donor starts its oldest next.
            waiting = [j for j in waiting if not j.withdrawing]
            taken = waiting[len(waiting) - min(room, len(waiting)) :]
            if not taken:
                continue
            for job in taken:
                job.withdrawing = True
            self._tg.start_soon(self._withdraw, worker, taken)
            room -= len(taken)
            if room <= 0:
                return

    async def _withdraw(self, worker: Worker, jobs: list[_Job]) -> None:
        """Ask ``worker`` for its unstarted ``jobs`` back; they return through its batch."""
        answer = await self._post(worker, "/withdraw", {"ids": [j.id for j in jobs]})
        if answer is None:
            for job in jobs:
                job.withdrawing = False

    def _requeue(self, jobs: list[_Job]) -> None:
        """Put jobs that never started back at the head of the queue, in order."""
        for job in reversed(jobs):
            job.worker = None
            job.running = job.delivered = job.withdrawing = False
            if self._closed:
                job.finish(
                    None, DeliveryError("the endpoint was stopped before the job ran")
                )
            elif not job.finished:
                job.state = "IN_QUEUE"
                self.queue.appendleft(job)
        self._wake.set()

    def _answered(self, worker: Worker, job: _Job) -> None:
        """The worker is done with ``job`` (answered, withdrawn, or gone)."""
        worker.jobs.pop(job.id, None)
        if job.running:
            job.running = False
            worker.running -= 1

    async def _send_batch(
        self, worker: Worker, batch: list[_Job], ahead: list[bool]
    ) -> None:
        """Send ``batch`` in one request; ``ahead``: each job waits there for a slot."""
        pending = {job.id: job for job in batch}
        conn = worker.connection()
        reusable = False
        jobs = [
            {
                "id": job.id,
                "request": job.request,
                "stream": job.chunks is not None,
                "ahead": waits,
            }
            for job, waits in zip(batch, ahead, strict=True)
        ]
        body = _packer.encode({"jobs": jobs, "concurrency": worker.slots})
        try:
            response = await conn.request(
                "POST", "/execute", body, content_type=MSGPACK
            )
            if response.status != 200:
                text = (await response.read()).decode(errors="replace")
                msg = f"worker {worker.id} answered HTTP {response.status}: {text}"
                raise DeliveryError(msg)
            for job in pending.values():
                job.delivered = True
            if True in ahead:
                self._wake.set()  # an idle worker may take some of these back
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
                    if done.started:
                        starting = pending.get(done.id)
                        if starting is not None and not starting.running:
                            starting.running = True
                            worker.running += 1
                            self._start_job(starting, self._clock())
                        continue
                    answered = pending.pop(done.id, None)
                    if answered is None:
                        continue
                    job = answered
                    self._answered(worker, job)
                    if done.withdrawn:
                        self._requeue([job])
                    elif done.refused is not None:
                        # Final, not retried: the same request would be refused again.
                        refused = f"worker {worker.id} refused the job: {done.refused}"
                        signature = done.refused.startswith("PayloadSignatureError")
                        kind = (
                            PayloadSignatureError if signature else SerializationError
                        )
                        job.finish(None, kind(refused))
                    elif _stopped_by_worker(done.response) and not job.finished:
                        # Its caller did not cancel it (that finishes the job first): the
                        # worker stopped it on its way out (recycled for another job's sake,
                        # or SIGTERM). The worker died mid-job: retried, not "cancelled".
                        job.finish(
                            None,
                            DeliveryError(
                                f"worker {worker.id} (pid {worker.pid}) was stopped "
                                "during the job"
                            ),
                        )
                    else:
                        job.finish(done.response, None)
                    self._redispatch()
            reusable = not pending
        except (DeliveryError, msgspec.DecodeError) as exc:
            error = DeliveryError(
                f"worker {worker.id} (pid {worker.pid}) failed during the job: {exc}"
            )
            if worker.terminated:
                # Recycled: its jobs hold their slots until the process is gone (its
                # sockets close a moment before it has exited).
                with anyio.move_on_after(5):
                    await worker.process.wait()
            unstarted = [job for job in pending.values() if not job.running]
            for job in pending.values():
                if job.running:
                    job.finish(None, error)
            for job in pending.values():
                self._answered(worker, job)
            pending.clear()
            self._requeue(unstarted)  # they never ran: they go to another worker
        finally:
            # Jobs still pending here failed above, or their callers were cancelled; else
            # the pool itself stops around them (or failed): they are retried, not lost.
            for job in pending.values():
                job.finish(None, DeliveryError(f"worker {worker.id}'s pool stopped"))
                self._answered(worker, job)
            if reusable and worker.alive:
                worker.connections.append(conn)
            else:
                await conn.aclose()
            if not worker.jobs:
                worker.idle_since = anyio.current_time()
            if reusable:
                self._redispatch()
            else:
                self._wake.set()

    def _redispatch(self) -> None:
        """Wake the dispatcher if a freed slot has anything to take.

        That is a queued job, or one waiting in another worker's batch (taken back for it);
        else the pass would find nothing to do (a lone call's answer would cost a wake-up).
        """
        if self.queue or any(w.running < len(w.jobs) for w in self.workers.values()):
            self._wake.set()

    def statistics(self) -> dict[str, Any]:
        """Queue depth and workers, for status displays.

        A job counts as busy from its start until its worker answers or is gone: a
        cancelled job that could not be interrupted keeps its slot until the recycled
        worker has exited.
        """
        return {
            "queued": len(self.queue),
            "workers": len(self.workers),
            "ready": sum(1 for w in self.workers.values() if w.ready),
            "starting": self.starting,
            "busy_slots": sum(w.running for w in self.workers.values()),
            "busy_workers": sum(1 for w in self.workers.values() if w.running),
            "waiting_on_workers": sum(
                len(w.jobs) - w.running for w in self.workers.values()
            ),
        }


def _stopped_by_worker(response: FunctionResponse | None) -> bool:
    """The worker's own answer for a job it cancelled (see `flash_actors.worker.server`)."""
    return response is not None and response.error_type == "cancelled"


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
    """The `EndpointBackend` of the local provider: a `WorkerPool` run in the provider's tasks.

    The pool applies the TTL (it knows when a job starts on a worker) and the execution
    timeout (it stops the job on its worker).
    """

    capacity = 1 << 20  # the pool queues; the Endpoint actor need not hold jobs back
    enforces = ENFORCES_ALL

    def __init__(self, pool: WorkerPool, scope: anyio.CancelScope) -> None:
        self.pool = pool
        self._scope = scope

    def execute(
        self,
        call: Call,
        *,
        job_id: str,
        chunks: MemoryObjectSendStream[FunctionResponse] | None = None,
    ) -> Coroutine[Any, Any, FunctionResponse]:
        """Run the job on one of the pool's workers (the pool's coroutine: no frame here)."""
        return self.pool.execute(call, job_id, chunks)

    async def aclose(self) -> None:
        """Stop the pool and its workers."""
        with anyio.CancelScope(shield=True):
            await self.pool.stop_all()
        self._scope.cancel()
