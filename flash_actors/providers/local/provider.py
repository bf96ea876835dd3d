"""The local provider: each endpoint a `WorkerPool` of worker processes on this machine.

No account, no Docker: ``await f(x)`` runs in a real ``python -m flash_actors.worker``
process on 127.0.0.1. Worker logs go to ``.flash/logs/<endpoint>/<worker>.log`` (endpoint
names are checked by `flash_actors.resources.check_endpoint_name`, so these paths are safe).
Leaving the runtime (normal exit, exception, Ctrl-C) stops every worker the provider started.
Each worker of a GPU endpoint holds devices of its own (``CUDA_VISIBLE_DEVICES``), CPU
endpoints' workers none: see `flash_actors.providers.local.gpus`.

Endpoints are isolated from each other: a pool whose workers cannot start fails its own jobs
(see `flash_actors.providers.local.pool`), and a pool that fails outright is logged, its jobs
fail with `DeliveryError`, and it is run again after a backoff; neither reaches the other
endpoints or the runtime.

A remote function on a worker that awaits another endpoint's function sends the call back to
this process (`flash_actors.providers.local.nested`), which runs it through the runtime.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import msgspec

from flash_actors._logging import get_logger
from flash_actors.errors import ConfigurationError, RuntimeNotRunningError
from flash_actors.messages import Route
from flash_actors.providers.local._processes import Template, template_supported
from flash_actors.providers.local.gpus import GpuAllocator
from flash_actors.providers.local.nested import Dispatch, NestedListener
from flash_actors.providers.local.pool import (
    LocalBackend,
    WorkerPool,
    default_start_backoff_max_s,
)
from flash_actors.registry import REGISTRY, Registry
from flash_actors.serialization import RequestSigner, endpoint_key

if TYPE_CHECKING:
    from types import TracebackType

    from anyio.abc import TaskGroup

    from flash_actors.providers.local.daemon_client import GatewayProvider
    from flash_actors.providers.runpod.backend import QueueBackend
    from flash_actors.resources import ServerlessResource

__all__ = ["MAX_WORKERS_ENV", "LocalProvider", "max_workers"]

MAX_WORKERS_ENV = "FLASH_LOCAL_MAX_WORKERS"
DEFAULT_MAX_WORKERS = 64


def max_workers() -> int:
    """Most worker processes one endpoint may have here (``FLASH_LOCAL_MAX_WORKERS``, 64).

    Raises:
        ConfigurationError: the variable is not a whole number from 1 to 4096.
    """
    raw = os.environ.get(MAX_WORKERS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_WORKERS
    if not raw.isdigit() or not 1 <= int(raw) <= 4096:
        msg = f"{MAX_WORKERS_ENV} must be a whole number from 1 to 4096, got {raw!r}"
        raise ConfigurationError(msg)
    return int(raw)


log = get_logger(__name__)


class LocalProvider:
    """Worker processes on this machine.

    Args:
        state_dir: where logs (and later the daemon's records) go; default ``.flash``.
        batch_size: most jobs handed to a busy worker to start next, in one request (how
            many jobs a worker runs at once is the endpoint's ``max_concurrency``). 32: a
            request per 8 jobs cost the caller and the workers more than the jobs did.
        registry: where load-balancer routes are found (default: the process-wide one).
        fast_start: fork workers from a pre-started template process (milliseconds each)
            instead of starting fresh interpreters (~0.4 s each).
        start_backoff_max_s: longest wait between two starts of a worker that keeps failing
            to start (the wait doubles from 0.5 s); default ``FLASH_LOCAL_START_BACKOFF_MAX_S``
            or 30.
    """

    name = "local"

    def __init__(
        self,
        *,
        state_dir: Path | str = ".flash",
        batch_size: int = 32,
        registry: Registry | None = None,
        fast_start: bool = True,
        start_backoff_max_s: float | None = None,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.start_backoff_max_s = (
            default_start_backoff_max_s()
            if start_backoff_max_s is None
            else start_backoff_max_s
        )
        self.template = Template() if fast_start and template_supported() else None
        self.registry = registry or REGISTRY
        self.batch_size = batch_size
        self.pools: dict[str, WorkerPool] = {}
        self.gpus = GpuAllocator()  # this machine's GPUs, shared by every endpoint
        self._tg: TaskGroup | None = None
        self._gateway: GatewayProvider | None = None
        self._gateway_lock = anyio.Lock()
        self.worker_env: dict[str, str] = {}
        """More environment for every worker (the daemon's: how to reach its data plane)."""
        self._nested: NestedListener | None = None

    def serve_nested(self, dispatch: Dispatch) -> None:
        """Let workers make nested calls through ``dispatch`` (the runtime's).

        See `flash_actors.providers.local.nested`.
        """
        self._nested = NestedListener(dispatch)

    async def _worker_env(self, endpoint: str) -> dict[str, str]:
        if self._nested is None or self._tg is None:
            return self.worker_env
        return {**self.worker_env, **await self._nested.worker_env(self._tg, endpoint)}

    async def __aenter__(self) -> LocalProvider:
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        tg, self._tg = self._tg, None
        if tg is None:
            return
        tg.cancel_scope.cancel()
        try:
            await tg.__aexit__(None, None, None)
        finally:
            if self.template is not None:
                await self.template.aclose()

    def signing_key(self, endpoint: str) -> bytes:
        """This process's key for ``endpoint``: its workers get it, never the master secret."""
        return endpoint_key(endpoint)

    async def open_endpoint(
        self,
        resource: ServerlessResource,
        key: bytes | None,
        *,
        entry: Path | None = None,
    ) -> LocalBackend | QueueBackend:
        """Start the endpoint's pool (``workersMin`` workers start now, others on demand).

        A handler endpoint (``handler="file.py"``) runs on a private gateway process that
        this provider starts on first use and stops when it closes. With ``entry`` (a
        generated handler in an unpacked build) the endpoint is that build's resource,
        served by workers started from the build (see `WorkerPool`).
        """
        if self._tg is None:
            msg = "the local provider is not running (enter it with `async with`)"
            raise RuntimeNotRunningError(msg)
        if key is None:
            key = self.signing_key(resource.name)
        if resource.handler is not None:
            async with self._gateway_lock:
                if self._gateway is None:
                    from flash_actors.providers.local.daemon_client import (
                        start_private_gateway,
                    )

                    self._gateway = await start_private_gateway(self.state_dir / "logs")
            return await self._gateway.open_endpoint(resource, key)
        # Each worker holds GPUs of its own (CPU endpoints: none), and workersMax is capped
        # by the matching ones; an endpoint no GPU here can serve fails its calls with why.
        # No endpoint starts more than FLASH_LOCAL_MAX_WORKERS processes here, whatever its
        # config (a registration over HTTP may ask for millions).
        gpus = await self.gpus.for_endpoint(resource)
        limit = min(gpus.workers_max, max_workers())
        if limit < resource.workersMax:
            if limit < gpus.workers_max:
                log.warning(
                    "pool.workers_capped",
                    endpoint=resource.name,
                    asked=resource.workersMax,
                    cap=limit,
                    variable=MAX_WORKERS_ENV,
                )
            resource = msgspec.structs.replace(
                resource,
                workersMax=limit,
                workersMin=min(resource.workersMin, limit),
            )
        routes = [
            Route(
                method=method,
                path=path,
                request=RequestSigner(key, template).sign((), {}),
            )
            for method, path, template in self.registry.routes(resource.name)
        ]
        pool = WorkerPool(
            resource,
            key,
            routes=routes,
            template=self.template,
            log_dir=self.state_dir / "logs" / resource.name,
            batch_size=self.batch_size,
            start_backoff_max_s=self.start_backoff_max_s,
            gpus=gpus,
            worker_env=functools.partial(self._worker_env, resource.name),
            entry=entry,
        )
        self.pools[resource.name] = pool
        scope = anyio.CancelScope()

        async def run(*, task_status: anyio.abc.TaskStatus[None]) -> None:
            # A pool that fails (a bug) must not take the provider's other pools, or the
            # runtime, down with it: log it, and run it again after a backoff (its queued
            # jobs failed with DeliveryError when it stopped, and are retried by policy).
            crashes = 0
            with scope:
                while True:
                    try:
                        await pool.run(task_status=task_status)
                        return
                    except Exception as exc:  # isolation is the point
                        crashes += 1
                        delay = min(
                            self.start_backoff_max_s, 0.5 * 2 ** min(crashes, 10)
                        )
                        log.error(
                            "pool.failed",
                            endpoint=resource.name,
                            crashes=crashes,
                            retry_in_s=delay,
                            exc_info=exc,
                        )
                        if not pool.serving:
                            raise  # failed while starting: the caller gets the error
                        pool.failure = repr(exc)
                        task_status = anyio.TASK_STATUS_IGNORED
                        await anyio.sleep(delay)

        await self._tg.start(run)
        return LocalBackend(pool, scope)

    async def aclose(self) -> None:
        """Stop every pool and the private gateway (the runtime also leaves the context)."""
        for pool in list(self.pools.values()):
            await pool.stop_all()
        gateway, self._gateway = self._gateway, None
        if gateway is not None:
            await gateway.aclose()
