"""Load-balancer endpoints on their own host: ``Host: {id}.{daemon host:port}``.

On RunPod a load-balancer endpoint answers at ``https://{endpoint_id}.api.runpod.ai``. An
endpoint here cannot have a DNS name of its own, so a request for it comes to the daemon's
address with the endpoint's id as the first label of its ``Host`` header (what the RunPod
provider sends when its base URL is a loopback address, see
`flash_actors.providers.runpod.provider.lb_target`). Such requests pass the same API-key
check as every other route first.

- A deployed load balancer (`Endpoint.serves_app`) answers ANY method and path of its app:
  the request is proxied to the app process the daemon runs for it
  (`flash_actors.providers.local.daemon.balancers`), its headers and body streamed through
  both ways (hop-by-hop headers dropped, ``X-Forwarded-For``/``-Host``/``-Proto`` added,
  bodies not decompressed). A request body over `PROXY_BODY_LIMIT` is a 413 (from its
  ``Content-Length``, or once that much has been read), one that stalls for the daemon's
  idle timeout a 408. When the client goes away the upstream request is closed, which
  cancels the route's function in the app. 503 while its app starts (naming why and its log
  when it cannot start) and when its app refuses the connection (it died and is started
  again), 502 when the app went away in the middle of the request.
- ``POST /execute`` on a live load-balancer endpoint is Flash's live load-balancer route: a
  ``FunctionRequest`` in (signed by the daemon when a stock client sent it unsigned, as for
  queued jobs), its ``FunctionResponse`` out, straight from one of the endpoint's workers:
  no queue and no retry, as on RunPod. Errors answer ``{"error": ...}``: 404 for an unknown
  endpoint or one that is not a load balancer, 400 for a body that is not a
  FunctionRequest, 503 while the endpoint's workers cannot start, 502 when its worker died,
  504 past the execution timeout.

A ``Host`` whose first label names no endpoint is a 404 naming it.
"""

from __future__ import annotations

import ipaddress
import secrets
from typing import TYPE_CHECKING

import aiohttp
import anyio
import msgspec
from aiohttp import web
from yarl import URL

from flash_actors._logging import get_logger
from flash_actors.errors import DeliveryError, ExecutionTimeoutError, FlashRuntimeError
from flash_actors.messages import Call, request_decoder, wire_encoder
from flash_actors.policies import RetryPolicy
from flash_actors.providers.local.daemon.bodies import RUNSYNC_LIMIT, too_large
from flash_actors.providers.local.daemon.errors import GatewayError
from flash_actors.providers.local.signing import sign_for_workers

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

    from flash_actors.providers.local.daemon.bodies import Bodies
    from flash_actors.providers.local.daemon.catalog import Endpoint
    from flash_actors.providers.local.daemon.gateway import Gateway

__all__ = ["PROXY_BODY_LIMIT", "add_lb_routes"]

log = get_logger(__name__)

POOL_WAIT_S = 30.0
PROXY_BODY_LIMIT = RUNSYNC_LIMIT
"""The largest request body proxied to a deployed load balancer's app (the daemon's
largest, ``/runsync``'s)."""
DISCONNECT_POLL_S = 0.1
"""How often a proxied request checks that its client is still connected."""
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
"""Headers of one connection (RFC 9110 section 7.6.1), never forwarded."""


def _forwardable(headers: Mapping[str, str]) -> list[tuple[str, str]]:
    """``headers`` without hop-by-hop ones (and those ``Connection`` names) or ``Host``."""
    items = list(headers.items())  # every value of a repeated header
    named = {
        token.strip().lower()
        for name, value in items
        if name.lower() == "connection"
        for token in value.split(",")
    }
    return [
        (name, value)
        for name, value in items
        if (low := name.lower()) not in HOP_BY_HOP
        and low not in named
        and low != "host"
    ]


def _is_address(host: str) -> bool:
    """``host`` (``name:port``) is a bare IP address: no endpoint label in front of it."""
    if host.startswith("[") and "]" in host:  # [IPv6]:port
        name = host[1 : host.index("]")]
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _endpoint_label(host: str) -> str | None:
    """The endpoint id in ``Host: {id}.{daemon address}``, else None (the daemon itself).

    The daemon's address is an IP address or ``localhost``, with or without a port: a host
    name of another shape is left to the daemon's own routes.
    """
    label, dot, rest = host.partition(".")
    if not dot or not label or _is_address(host):
        return None
    name = rest.rsplit(":", 1)[0] if rest.count(":") == 1 else rest
    if name.lower() != "localhost" and not _is_address(rest):
        return None
    return label


class _Upload:
    """A request body streamed to the app, within the limit and the idle timeout."""

    def __init__(self, request: web.Request, idle_s: float) -> None:
        self.request = request
        self.idle_s = idle_s
        self.size = 0
        self.problem: GatewayError | None = None

    async def _next(self) -> bytes:
        with anyio.move_on_after(self.idle_s):
            return await self.request.content.readany()
        self.problem = GatewayError(
            408, f"the request body stalled for {self.idle_s:g} s"
        )
        raise self.problem

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body, chunk by chunk as it arrives (`problem` set when it is refused)."""
        while chunk := await self._next():
            self.size += len(chunk)
            if self.size > PROXY_BODY_LIMIT:
                self.problem = too_large(self.size, PROXY_BODY_LIMIT, "request")
                raise self.problem
            yield chunk


class _Proxy:
    """Requests for deployed load balancers, forwarded to their app processes."""

    def __init__(self, idle_s: float) -> None:
        self.idle_s = idle_s
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:  # made on the daemon's loop, at the first request
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),
                auto_decompress=False,  # bodies pass through as they are
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
                cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
            )
        return self._session

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def handle(self, request: web.Request, ep: Endpoint) -> web.StreamResponse:
        """Forward ``request`` to ``ep``'s app; the client's disconnect cancels it."""
        app = ep.app
        if app is None or not app.ready:
            message = (
                app.status()
                if app is not None
                else f"endpoint {ep.name!r} is starting its app; retry shortly"
            )
            raise GatewayError(503, message)
        length = request.content_length
        if length is not None and length > PROXY_BODY_LIMIT:
            raise too_large(length, PROXY_BODY_LIMIT, "request")
        answer: web.StreamResponse | None = None
        problem: GatewayError | None = None
        async with anyio.create_task_group() as tg:

            async def watch_client() -> None:
                while True:
                    transport = request.transport
                    if transport is None or transport.is_closing():
                        log.info("balancer.client_gone", endpoint=ep.name)
                        tg.cancel_scope.cancel()
                        return
                    await anyio.sleep(DISCONNECT_POLL_S)

            tg.start_soon(watch_client)
            try:
                answer = await self._forward(request, ep, app.port)
            except GatewayError as exc:  # raised here, not wrapped in a group
                problem = exc
            finally:
                tg.cancel_scope.cancel()
        if problem is not None:
            raise problem
        if answer is None:  # the client is gone: nobody reads this
            return web.Response(status=499)
        return answer

    async def _forward(
        self, request: web.Request, ep: Endpoint, port: int
    ) -> web.StreamResponse:
        headers = _forwardable(request.headers)
        headers += [
            ("X-Forwarded-For", request.remote or "127.0.0.1"),
            ("X-Forwarded-Host", request.host),
            ("X-Forwarded-Proto", request.scheme),
        ]
        upload = _Upload(request, self.idle_s)
        url = URL(f"http://127.0.0.1:{port}{request.raw_path}", encoded=True)
        answer: web.StreamResponse | None = None
        try:
            async with self.session().request(
                request.method,
                url,
                headers=headers,
                data=upload.chunks() if request.body_exists else None,
                allow_redirects=False,
            ) as upstream:
                answer = web.StreamResponse(
                    status=upstream.status, reason=upstream.reason
                )
                for name, value in _forwardable(upstream.headers):
                    answer.headers.add(name, value)
                await answer.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await answer.write(chunk)
                await answer.write_eof()
                return answer
        except (aiohttp.ClientError, OSError) as exc:
            if upload.problem is not None:
                raise upload.problem from None
            if answer is not None and answer.prepared:
                # the head is sent: all that can be done is to cut the answer short
                log.warning("balancer.answer_cut", endpoint=ep.name, error=str(exc))
                if request.transport is not None:
                    request.transport.close()
                return answer
            if isinstance(exc, aiohttp.ClientConnectorError):
                # nothing was sent: its app died and the daemon has not seen it yet (it is
                # started again), as a caller retrying a 503 expects
                msg = f"endpoint {ep.name!r} is starting its app; retry shortly"
                raise GatewayError(503, msg) from exc
            app = ep.app
            where = f" (log: {app.log_path})" if app is not None else ""
            msg = f"endpoint {ep.name!r}: its app did not answer ({exc}){where}"
            raise GatewayError(502, msg) from exc


def add_lb_routes(app: web.Application, gateway: Gateway, bodies: Bodies) -> None:
    """Serve load-balancer endpoints, chosen by ``Host`` (see the module docstring).

    Adds a middleware (after those already there, so the API key is checked first) that
    proxies every request for a deployed load balancer, and ``POST /execute`` for live ones.
    """
    proxy = _Proxy(bodies.idle_timeout_s)

    @web.middleware
    async def by_host(
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        endpoint_id = _endpoint_label(request.host)
        if endpoint_id is None:
            return await handler(request)
        ep = gateway.catalog.endpoints.get(endpoint_id)
        if ep is None:
            msg = (
                f"no endpoint {endpoint_id!r} here (Host: {request.host}): the first label "
                "of Host names a load-balancer endpoint of this daemon; check the id"
            )
            raise GatewayError(404, msg)
        if ep.serves_app:
            return await proxy.handle(request, ep)
        return await handler(request)

    async def close_proxy(app: web.Application) -> None:
        del app
        await proxy.aclose()

    app.middlewares.append(by_host)
    app.on_cleanup.append(close_proxy)

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
