"""The provider of deployed code: calls to the app's other resources, at their deployed endpoints.

In a deployed process (``FLASH_RESOURCE_NAME`` set: a worker or load balancer started from a
built archive) a call to a function of the process's own resource runs in the process
(`flash_actors.remote`); a call to another resource's function is looked up by the Router in
the manifest and sent here. `DeployedProvider` is then what the runtime uses by default (see
`flash_actors.providers.registry`), and each such call:

- goes WITHOUT code: deployed workers run only the code they were built with, so
  ``function_code``, ``class_code``, ``modules`` and the dependency lists are taken off, and the
  function is named by its manifest key (``function_name``, or ``class_name`` for a class,
  = ``module:qualname``);
- is signed with the target resource's key, derived from the app's secret (``FLASH_SECRET``)
  and the resource's name, as its workers check it (`flash_actors.deployed.handler.
  key_from_env`; a ``flash local`` deployment's endpoints, named by id, keep the resource's
  name for their key); deployed endpoints run only signed requests, so without the secret the
  call fails with `ConfigurationError`;
- carries the chain of resources waiting on it (``call_chain``), so that A -> B -> A fails
  with `CallCycleError` in B instead of waiting on A's busy workers
  (`flash_actors.worker.nested.deployed_chain`);
- reaches the resource's endpoint through an `EndpointResolver`: the service that knows
  where the app's resources are deployed; a load balancer's function is one ``POST
  /execute`` on the endpoint's own host, as the RunPod provider calls it
  (`flash_actors.providers.runpod.provider.RunPodBackend`).

Resolvers: `RunPodResolver`, chosen when ``FLASH_ENVIRONMENT_ID`` is set (a deployed
environment, on RunPod or on ``flash local``), asks the Flash control plane for the
environment's endpoints by resource name (``getFlashEnvironment``) and reaches them on the
data plane: RunPod's (``RUNPOD_API_KEY``, ``RUNPOD_API_BASE_URL``,
``RUNPOD_ENDPOINT_BASE_URL``), or, in a worker of a ``flash local`` daemon
(``FLASH_LOCAL_URL`` and ``FLASH_LOCAL_API_KEY``, which the daemon gives its workers), that
daemon's. `DaemonResolver` asks a ``flash local`` daemon for an endpoint named as the resource
(``flash build --preview`` serves each resource under its own name). A resolver that cannot be reached (connection refused, a timeout,
5xx after retries) raises `ManifestServiceUnavailableError`; a resource it does not know,
`ManifestError`.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import msgspec

from flash_actors._logging import get_logger
from flash_actors.errors import (
    ConfigurationError,
    DeliveryError,
    ManifestError,
    ManifestServiceUnavailableError,
)
from flash_actors.providers.base import ENFORCES_ALL
from flash_actors.serialization import secret_key, sign_request

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from types import TracebackType

    from anyio.streams.memory import MemoryObjectSendStream

    from flash_actors.messages import Call, FunctionRequest, FunctionResponse
    from flash_actors.providers.base import Enforced
    from flash_actors.providers.local.daemon.record import DaemonRecord
    from flash_actors.providers.local.daemon_client import GatewayProvider
    from flash_actors.providers.runpod.backend import QueueBackend
    from flash_actors.providers.runpod.credentials import RunPodSettings
    from flash_actors.providers.runpod.transport import Transport
    from flash_actors.resources import ServerlessResource

__all__ = [
    "ENVIRONMENT_ENV",
    "RESOLVE_TRIES",
    "DaemonResolver",
    "DeployedProvider",
    "EndpointResolver",
    "RunPodResolver",
    "codeless",
    "default_resolver",
]

log = get_logger(__name__)

ENVIRONMENT_ENV = "FLASH_ENVIRONMENT_ID"
"""The Flash environment a deployed process belongs to (runpod-flash's name): set, its
endpoints are looked up on the Flash control plane (`RunPodResolver`)."""
RESOLVE_TRIES = 4
"""Attempts to reach the resolver (0.1 s backoff, doubled) before it is called unavailable."""


class EndpointResolver(Protocol):
    """Where the app's resources are deployed: a resource name in, its endpoint out.

    Attributes:
        service: the resolver, for messages (``"the flash local daemon at ..."``).
    """

    service: str

    async def resolve(self, resource: str) -> QueueBackend:
        """The deployed endpoint of ``resource``, as a data-plane backend.

        Raises:
            ManifestServiceUnavailableError: the resolver cannot be reached.
            ManifestError: it has no endpoint for ``resource``.
        """
        ...

    async def aclose(self) -> None:
        """Close its connections."""
        ...


class DaemonResolver:
    """Resources served by a ``flash local`` daemon under their own names.

    Args:
        record: the daemon (`flash_actors.providers.local.daemon.record.find_daemon`).
        tries: attempts to reach it before `ManifestServiceUnavailableError`.
    """

    def __init__(self, record: DaemonRecord, *, tries: int = RESOLVE_TRIES) -> None:
        from flash_actors.providers.local.daemon_client import GatewayProvider

        self.tries = max(1, tries)
        # The daemon client: its data plane, its reconnect window while a call waits.
        self._client: GatewayProvider = GatewayProvider(record)
        self.service = f"the flash local daemon at {record.url}"

    async def resolve(self, resource: str) -> QueueBackend:
        """The daemon's endpoint ``resource`` (checked with ``GET /v2/{resource}/health``).

        Raises:
            ManifestServiceUnavailableError: refused, cut or 5xx, ``tries`` times in a row.
            ManifestError: the daemon has no endpoint of that name.
            ConfigurationError: it refused the API key.
        """
        from flash_actors.providers.runpod.dataplane import error_text
        from flash_actors.providers.runpod.provider import RunPodBackend, lb_target

        client = self._client
        delay = 0.1
        problem = ""
        for attempt in range(1, self.tries + 1):
            try:
                status, body = await client.request("GET", f"/v2/{resource}/health")
            except DeliveryError as exc:
                problem = _reason(exc)
            else:
                if status == 200:
                    lb_url, lb_headers = lb_target(client.plane.base_url, resource)
                    return RunPodBackend(
                        client.plane,
                        resource,
                        lb_url=lb_url,
                        lb_headers=lb_headers,
                        persist=client.reconnecting,
                        job_policy=client.job_policy,
                    )
                if status == 404:
                    msg = (
                        f"resource {resource!r} is not deployed on {self.service} "
                        f"({error_text(body)}): deploy the app again (`flash build "
                        "--preview`, or `flash deploy`)"
                    )
                    raise ManifestError(msg)
                if status in (401, 403):
                    msg = (
                        f"{self.service} refused the API key (FLASH_LOCAL_API_KEY) while "
                        f"looking up resource {resource!r}: {error_text(body)}"
                    )
                    raise ConfigurationError(msg)
                problem = f"HTTP {status}: {error_text(body)}"
                if status < 500:
                    break
            if attempt < self.tries:
                await anyio.sleep(delay)
                delay *= 2
        msg = (
            f"cannot look up where resource {resource!r} is deployed: {self.service}, "
            f"which resolves the app's endpoints, cannot be reached ({problem}; "
            f"{self.tries} tries): start it again (`flash local up`, or run `flash build "
            "--preview` again), or point FLASH_LOCAL_URL at the one serving the app"
        )
        raise ManifestServiceUnavailableError(msg)

    async def aclose(self) -> None:
        """Close the connections to the daemon."""
        await self._client.aclose()


class RunPodResolver:
    """Resources of a Flash environment, from its endpoints (``getFlashEnvironment``).

    RunPod's Flash control plane lists each deployed environment's endpoints by resource
    name; ``flash local`` answers the same query for the environments deployed to it. The
    endpoints are then reached on the data plane with the same key.

    Args:
        environment_id: the environment (``FLASH_ENVIRONMENT_ID``).
        settings: the API key and URLs (default: `load_settings`, RunPod's variables).
        transport: how requests travel (default: HTTPS).
        tries: attempts to reach the control plane before `ManifestServiceUnavailableError`.
    """

    def __init__(
        self,
        environment_id: str,
        settings: RunPodSettings | None = None,
        *,
        transport: Transport | None = None,
        tries: int = RESOLVE_TRIES,
    ) -> None:
        from flash_actors.providers.runpod.credentials import load_settings
        from flash_actors.providers.runpod.transport import HttpsTransport

        self.environment_id = environment_id
        self.settings = settings or load_settings()
        self.transport: Transport = transport or HttpsTransport()
        self.tries = max(1, tries)
        self.service = (
            f"the Flash control plane at {self.settings.api_base_url} "
            f"(environment {environment_id})"
        )
        self._endpoints: dict[str, str] | None = None

    async def _environment_endpoints(self) -> dict[str, str]:
        from flash_actors.errors import GraphQLError
        from flash_actors.providers.runpod.flash_apps import FlashApps
        from flash_actors.providers.runpod.graphql import ControlPlane
        from flash_actors.providers.runpod.provisioning import without_flashboot_suffix

        control = ControlPlane(
            self.transport, self.settings.api_base_url, self.settings.api_key
        )
        apps = FlashApps(control, self.transport)
        delay = 0.1
        problem = ""
        for attempt in range(1, self.tries + 1):
            try:
                environment = await apps.environment(self.environment_id)
            except GraphQLError as exc:
                msg = (
                    f"{self.service} does not know this app's environment ({exc}): deploy "
                    "the app again (`flash deploy send`), or fix FLASH_ENVIRONMENT_ID"
                )
                raise ManifestError(msg) from exc
            except DeliveryError as exc:
                problem = _reason(exc)
            else:
                return {
                    without_flashboot_suffix(str(e["name"])): str(e["id"])
                    for e in environment.get("endpoints") or []
                    if isinstance(e, dict) and e.get("name") and e.get("id")
                }
            if attempt < self.tries:
                await anyio.sleep(delay)
                delay *= 2
        msg = (
            f"cannot look up where this app's resources are deployed: {self.service} "
            f"cannot be reached ({problem}; {self.tries} tries): check RUNPOD_API_BASE_URL "
            "and the network, then call again"
        )
        raise ManifestServiceUnavailableError(msg)

    async def resolve(self, resource: str) -> QueueBackend:
        """The environment's endpoint for ``resource`` (its list is read again when absent).

        Raises:
            ManifestServiceUnavailableError: the control plane cannot be reached.
            ManifestError: the environment has no endpoint for ``resource``.
        """
        from flash_actors.providers.runpod.dataplane import DataPlane
        from flash_actors.providers.runpod.provider import RunPodBackend, lb_target

        if self._endpoints is None or resource not in self._endpoints:
            self._endpoints = await self._environment_endpoints()
        endpoint_id = self._endpoints.get(resource)
        if endpoint_id is None:
            known = ", ".join(sorted(self._endpoints)) or "none"
            msg = (
                f"resource {resource!r} has no endpoint in {self.service} (it has: "
                f"{known}): deploy the app again (`flash deploy send`)"
            )
            raise ManifestError(msg)
        plane = DataPlane(
            self.transport, self.settings.endpoint_base_url, self.settings.api_key
        )
        lb_url, lb_headers = lb_target(plane.base_url, endpoint_id)
        return RunPodBackend(plane, endpoint_id, lb_url=lb_url, lb_headers=lb_headers)

    async def aclose(self) -> None:
        """Close the HTTPS connections."""
        await self.transport.aclose()


def _reason(exc: BaseException) -> str:
    """The OS error under ``exc`` (a refused connection, say), else its own message."""
    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    return str(root) or str(exc)


def default_resolver() -> EndpointResolver:
    """The resolver of this deployed process: the ``flash local`` daemon that serves the app.

    Raises:
        ManifestServiceUnavailableError: no resolver is configured (the message says what
            to set).
    """
    from flash_actors.providers.local.daemon.record import find_daemon

    environment = os.environ.get(ENVIRONMENT_ENV)
    if environment:
        return RunPodResolver(environment, _daemon_settings())
    record = find_daemon()
    if record is None:
        msg = (
            "this deployed app has no service to resolve its endpoints: set "
            "FLASH_LOCAL_URL and FLASH_LOCAL_API_KEY to the flash local daemon that serves "
            "it (flash build --preview sets them), or unset FLASH_LOCAL=0"
        )
        raise ManifestServiceUnavailableError(msg)
    return DaemonResolver(record)


def _daemon_settings() -> RunPodSettings | None:
    """The RunPod settings of a ``flash local`` daemon's worker: the daemon (None elsewhere)."""
    from flash_actors.providers.runpod.credentials import RunPodSettings

    url = os.environ.get("FLASH_LOCAL_URL", "").strip().rstrip("/")
    key = os.environ.get("FLASH_LOCAL_API_KEY", "")
    if not (url and key):
        return None
    return RunPodSettings(
        api_key=key,
        api_base_url=url,
        endpoint_base_url=f"{url}/v2",
        api_key_source="FLASH_LOCAL_API_KEY",
    )


def codeless(call: Call, key: bytes | None) -> FunctionRequest:
    """``call``'s request as a deployed endpoint takes it: no code, named by its key, signed.

    Unchanged (no second signature) when it already is in that form.
    """
    req = call.request
    name = call.key or None
    fields: dict[str, Any] = {}
    if req.execution_type == "class":
        if name and req.class_name != name:
            fields["class_name"] = name
    elif name and req.function_name != name:
        fields["function_name"] = name
    for field in ("function_code", "class_code", "dependencies", "system_dependencies"):
        if getattr(req, field) is not None:
            fields[field] = None
    if req.modules:
        fields["modules"] = {}
    if not fields:
        return req
    stripped = msgspec.structs.replace(req, **fields)
    return sign_request(stripped, key) if key is not None else stripped


class _DeployedBackend:
    """A resource's deployed endpoint, resolved at its first call, sent calls without code.

    Resolved when a call needs it (not when the Endpoint actor starts), so that a resolver
    that cannot be reached is that call's answer; the next call tries again.
    """

    capacity = 4096  # the deployed endpoint queues; see QueueBackend
    enforces: frozenset[Enforced] = ENFORCES_ALL

    def __init__(
        self, resolver: Callable[[], Awaitable[QueueBackend]], key: bytes | None
    ) -> None:
        self._resolver = resolver
        self._key = key
        self._backend: QueueBackend | None = None
        self._lock = anyio.Lock()

    async def _resolved(self) -> QueueBackend:
        if self._backend is None:
            async with self._lock:
                if self._backend is None:
                    self._backend = await self._resolver()
        return self._backend

    async def execute(
        self,
        call: Call,
        *,
        job_id: str,
        chunks: MemoryObjectSendStream[FunctionResponse] | None = None,
    ) -> FunctionResponse:
        if self._key is None:
            msg = (
                f"{call.function}() is on resource {call.endpoint!r}, and deployed "
                "resources sign their calls to each other with the app's secret: set "
                "FLASH_SECRET (the same hex string for every resource of the app)"
            )
            raise ConfigurationError(msg)
        backend = await self._resolved()
        request = codeless(call, self._key)
        if request is not call.request:
            call = msgspec.structs.replace(call, request=request)
        return await backend.execute(call, job_id=job_id, chunks=chunks)

    async def aclose(self) -> None:
        if self._backend is not None:
            await self._backend.aclose()


class DeployedProvider:
    """The app's other resources, at their deployed endpoints (see the module docstring).

    Args:
        resolver: where the endpoints are (default: `default_resolver`, made at the first
            call).
        secret: the app's secret (hex; default ``FLASH_SECRET``), from which each
            resource's key is derived.
    """

    name = "deployed"

    def __init__(
        self, resolver: EndpointResolver | None = None, *, secret: str | None = None
    ) -> None:
        self._resolver = resolver
        self._secret = os.environ.get("FLASH_SECRET", "") if secret is None else secret
        self._keys: dict[str, bytes | None] = {}

    def signing_key(self, endpoint: str) -> bytes | None:
        """``endpoint``'s key under the app's secret, or None without one (calls then fail).

        Raises:
            ConfigurationError: the secret is not hex.
        """
        if endpoint not in self._keys:
            self._keys[endpoint] = (
                secret_key(self._secret, endpoint) if self._secret else None
            )
        return self._keys[endpoint]

    async def __aenter__(self) -> DeployedProvider:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def open_endpoint(
        self, resource: ServerlessResource, key: bytes | None
    ) -> _DeployedBackend:
        """``resource``'s deployed endpoint, resolved at its first call.

        That call raises `ManifestServiceUnavailableError` when the resolver cannot be
        reached, `ManifestError` when it has no endpoint for the resource.
        """
        return _DeployedBackend(functools.partial(self._resolve, resource.name), key)

    async def _resolve(self, name: str) -> QueueBackend:
        if self._resolver is None:
            self._resolver = default_resolver()
        backend = await self._resolver.resolve(name)
        log.info("deployed.resolved", resource=name, service=self._resolver.service)
        return backend

    async def aclose(self) -> None:
        """Close the resolver's connections."""
        resolver, self._resolver = self._resolver, None
        if resolver is not None:
            with anyio.CancelScope(shield=True):
                await resolver.aclose()
