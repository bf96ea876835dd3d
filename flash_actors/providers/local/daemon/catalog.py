"""The daemon's registered endpoints: what each one is, and which configs it accepts.

One `Endpoint` per registered resource config, of three kinds:

- ``flash``: a ``@remote`` endpoint. Its jobs' ``input`` is a Flash ``FunctionRequest``;
  `flash_actors.providers.local.daemon.dispatch` hands them to the embedded local
  provider's worker pool, and the job's ``output`` is the worker's ``FunctionResponse``.
- ``handler``: a RunPod handler file (``ServerlessEndpoint(handler="handler.py")``). Its
  jobs are dictionaries pulled by stock ``runpod`` workers over the worker protocol
  (`flash_actors.providers.local.daemon.worker_protocol`); the daemon starts and stops those
  worker processes itself (`flash_actors.providers.local.daemon.workers`), and unmodified
  workers started by hand with the same environment are served too.
- ``deployed``: a resource of a built app, served from the unpacked archive (config key
  ``"deployed": {"dir": <the unpacked folder>, "handler": "handler_<resource>.py"}``, see
  `deployed_config`). Its workers are our own worker in deployed mode, started as ``python
  handler_<resource>.py`` in that folder (the archive's runtime and dependencies), and run
  only the code built into it. Jobs take Flash's deployed-mode JSON (the job's output is
  the function's value) or signed requests without code (`flash_actors.providers.deployed`).
  A deployed load balancer (`Endpoint.serves_app`) has no queue and no workers: the daemon
  runs its HTTP app as one process (`flash_actors.providers.local.daemon.balancers`) and
  proxies requests for its host to it (`flash_actors.providers.local.daemon.lb_routes`).

The `Catalog` finds endpoints and jobs by name and checks configs: the shape of any
registration (`Catalog.checked`), and what one sent over HTTP may make the daemon run
(`Catalog.check_config`).
"""

from __future__ import annotations

import re
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import msgspec

from flash_actors import resources
from flash_actors.errors import ConfigurationError
from flash_actors.providers.local.daemon.errors import GatewayError

if TYPE_CHECKING:
    from anyio.abc import Process

    from flash_actors.providers.local.daemon.balancers import BalancerApp
    from flash_actors.providers.local.daemon.jobs import Job
    from flash_actors.providers.local.pool import LocalBackend

__all__ = [
    "UNSAFE_ENV",
    "Catalog",
    "Endpoint",
    "HandlerWorker",
    "config_of",
    "deployed_config",
    "resource_from_config",
]

UNSAFE_ENV = re.compile(
    r"(LD_|DYLD_|PYTHON|FLASH_|RUNPOD_|PERL5|RUBY|NODE_|GCONV_).*|"
    r"PATH|BASH_ENV|ENV|SHELLOPTS|PS4|HOME|MALLOC_.*"
)
"""Worker ``env`` names an HTTP registration may not set: they make a process (or Python,
the dynamic linker, a shell) load code from elsewhere, or redirect our own workers."""


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


def deployed_config(
    resource: resources.ServerlessResource,
    build_dir: Path,
    handler: str,
    *,
    resource_name: str | None = None,
) -> dict[str, Any]:
    """The registration of ``resource`` served from the unpacked build ``build_dir``.

    A queue resource's endpoint runs workers of the build; a load balancer's runs its HTTP
    app (`Endpoint.serves_app`): the same config for both, told apart by the resource's
    class. ``handler`` is the generated handler's file name in that folder
    (`flash_actors.build.handlers.handler_name`). ``resource_name`` is the resource's name
    in the build when the endpoint has another (a deployed environment's prefixed names):
    the endpoint's key is derived from it, as the app's other resources derive it
    (`Endpoint.key_name`).
    """
    deployed = {"dir": str(build_dir), "handler": handler}
    if resource_name is not None and resource_name != resource.name:
        deployed["resource"] = resource_name
    return {**config_of(resource), "deployed": deployed}


def _deployed_entry(name: str, config: dict[str, Any]) -> Path | None:
    """The handler file a ``deployed`` endpoint's workers run, or None for other kinds.

    Raises:
        ConfigurationError: the ``deployed`` key is malformed.
    """
    deployed = config.get("deployed")
    if deployed is None:
        return None
    folder = deployed.get("dir") if isinstance(deployed, dict) else None
    handler = deployed.get("handler") if isinstance(deployed, dict) else None
    if (
        not isinstance(folder, str)
        or not isinstance(handler, str)
        or not Path(folder).is_absolute()
        or not re.fullmatch(r"[A-Za-z0-9_.-]+\.py", handler)
    ):
        msg = (
            f'endpoint {name!r}: "deployed" must be {{"dir": <absolute folder>, '
            '"handler": "handler_<resource>.py"}'
        )
        raise ConfigurationError(msg)
    return Path(folder, handler)


def _deployed_resource(name: str, config: dict[str, Any]) -> str | None:
    """A ``deployed`` endpoint's resource name in its build, when it differs from ``name``.

    Raises:
        ConfigurationError: it is not a valid endpoint name.
    """
    deployed = config.get("deployed")
    resource = deployed.get("resource") if isinstance(deployed, dict) else None
    if resource is None:
        return None
    if not isinstance(resource, str):
        msg = f'endpoint {name!r}: "deployed.resource" must be a resource name'
        raise ConfigurationError(msg)
    resources.check_endpoint_name(resource)
    return resource


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
        self.entry = _deployed_entry(name, config)
        """A ``deployed`` endpoint's handler file (in the unpacked build), else None."""
        self.key_name = _deployed_resource(name, config) or self.resource.name
        """The name the endpoint's signing key is derived from: a deployed endpoint's
        resource name in its build (the app's other resources sign their calls with it),
        else its own name."""
        self.kind = (
            "handler"
            if self.resource.handler
            else ("deployed" if self.entry is not None else "flash")
        )
        self.queue: deque[Job] = deque()
        self.jobs: dict[str, Job] = {}
        self.available = anyio.Event()
        self.retried = 0
        self.workers: dict[str, HandlerWorker] = {}
        self.backend: LocalBackend | None = None
        self.app: BalancerApp | None = None
        """A deployed load balancer's app process, once the gateway runs it."""
        self.scope = anyio.CancelScope()

    @property
    def serves_app(self) -> bool:
        """A deployed load balancer: the daemon runs its HTTP app and proxies to it."""
        return self.kind == "deployed" and self.resource.is_load_balancer

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

    def start_error(self) -> str | None:
        """Why the endpoint's workers (or app) fail to start, else None."""
        if self.app is not None:
            return self.app.error
        pool = self.backend.pool if self.backend is not None else None
        if pool is None or not pool.start_failures:
            return None
        return pool.start_error

    def worker_counts(self) -> dict[str, int]:
        """Workers by state, for /health and ``flash local status``."""
        if self.app is not None:  # its one app process
            starting = int(self.app.starting)
            ready = int(self.app.ready)
            return {
                "idle": ready,
                "running": 0,
                "initializing": starting,
                "ready": ready,
                "throttled": 0,
                "unhealthy": int(not ready and not starting),
            }
        if self.kind != "handler":
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


class Catalog:
    """The registered endpoints by name (``endpoints``), and the checks on their configs.

    Args:
        served_dir: the folder the daemon serves: handler files registered over HTTP must
            lie inside it (see `check_config`).
    """

    def __init__(self, served_dir: Path) -> None:
        self.served_dir = served_dir.resolve()
        self.endpoints: dict[str, Endpoint] = {}

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

    @staticmethod
    def job(endpoint: Endpoint, job_id: str) -> Job:
        """A job of this endpoint.

        Raises:
            GatewayError: 404 for an unknown or expired job.
        """
        job = endpoint.jobs.get(job_id)
        if job is None:
            raise GatewayError(404, "request does not exist")
        return job

    @staticmethod
    def checked(name: str, config: dict[str, Any]) -> Endpoint:
        """A new, not yet registered endpoint for ``config`` (any registration's checks).

        Raises:
            GatewayError: 400 for an invalid config or name (`resources.check_endpoint_name`),
                a config named otherwise, or ``env`` no process can be given.
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
        try:
            entry = _deployed_entry(name, config)
        except ConfigurationError as exc:
            raise GatewayError(400, str(exc)) from exc
        if entry is not None:
            return self._check_deployed(name, config, entry)
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

    def _check_deployed(
        self, name: str, config: dict[str, Any], entry: Path
    ) -> dict[str, Any]:
        """A ``deployed`` registration over HTTP: its build inside the served folder."""
        try:
            real = entry.resolve(strict=True)
        except (OSError, RuntimeError) as exc:
            msg = (
                f"endpoint {name!r}: handler file {str(entry)!r} does not exist ({exc})"
            )
            raise GatewayError(400, msg) from exc
        if not real.is_relative_to(self.served_dir):
            msg = (
                f"endpoint {name!r}: the build {str(real.parent)!r} is outside the folder "
                f"this gateway serves ({str(self.served_dir)!r}); over HTTP only builds "
                "inside it can be registered: unpack the archive there"
            )
            raise GatewayError(403, msg)
        if not real.is_file() or not (real.parent / "flash_manifest.json").is_file():
            msg = (
                f"endpoint {name!r}: {str(real)!r} is not a handler of an unpacked build "
                "(a regular file next to flash_manifest.json)"
            )
            raise GatewayError(400, msg)
        deployed = {"dir": str(real.parent), "handler": real.name}
        return {**config, "deployed": deployed}
