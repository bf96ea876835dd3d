"""The daemon's state, composed: `Gateway` wires the catalog, the jobs and their services.

- `catalog`: the registered endpoints and the checks on their configs;
- `jobs`: every job and every change of its state (committed to the `JobStore` first);
- `dataplane`: what clients ask (run, runsync, status, stream, health);
- `feeds`: many jobs' results per long poll, for our own client's batched jobs;
- `worker_protocol`: what stock ``runpod`` workers of handler endpoints ask;
- `dispatch`: Flash endpoints' jobs handed to the local provider's worker pools;
- deployed load balancers' app processes (`balancers`), one per such endpoint;
- `webhooks` and `janitor`: what happens to a job without anyone asking.

`Gateway` itself owns the lifecycle: reading state back at start-up (`load`), registering
and replacing endpoints (their workers start and stop with them), serving (`run`) and
stopping. All of it runs on the daemon's one event loop, so there are no locks beyond the
one that keeps registrations one at a time.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from flash_actors._logging import get_logger
from flash_actors.errors import ConfigurationError
from flash_actors.providers.local.daemon.balancers import BalancerApp
from flash_actors.providers.local.daemon.catalog import Catalog, Endpoint
from flash_actors.providers.local.daemon.dataplane import DataPlane
from flash_actors.providers.local.daemon.dispatch import FlashDispatch
from flash_actors.providers.local.daemon.feeds import Feeds
from flash_actors.providers.local.daemon.janitor import Janitor
from flash_actors.providers.local.daemon.jobs import Job, JobBook
from flash_actors.providers.local.daemon.webhooks import Webhooks
from flash_actors.providers.local.daemon.worker_protocol import WorkerProtocol
from flash_actors.providers.local.daemon.workers import run_handler_pool, stop_workers

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from flash_actors.providers.local import LocalProvider
    from flash_actors.providers.local.daemon.store import JobStore

__all__ = ["Gateway"]

log = get_logger(__name__)


class Gateway:
    """The daemon's state: endpoints and jobs, backed by ``store``.

    Args:
        store: the durable store (opened by `load`).
        provider: runs the ``flash`` endpoints' workers.
        state_dir: where worker logs go (``logs/<endpoint>/``).
        api_key: what workers we start authenticate with.
        retention_s: how long finished jobs stay readable.
        take_wait_s: how long job-take and job-stop polls are held open.
        max_queue: most queued jobs per endpoint; more are refused with 429.
        served_dir: the folder the daemon serves (default: its working directory): handler
            files registered over HTTP must lie inside it (see `Catalog.check_config`).
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
        self.provider = provider
        self.state_dir = state_dir
        self.api_key = api_key
        self.base_url = ""
        self.started = time.time()
        self.closing = anyio.Event()
        self.catalog = Catalog(served_dir or Path.cwd())
        self.webhooks = Webhooks(store)
        self.feeds = Feeds(self.closing)
        self.book = JobBook(store, self.catalog.endpoints, on_end=self._ended)
        self.plane = DataPlane(self.book, self.closing, max_queue=max_queue)
        self.protocol = WorkerProtocol(self.book, self.closing, take_wait_s=take_wait_s)
        self.dispatch = FlashDispatch(provider, self.book)
        self.janitor = Janitor(
            self.catalog.endpoints, self.book, retention_s=retention_s
        )
        self._registering = anyio.Lock()
        self._tg: TaskGroup | None = None

    @property
    def endpoints(self) -> dict[str, Endpoint]:
        """The registered endpoints by name."""
        return self.catalog.endpoints

    @property
    def jobs(self) -> dict[str, Job]:
        """Every job the daemon knows, by id."""
        return self.book.jobs

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
                    self.book.fail(job, "its endpoint is not registered")
                continue
            self.book.add(endpoint, job)
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
        async with anyio.create_task_group() as tg:
            await tg.start(self.webhooks.serve)
            self._tg = tg
            for endpoint in self.endpoints.values():
                self._start_endpoint(endpoint)
            tg.start_soon(self.janitor.run)
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
        """The daemon stops: long polls (runsync, status, stream, feed waits) answer now."""
        self.closing.set()
        for job in self.jobs.values():
            job.notify()
        self.feeds.close()

    def _ended(self, job: Job) -> None:
        """A job has ended: its webhook, and its feed."""
        self.webhooks.send(job)
        self.feeds.ended(job)

    def _start_endpoint(self, endpoint: Endpoint) -> None:
        assert self._tg is not None  # noqa: S101 (run() set it)
        if endpoint.serves_app:  # a deployed load balancer: its app process
            endpoint.app = BalancerApp(
                endpoint,
                log_dir=self.state_dir / "logs" / endpoint.name,
                daemon_url=self.base_url,
                api_key=self.api_key,
            )
            self._tg.start_soon(endpoint.app.run)
        elif endpoint.kind != "handler":  # flash and deployed: the local worker pools
            self._tg.start_soon(self.dispatch.run, endpoint)
        else:
            self._tg.start_soon(run_handler_pool, self, endpoint)

    async def _stop_endpoint(self, endpoint: Endpoint) -> None:
        """Stop an endpoint's workers; its running jobs go back to the queue."""
        for job in list(endpoint.jobs.values()):
            if job.status != "IN_PROGRESS":
                continue
            if job.scope is not None:
                job.scope.cancel()  # the dispatcher puts it back in the queue
            else:  # a handler worker's job: its worker is stopped below
                self.book.requeue(
                    endpoint, job, reason="its endpoint was stopped", count=False
                )
        endpoint.scope.cancel()
        if endpoint.app is not None:
            await endpoint.app.stop()
        if endpoint.backend is not None:
            await endpoint.backend.aclose()
            endpoint.backend = None
        await stop_workers(self, endpoint)

    async def register(self, name: str, config: dict[str, Any]) -> Endpoint:
        """Register an endpoint, or replace its config (its workers restart).

        Raises:
            GatewayError: 400 for an invalid config or name (`Catalog.checked`).
        """
        endpoint = self.catalog.checked(name, config)
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

    async def unregister(self, name: str) -> bool:
        """Remove an endpoint: its unfinished jobs end CANCELLED, its workers stop.

        Returns False when no endpoint has that name.
        """
        async with self._registering:
            endpoint = self.endpoints.get(name)
            if endpoint is None:
                return False
            for job in list(endpoint.jobs.values()):
                if not job.terminal:
                    # before the stop, which would requeue them
                    self.book.cancel(endpoint, job, f"its endpoint {name} was deleted")
            await self._stop_endpoint(endpoint)
            del self.endpoints[name]
            self.store.delete_endpoint(name)
        log.info("gateway.endpoint_removed", endpoint=name)
        return True

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
                    # a deployed endpoint's: its generated handler in the unpacked build
                    "handler": endpoint.resource.handler
                    or (str(endpoint.entry) if endpoint.entry else None),
                    "workersMin": endpoint.resource.workersMin,
                    "workersMax": endpoint.resource.workersMax,
                    "jobs": endpoint.counts(),
                    "workers": endpoint.worker_counts(),
                    "start_error": endpoint.start_error(),
                    # a deployed load balancer's app process: where it answers, its log
                    **(
                        {
                            "app": {
                                "pid": endpoint.app.pid,
                                "port": endpoint.app.port or None,
                                "log": str(endpoint.app.log_path),
                            }
                        }
                        if endpoint.app is not None
                        else {}
                    ),
                }
                for endpoint in self.endpoints.values()
            ],
        }
