"""The local provider: each endpoint a `WorkerPool` of worker processes on this machine.

No account, no Docker: ``await f(x)`` runs in a real ``python -m flash_actors.worker``
process on 127.0.0.1. Worker logs go to ``.flash/logs/<endpoint>/<worker>.log``. Leaving the
runtime (normal exit, exception, Ctrl-C) stops every worker the provider started.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from flash_actors.errors import RuntimeNotRunningError
from flash_actors.messages import Route
from flash_actors.providers.local._processes import Template, template_supported
from flash_actors.providers.local.pool import LocalBackend, WorkerPool
from flash_actors.registry import REGISTRY, Registry
from flash_actors.serialization import RequestSigner

if TYPE_CHECKING:
    from types import TracebackType

    from anyio.abc import TaskGroup

    from flash_actors.gateway.client import GatewayBackend, GatewayProvider
    from flash_actors.resources import ServerlessResource

__all__ = ["LocalProvider"]


class LocalProvider:
    """Worker processes on this machine.

    Args:
        state_dir: where logs (and later the daemon's records) go; default ``.flash``.
        batch_size: most jobs sent to a worker in one request (how many jobs a worker runs at
            once is the endpoint's ``max_concurrency``).
        registry: where load-balancer routes are found (default: the process-wide one).
        fast_start: fork workers from a pre-started template process (milliseconds each)
            instead of starting fresh interpreters (~0.4 s each).
    """

    name = "local"

    def __init__(
        self,
        *,
        state_dir: Path | str = ".flash",
        batch_size: int = 8,
        registry: Registry | None = None,
        fast_start: bool = True,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.template = Template() if fast_start and template_supported() else None
        self.registry = registry or REGISTRY
        self.batch_size = batch_size
        self.pools: dict[str, WorkerPool] = {}
        self._tg: TaskGroup | None = None
        self._gateway: GatewayProvider | None = None
        self._gateway_lock = anyio.Lock()

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

    async def open_endpoint(
        self, resource: ServerlessResource, key: bytes
    ) -> LocalBackend | GatewayBackend:
        """Start the endpoint's pool (``workersMin`` workers start now, others on demand).

        A handler endpoint (``handler="file.py"``) runs on a private gateway process that
        this provider starts on first use and stops when it closes.
        """
        if self._tg is None:
            msg = "the local provider is not running (enter it with `async with`)"
            raise RuntimeNotRunningError(msg)
        if resource.handler is not None:
            async with self._gateway_lock:
                if self._gateway is None:
                    from flash_actors.gateway.client import (
                        start_private_gateway,
                    )

                    self._gateway = await start_private_gateway(self.state_dir / "logs")
            return await self._gateway.open_endpoint(resource, key)
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
        )
        self.pools[resource.name] = pool
        scope = anyio.CancelScope()

        async def run(*, task_status: anyio.abc.TaskStatus[None]) -> None:
            with scope:
                await pool.run(task_status=task_status)

        await self._tg.start(run)
        return LocalBackend(pool, scope)

    async def aclose(self) -> None:
        """Stop every pool and the private gateway (the runtime also leaves the context)."""
        for pool in list(self.pools.values()):
            await pool.stop_all()
        gateway, self._gateway = self._gateway, None
        if gateway is not None:
            await gateway.aclose()
