"""Load-balancer endpoints on their own host: ``POST /execute`` with ``Host: {id}.{daemon}``.

On RunPod a load-balancer endpoint answers at ``https://{endpoint_id}.api.runpod.ai``. An
endpoint here cannot have a DNS name of its own, so a request for it comes to the daemon's
address with the endpoint's id as the first label of its ``Host`` header (what the RunPod
provider sends when its base URL is a loopback address, see
`flash_actors.providers.runpod.provider.lb_target`).

``/execute`` is Flash's live load-balancer route: a ``FunctionRequest`` in (signed by the
daemon when a stock client sent it unsigned, as for queued jobs), its ``FunctionResponse``
out, straight from one of the endpoint's workers: no queue and no retry, as on RunPod.
Errors answer ``{"error": ...}``: 404 for an unknown endpoint or one that is not a load
balancer, 400 for a body that is not a FunctionRequest, 503 while the endpoint's workers
cannot start, 502 when its worker died, 504 past the execution timeout.
"""

from __future__ import annotations

import ipaddress
import secrets
from typing import TYPE_CHECKING

import anyio
import msgspec
from aiohttp import web

from flash_actors.errors import DeliveryError, ExecutionTimeoutError, FlashRuntimeError
from flash_actors.messages import Call, request_decoder, wire_encoder
from flash_actors.policies import RetryPolicy
from flash_actors.providers.local.daemon.bodies import RUNSYNC_LIMIT
from flash_actors.providers.local.daemon.errors import GatewayError
from flash_actors.providers.local.signing import sign_for_workers

if TYPE_CHECKING:
    from flash_actors.providers.local.daemon.bodies import Bodies
    from flash_actors.providers.local.daemon.gateway import Gateway

__all__ = ["add_lb_routes"]

POOL_WAIT_S = 30.0


def _is_address(host: str) -> bool:
    """``host`` (``name:port``) is a bare IP address: no endpoint label in front of it."""
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True


def add_lb_routes(app: web.Application, gateway: Gateway, bodies: Bodies) -> None:
    """Add ``POST /execute`` (load-balancer endpoints, chosen by ``Host``) to ``app``."""

    async def execute(request: web.Request) -> web.Response:
        endpoint_id, dot, _ = request.host.partition(".")
        if not dot or not endpoint_id or _is_address(request.host):
            msg = (
                "POST /execute is a load-balancer endpoint's route: send it with "
                "Host: {endpoint_id}.<this daemon's host:port>"
            )
            raise GatewayError(404, msg)
        ep = gateway.catalog.endpoint(endpoint_id)
        if ep.kind != "flash" or not ep.resource.is_load_balancer:
            msg = (
                f"endpoint {endpoint_id!r} is not a load balancer: send it jobs at /v2"
            )
            raise GatewayError(404, msg)
        async with bodies.large(request, RUNSYNC_LIMIT, "execute"):
            body = await bodies.read(request, RUNSYNC_LIMIT, "execute")
            try:
                signed = request_decoder.decode(sign_for_workers(body, ep.key_name))
            except FlashRuntimeError as exc:
                raise GatewayError(400, str(exc)) from exc
            with anyio.move_on_after(POOL_WAIT_S):
                while ep.backend is None:  # noqa: ASYNC110 (set by the dispatcher)
                    await anyio.sleep(0.05)
            backend = ep.backend
            if backend is None:
                msg = (
                    f"endpoint {endpoint_id!r}: its workers did not start; see its logs"
                )
                raise GatewayError(503, msg)
            policy = ep.resource.call_policy()
            call = Call(
                endpoint=ep.name,
                function=signed.function_name or signed.class_name or "?",
                request=signed,
                policy=msgspec.structs.replace(policy, retry=RetryPolicy.never()),
            )
            try:
                response = await backend.execute(call, job_id=secrets.token_hex(12))
            except ExecutionTimeoutError as exc:
                raise GatewayError(504, str(exc)) from exc
            except DeliveryError as exc:
                raise GatewayError(502, str(exc)) from exc
            except FlashRuntimeError as exc:
                raise GatewayError(400, str(exc)) from exc
        return web.Response(
            body=wire_encoder.encode(response), content_type="application/json"
        )

    app.router.add_post("/execute", execute)
