"""The data plane's routes (PROTOCOL.md section 1) under ``/v2/{endpoint_id}/``.

``run``, ``runsync``, ``status/{id}``, ``stream/{id}``, ``cancel/{id}``, ``retry/{id}``,
``purge-queue``, ``health``, ``metrics``. ``status`` also takes ``?wait=ms`` (wait for the job
to end), ``run`` an ``id`` and ``stream`` field and the policy an ``abandonAfter``: extensions
our own client uses, ignored by stock clients. So are ``runbatch`` (many jobs in one request,
each under its caller-chosen id, each accepted or refused on its own) and ``feed/{feed}``
(their results, many per long poll: `flash_actors.providers.local.daemon.feeds`). With
``runpod_only`` (``flash local up --runpod-only``) none of this is offered: ``id`` and
``stream`` are ignored and ``?wait`` on ``status`` too, ``abandonAfter`` is an unknown policy
field, and ``runbatch`` and ``feed`` do not exist, as on RunPod.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec

from flash_actors.providers.local.daemon.bodies import (
    RUN_LIMIT,
    RUNSYNC_LIMIT,
    SMALL_LIMIT,
    decode,
    json_response,
    wait_ms,
)
from flash_actors.providers.local.daemon.errors import GatewayError
from flash_actors.providers.local.daemon.jobs import Job

if TYPE_CHECKING:
    from collections.abc import Callable

    from aiohttp import web

    from flash_actors.providers.local.daemon.bodies import Bodies
    from flash_actors.providers.local.daemon.catalog import Endpoint
    from flash_actors.providers.local.daemon.gateway import Gateway

__all__ = ["add_dataplane_routes"]

_POLICY_FIELDS = ("abandonAfter", "executionTimeout", "lowPriority", "ttl")
_RUNPOD_POLICY_FIELDS = ("executionTimeout", "lowPriority", "ttl")


class _RunBody(msgspec.Struct):
    input: msgspec.Raw
    webhook: str | None = None
    policy: dict[str, Any] | None = None
    s3Config: Any = None
    id: str | None = None
    stream: bool = False


_run_decoder = msgspec.json.Decoder(_RunBody)

MAX_BATCH_JOBS = 1_000
"""The most jobs one ``runbatch`` request may carry."""


class _BatchJob(msgspec.Struct):
    id: str
    input: msgspec.Raw
    policy: dict[str, Any] | None = None


class _BatchBody(msgspec.Struct):
    feed: str
    jobs: list[_BatchJob]


class _AckBody(msgspec.Struct):
    ack: list[str] = []


_batch_decoder = msgspec.json.Decoder(_BatchBody)
_ack_decoder = msgspec.json.Decoder(_AckBody)


def add_dataplane_routes(
    app: web.Application,
    gateway: Gateway,
    bodies: Bodies,
    *,
    runpod_only: bool = False,
    deployed: Callable[[str, str, str], str] | None = None,
) -> None:
    """Add the data plane's routes, served by ``gateway``, to ``app``.

    ``deployed(app, environment, resource)`` names the endpoint of a deployed resource (or
    raises `LookupError` saying what there is): with it, ``POST /v2/flash/runsync`` with
    runpod-flash's ``X-Flash-App``, ``X-Flash-Environment`` and ``X-Flash-Endpoint`` headers
    runs Flash's deployed-mode input on that endpoint.
    """
    catalog, book, plane, feeds = (
        gateway.catalog,
        gateway.book,
        gateway.plane,
        gateway.feeds,
    )
    known_policy = _RUNPOD_POLICY_FIELDS if runpod_only else _POLICY_FIELDS

    async def send_envelope(request: web.Request, job: Job) -> web.StreamResponse:
        """The job's envelope, its output read from the store under the budget.

        Streamed here, so it waits itself for the commit of what it reports (the other
        answers wait in `make_app`'s middleware).
        """
        async with bodies.budget.hold(
            2 * book.output_size(job)
        ):  # the output, then its answer
            response = json_response(book.envelope(job))
            await book.store.wait_committed()
            await response.prepare(request)
            await response.write_eof()
        return response

    def endpoint(request: web.Request) -> Endpoint:
        name = request.match_info["endpoint"]
        if name == "flash" and "X-Flash-Endpoint" in request.headers:
            name = flash_endpoint(request)
        return catalog.endpoint(name)

    def flash_endpoint(request: web.Request) -> str:
        """The endpoint runpod-flash's deployed-mode headers name."""
        headers = request.headers
        missing = [
            h
            for h in ("X-Flash-App", "X-Flash-Environment", "X-Flash-Endpoint")
            if not headers.get(h)
        ]
        if missing:
            raise GatewayError(400, f"deployed-mode call without {', '.join(missing)}")
        if deployed is None:
            raise GatewayError(404, "this server runs no deployed Flash apps")
        try:
            return deployed(
                headers["X-Flash-App"],
                headers["X-Flash-Environment"],
                headers["X-Flash-Endpoint"],
            )
        except LookupError as exc:
            raise GatewayError(404, str(exc.args[0] if exc.args else exc)) from None

    def job_of(request: web.Request) -> tuple[Endpoint, Job]:
        ep = endpoint(request)
        return ep, catalog.job(ep, request.match_info["job"])

    async def submit(request: web.Request, limit: int) -> Job:
        ep = endpoint(request)
        route = request.path.rsplit("/", 1)[-1]
        async with bodies.large(request, limit, route):
            body = await bodies.read(request, limit, route)
            parsed = decode(_run_decoder, body, "request")
            options = options_of(parsed.policy)
            options["webhook"] = parsed.webhook
            options["stream"] = parsed.stream and not runpod_only
            return plane.submit(
                ep, input_of(parsed.input), options, None if runpod_only else parsed.id
            )

    def input_of(raw: msgspec.Raw) -> memoryview:
        """A job's input: the body's bytes, not a copy; a missing input is a 400."""
        raw_input = memoryview(raw)
        if len(raw_input) <= 4 and bytes(raw_input) in {b"null", b""}:
            raise GatewayError(400, "invalid request: input is required")
        return raw_input

    def options_of(policy: dict[str, Any] | None) -> dict[str, Any]:
        """A job's options from its policy; an unknown policy field is a 400."""
        options: dict[str, Any] = dict(policy or {})
        unknown = set(options) - set(known_policy)
        if unknown:
            msg = (
                f"unknown policy field(s) {sorted(unknown)}; known: "
                f"{', '.join(known_policy)}"
            )
            raise GatewayError(400, msg)
        return options

    async def run(request: web.Request) -> web.Response:
        job = await submit(request, RUN_LIMIT)
        return json_response({"id": job.id, "status": job.status})

    async def runsync(request: web.Request) -> web.StreamResponse:
        wait = wait_ms(request, 90_000, 1_000, 300_000)
        job = await submit(request, RUNSYNC_LIMIT)
        await plane.wait(job, wait)
        if job.terminal:
            return await send_envelope(request, job)
        return json_response({"id": job.id, "status": job.status})

    async def status(request: web.Request) -> web.StreamResponse:
        _, job = job_of(request)
        wait = 0 if runpod_only else wait_ms(request, 0, 0, 300_000)
        if wait:
            await plane.wait(job, wait)
        return await send_envelope(request, job)

    async def stream(request: web.Request) -> web.Response:
        _, job = job_of(request)
        wait = wait_ms(request, 1_000, 0, 300_000)
        chunks = await plane.drain_stream(job, wait)
        answer: dict[str, Any] = {
            "status": job.status,
            "stream": [msgspec.Raw(chunk) for chunk in chunks],
        }
        if job.terminal and job.record.error is not None:
            answer["error"] = job.record.error
        return json_response(answer)

    async def cancel(request: web.Request) -> web.Response:
        ep, job = job_of(request)
        book.cancel(ep, job)
        return json_response({"id": job.id, "status": job.status})

    async def retry(request: web.Request) -> web.Response:
        ep, job = job_of(request)
        book.retry(ep, job)
        return json_response({"id": job.id, "status": job.status})

    async def purge(request: web.Request) -> web.Response:
        removed = book.purge(endpoint(request))
        return json_response({"removed": removed, "status": "completed"})

    async def health(request: web.Request) -> web.Response:
        return json_response(plane.health(endpoint(request)))

    async def metrics(request: web.Request) -> web.Response:
        # what runpod-flash reads while it waits: ``workers`` by state, ``readyWorkers`` ids
        ep = endpoint(request)
        ready = [w.id for w in ep.workers.values() if w.state in {"idle", "running"}]
        return json_response(
            {"workers": ep.worker_counts(), "readyWorkers": ready, "jobs": ep.counts()}
        )

    async def runbatch(request: web.Request) -> web.Response:
        """Many jobs at once, each under its own id: each is accepted or refused alone.

        With ``?wait=ms``, the answer waits (that long at most) until one of them has ended,
        and carries the envelope of each that has: a lone call costs one request, as with
        ``runsync``. The others' results come on the feed.
        """
        ep = endpoint(request)
        wait = wait_ms(request, 0, 0, 60_000)
        async with bodies.large(request, RUN_LIMIT, "runbatch"):
            body = await bodies.read(request, RUN_LIMIT, "runbatch")
            parsed = decode(_batch_decoder, body, "request")
            if len(parsed.jobs) > MAX_BATCH_JOBS:
                msg = (
                    f"a runbatch request carries at most {MAX_BATCH_JOBS} jobs, "
                    f"got {len(parsed.jobs)}"
                )
                raise GatewayError(400, msg)
            feed = feeds.open(ep.name, parsed.feed)
            answers: list[dict[str, Any] | Job] = []
            accepted: list[Job] = []
            for item in parsed.jobs:
                try:
                    job = plane.submit(
                        ep, input_of(item.input), options_of(item.policy), item.id
                    )
                except GatewayError as exc:
                    answers.append(
                        {"id": item.id, "error": exc.message, "code": exc.status}
                    )
                    continue
                feeds.watch(feed, job)
                answers.append(job)
                accepted.append(job)
        if wait and accepted:
            await feed.wait_any(accepted, wait, gateway.closing)
        out: list[dict[str, Any]] = []
        size = 0
        for answer in answers:
            if not isinstance(answer, Job):
                out.append(answer)
            elif answer.terminal and (
                size + (output := book.output_size(answer)) <= SMALL_LIMIT
            ):  # larger outputs: on the feed, whose answers hold the memory budget
                size += output
                out.append(book.envelope(answer))
                feed.hand_out(answer)
            else:
                out.append({"id": answer.id, "status": answer.status})
        return json_response({"jobs": out})

    async def feed(request: web.Request) -> web.Response:
        """The ended jobs of a feed, once the acknowledged ones are dropped (long-polled)."""
        ep = endpoint(request)
        wait = wait_ms(request, 30_000, 0, 300_000)
        body = await bodies.read(request, SMALL_LIMIT, "feed")
        ack = decode(_ack_decoder, body, "request").ack if body else []
        known = feeds.find(ep.name, request.match_info["feed"])
        if known is None:
            return json_response({"known": False, "jobs": []})
        jobs = await feeds.take(known, ack, wait)
        # Outputs of up to 20 MB each: as many as fit one large answer, at least one.
        size, count = 0, 0
        for job in jobs:
            output = book.output_size(job)
            if count and size + output > RUNSYNC_LIMIT:
                break
            size += output
            count += 1
        async with bodies.budget.hold(2 * size):
            return json_response(
                {"known": True, "jobs": [book.envelope(job) for job in jobs[:count]]}
            )

    v2 = "/v2/{endpoint}"
    if not runpod_only:
        app.router.add_post(f"{v2}/runbatch", runbatch)
        app.router.add_post(f"{v2}/feed/{{feed}}", feed)
    app.router.add_post(f"{v2}/run", run)
    app.router.add_post(f"{v2}/runsync", runsync)
    for method in ("GET", "POST"):
        app.router.add_route(method, f"{v2}/status/{{job}}", status)
        app.router.add_route(method, f"{v2}/stream/{{job}}", stream)
    app.router.add_post(f"{v2}/cancel/{{job}}", cancel)
    app.router.add_post(f"{v2}/retry/{{job}}", retry)
    app.router.add_post(f"{v2}/purge-queue", purge)
    app.router.add_get(f"{v2}/health", health)
    app.router.add_get(f"{v2}/metrics", metrics)
