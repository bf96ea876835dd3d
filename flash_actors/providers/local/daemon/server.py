"""The daemon's HTTP face (aiohttp, 127.0.0.1 only): `make_app` puts its routes together.

- Data plane (PROTOCOL.md section 1): `flash_actors.providers.local.daemon.dataplane_routes`.
- Worker side (section 2): `flash_actors.providers.local.daemon.worker_routes`.
- Load balancers on their own host (``POST /execute``):
  `flash_actors.providers.local.daemon.lb_routes`.
- Control plane (section 4): ``POST /graphql``, answered by the ``graphql`` callable
  (`flash_actors.providers.local.controlplane`).
- Our own: ``/flash/v1/status``, ``PUT /flash/v1/endpoints/{name}``, ``/flash/v1/shutdown``.
- Flash build uploads: ``PUT /flash/v1/uploads/{token}``, answered by the ``upload``
  callable; the one-time token in the URL is its credential (a presigned URL's, as RunPod's
  clients send archives there without the API key).

Every request needs the API key: ``Authorization: Bearer <key>`` or the bare key (workers);
anything else (a non-ASCII header included) is a 401, and nothing is read before the key is
checked. An answer is sent only once every change made before it is committed
(`JobStore.wait_committed`), so nothing a client, a worker or a webhook is told of is lost
if the daemon dies: the middleware waits for answers built whole (most of them), a route
that streams its answer waits itself before it starts. Bodies are bounded (`flash_actors.providers.local.daemon.bodies`); the socket,
its idle timeout and its connection cap are `flash_actors.providers.local.daemon.httpserver`'s.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING

import msgspec
from aiohttp import web

from flash_actors.providers.local.daemon.bodies import (
    IDLE_TIMEOUT_S,
    LARGE_BUDGET,
    MB,
    SMALL_LIMIT,
    Bodies,
    Budget,
    decode,
    json_response,
    token,
)
from flash_actors.providers.local.daemon.dataplane_routes import add_dataplane_routes
from flash_actors.providers.local.daemon.errors import GatewayError
from flash_actors.providers.local.daemon.lb_routes import add_lb_routes
from flash_actors.providers.local.daemon.worker_routes import add_worker_routes

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    import anyio

    from flash_actors.providers.local.daemon.gateway import Gateway

__all__ = ["make_app"]

_json_decoder = msgspec.json.Decoder()
_UPLOADS = "/flash/v1/uploads/"


def make_app(
    gateway: Gateway,
    api_key: str,
    shutdown: anyio.Event,
    *,
    owner_token: str = "",
    idle_timeout_s: float = IDLE_TIMEOUT_S,
    large_budget: int = LARGE_BUDGET,
    graphql: Callable[[bytes], Awaitable[tuple[int, bytes]]] | None = None,
    upload: Callable[
        [str, int | None, AsyncIterator[bytes]], Awaitable[tuple[int, bytes]]
    ]
    | None = None,
    runpod_only: bool = False,
    deployed: Callable[[str, str, str], str] | None = None,
) -> web.Application:
    """The aiohttp application serving ``gateway``.

    ``runpod_only`` hides the data plane's extensions (see
    `flash_actors.providers.local.daemon.dataplane_routes`), so the daemon answers exactly
    as RunPod does.

    ``graphql`` answers ``POST /graphql`` bodies (RunPod's control plane): the HTTP status
    and the JSON answer. ``deployed`` names a deployed Flash app's endpoints for
    ``POST /v2/flash/runsync`` (see `add_dataplane_routes`).

    ``owner_token`` (the private gateway's, known only to the process that started it; sent
    as ``?owner=``) lets a registration name a handler file outside the served folder; see
    `Catalog.check_config`.
    """
    key = api_key.encode()
    owner = owner_token.encode()
    store = gateway.store
    bodies = Bodies(Budget(large_budget, idle_timeout_s), idle_timeout_s)

    @web.middleware
    async def guard(
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        if upload is not None and request.path.startswith(_UPLOADS):
            return await handler(request)  # the URL's token is checked there
        auth = request.headers.get("Authorization", "")
        presented = auth[7:] if auth[:7].lower() == "bearer " else auth
        if not hmac.compare_digest(token(presented), key):
            return json_response(
                {"error": "Unauthorized: a valid API key is required"}, 401
            )
        try:
            response = await handler(request)
        except GatewayError as exc:
            return json_response({"error": exc.message}, exc.status)
        except RecursionError:  # JSON nested too deeply, wherever it was decoded
            return json_response({"error": "the request is nested too deeply"}, 400)
        if store.pending and not response.prepared:
            await store.wait_committed()  # what the answer reports is committed first
        return response

    async def flash_status(request: web.Request) -> web.Response:
        return json_response(gateway.status_table())

    async def put_endpoint(request: web.Request) -> web.Response:
        body = await bodies.read(request, SMALL_LIMIT, "registration")
        config = decode(_json_decoder, body, "body")
        if not isinstance(config, dict):
            raise GatewayError(400, "the body must be a JSON object")
        name = request.match_info["name"]
        presented = token(request.query.get("owner", ""))
        if not (owner and hmac.compare_digest(presented, owner)):
            config = gateway.catalog.check_config(name, config)
        ep = await gateway.register(name, config)
        return json_response({"name": ep.name, "kind": ep.kind})

    async def graphql_route(request: web.Request) -> web.Response:
        assert graphql is not None  # noqa: S101 (routed only when given)
        status, answer = await graphql(
            await bodies.read(request, SMALL_LIMIT, "graphql")
        )
        return web.Response(body=answer, status=status, content_type="application/json")

    async def upload_route(request: web.Request) -> web.Response:
        assert upload is not None  # noqa: S101 (routed only when given)
        status, answer = await upload(
            request.match_info["token"],
            request.content_length,
            request.content.iter_chunked(MB),
        )
        return web.Response(body=answer, status=status, content_type="application/json")

    async def flash_shutdown(request: web.Request) -> web.Response:
        shutdown.set()
        return json_response({"status": "stopping"})

    app = web.Application(middlewares=[guard], client_max_size=SMALL_LIMIT)
    add_dataplane_routes(
        app, gateway, bodies, runpod_only=runpod_only, deployed=deployed
    )
    add_lb_routes(app, gateway, bodies)
    add_worker_routes(app, gateway, bodies)
    app.router.add_get("/flash/v1/status", flash_status)
    app.router.add_put("/flash/v1/endpoints/{name}", put_endpoint)
    app.router.add_post("/flash/v1/shutdown", flash_shutdown)
    if graphql is not None:
        app.router.add_post("/graphql", graphql_route)
    if upload is not None:
        app.router.add_put(_UPLOADS + "{token}", upload_route)
    return app
