"""The gateway's HTTP face (aiohttp, 127.0.0.1 only): RunPod's data plane and worker protocol.

- Data plane (PROTOCOL.md section 1) under ``/v2/{endpoint_id}/``: ``run``, ``runsync``,
  ``status/{id}``, ``stream/{id}``, ``cancel/{id}``, ``retry/{id}``, ``purge-queue``,
  ``health``. ``status`` also takes ``?wait=ms`` (wait for the job to end) and ``run`` an
  ``id`` and ``stream`` field: extensions our own client uses, ignored by stock clients.
- Worker side (section 2): ``job-take/{worker}``, ``job-take-batch/{worker}``,
  ``job-done/{worker}/{job}``, ``job-stream/{worker}/{job}``, ``ping/{worker}``,
  ``job-stop/{worker}``.
- Our own: ``/flash/v1/status``, ``PUT /flash/v1/endpoints/{name}``, ``/flash/v1/shutdown``.

Every request needs the API key: ``Authorization: Bearer <key>`` or the bare key (workers);
anything else (a non-ASCII header included) is a 401.

Bounded by construction: a body over its route's limit (``/run`` 10 MB, ``/runsync`` 20 MB,
a worker's ``job-done`` and ``job-stream`` the 20 MB result limit plus 1 MB, anything else
1 MB) is refused from its ``Content-Length`` or as soon as the bytes read pass the limit
(413); JSON nested too deeply is a 400. Bodies and answers over 1 MB share one memory
budget (``FLASH_LOCAL_LARGE_BUDGET_MB``, 128 MB): beyond it, requests wait their turn
unread. Nothing is read before the API key is checked. `HttpServer` closes connections idle
(or sending their head or body too slowly) for ``FLASH_LOCAL_IDLE_TIMEOUT_S`` and refuses
connections beyond a cap, and keeps answering at its open-file limit.
"""

from __future__ import annotations

import asyncio  # noqa: TID251 (the daemon runs aiohttp on its own asyncio loop)
import contextlib
import hmac
import os
import resource
import time
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
from aiohttp import web

from flash_actors._logging import get_logger
from flash_actors.messages import wire_encoder
from flash_actors.providers.local.daemon.errors import GatewayError
from flash_actors.providers.local.daemon.jobs import RESULT_LIMIT

if TYPE_CHECKING:
    import socket
    from collections.abc import AsyncIterator, Awaitable, Callable

    from flash_actors.providers.local.daemon.gateway import Gateway
    from flash_actors.providers.local.daemon.jobs import Job

__all__ = ["HttpServer", "make_app"]

log = get_logger(__name__)

MB = 1024 * 1024
RUN_LIMIT = 10 * MB
RUNSYNC_LIMIT = 20 * MB
# a worker's job-done: the result plus RunPod's few fields around it
DONE_LIMIT = RESULT_LIMIT + MB
SMALL_LIMIT = MB  # every other body (registrations, stream chunks, cancels)
IDLE_TIMEOUT_S = 75.0  # aiohttp's and nginx's keep-alive default
LARGE_BUDGET = 128 * MB  # large bodies and answers at once: FLASH_LOCAL_LARGE_BUDGET_MB


class _TooLarge(Exception):
    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


async def _read(request: web.Request, limit: int, within_s: float) -> bytes:
    """The body, refused (`_TooLarge`) from its Content-Length or once it passes ``limit``.

    Raises:
        GatewayError: 408 when the whole body has not come within ``within_s``.
    """
    length = request.content_length
    if length is not None and length > limit:
        raise _TooLarge(length)
    parts: list[bytes] = []
    size = 0
    with anyio.move_on_after(within_s):
        while chunk := await request.content.readany():
            size += len(chunk)
            if size > limit:
                raise _TooLarge(size)
            parts.append(chunk)
        return b"".join(parts)
    msg = f"the request body did not arrive within {within_s:g} s"
    raise GatewayError(408, msg)


def _too_large(size: int, limit: int, what: str) -> GatewayError:
    return GatewayError(
        413,
        f"payload too large: the {what} body of {size} bytes exceeds the "
        f"{limit // MB} MB limit; send large data by reference (a URL or a volume path)",
    )


class _Budget:
    """The bytes of large request bodies and answers (over 1 MB) the daemon holds at once.

    Over ``total``, a request waits (its bytes unread) for others to finish, up to
    ``wait_s``, then gets a 429: memory stays near ``total`` times a small factor (a body
    is copied once more into SQLite) however many clients send at once.
    """

    def __init__(self, total: int, wait_s: float) -> None:
        self.total = total
        self.wait_s = wait_s
        self.used = 0
        self._freed = anyio.Event()

    @contextlib.asynccontextmanager
    async def hold(self, size: int) -> AsyncIterator[None]:
        size = min(size, self.total)
        if size <= SMALL_LIMIT:
            yield
            return
        with anyio.move_on_after(self.wait_s):
            while self.used + size > self.total:
                await self._freed.wait()
        if self.used + size > self.total:
            msg = (
                f"too many large requests at once ({self.used // MB} MB in flight, the "
                f"limit is {self.total // MB} MB); retry shortly"
            )
            raise GatewayError(429, msg)
        self.used += size
        try:
            yield
        finally:
            self.used -= size
            self._freed.set()
            self._freed = anyio.Event()


def _decode(decoder: Any, body: bytes, what: str) -> Any:
    """Decode JSON; malformed, mistyped or too deeply nested JSON is a 400 naming ``what``."""
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise GatewayError(400, f"invalid {what}: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise GatewayError(400, f"the {what} is not JSON: {exc}") from exc
    except RecursionError as exc:
        raise GatewayError(400, f"the {what} is nested too deeply") from exc


class _RunBody(msgspec.Struct):
    input: msgspec.Raw
    webhook: str | None = None
    policy: dict[str, Any] | None = None
    s3Config: Any = None
    id: str | None = None
    stream: bool = False


_run_decoder = msgspec.json.Decoder(_RunBody)
_json_decoder = msgspec.json.Decoder()


def _json(payload: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=wire_encoder.encode(payload),
        status=status,
        content_type="application/json",
    )


def _wait_ms(request: web.Request, default: int, low: int, high: int) -> float:
    raw = request.query.get("wait")
    if raw is None:
        return default / 1000
    try:
        value = int(raw)
    except ValueError as exc:
        msg = f"wait must be an integer of milliseconds, got {raw!r}"
        raise GatewayError(400, msg) from exc
    return min(max(value, low), high) / 1000


def _token(header: str) -> bytes:
    """A presented key as bytes; b"" for one no key can be (non-ASCII)."""
    try:
        return header.strip().encode("ascii")
    except UnicodeEncodeError:
        return b""


def make_app(
    gateway: Gateway,
    api_key: str,
    shutdown: anyio.Event,
    *,
    owner_token: str = "",
    idle_timeout_s: float = IDLE_TIMEOUT_S,
    large_budget: int = LARGE_BUDGET,
) -> web.Application:
    """The aiohttp application serving ``gateway``.

    ``owner_token`` (the private gateway's, known only to the process that started it; sent
    as ``?owner=``) lets a registration name a handler file outside the served folder; see
    `Catalog.check_config`.
    """
    key = api_key.encode()
    owner = owner_token.encode()
    budget = _Budget(large_budget, idle_timeout_s)

    @web.middleware
    async def guard(
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        token = auth[7:] if auth[:7].lower() == "bearer " else auth
        if not hmac.compare_digest(_token(token), key):
            return _json({"error": "Unauthorized: a valid API key is required"}, 401)
        try:
            return await handler(request)
        except GatewayError as exc:
            return _json({"error": exc.message}, exc.status)
        except RecursionError:  # JSON nested too deeply, wherever it was decoded
            return _json({"error": "the request is nested too deeply"}, 400)

    async def read(request: web.Request, limit: int, what: str) -> bytes:
        try:
            return await _read(request, limit, idle_timeout_s)
        except _TooLarge as exc:
            raise _too_large(exc.size, limit, what) from None

    def large(request: web.Request, limit: int, what: str) -> Any:
        """Hold the budget for this request's body (refused at once if it says it is too big)."""
        length = request.content_length
        if length is not None and length > limit:
            raise _too_large(length, limit, what)
        return budget.hold(limit if length is None else length)

    async def send_envelope(request: web.Request, job: Job) -> web.StreamResponse:
        """The job's envelope, its output read from the store under the budget."""
        async with budget.hold(
            2 * gateway.book.output_size(job)
        ):  # the output, then its answer
            response = _json(gateway.book.envelope(job))
            await response.prepare(request)
            await response.write_eof()
        return response

    def endpoint(request: web.Request) -> Any:
        return gateway.catalog.endpoint(request.match_info["endpoint"])

    async def submit(request: web.Request, limit: int) -> Any:
        ep = endpoint(request)
        route = request.path.rsplit("/", 1)[-1]
        async with large(request, limit, route):
            parsed = _decode(_run_decoder, await read(request, limit, route), "request")
            raw_input = memoryview(parsed.input)  # the body's bytes, not a copy
            if len(raw_input) <= 4 and bytes(raw_input) in {b"null", b""}:
                raise GatewayError(400, "invalid request: input is required")
            options: dict[str, Any] = dict(parsed.policy or {})
            unknown = set(options) - {
                "abandonAfter",
                "executionTimeout",
                "lowPriority",
                "ttl",
            }
            if unknown:
                msg = f"unknown policy field(s) {sorted(unknown)}; known: abandonAfter, executionTimeout, lowPriority, ttl"
                raise GatewayError(400, msg)
            options["webhook"] = parsed.webhook
            options["stream"] = parsed.stream
            return ep, gateway.plane.submit(ep, raw_input, options, parsed.id)

    async def run(request: web.Request) -> web.Response:
        _, job = await submit(request, RUN_LIMIT)
        return _json({"id": job.id, "status": job.status})

    async def runsync(request: web.Request) -> web.StreamResponse:
        wait = _wait_ms(request, 90_000, 1_000, 300_000)
        _, job = await submit(request, RUNSYNC_LIMIT)
        await gateway.plane.wait(job, wait)
        if job.terminal:
            return await send_envelope(request, job)
        return _json({"id": job.id, "status": job.status})

    async def status(request: web.Request) -> web.StreamResponse:
        ep = endpoint(request)
        job = gateway.catalog.job(ep, request.match_info["job"])
        wait = _wait_ms(request, 0, 0, 300_000)
        if wait:
            await gateway.plane.wait(job, wait)
        return await send_envelope(request, job)

    async def stream(request: web.Request) -> web.Response:
        ep = endpoint(request)
        job = gateway.catalog.job(ep, request.match_info["job"])
        wait = _wait_ms(request, 1_000, 0, 300_000)
        chunks = await gateway.plane.drain_stream(job, wait)
        answer: dict[str, Any] = {
            "status": job.status,
            "stream": [msgspec.Raw(chunk) for chunk in chunks],
        }
        if job.terminal and job.record.error is not None:
            answer["error"] = job.record.error
        return _json(answer)

    async def cancel(request: web.Request) -> web.Response:
        ep = endpoint(request)
        job = gateway.catalog.job(ep, request.match_info["job"])
        gateway.book.cancel(ep, job)
        return _json({"id": job.id, "status": job.status})

    async def retry(request: web.Request) -> web.Response:
        ep = endpoint(request)
        job = gateway.catalog.job(ep, request.match_info["job"])
        gateway.book.retry(ep, job)
        return _json({"id": job.id, "status": job.status})

    async def purge(request: web.Request) -> web.Response:
        removed = gateway.book.purge(endpoint(request))
        return _json({"removed": removed, "status": "completed"})

    async def health(request: web.Request) -> web.Response:
        return _json(gateway.plane.health(endpoint(request)))

    # -- the worker side --------------------------------------------------------------------

    def _job_json(job: Any) -> dict[str, Any]:
        return {"id": job.id, "input": msgspec.Raw(gateway.book.input_of(job))}

    def gone(request: web.Request, ep: Any, jobs: list[Any]) -> bool:
        """True (and the jobs queued again) if the worker hung up while it waited."""
        transport = request.transport
        if jobs and (transport is None or transport.is_closing()):
            gateway.protocol.untake(ep, request.match_info["worker"], jobs)
            return True
        return False

    async def take(request: web.Request) -> web.Response:
        ep = endpoint(request)
        jobs = await gateway.protocol.take(ep, request.match_info["worker"], 1)
        if not jobs or gone(request, ep, jobs):
            return web.Response(status=204)
        return _json(_job_json(jobs[0]))

    async def take_batch(request: web.Request) -> web.Response:
        ep = endpoint(request)
        try:
            size = max(1, int(request.query.get("batch_size", "1")))
        except ValueError as exc:
            raise GatewayError(400, "batch_size must be an integer") from exc
        jobs = await gateway.protocol.take(ep, request.match_info["worker"], size)
        if not jobs or gone(request, ep, jobs):
            return web.Response(status=204)
        return _json([_job_json(job) for job in jobs])

    async def done(request: web.Request) -> web.Response:
        ep = endpoint(request)
        worker, job_id = request.match_info["worker"], request.match_info["job"]
        length = request.content_length
        try:  # JSON, though the worker says form-encoded
            if length is not None and length > DONE_LIMIT:
                raise _TooLarge(length)
            async with budget.hold(DONE_LIMIT if length is None else length):
                body = await _read(request, DONE_LIMIT, idle_timeout_s)
                gateway.protocol.done(ep, worker, job_id, body)
        except _TooLarge as exc:
            gateway.protocol.refuse_result(ep, worker, job_id, exc.size)
            raise _too_large(exc.size, DONE_LIMIT, "job-done") from None
        return _json({})

    async def job_stream(request: web.Request) -> web.Response:
        ep = endpoint(request)
        async with large(request, DONE_LIMIT, "job-stream"):
            body = await read(request, DONE_LIMIT, "job-stream")
            gateway.protocol.stream_chunk(
                ep, request.match_info["worker"], request.match_info["job"], body
            )
        return _json({})

    async def ping(request: web.Request) -> web.Response:
        gateway.protocol.worker(endpoint(request), request.match_info["worker"])
        return _json({})

    async def job_stop(request: web.Request) -> web.Response:
        ep = endpoint(request)
        stops = await gateway.protocol.stop_signals(ep, request.match_info["worker"])
        if not stops:
            return web.Response(status=204)
        return _json({"jobsToStop": stops})

    # -- our own ----------------------------------------------------------------------------

    async def flash_status(request: web.Request) -> web.Response:
        return _json(gateway.status_table())

    async def put_endpoint(request: web.Request) -> web.Response:
        config = _decode(
            _json_decoder, await read(request, SMALL_LIMIT, "registration"), "body"
        )
        if not isinstance(config, dict):
            raise GatewayError(400, "the body must be a JSON object")
        name = request.match_info["name"]
        presented = _token(request.query.get("owner", ""))
        if not (owner and hmac.compare_digest(presented, owner)):
            config = gateway.catalog.check_config(name, config)
        ep = await gateway.register(name, config)
        return _json({"name": ep.name, "kind": ep.kind})

    async def flash_shutdown(request: web.Request) -> web.Response:
        shutdown.set()
        return _json({"status": "stopping"})

    app = web.Application(middlewares=[guard], client_max_size=SMALL_LIMIT)
    v2 = "/v2/{endpoint}"
    app.router.add_post(f"{v2}/run", run)
    app.router.add_post(f"{v2}/runsync", runsync)
    for method in ("GET", "POST"):
        app.router.add_route(method, f"{v2}/status/{{job}}", status)
        app.router.add_route(method, f"{v2}/stream/{{job}}", stream)
    app.router.add_post(f"{v2}/cancel/{{job}}", cancel)
    app.router.add_post(f"{v2}/retry/{{job}}", retry)
    app.router.add_post(f"{v2}/purge-queue", purge)
    app.router.add_get(f"{v2}/health", health)
    # no HEAD where a GET hands something out: a HEAD's answer has no body to get it in
    app.router.add_get(f"{v2}/job-take/{{worker}}", take, allow_head=False)
    app.router.add_get(f"{v2}/job-take-batch/{{worker}}", take_batch, allow_head=False)
    app.router.add_post(f"{v2}/job-done/{{worker}}/{{job}}", done)
    app.router.add_post(f"{v2}/job-stream/{{worker}}/{{job}}", job_stream)
    app.router.add_get(f"{v2}/ping/{{worker}}", ping)
    app.router.add_get(f"{v2}/job-stop/{{worker}}", job_stop, allow_head=False)
    app.router.add_get("/flash/v1/status", flash_status)
    app.router.add_put("/flash/v1/endpoints/{name}", put_endpoint)
    app.router.add_post("/flash/v1/shutdown", flash_shutdown)
    return app


class _Throttle:
    """At most one log line per condition per ``every_s``, counting the ones held back."""

    def __init__(self, every_s: float = 60.0) -> None:
        self.every_s = every_s
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warn(self, event: str, **data: Any) -> None:
        now = time.monotonic()
        last = self._last.get(event)
        if last is not None and now - last < self.every_s:
            self._held[event] = self._held.get(event, 0) + 1
            return
        self._last[event] = now
        held = self._held.pop(event, 0)
        log.warning(event, **data, repeated=held, quiet_for_s=self.every_s)


class _Refused(asyncio.Protocol):
    """A connection over the cap: closed as soon as it is accepted."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


def max_connections_default() -> int:
    """``FLASH_LOCAL_MAX_CONNECTIONS``, else the open-file limit less room for the rest.

    The daemon's own files (the store, logs, worker pipes) need descriptors too, so the cap
    stays well below ``RLIMIT_NOFILE``.
    """
    value = os.environ.get("FLASH_LOCAL_MAX_CONNECTIONS")
    if value:
        return max(1, int(value))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 4096
    # room for the daemon's own files and for a batch of accepted-then-refused connections
    return max(8, min(4096, soft - max(128, soft // 4)))


class HttpServer:
    """The aiohttp app on a listening socket, with the limits a long-running daemon needs.

    - Idle connections, and clients that send their request head too slowly, are closed
      after ``idle_timeout_s`` (aiohttp's keep-alive timer, which also runs from the moment
      a connection opens); a request body must arrive within that time too (408).
    - At most ``max_connections`` connections at once: more are closed as soon as they are
      accepted.
    - At the open-file limit, asyncio's accept() failure (a traceback every retry) becomes
      one log line a minute; so does the cap being reached.

    Args:
        app: the application (`make_app`).
        sock: bound and listening, non-blocking.
        idle_timeout_s: see above.
        max_connections: see above.
    """

    def __init__(
        self,
        app: web.Application,
        sock: socket.socket,
        *,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        max_connections: int = 1024,
    ) -> None:
        self.runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            shutdown_timeout=5,
            keepalive_timeout=idle_timeout_s,
        )
        self.sock = sock
        self.max_connections = max_connections
        self._throttle = _Throttle()
        self._server: asyncio.Server | None = None
        self._batch = 0

    async def start(self) -> None:
        """Serve from now on."""
        await self.runner.setup()
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._loop_error)
        self._server = await loop.create_server(self._protocol, sock=self.sock)

    def _protocol(self) -> asyncio.BaseProtocol:
        # asyncio accepts a batch of connections, calls this for each, and only then makes
        # them (and aiohttp counts them): count this batch's too.
        server = self.runner.server
        assert server is not None  # noqa: S101 (start() set it up)
        if len(server.connections) + self._batch >= self.max_connections:
            self._throttle.warn("gateway.connections_full", limit=self.max_connections)
            return _Refused()
        if not self._batch:
            asyncio.get_running_loop().call_soon(self._end_batch)
        self._batch += 1
        return server()

    def _end_batch(self) -> None:
        self._batch = 0

    def _loop_error(
        self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]
    ) -> None:
        message = str(context.get("message", ""))
        if message.startswith("socket.accept() out of system resource"):
            self._throttle.warn(
                "gateway.accept_failed",
                error=str(context.get("exception")),
                hint="the open-file limit is reached: connections wait in the backlog",
            )
            return
        loop.default_exception_handler(context)

    async def stop(self) -> None:
        """Stop listening, then close every connection (5 s grace for requests)."""
        if self._server is not None:
            self._server.close()
        await self.runner.cleanup()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
