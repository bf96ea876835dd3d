"""The worker protocol's routes (PROTOCOL.md section 2) under ``/v2/{endpoint_id}/``.

``job-take/{worker}``, ``job-take-batch/{worker}``, ``job-done/{worker}/{job}``,
``job-stream/{worker}/{job}``, ``ping/{worker}``, ``job-stop/{worker}``. Jobs handed to a
worker that hung up while it waited go back to the queue. No HEAD where a GET hands
something out: a HEAD's answer has no body to get it in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web

from flash_actors.providers.local.daemon.bodies import (
    DONE_LIMIT,
    TooLargeError,
    json_response,
    read_body,
    too_large,
)
from flash_actors.providers.local.daemon.errors import GatewayError

if TYPE_CHECKING:
    from flash_actors.providers.local.daemon.bodies import Bodies
    from flash_actors.providers.local.daemon.catalog import Endpoint
    from flash_actors.providers.local.daemon.gateway import Gateway
    from flash_actors.providers.local.daemon.jobs import Job

__all__ = ["add_worker_routes"]


def add_worker_routes(app: web.Application, gateway: Gateway, bodies: Bodies) -> None:
    """Add the worker protocol's routes, served by ``gateway``, to ``app``."""
    catalog, book, protocol = gateway.catalog, gateway.book, gateway.protocol

    def endpoint(request: web.Request) -> Endpoint:
        return catalog.endpoint(request.match_info["endpoint"])

    def job_json(job: Job) -> dict[str, Any]:
        return {"id": job.id, "input": msgspec.Raw(book.input_of(job))}

    def gone(request: web.Request, ep: Endpoint, jobs: list[Job]) -> bool:
        """True (and the jobs queued again) if the worker hung up while it waited."""
        transport = request.transport
        if jobs and (transport is None or transport.is_closing()):
            protocol.untake(ep, request.match_info["worker"], jobs)
            return True
        return False

    async def take(request: web.Request) -> web.Response:
        ep = endpoint(request)
        jobs = await protocol.take(ep, request.match_info["worker"], 1)
        if not jobs or gone(request, ep, jobs):
            return web.Response(status=204)
        return json_response(job_json(jobs[0]))

    async def take_batch(request: web.Request) -> web.Response:
        ep = endpoint(request)
        try:
            size = max(1, int(request.query.get("batch_size", "1")))
        except ValueError as exc:
            raise GatewayError(400, "batch_size must be an integer") from exc
        jobs = await protocol.take(ep, request.match_info["worker"], size)
        if not jobs or gone(request, ep, jobs):
            return web.Response(status=204)
        return json_response([job_json(job) for job in jobs])

    async def done(request: web.Request) -> web.Response:
        ep = endpoint(request)
        worker, job_id = request.match_info["worker"], request.match_info["job"]
        length = request.content_length
        try:  # JSON, though the worker says form-encoded
            if length is not None and length > DONE_LIMIT:
                raise TooLargeError(length)
            async with bodies.budget.hold(DONE_LIMIT if length is None else length):
                body = await read_body(request, DONE_LIMIT, bodies.idle_timeout_s)
                protocol.done(ep, worker, job_id, body)
        except TooLargeError as exc:
            protocol.refuse_result(ep, worker, job_id, exc.size)
            raise too_large(exc.size, DONE_LIMIT, "job-done") from None
        return json_response({})

    async def job_stream(request: web.Request) -> web.Response:
        ep = endpoint(request)
        async with bodies.large(request, DONE_LIMIT, "job-stream"):
            body = await bodies.read(request, DONE_LIMIT, "job-stream")
            protocol.stream_chunk(
                ep, request.match_info["worker"], request.match_info["job"], body
            )
        return json_response({})

    async def ping(request: web.Request) -> web.Response:
        protocol.worker(endpoint(request), request.match_info["worker"])
        return json_response({})

    async def job_stop(request: web.Request) -> web.Response:
        ep = endpoint(request)
        stops = await protocol.stop_signals(ep, request.match_info["worker"])
        if not stops:
            return web.Response(status=204)
        return json_response({"jobsToStop": stops})

    v2 = "/v2/{endpoint}"
    app.router.add_get(f"{v2}/job-take/{{worker}}", take, allow_head=False)
    app.router.add_get(f"{v2}/job-take-batch/{{worker}}", take_batch, allow_head=False)
    app.router.add_post(f"{v2}/job-done/{{worker}}/{{job}}", done)
    app.router.add_post(f"{v2}/job-stream/{{worker}}/{{job}}", job_stream)
    app.router.add_get(f"{v2}/ping/{{worker}}", ping)
    app.router.add_get(f"{v2}/job-stop/{{worker}}", job_stop, allow_head=False)
