"""The gateway's HTTP face (aiohttp, 127.0.0.1 only): RunPod's data plane and worker protocol.

- Data plane (PROTOCOL.md section 1) under ``/v2/{endpoint_id}/``: ``run``, ``runsync``,
  ``status/{id}``, ``stream/{id}``, ``cancel/{id}``, ``retry/{id}``, ``purge-queue``,
  ``health``. ``status`` also takes ``?wait=ms`` (wait for the job to end) and ``run`` an
  ``id`` and ``stream`` field: extensions our own client uses, ignored by stock clients.
- Worker side (section 2): ``job-take/{worker}``, ``job-take-batch/{worker}``,
  ``job-done/{worker}/{job}``, ``job-stream/{worker}/{job}``, ``ping/{worker}``,
  ``job-stop/{worker}``.
- Our own: ``/flash/v1/status``, ``PUT /flash/v1/endpoints/{name}``, ``/flash/v1/shutdown``.

Every request needs the API key: ``Authorization: Bearer <key>`` or the bare key (workers).
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web

from flash_actors.gateway.core import Gateway, GatewayError
from flash_actors.messages import wire_encoder

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    import anyio

__all__ = ["make_app"]

RUN_LIMIT = 10 * 1024 * 1024
RUNSYNC_LIMIT = 20 * 1024 * 1024


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


def make_app(gateway: Gateway, api_key: str, shutdown: anyio.Event) -> web.Application:
    """The aiohttp application serving ``gateway``."""
    key = api_key.encode()

    @web.middleware
    async def guard(
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        token = auth[7:] if auth[:7].lower() == "bearer " else auth
        if not hmac.compare_digest(token.strip().encode(), key):
            return _json({"error": "Unauthorized: a valid API key is required"}, 401)
        try:
            return await handler(request)
        except GatewayError as exc:
            return _json({"error": exc.message}, exc.status)

    def endpoint(request: web.Request) -> Any:
        return gateway.endpoint(request.match_info["endpoint"])

    async def submit(request: web.Request, limit: int) -> Any:
        ep = endpoint(request)
        body = await request.read()
        if len(body) > limit:
            msg = f"request body of {len(body)} bytes is over the {limit // (1024 * 1024)} MB limit"
            raise GatewayError(400, msg)
        try:
            parsed = _run_decoder.decode(body)
        except msgspec.ValidationError as exc:
            raise GatewayError(400, f"invalid request: {exc}") from exc
        except msgspec.DecodeError as exc:
            raise GatewayError(400, f"the body is not JSON: {exc}") from exc
        raw_input = bytes(parsed.input)
        if raw_input in {b"null", b""}:
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
        return ep, gateway.submit(ep, raw_input, options, parsed.id)

    async def run(request: web.Request) -> web.Response:
        _, job = await submit(request, RUN_LIMIT)
        return _json({"id": job.id, "status": job.status})

    async def runsync(request: web.Request) -> web.Response:
        wait = _wait_ms(request, 90_000, 1_000, 300_000)
        _, job = await submit(request, RUNSYNC_LIMIT)
        await gateway.wait(job, wait)
        if job.terminal:
            return _json(job.envelope())
        return _json({"id": job.id, "status": job.status})

    async def status(request: web.Request) -> web.Response:
        ep = endpoint(request)
        job = gateway.job(ep, request.match_info["job"])
        wait = _wait_ms(request, 0, 0, 300_000)
        if wait:
            await gateway.wait(job, wait)
        return _json(job.envelope())

    async def stream(request: web.Request) -> web.Response:
        ep = endpoint(request)
        job = gateway.job(ep, request.match_info["job"])
        wait = _wait_ms(request, 1_000, 0, 300_000)
        chunks = await gateway.drain_stream(job, wait)
        answer: dict[str, Any] = {
            "status": job.status,
            "stream": [msgspec.Raw(chunk) for chunk in chunks],
        }
        if job.terminal and job.record.error is not None:
            answer["error"] = job.record.error
        return _json(answer)

    async def cancel(request: web.Request) -> web.Response:
        ep = endpoint(request)
        job = gateway.job(ep, request.match_info["job"])
        gateway.cancel(ep, job)
        return _json({"id": job.id, "status": job.status})

    async def retry(request: web.Request) -> web.Response:
        ep = endpoint(request)
        job = gateway.job(ep, request.match_info["job"])
        gateway.retry(ep, job)
        return _json({"id": job.id, "status": job.status})

    async def purge(request: web.Request) -> web.Response:
        removed = gateway.purge(endpoint(request))
        return _json({"removed": removed, "status": "completed"})

    async def health(request: web.Request) -> web.Response:
        return _json(gateway.health(endpoint(request)))

    # -- the worker side --------------------------------------------------------------------

    def _job_json(job: Any) -> dict[str, Any]:
        return {"id": job.id, "input": msgspec.Raw(job.record.input)}

    def gone(request: web.Request, ep: Any, jobs: list[Any]) -> bool:
        """True (and the jobs queued again) if the worker hung up while it waited."""
        transport = request.transport
        if jobs and (transport is None or transport.is_closing()):
            gateway.untake(ep, request.match_info["worker"], jobs)
            return True
        return False

    async def take(request: web.Request) -> web.Response:
        ep = endpoint(request)
        jobs = await gateway.take(ep, request.match_info["worker"], 1)
        if not jobs or gone(request, ep, jobs):
            return web.Response(status=204)
        return _json(_job_json(jobs[0]))

    async def take_batch(request: web.Request) -> web.Response:
        ep = endpoint(request)
        try:
            size = max(1, int(request.query.get("batch_size", "1")))
        except ValueError as exc:
            raise GatewayError(400, "batch_size must be an integer") from exc
        jobs = await gateway.take(ep, request.match_info["worker"], size)
        if not jobs or gone(request, ep, jobs):
            return web.Response(status=204)
        return _json([_job_json(job) for job in jobs])

    async def done(request: web.Request) -> web.Response:
        ep = endpoint(request)
        body = await request.read()  # JSON, though the worker says form-encoded
        gateway.done(ep, request.match_info["worker"], request.match_info["job"], body)
        return _json({})

    async def job_stream(request: web.Request) -> web.Response:
        ep = endpoint(request)
        body = await request.read()
        gateway.stream_chunk(
            ep, request.match_info["worker"], request.match_info["job"], body
        )
        return _json({})

    async def ping(request: web.Request) -> web.Response:
        gateway.worker(endpoint(request), request.match_info["worker"])
        return _json({})

    async def job_stop(request: web.Request) -> web.Response:
        ep = endpoint(request)
        stops = await gateway.stop_signals(ep, request.match_info["worker"])
        if not stops:
            return web.Response(status=204)
        return _json({"jobsToStop": stops})

    # -- our own ----------------------------------------------------------------------------

    async def flash_status(request: web.Request) -> web.Response:
        return _json(gateway.status_table())

    async def put_endpoint(request: web.Request) -> web.Response:
        try:
            config = _json_decoder.decode(await request.read())
        except msgspec.DecodeError as exc:
            raise GatewayError(400, f"the body is not JSON: {exc}") from exc
        if not isinstance(config, dict):
            raise GatewayError(400, "the body must be a JSON object")
        ep = await gateway.register(request.match_info["name"], config)
        return _json({"name": ep.name, "kind": ep.kind})

    async def flash_shutdown(request: web.Request) -> web.Response:
        shutdown.set()
        return _json({"status": "stopping"})

    app = web.Application(
        middlewares=[guard], client_max_size=RUNSYNC_LIMIT + 1024 * 1024
    )
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
    app.router.add_get(f"{v2}/job-take/{{worker}}", take)
    app.router.add_get(f"{v2}/job-take-batch/{{worker}}", take_batch)
    app.router.add_post(f"{v2}/job-done/{{worker}}/{{job}}", done)
    app.router.add_post(f"{v2}/job-stream/{{worker}}/{{job}}", job_stream)
    app.router.add_get(f"{v2}/ping/{{worker}}", ping)
    app.router.add_get(f"{v2}/job-stop/{{worker}}", job_stop)
    app.router.add_get("/flash/v1/status", flash_status)
    app.router.add_put("/flash/v1/endpoints/{name}", put_endpoint)
    app.router.add_post("/flash/v1/shutdown", flash_shutdown)
    return app
