"""The gateway's queue: RunPod's job semantics over the durable store.

One `Endpoint` per registered resource config, of two kinds:

- ``flash``: a ``@remote`` endpoint. Its jobs' ``input`` is a Flash ``FunctionRequest``; a
  dispatcher hands queued jobs to the embedded local provider's worker pool as workers have
  room, and the job's ``output`` is the worker's ``FunctionResponse``.
- ``handler``: a RunPod handler file (``ServerlessEndpoint(handler="handler.py")``). Its
  jobs are dictionaries pulled by stock ``runpod`` workers over the worker protocol
  (job-take, job-done, job-stream, ping, job-stop); the gateway starts and stops those worker
  processes itself (`flash_actors.providers.local.daemon.workers`), and unmodified workers started by hand
  with the same environment are served too.

Every state change is written to the `JobStore` before it is reported; events wake the
requests waiting on it (runsync, long-polled status and stream, job-take, job-stop). All of
it runs on the daemon's one event loop, so there are no locks.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import anyio
import httpx
import msgspec

from flash_actors import resources
from flash_actors._logging import get_logger
from flash_actors.errors import (
    ConfigurationError,
    DeliveryError,
    ExecutionTimeoutError,
    FlashRuntimeError,
)
from flash_actors.messages import Call, FunctionRequest, FunctionResponse, wire_encoder
from flash_actors.policies import CallPolicy, RetryPolicy
from flash_actors.providers.local.daemon.store import TERMINAL, JobRecord, JobStore
from flash_actors.providers.local.pool import LocalBackend
from flash_actors.serialization import endpoint_key

if TYPE_CHECKING:
    from anyio.abc import Process, TaskGroup

    from flash_actors.providers.local import LocalProvider

__all__ = ["Endpoint", "Gateway", "GatewayError", "Job"]

log = get_logger(__name__)

DEFAULT_EXECUTION_TIMEOUT_MS = 600_000
DEFAULT_TTL_MS = 86_400_000
MAX_POLICY_MS = 7 * 86_400_000
MAX_ATTEMPTS = (
    3  # a job whose worker dies is queued again, at most this many runs in all
)
RESULT_LIMIT = 20 * 1024 * 1024
"""The largest result a job may have (its output as JSON): RunPod's ``/runsync`` limit, so
whatever a job returns can also be handed back in one ``/runsync`` answer."""

UNSAFE_ENV = re.compile(
    r"(LD_|DYLD_|PYTHON|FLASH_|RUNPOD_|PERL5|RUBY|NODE_|GCONV_).*|"
    r"PATH|BASH_ENV|ENV|SHELLOPTS|PS4|HOME|MALLOC_.*"
)
"""Worker ``env`` names an HTTP registration may not set: they make a process (or Python,
the dynamic linker, a shell) load code from elsewhere, or redirect our own workers."""

_request_decoder = msgspec.json.Decoder(FunctionRequest)
_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


def _backoff(failures: int) -> float:
    """Seconds to wait after ``failures`` failures in a row: 0.5 s doubling, at most 30 s."""
    return float(min(30.0, 0.5 * 2 ** min(failures - 1, 10)))


class GatewayError(Exception):
    """A request the gateway refuses: HTTP ``status`` and the message for ``{"error": ...}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(eq=False)
class Job:
    """A job: its stored record plus what only lives while the daemon runs."""

    record: JobRecord
    options: dict[str, Any]
    worker: str | None = None
    progress: bytes | None = None
    chunks: list[bytes] = field(default_factory=list)
    changed: anyio.Event = field(default_factory=anyio.Event)
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

    def notify(self) -> None:
        """Wake everyone waiting on this job."""
        self.changed.set()
        self.changed = anyio.Event()

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
        out["retries"] = record.retries
        return out


@dataclass(eq=False)
class HandlerWorker:
    """A stock ``runpod`` worker serving a handler endpoint (started by us or by hand)."""

    id: str
    process: Process | None = None
    state: str = "initializing"  # initializing, idle, running
    jobs: set[str] = field(default_factory=set)
    last_active: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)
    stops: list[str] = field(default_factory=list)
    stop_wake: anyio.Event = field(default_factory=anyio.Event)
    recycle: bool = False


class Endpoint:
    """One registered endpoint: its config, its queue and (for handlers) its workers."""

    def __init__(self, name: str, config: dict[str, Any]) -> None:
        self.name = name
        self.config = config
        self.resource = resource_from_config(config)
        self.kind = "handler" if self.resource.handler else "flash"
        self.queue: deque[Job] = deque()
        self.jobs: dict[str, Job] = {}
        self.available = anyio.Event()
        self.retried = 0
        self.workers: dict[str, HandlerWorker] = {}
        self.backend: LocalBackend | None = None
        self.scope = anyio.CancelScope()

    def push(self, job: Job, *, front: bool = False) -> None:
        """Queue a job and wake whoever takes jobs."""
        if front:
            self.queue.appendleft(job)
        else:
            self.queue.append(job)
        self.available.set()

    def pop(self) -> Job | None:
        """The next queued job, if any."""
        while self.queue:
            job = self.queue.popleft()
            if job.status == "IN_QUEUE":
                return job
        if self.available.is_set():  # never replace an event someone may be waiting on
            self.available = anyio.Event()
        return None

    async def wait_available(self) -> None:
        """Until a job is queued."""
        while not any(job.status == "IN_QUEUE" for job in self.queue):
            if self.available.is_set():
                self.available = anyio.Event()
            await self.available.wait()

    def counts(self) -> dict[str, int]:
        """Jobs by state, for /health and ``flash local status``."""
        counts = {"completed": 0, "failed": 0, "inProgress": 0, "inQueue": 0}
        for job in self.jobs.values():
            status = job.status
            if status == "COMPLETED":
                counts["completed"] += 1
            elif status in {"FAILED", "TIMED_OUT"}:
                counts["failed"] += 1
            elif status == "IN_PROGRESS":
                counts["inProgress"] += 1
            elif status == "IN_QUEUE":
                counts["inQueue"] += 1
        counts["retried"] = self.retried
        return counts

    def worker_counts(self) -> dict[str, int]:
        """Workers by state, for /health and ``flash local status``."""
        if self.kind == "flash":
            stats = self.backend.pool.statistics() if self.backend else {}
            workers = int(stats.get("workers", 0))
            ready = int(stats.get("ready", 0))
            busy = int(stats.get("busy_workers", 0))  # a recycled one until it is gone
            running = min(ready, busy)
            return {
                "idle": max(0, ready - running),
                "running": running,
                "initializing": int(stats.get("starting", 0)),
                "ready": ready,
                "throttled": 0,
                "unhealthy": max(0, workers - ready - int(stats.get("starting", 0))),
            }
        states = [w.state for w in self.workers.values()]
        return {
            "idle": states.count("idle"),
            "running": states.count("running"),
            "initializing": states.count("initializing"),
            "ready": states.count("idle") + states.count("running"),
            "throttled": 0,
            "unhealthy": 0,
        }


def resource_from_config(config: dict[str, Any]) -> resources.ServerlessResource:
    """Rebuild a resource config sent as ``{"class": ..., "resource": {...}}``.

    Raises:
        ConfigurationError: unknown class or invalid fields.
    """
    cls_name = config.get("class")
    cls = getattr(resources, str(cls_name), None)
    if not (
        isinstance(cls, type)
        and issubclass(cls, resources.ServerlessResource)
        and cls.__name__ in resources.__all__
    ):
        msg = f"unknown resource class {cls_name!r}"
        raise ConfigurationError(msg)
    try:
        resource: resources.ServerlessResource = msgspec.convert(
            config.get("resource"), type=cls
        )
    except msgspec.ValidationError as exc:
        msg = f"invalid {cls_name} config: {exc}"
        raise ConfigurationError(msg) from exc
    return resource


def config_of(resource: resources.ServerlessResource) -> dict[str, Any]:
    """The JSON-able form of a resource config that `resource_from_config` reads back."""
    return {"class": type(resource).__name__, "resource": msgspec.to_builtins(resource)}


def check_webhook(url: str) -> str:
    """The webhook URL if it is one we can POST to: ``http`` or ``https``, a host, a valid port.

    Raises:
        GatewayError: 400 naming the webhook, for anything else.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
        httpx.URL(url)
    except (ValueError, httpx.InvalidURL) as exc:
        msg = f"webhook {url!r} is not a valid URL: {exc}"
        raise GatewayError(400, msg) from exc
    if parts.scheme not in {"http", "https"} or not parts.hostname or port == 0:
        msg = f"webhook {url!r} must be an http:// or https:// URL with a host"
        raise GatewayError(400, msg)
    return url


def result_too_large(size: int) -> str:
    """The error of a job whose result is over `RESULT_LIMIT`."""
    return (
        f"result of {size / 1048576:.1f} MB exceeds the {RESULT_LIMIT // 1048576} MB limit "
        "of the local gateway; return a smaller value, or write the data to a volume (or "
        "other storage) and return where it is"
    )


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


class Gateway:
    """The daemon's state: endpoints and jobs, backed by ``store``.

    Args:
        store: the durable store (opened by `run`).
        provider: runs the ``flash`` endpoints' workers.
        state_dir: where worker logs go (``logs/<endpoint>/``).
        api_key: what workers we start authenticate with.
        retention_s: how long finished jobs stay readable.
        take_wait_s: how long job-take and job-stop polls are held open.
        max_queue: most queued jobs per endpoint; more are refused with 429.
        served_dir: the folder the daemon serves (default: its working directory): handler
            files registered over HTTP must lie inside it (see `check_config`).
    """

    def __init__(
        self,
        store: JobStore,
        provider: LocalProvider,
        *,
        state_dir: Path,
        api_key: str,
        retention_s: float = 1800.0,
        take_wait_s: float = 30.0,
        max_queue: int = 100_000,
        served_dir: Path | None = None,
    ) -> None:
        self.store = store
        self.served_dir = (served_dir or Path.cwd()).resolve()
        self.provider = provider
        self.state_dir = state_dir
        self.api_key = api_key
        self.retention_s = retention_s
        self.take_wait_s = take_wait_s
        self.max_queue = max_queue
        self.base_url = ""
        self.endpoints: dict[str, Endpoint] = {}
        self.jobs: dict[str, Job] = {}
        self.closing = anyio.Event()
        self._registering = anyio.Lock()
        self.started = time.time()
        self._tg: TaskGroup | None = None
        self._http: httpx.AsyncClient | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def load(self) -> None:
        """Read endpoints and jobs back from the store (queued jobs keep their order)."""
        recovered = {job.id for job in self.store.open()}
        for name, text in self.store.endpoints().items():
            try:
                self.endpoints[name] = Endpoint(name, json.loads(text))
            except (ConfigurationError, ValueError) as exc:
                log.error("gateway.endpoint_unreadable", endpoint=name, error=str(exc))
        for record in self.store.jobs():
            endpoint = self.endpoints.get(record.endpoint)
            job = Job(record, json.loads(record.options))
            if endpoint is None:
                if not job.terminal:
                    self._finish(job, "FAILED", error="its endpoint is not registered")
                continue
            self.jobs[job.id] = job
            endpoint.jobs[job.id] = job
            if job.status == "IN_QUEUE":
                endpoint.push(job)
                if job.id in recovered:
                    endpoint.retried += 1
                    log.warning(
                        "job.requeued",
                        job_id=job.id,
                        endpoint=endpoint.name,
                        reason="it was running when the daemon stopped",
                    )
        if recovered:
            log.info("gateway.recovered", requeued=len(recovered))

    async def run(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Serve the endpoints (dispatchers, worker pools, the janitor) until cancelled."""
        async with (
            httpx.AsyncClient(timeout=10) as http,
            anyio.create_task_group() as tg,
        ):
            self._http = http
            self._tg = tg
            for endpoint in self.endpoints.values():
                self._start_endpoint(endpoint)
            tg.start_soon(self._janitor)
            task_status.started()
            try:
                await anyio.sleep_forever()
            finally:
                self.closing.set()
                with anyio.CancelScope(shield=True):
                    for endpoint in list(self.endpoints.values()):
                        await self._stop_endpoint(endpoint)
                tg.cancel_scope.cancel()

    def close(self) -> None:
        """The daemon stops: long polls (runsync, status and stream waits) answer now."""
        self.closing.set()
        for job in self.jobs.values():
            job.notify()

    def _start_endpoint(self, endpoint: Endpoint) -> None:
        assert self._tg is not None  # noqa: S101 (run() set it)
        if endpoint.kind == "flash":
            self._tg.start_soon(self._dispatch_flash, endpoint)
        else:
            from flash_actors.providers.local.daemon.workers import run_handler_pool

            self._tg.start_soon(run_handler_pool, self, endpoint)

    async def _stop_endpoint(self, endpoint: Endpoint) -> None:
        """Stop an endpoint's workers; its running jobs go back to the queue."""
        for job in list(endpoint.jobs.values()):
            if job.status != "IN_PROGRESS":
                continue
            if job.scope is not None:
                job.scope.cancel()  # `_run_flash` puts it back in the queue
            else:  # a handler worker's job: its worker is stopped below
                self.requeue(
                    endpoint, job, reason="its endpoint was stopped", count=False
                )
        endpoint.scope.cancel()
        if endpoint.backend is not None:
            await endpoint.backend.aclose()
            endpoint.backend = None
        from flash_actors.providers.local.daemon.workers import stop_workers

        await stop_workers(self, endpoint)

    async def register(self, name: str, config: dict[str, Any]) -> Endpoint:
        """Register an endpoint, or replace its config (its workers restart).

        Raises:
            GatewayError: 400 for an invalid config or name (`resources.check_endpoint_name`).
        """
        try:
            resources.check_endpoint_name(name)
            endpoint = Endpoint(name, config)
        except ConfigurationError as exc:
            raise GatewayError(400, str(exc)) from exc
        if endpoint.resource.name != name:
            msg = f"the config is named {endpoint.resource.name!r}, not {name!r}"
            raise GatewayError(400, msg)
        bad = sorted(
            key
            for key, value in endpoint.resource.worker_env().items()
            if not key or "=" in key or "\0" in key or "\0" in value
        )
        if bad:  # no process can be started with these: refuse them now
            msg = (
                f"endpoint {name!r}: env {bad!r} cannot be given to a process: names "
                "must be non-empty without '=' or NUL, values without NUL"
            )
            raise GatewayError(400, msg)
        # One registration at a time: two replacing the same endpoint at once would both
        # stop the old one and both start theirs, leaving one running unseen.
        async with self._registering:
            known = self.endpoints.get(name)
            if known is not None:
                if known.resource.same_config(endpoint.resource):
                    return known
                log.info("gateway.endpoint_replaced", endpoint=name)
                await self._stop_endpoint(known)
                endpoint.jobs = known.jobs
                endpoint.retried = known.retried
                for job in sorted(known.jobs.values(), key=lambda j: j.record.seq):
                    if job.status == "IN_QUEUE":
                        endpoint.push(job)
            self.store.put_endpoint(name, json.dumps(config))
            self.endpoints[name] = endpoint
            if self._tg is not None:
                self._start_endpoint(endpoint)
        log.info("gateway.endpoint", endpoint=name, kind=endpoint.kind)
        return endpoint

    def check_config(self, name: str, config: dict[str, Any]) -> dict[str, Any]:
        """A config registered over HTTP, checked (its handler's path resolved).

        Registering an endpoint starts processes, so over HTTP (where the API key is all a
        caller shows) the config may not choose what code they load: a handler must be an
        existing regular ``.py`` file inside `served_dir` (after resolving symlinks and
        ``..``), and ``env`` may not set variables that make a process load other code
        (`UNSAFE_ENV`). The local user names any handler on the daemon's command line
        (``flash local up --endpoint``). A config identical to the registered one is
        accepted as it is (nothing new runs).

        Raises:
            GatewayError: 403 for a handler outside the served folder or an unsafe ``env``
                variable, 400 for a handler that is not an existing ``.py`` file.
        """
        known = self.endpoints.get(name)
        if known is not None and known.config == config:
            return config
        try:
            resource = resource_from_config(config)
        except ConfigurationError as exc:
            raise GatewayError(400, str(exc)) from exc
        unsafe = sorted(k for k in resource.worker_env() if UNSAFE_ENV.fullmatch(k))
        if unsafe:
            msg = (
                f"endpoint {name!r}: env {', '.join(unsafe)} would change the code its "
                "workers load; over HTTP such variables cannot be set. Set them in the "
                "environment of `flash local up` instead"
            )
            raise GatewayError(403, msg)
        fields = config.get("resource")
        if resource.handler is None or not isinstance(fields, dict):
            return config
        path = Path(self.served_dir, resource.handler)
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError) as exc:
            msg = (
                f"endpoint {name!r}: handler file {str(path)!r} does not exist ({exc})"
            )
            raise GatewayError(400, msg) from exc
        if not real.is_relative_to(self.served_dir):
            msg = (
                f"endpoint {name!r}: handler file {str(real)!r} is outside the folder this "
                f"gateway serves ({str(self.served_dir)!r}); over HTTP only handlers inside "
                "it can be registered. Move the file there, or name it on the daemon's "
                "command line: flash local up --endpoint NAME=PATH.py"
            )
            raise GatewayError(403, msg)
        if real.suffix != ".py" or not real.is_file():
            msg = f"endpoint {name!r}: handler {str(real)!r} is not a regular .py file"
            raise GatewayError(400, msg)
        return {**config, "resource": {**fields, "handler": str(real)}}

    def endpoint(self, name: str) -> Endpoint:
        """A registered endpoint.

        Raises:
            GatewayError: 404 when there is none of that name; 400 when no endpoint can
                have it.
        """
        endpoint = self.endpoints.get(name)
        if endpoint is None:
            try:
                resources.check_endpoint_name(name)
            except ConfigurationError as exc:
                raise GatewayError(400, str(exc)) from exc
            msg = f"endpoint {name!r} not found (register it first, or check the name)"
            raise GatewayError(404, msg)
        return endpoint

    def job(self, endpoint: Endpoint, job_id: str) -> Job:
        """A job of this endpoint.

        Raises:
            GatewayError: 404 for an unknown or expired job.
        """
        job = endpoint.jobs.get(job_id)
        if job is None:
            raise GatewayError(404, "request does not exist")
        return job

    # -- the client side --------------------------------------------------------------------

    def submit(
        self,
        endpoint: Endpoint,
        raw_input: bytes | memoryview,
        options: dict[str, Any],
        job_id: str | None = None,
    ) -> Job:
        """Queue a job (committed before this returns). An existing ``job_id`` is returned as is.

        Raises:
            GatewayError: 400 for a bad policy or input.
        """
        if job_id is not None:
            if not _JOB_ID.fullmatch(job_id):
                msg = f"job id {job_id!r} must be 1-128 letters, digits, '-' or '_'"
                raise GatewayError(400, msg)
            known = self.jobs.get(job_id)
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
            try:
                _request_decoder.decode(raw_input)
            except (msgspec.DecodeError, RecursionError) as exc:
                msg = f"input is not a Flash FunctionRequest: {exc}"
                raise GatewayError(400, msg) from exc
        record = JobRecord(
            id=job_id or f"{secrets.token_hex(4)}-{secrets.token_hex(8)}",
            endpoint=endpoint.name,
            status="IN_QUEUE",
            options=json.dumps(clean),
            created=time.time(),
        )
        self.store.insert(record, raw_input)
        job = Job(record, clean)
        self.jobs[job.id] = job
        endpoint.jobs[job.id] = job
        endpoint.push(job)
        return job

    def envelope(self, job: Job) -> dict[str, Any]:
        """The job's ``/status`` answer, its output read from the store."""
        output = self.store.output(job.id) if job.status == "COMPLETED" else None
        return job.envelope(output)

    def output_size(self, job: Job) -> int:
        """The size of the job's stored output (0 if it has none)."""
        return self.store.output_size(job.id) if job.status == "COMPLETED" else 0

    def input_of(self, job: Job) -> bytes:
        """The job's input (raw JSON), read from the store."""
        return self.store.input(job.id)

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
        chunks, job.chunks = job.chunks, []
        return chunks

    def cancel(self, endpoint: Endpoint, job: Job) -> None:
        """Cancel a queued or running job (a finished job is left as it is)."""
        if job.terminal:
            return
        worker = endpoint.workers.get(job.worker or "")
        self._finish(job, "CANCELLED", error="cancelled by a client")
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
        job.chunks = []
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

    def health(self, endpoint: Endpoint) -> dict[str, Any]:
        """The ``/health`` answer."""
        return {"jobs": endpoint.counts(), "workers": endpoint.worker_counts()}

    def status_table(self) -> dict[str, Any]:
        """Everything ``flash local status`` shows."""
        return {
            "url": self.base_url,
            "started": self.started,
            "endpoints": [
                {
                    "name": endpoint.name,
                    "kind": endpoint.kind,
                    "class": type(endpoint.resource).__name__,
                    "handler": endpoint.resource.handler,
                    "workersMin": endpoint.resource.workersMin,
                    "workersMax": endpoint.resource.workersMax,
                    "jobs": endpoint.counts(),
                    "workers": endpoint.worker_counts(),
                }
                for endpoint in self.endpoints.values()
            ],
        }

    # -- job state changes ------------------------------------------------------------------

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
        if job.options.get("webhook") and self._tg is not None:
            self._tg.start_soon(self._webhook, job)

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

    async def _webhook(self, job: Job) -> None:
        """POST the final ``/status`` envelope (never the job's input) to the job's webhook.

        Three tries with backoff, each with 10 s for the answer's status line; the answer's
        body is never read (an endless one cannot fill memory). Whatever goes wrong (a
        refused connection, a bad URL stored by an older version, a bug) is logged: a
        webhook never stops the daemon.
        """
        if self._http is None:
            return
        url = str(job.options["webhook"])
        headers = {"Content-Type": "application/json"}
        for attempt in range(3):
            error = "no answer within 10 s"
            try:
                body = envelope_json(self.envelope(job))
                with anyio.move_on_after(10):
                    async with self._http.stream(
                        "POST", url, content=body, headers=headers
                    ) as response:
                        if response.status_code < 500:
                            return
                        error = f"HTTP {response.status_code}"
            except Exception as exc:  # noqa: BLE001 (a webhook must never stop the daemon)
                error = f"{type(exc).__name__}: {exc}"
            log.warning(
                "webhook.failed",
                job_id=job.id,
                url=url,
                error=error,
                attempt=attempt + 1,
            )
            await anyio.sleep(2**attempt)

    async def _janitor(self) -> None:
        """Every half second, `_sweep`; a failing sweep is logged and tried again."""
        while True:
            await anyio.sleep(0.5)
            try:
                self._sweep()
            except Exception:  # the daemon must outlive a bad sweep
                log.exception("gateway.sweep_failed")

    def _sweep(self) -> None:
        """Expire queued jobs past their TTL, time out handler jobs, forget old results."""
        now = time.time()
        for endpoint in self.endpoints.values():
            for job in list(endpoint.jobs.values()):
                record = job.record
                if (
                    record.status == "IN_QUEUE"
                    and now - record.created > job.ttl_ms / 1000
                ):
                    self.fail(
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
                    self.fail(
                        job,
                        f"job {job.id} ran past its execution timeout of "
                        f"{job.execution_timeout_ms} ms",
                        status="TIMED_OUT",
                    )
                    if worker is not None:
                        worker.jobs.discard(job.id)
                        worker.stops.append(job.id)
                        worker.stop_wake.set()
        expired = self.store.expired(self.retention_s, now)
        if expired:
            self.store.delete(expired)
            for job_id in expired:
                gone = self.jobs.pop(job_id, None)
                owner = self.endpoints.get(gone.record.endpoint) if gone else None
                if owner is not None:
                    owner.jobs.pop(job_id, None)

    # -- flash endpoints ----------------------------------------------------------------------

    async def _open_pool(self, endpoint: Endpoint) -> LocalBackend:
        """The endpoint's worker pool; while it cannot start, its queued jobs fail with why.

        Tries again when a job is queued, at most every so often (exponential backoff).
        """
        resource = endpoint.resource
        failures = 0
        while True:
            try:
                backend = await self.provider.open_endpoint(
                    resource, endpoint_key(resource.name)
                )
            except (
                Exception
            ) as exc:  # the daemon outlives one endpoint that cannot start
                failures += 1
                log.exception("gateway.endpoint_failed", endpoint=endpoint.name)
                for waiting in list(endpoint.queue):
                    if waiting.status == "IN_QUEUE":
                        self.fail(
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

    async def _dispatch_flash(self, endpoint: Endpoint) -> None:
        """Hand queued jobs to the endpoint's worker pool while it has room."""
        with endpoint.scope:
            endpoint.backend = backend = await self._open_pool(endpoint)
            # As many as its workers may hold (running, and handed ahead): the pool
            # decides which worker runs which, so no job waits behind a busy worker.
            room = anyio.Semaphore(backend.pool.capacity)
            async with anyio.create_task_group() as tg:
                while True:
                    await room.acquire()
                    job = endpoint.pop()
                    while job is None:
                        await endpoint.wait_available()
                        job = endpoint.pop()
                    self.start(job, None)
                    tg.start_soon(self._run_flash, endpoint, backend, job, room)

    async def _run_flash(
        self, endpoint: Endpoint, backend: LocalBackend, job: Job, room: anyio.Semaphore
    ) -> None:
        try:
            request = _request_decoder.decode(self.input_of(job))
            call = Call(
                endpoint=endpoint.name,
                function=request.function_name or request.class_name or "?",
                request=request,
                policy=CallPolicy(
                    retry=RetryPolicy.never(),
                    execution_timeout_s=job.execution_timeout_ms / 1000,
                    ttl_s=job.ttl_ms / 1000,
                ),
            )
            with anyio.CancelScope() as scope:
                job.scope = scope
                response = await self._execute(backend, call, job)
            if scope.cancelled_caught:
                # cancelled by a client (already CANCELLED) or by the endpoint stopping
                self.requeue(
                    endpoint, job, reason="its endpoint was stopped", count=False
                )
                return
            if not job.terminal:
                job.worker = response.worker_id
                self.complete(job, wire_encoder.encode(response))
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
            self.requeue(endpoint, job, reason="its endpoint was stopped", count=False)
            raise
        except ExecutionTimeoutError as exc:
            self.fail(job, str(exc), status="TIMED_OUT")
        except DeliveryError as exc:
            self.requeue(endpoint, job, reason=str(exc))
        except (FlashRuntimeError, msgspec.DecodeError) as exc:
            self.fail(job, str(exc))
        except Exception as exc:  # a bug must fail one job, not the daemon
            log.exception("gateway.job_failed", job_id=job.id)
            self.fail(job, f"internal error of the local gateway: {exc!r}")
        finally:
            job.scope = None
            room.release()

    async def _execute(
        self, backend: LocalBackend, call: Call, job: Job
    ) -> FunctionResponse:
        if not job.options.get("stream"):
            return await backend.execute(call, job_id=job.id)
        send, receive = anyio.create_memory_object_stream[FunctionResponse](16)

        async def collect() -> None:
            async with receive:
                async for chunk in receive:
                    job.chunks.append(b'{"output":' + wire_encoder.encode(chunk) + b"}")
                    job.notify()

        async with anyio.create_task_group() as tg:
            tg.start_soon(collect)
            async with send:
                response = await backend.execute(call, job_id=job.id, chunks=send)
        return response

    # -- the worker side (handler endpoints) -------------------------------------------------------

    def worker(self, endpoint: Endpoint, worker_id: str) -> HandlerWorker:
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
            self.start(job, worker_id)
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
            self.requeue(
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
            self.fail(job, error)
        else:
            self.complete(job, output)

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
            self.fail(job, result_too_large(size))

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
        job.chunks.append(body)
        job.notify()

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


class _Done(msgspec.Struct):
    output: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)
    error: Any = None
    status: str | None = None
    stopPod: bool = False


def envelope_json(payload: Any) -> bytes:
    """Encode an answer (``msgspec.Raw`` values are spliced in as they are)."""
    return wire_encoder.encode(payload)
