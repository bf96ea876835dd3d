"""The RunPod provider: endpoints on RunPod Serverless (or on anything that speaks its API).

``FLASH_PROVIDER=runpod`` or ``runtime(provider="runpod")``. The key comes from
``RUNPOD_API_KEY``, ``.env`` or ``~/.runpod/config.toml``; ``RUNPOD_API_BASE_URL`` and
``RUNPOD_ENDPOINT_BASE_URL`` point it elsewhere (`flash local` included, which is how it is
tested). Each endpoint is provisioned on its first call through GraphQL ``saveEndpoint``, as
runpod-flash 1.21 sends it (`flash_actors.providers.runpod.provisioning`): an endpoint of that
name with the same config is reused, one whose config changed is updated.

Calls are Flash ``FunctionRequest`` jobs through the shared data-plane client with RunPod's
documented API only (`RUNPOD` capabilities: no caller-chosen ids, no long-poll): each job is
submitted with ``/runsync`` and handed back in that answer when it ends within
`flash_actors.providers.runpod.backend.RUNSYNC_WAIT_MS`, else its status is polled with
backoff; `RUNPOD_CAPACITY` calls per endpoint are in flight at once;
load-balancer endpoints are called over HTTP at ``/execute`` on the endpoint's own host
(``https://{id}.api.runpod.ai``). RunPod's stock Flash workers do not check signatures, so
requests go unsigned and results are trusted as Flash trusts them: over TLS, from the
account's own endpoints.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import msgspec

from flash_actors.errors import ConfigurationError, FlashRuntimeError
from flash_actors.messages import FunctionResponse, response_decoder, wire_encoder
from flash_actors.providers.runpod import credentials
from flash_actors.providers.runpod.backend import QUEUE_CAPACITY, QueueBackend
from flash_actors.providers.runpod.dataplane import RUNPOD, Capabilities, DataPlane
from flash_actors.providers.runpod.graphql import ControlPlane
from flash_actors.providers.runpod.provisioning import ensure_endpoint
from flash_actors.providers.runpod.transport import HttpsTransport

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from types import TracebackType

    from anyio.streams.memory import MemoryObjectSendStream

    from flash_actors.messages import Call
    from flash_actors.providers.runpod.transport import Transport
    from flash_actors.resources import ServerlessResource

__all__ = ["RUNPOD_CAPACITY", "RunPodBackend", "RunPodProvider", "lb_target"]

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
RUNPOD_CAPACITY = 256
"""Calls in flight at once per endpoint on a server without caller-chosen job ids (RunPod).

Each such call has one request open at a time (its ``/runsync``, then a ``/status`` poll),
so this bounds the endpoint's concurrent requests: under RunPod's documented 400 concurrent
``/runsync`` or ``/status`` requests per endpoint, and no more than `HttpsTransport`'s
connections, so that requests do not queue inside httpx's pool, which scans all its waiters
at every change (thousands of waiters cost more CPU than the calls themselves). The Endpoint
actor queues the calls beyond it, cheaply.
"""


def lb_target(endpoint_base_url: str, endpoint_id: str) -> tuple[str, dict[str, str]]:
    """Where a load-balancer endpoint answers: its base URL, and a ``Host`` header if needed.

    On RunPod that is ``https://{id}.{domain}`` (the domain of ``RUNPOD_ENDPOINT_BASE_URL``,
    as runpod-flash derives it). A loopback stand-in (``flash local``) cannot have DNS names
    per endpoint: the request goes to its address with ``Host: {id}.{host:port}``, which is
    how it tells endpoints apart.
    """
    parts = urlsplit(endpoint_base_url)
    host = parts.hostname or ""
    if host in LOOPBACK_HOSTS:
        return f"{parts.scheme}://{parts.netloc}", {
            "host": f"{endpoint_id}.{parts.netloc}"
        }
    return f"https://{endpoint_id}.{parts.netloc}", {}


class RunPodBackend(QueueBackend):
    """One RunPod endpoint: queue jobs through the data plane, load-balancer calls over HTTP.

    ``persist`` and ``job_policy`` are `QueueBackend`'s; without caller-chosen job ids
    (RunPod), `RUNPOD_CAPACITY` calls are let through at once.
    """

    def __init__(
        self,
        plane: DataPlane,
        endpoint_id: str,
        *,
        lb_url: str,
        lb_headers: dict[str, str],
        persist: Callable[[str, Callable[[], Awaitable[Any]]], Awaitable[Any]]
        | None = None,
        job_policy: Callable[[dict[str, int]], dict[str, int]] | None = None,
    ) -> None:
        super().__init__(
            plane,
            endpoint_id,
            persist=persist,
            job_policy=job_policy,
            capacity=QUEUE_CAPACITY if plane.capabilities.job_ids else RUNPOD_CAPACITY,
        )
        self.lb_url = lb_url
        self._lb_headers = {
            **plane.headers,
            **lb_headers,
        }

    async def execute(
        self,
        call: Call,
        *,
        job_id: str,
        chunks: MemoryObjectSendStream[FunctionResponse] | None = None,
    ) -> FunctionResponse:
        """A queue job, or for a load-balancer call one ``POST /execute`` on the endpoint."""
        if call.policy.delivery != "load_balancer" or chunks is not None:
            return await super().execute(call, job_id=job_id, chunks=chunks)
        timeout = call.policy.execution_timeout_s
        response = await self.plane.transport.request(
            "POST",
            f"{self.lb_url}/execute",
            body=wire_encoder.encode(call.request),
            headers=self._lb_headers,
            timeout_s=None if timeout is None else timeout + 30.0,
        )
        if response.status != 200:
            self.plane.raise_for(response, f"{self.endpoint_id} /execute")
        try:
            return response_decoder.decode(response.body)
        except msgspec.DecodeError as exc:
            msg = (
                f"{call.function}(): the load-balancer endpoint {self.endpoint_id!r} did not "
                f"answer with a Flash FunctionResponse ({exc})"
            )
            raise FlashRuntimeError(msg) from exc


class RunPodProvider:
    """Endpoints on RunPod Serverless.

    Args:
        api_key: default: `credentials.api_key` (``RUNPOD_API_KEY``, ``.env``,
            ``~/.runpod/config.toml``).
        api_url: the GraphQL base (default ``RUNPOD_API_BASE_URL`` or RunPod's).
        endpoint_url: the data-plane base (default ``RUNPOD_ENDPOINT_BASE_URL`` or RunPod's).
        transport: how requests travel (default: HTTPS through httpx).
        capabilities: what the data-plane server offers beyond RunPod's API (default none).
    """

    name = "runpod"

    def __init__(
        self,
        *,
        api_key: str | None = None,
        api_url: str | None = None,
        endpoint_url: str | None = None,
        transport: Transport | None = None,
        capabilities: Capabilities = RUNPOD,
    ) -> None:
        self._api_key = api_key
        self._api_url = api_url
        self._endpoint_url = endpoint_url
        self._transport = transport
        self.capabilities = capabilities
        self.control: ControlPlane | None = None
        self.plane: DataPlane | None = None
        self.endpoints: dict[str, dict[str, Any]] = {}

    async def __aenter__(self) -> RunPodProvider:
        if self._api_key and self._api_url and self._endpoint_url:
            key, api_url, endpoint_url = (
                self._api_key,
                self._api_url,
                self._endpoint_url,
            )
        else:
            settings = credentials.load_settings()
            key = self._api_key or settings.api_key
            api_url = self._api_url or settings.api_base_url
            endpoint_url = self._endpoint_url or settings.endpoint_base_url
        if self._transport is None:
            self._transport = HttpsTransport()
        self.control = ControlPlane(self._transport, api_url, key)
        self.plane = DataPlane(
            self._transport, endpoint_url, key, capabilities=self.capabilities
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def signing_key(self, endpoint: str) -> None:
        """None: RunPod's Flash workers do not check signatures (see the module docstring)."""
        del endpoint

    async def open_endpoint(
        self, resource: ServerlessResource, key: bytes | None
    ) -> RunPodBackend:
        """Provision (or reuse, or update) the endpoint through GraphQL ``saveEndpoint``.

        Raises:
            ConfigurationError: a handler-file endpoint (RunPod runs those from a Docker
                image you build; use the local provider or ``flash local`` for them), or
                a rejected key.
            GraphQLMutationError: RunPod refused the endpoint (its message).
        """
        del key
        if self.control is None or self.plane is None:
            msg = "the RunPod provider is not running (enter it with `async with`)"
            raise ConfigurationError(msg)
        if resource.handler is not None:
            msg = (
                f"endpoint {resource.name!r} runs the handler file {resource.handler!r}: on "
                "RunPod a handler runs from a Docker image you build and push; run it with "
                "the local provider or `flash local` here"
            )
            raise ConfigurationError(msg)
        record = await ensure_endpoint(self.control, resource)
        self.endpoints[resource.name] = record
        lb_url, lb_headers = lb_target(self.plane.base_url, str(record["id"]))
        return RunPodBackend(
            self.plane, str(record["id"]), lb_url=lb_url, lb_headers=lb_headers
        )

    async def aclose(self) -> None:
        """Close connections (the endpoints stay: `flash undeploy` removes them)."""
        transport, self._transport = self._transport, None
        if transport is not None:
            await transport.aclose()
