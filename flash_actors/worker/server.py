"""The worker's HTTP server (aiohttp, on its own asyncio loop, loopback only).

Routes:

- ``POST /execute``: ``{"jobs": [{"id", "request": FunctionRequest, "stream"?, "ahead"?},
  ...], "concurrency"?}`` as msgpack (our client) or JSON. The worker runs at most
  ``concurrency`` jobs at once (default 1: the endpoint's ``max_concurrency``, the same in
  every batch), in arrival order; the others wait in the worker (as entries: a job gets its
  task when it starts). The reply streams one answer per job as it finishes
  (length-prefixed msgpack frames, or JSON lines for a JSON body; answers of small jobs
  that end one after the other share a write, see `LINGER_S`):
  ``{"id", "response": FunctionResponse}``,
  ``{"id", "chunk": ...}`` for each chunk of a streaming job, ``{"id", "refused": "..."}``
  for a request whose signature does not hold (nothing of it was unpickled), or
  ``{"id", "withdrawn": true}`` for a job taken back before it started. A job sent
  ``ahead`` (or one that had to wait) also gets ``{"id", "started": true}`` when it starts.
- ``POST /cancel``: ``{"ids": [...]}`` cancels those jobs and answers ``{"cancelled": [...],
  "stuck": [...]}``: a stuck job runs code that cannot be interrupted (a sync function in a
  thread, or an async one that ignores cancellation): only ending the process stops it.
- ``POST /withdraw``: ``{"ids": [...]}`` takes back those jobs that have not started yet
  (they never will here) and answers ``{"withdrawn": [...]}``.
- ``GET /ping``: liveness, with the number of running jobs.
- Load-balancer workers also serve the user's own routes (``method`` + ``path``), calling the
  function with the JSON body (or the query string for GET) as keyword arguments and
  answering with its value as JSON.
- Deployed mode (``FLASH_RESOURCE_NAME`` set): the resource's functions from its build's
  manifest instead of ``FLASH_DEPLOYED_MODULES``, code sent with a request refused, and
  ``POST /runsync`` for Flash's deployed-mode input (`flash_actors.deployed.app`).

Every route but ``/ping`` needs ``Authorization: Bearer <token>`` (401 otherwise).

When the worker stops (SIGTERM, or its client process is gone) it cancels its jobs; if one is
stuck, the process ends at once rather than let the code run on unsupervised.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import hmac
import importlib
import json
import os
import signal
import socket
import struct
import sys
import time
import traceback
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
from aiohttp import web

from flash_actors._lifeline import die_with_parent
from flash_actors._private import open_private
from flash_actors.build.manifest import deployed_resource
from flash_actors.messages import FunctionRequest, FunctionResponse, Route
from flash_actors.serialization import verify_request
from flash_actors.worker import _capture, isolation
from flash_actors.worker.executor import BLOCKING, Blocking, Executor, invoke

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine, Sequence

    _Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

__all__ = ["WorkerApp", "forked_main", "main", "read_body", "serve"]

CANCEL_GRACE_S = 1.0
"""How long a cancelled async job may take to finish before it counts as stuck."""

LINGER_S = 0.0005
"""How long answers may wait for those of the jobs started after them, to leave in the same
write (only while each such job ends in its first step; see `WorkerApp._flush_later`)."""


class Job(msgspec.Struct, frozen=True):
    """One job of an ``/execute`` batch."""

    id: str
    request: FunctionRequest
    stream: bool = False
    ahead: bool = False  # sent to wait here for a free slot: say when it starts


class Batch(msgspec.Struct, frozen=True):
    """The body of ``/execute``."""

    jobs: list[Job]
    concurrency: int = 1


class Done(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One line of the ``/execute`` reply."""

    id: str
    response: FunctionResponse | None = None
    chunk: FunctionResponse | None = None
    refused: str | None = None
    started: bool = False
    withdrawn: bool = False


class _FirstFrameResponse(web.StreamResponse):
    """A streamed answer whose headers leave with its first write (aiohttp 3.11+)."""

    _send_headers_immediately = False


class _Answers:
    """The answers of one ``/execute`` batch, waiting for its handler to write them.

    Answers are added as they come and leave when the worker flushes them (see
    `WorkerApp._flush_later`): those of jobs that end together go in one write.
    """

    __slots__ = ("_flushed", "_waiter", "done")

    def __init__(self) -> None:
        self.done: list[Done] = []
        self._flushed = False
        self._waiter: asyncio.Future[None] | None = None

    def flush(self) -> None:
        """Let the handler take what is here."""
        self._flushed = True
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def take(self) -> list[Done]:
        """Every answer added so far, once they are flushed (maybe none)."""
        if not self._flushed:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        self._flushed = False
        taken, self.done = self.done, []
        return taken


class _Running:
    """One job of this worker, from its arrival to its answer.

    A job waits as an entry in the worker's queue; its task and cancel scope are made only
    when it starts (a waiting job costs no task: it is withdrawn or cancelled by answering
    it at once).
    """

    __slots__ = (
        "answered",
        "answers",
        "blocking",
        "job",
        "scope",
        "started",
        "task",
        "waited",
        "write",
    )

    def __init__(
        self,
        job: Job,
        answers: _Answers,
        write: Callable[[Done], Awaitable[None]],
    ) -> None:
        self.job = job
        self.answers = answers
        self.write = write
        self.blocking = Blocking()
        self.scope: anyio.CancelScope | None = None
        self.started = False
        self.waited = False  # it arrived while the worker's slots were all taken
        self.answered = False
        self.task: asyncio.Task[FunctionResponse | None] | None = None

    @property
    def stuck(self) -> bool:
        """Running code in a thread: cancellation cannot reach it."""
        return self.blocking.threads > 0


_CANCELLED = FunctionResponse(success=False, error="cancelled", error_type="cancelled")


class Cancel(msgspec.Struct, frozen=True):
    """The body of ``/cancel``."""

    ids: list[str] = []


_batch_json = msgspec.json.Decoder(Batch)
_cancel_json = msgspec.json.Decoder(Cancel)
_batch_msgpack = msgspec.msgpack.Decoder(Batch)
_json = msgspec.json.Encoder()
_msgpack = msgspec.msgpack.Encoder()
_FRAME = struct.Struct(">I")
MSGPACK = "application/msgpack"
"""Our client's body format: msgpack moves multi-megabyte base64 strings several times
faster than JSON (no escaping scan). Answers then come as length-prefixed msgpack frames.
JSON bodies get NDJSON answers, for other clients and for debugging."""


async def read_body(request: web.Request) -> bytes | bytearray:
    """A request's body, copied once into a buffer of the length it announced.

    ``request.read()`` grows a bytearray chunk by chunk, then copies it into bytes: for a
    batch of multi-megabyte arguments, two or more copies where one does. A body without
    ``Content-Length`` (chunked), or a small one, is read the usual way.

    Raises:
        web.HTTPRequestEntityTooLarge: the body is larger than the app's ``client_max_size``.
        web.HTTPBadRequest: the body is longer than its ``Content-Length``.
    """
    size = request.content_length
    if size is None or size < 65536:
        return await request.read()
    if size > request.client_max_size:
        raise web.HTTPRequestEntityTooLarge(
            max_size=request.client_max_size, actual_size=size
        )
    body = bytearray(size)
    with memoryview(body) as view:
        filled = 0
        while chunk := (await request.content.readchunk())[0]:
            end = filled + len(chunk)
            if end > size:
                raise web.HTTPBadRequest(
                    text="the body is longer than its Content-Length"
                )
            view[filled:end] = chunk
            filled = end
    if filled != size:  # aiohttp raises first when the connection ends early
        raise web.HTTPBadRequest(text="the body is shorter than its Content-Length")
    return body


def _json_lines(answers: list[Done]) -> bytes:
    return b"".join(_json.encode(done) + b"\n" for done in answers)


def _msgpack_frames(answers: list[Done]) -> bytes:
    """Length-prefixed msgpack frames, joined for one write."""
    pack = _FRAME.pack
    return b"".join(pack(len(frame)) + frame for frame in map(_msgpack.encode, answers))


class WorkerApp:
    """The state of one worker process.

    Args:
        key: the endpoint's MAC key.
        token: the bearer token callers must present.
        routes: user routes (load-balancer workers).
    """

    def __init__(
        self,
        key: bytes,
        token: str,
        routes: list[Route],
        deployed: dict[str, object] | None = None,
        *,
        executor: Executor | None = None,
        extra_routes: Sequence[tuple[str, str, _Handler]] = (),
    ) -> None:
        self.executor = executor or Executor(
            key, capture_stdout=True, deployed=deployed
        )
        self.key = key
        self.token = token
        self.routes = routes
        self.extra_routes = list(
            extra_routes
        )  # deployed mode's (flash_actors.deployed)
        self.running: dict[str, _Running] = {}  # by job id: waiting or running
        self._waiting: deque[_Running] = deque()  # in arrival order
        self._active = 0  # jobs started and not finished
        self._unflushed: set[_Answers] = set()  # batches with answers to write
        self._unflushed_since = 0.0  # when the oldest of those answers came
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self._slots = 0  # how many may run at once: sized by the first batch
        # asyncio's cancel scope class, looked up once (``anyio.CancelScope()`` asks
        # sniffio for the backend each time)
        self._scope_class: type[anyio.CancelScope] | None = None
        self.worker_id = os.environ.get("FLASH_WORKER_ID") or None
        self._cancelled = self._stamped(_CANCELLED)

    def _authorized(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        try:  # a non-ASCII header is no token of ours (and must not be a 500)
            presented = header.removeprefix("Bearer ").strip().encode("ascii")
        except UnicodeEncodeError:
            return False
        return hmac.compare_digest(presented, self.token.encode())

    @web.middleware
    async def auth(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        """Refuse every request but ``/ping`` without the bearer token.

        JSON (or msgpack) nested too deeply for the decoder is a 400, wherever it is decoded.
        """
        if request.path != "/ping" and not self._authorized(request):
            return web.json_response(
                {"error": "missing or wrong bearer token"}, status=401
            )
        try:
            return await handler(request)
        except RecursionError:
            return web.json_response(
                {"error": "the request body is nested too deeply"}, status=400
            )

    async def ping(self, request: web.Request) -> web.Response:
        """Liveness."""
        del request
        return web.json_response({"status": "ok", "running": len(self.running)})

    async def execute(self, request: web.Request) -> web.StreamResponse:
        """Run a batch of jobs, streaming each result as it finishes."""
        packed = request.content_type == MSGPACK
        try:
            body = await read_body(request)
            batch = (_batch_msgpack if packed else _batch_json).decode(body)
            del body  # the payloads now live in the batch's strings
        except msgspec.DecodeError as exc:
            return web.json_response({"error": f"invalid batch: {exc}"}, status=400)
        except RecursionError:
            return web.json_response(
                {"error": "invalid batch: nested too deeply"}, status=400
            )
        frames = _msgpack_frames if packed else _json_lines
        content_type = (
            "application/x-flash-frames" if packed else "application/x-ndjson"
        )
        # While every job of the batch starts at once, its answer's headers wait for its
        # first frame (one write, one wake-up of the client instead of two); a batch with
        # jobs that wait here sends them at once, so the client may take those back.
        slots = self._slots or max(1, batch.concurrency)
        starts_now = not self._waiting and len(batch.jobs) <= slots - self._active
        response = (_FirstFrameResponse if starts_now else web.StreamResponse)(
            headers={"Content-Type": content_type}
        )
        answers = _Answers()
        write_lock = asyncio.Lock()

        async def write(done: Done) -> None:
            async with write_lock:  # a stream's chunks go between the batch's answers
                await response.write(frames([done]))

        # The jobs are known here before the client sees the answer's headers, so that a
        # /withdraw or /cancel sent after that finds them. A job started meanwhile (a slot
        # freed) waits for the headers before it writes a chunk.
        await write_lock.acquire()
        if not self._slots:
            self._slots = max(1, batch.concurrency)
        entries: list[_Running] = []
        for job in batch.jobs:
            entry = _Running(job, answers, write)
            entries.append(entry)
            self.running[job.id] = entry
            self._waiting.append(entry)
        try:
            await response.prepare(request)
        except BaseException:
            for entry in entries:  # nobody would hear their answers
                if entry.scope is not None:
                    entry.scope.cancel()
                else:
                    entry.answered = True  # never starts
                    self._forget(entry)
            raise
        finally:
            write_lock.release()
        self._flush_later(self._start_waiting())
        for entry in entries:
            entry.waited = not entry.started  # it says when it starts
        left = len(entries)
        while left:
            # Answers that finished together leave in one write (one TCP segment), so the
            # client frees their slots at once and refills them with a full batch; a job
            # that starts as another ends says so in the same write (`_flush_later`).
            done = await answers.take()
            if not done:
                continue
            left -= sum(1 for answer in done if not answer.started)
            async with write_lock:
                if left:
                    await response.write(frames(done))
                else:  # the last answers and the end of the body in one write
                    await response.write_eof(frames(done))
        await response.write_eof()
        return response

    def _start_waiting(self) -> _Running | None:
        """Start waiting jobs, oldest first, while a slot is free; the last one started."""
        started = None
        while self._active < self._slots and self._waiting:
            entry = self._waiting.popleft()
            if not entry.answered:  # else withdrawn or cancelled while it waited
                self._start(entry)
                started = entry
        return started

    def _queue(self, answers: _Answers, done: Done) -> None:
        """Add one answer to its batch's; it leaves with the next flush."""
        answers.done.append(done)
        if not self._unflushed:
            self._unflushed_since = time.monotonic()
        self._unflushed.add(answers)

    def _answer(self, entry: _Running, done: Done) -> None:
        """The job's final answer (only one is ever sent)."""
        if not entry.answered:
            entry.answered = True
            self._queue(entry.answers, done)

    def _flush_later(self, started: _Running | None) -> None:
        """Write the answers queued so far now, or after ``started`` took its first step.

        A small job ends in its first step: then its own answer (and the next job's start)
        joins those waiting, and so on, until a job waits for something or the oldest
        answer has waited `LINGER_S`. On loopback a write costs the worker and its reader
        more than a small job does; an answer waits at most one job's first step beyond
        `LINGER_S` (the job it was handed over to, as before this grouping).
        """
        if not self._unflushed:
            return
        if (
            started is not None
            and started.task is not None
            and time.monotonic() - self._unflushed_since < LINGER_S
        ):
            started.task.get_loop().call_soon(self._flush_unless_done, started.task)
        else:
            self._flush()

    def _flush_unless_done(self, task: asyncio.Task[FunctionResponse | None]) -> None:
        # Done: its `_finished`, already scheduled, answers it and decides again.
        if not task.done():
            self._flush()

    def _flush(self) -> None:
        """Let every batch write the answers queued for it."""
        for answers in self._unflushed:
            answers.flush()
        self._unflushed.clear()

    def _start(self, entry: _Running) -> None:
        """Give ``entry`` a slot and its own task (a context of its own, for its code)."""
        self._active += 1
        entry.started = True
        job = entry.job
        if job.ahead or entry.waited:
            self._queue(entry.answers, Done(id=job.id, started=True))
        if self._scope_class is None:
            self._scope_class = type(anyio.CancelScope())
        entry.scope = self._scope_class()
        task = self._loop().create_task(self._run_job(entry))
        entry.task = task
        task.add_done_callback(functools.partial(self._finished, entry=entry))

    async def _run_job(self, entry: _Running) -> FunctionResponse | None:
        """Run a started job; ``None`` when it was cancelled."""
        assert entry.scope is not None  # noqa: S101 (set by _start)
        BLOCKING.set(entry.blocking)  # this task's own context
        job = entry.job
        with entry.scope:
            # The executor checks the signature before it unpickles or compiles
            # anything; a refusal is the task's PayloadSignatureError (see _finished).
            if job.stream:
                return await self.executor.stream(
                    job.request, self._chunk_writer(job.id, entry.write)
                )
            return await self.executor.execute(job.request)
        return None  # cancelled

    @staticmethod
    def _chunk_writer(
        job_id: str, write: Callable[[Done], Awaitable[None]]
    ) -> Callable[[FunctionResponse], Awaitable[None]]:
        async def emit(chunk: FunctionResponse) -> None:
            # Awaiting the socket's drain is the back-pressure on the generator; the
            # explicit yield keeps a fast generator from starving /cancel and /ping.
            await write(Done(id=job_id, chunk=chunk))
            await asyncio.sleep(0)

        return emit

    def _finished(
        self, task: asyncio.Task[FunctionResponse | None], *, entry: _Running
    ) -> None:
        """A started job's task is over: answer it, and start the next job in its slot."""
        self._active -= 1
        self._forget(entry)
        job_id = entry.job.id
        if task.cancelled():
            done = Done(id=job_id, response=self._cancelled)
        elif (exc := task.exception()) is not None:
            done = Done(id=job_id, refused=f"{type(exc).__name__}: {exc}")
        else:
            response = task.result()
            stamped = self._cancelled if response is None else self._stamped(response)
            done = Done(id=job_id, response=stamped)
        self._answer(entry, done)
        self._flush_later(self._start_waiting())

    def _forget(self, entry: _Running) -> None:
        if self.running.get(entry.job.id) is entry:
            del self.running[entry.job.id]

    def _loop(self) -> asyncio.AbstractEventLoop:
        """The worker's loop, looked up once (on Python 3.11 each lookup is a getpid())."""
        if self._event_loop is None:
            self._event_loop = asyncio.get_running_loop()
        return self._event_loop

    def _stamped(self, response: FunctionResponse) -> FunctionResponse:
        """The response naming this worker (`JobOutput.worker_id` on the caller's side)."""
        if self.worker_id is None:
            return response
        return msgspec.structs.replace(response, worker_id=self.worker_id)

    async def cancel(self, request: web.Request) -> web.Response:
        """Cancel jobs by id; say which are stuck in code that cannot be interrupted."""
        try:
            body = _cancel_json.decode(await request.read() or b"{}")
        except (msgspec.DecodeError, RecursionError) as exc:
            return web.json_response({"error": f"invalid cancel: {exc}"}, status=400)
        entries: dict[str, _Running] = {}
        for job_id in body.ids:
            found = self.running.get(job_id)
            if found is not None:
                entries[job_id] = found
        stuck = await self.stop_jobs(list(entries.values()))
        return web.json_response(
            {
                "cancelled": [i for i, e in entries.items() if e not in stuck],
                "stuck": [i for i, e in entries.items() if e in stuck],
            }
        )

    async def stop_jobs(self, entries: list[_Running]) -> list[_Running]:
        """Cancel these jobs and wait a little for them; return those that cannot stop.

        A job still waiting for a slot never starts: it is answered ``cancelled`` at once.
        """
        for entry in entries:
            if entry.scope is not None:
                entry.scope.cancel()
            elif not entry.answered:
                self._forget(entry)
                self._answer(entry, Done(id=entry.job.id, response=self._cancelled))
        self._flush()
        waiting = {
            entry.task
            for entry in entries
            if entry.task is not None and not entry.task.done() and not entry.stuck
        }
        if waiting:
            await asyncio.wait(waiting, timeout=CANCEL_GRACE_S)
        return [e for e in entries if e.task is not None and not e.task.done()]

    async def withdraw(self, request: web.Request) -> web.Response:
        """Take back jobs that have not started; they are answered ``withdrawn``."""
        try:
            body = _cancel_json.decode(await request.read() or b"{}")
        except (msgspec.DecodeError, RecursionError) as exc:
            return web.json_response({"error": f"invalid withdraw: {exc}"}, status=400)
        withdrawn = []
        for job_id in body.ids:
            entry = self.running.get(job_id)
            if entry is not None and not entry.started and not entry.answered:
                self._forget(entry)
                self._answer(entry, Done(id=job_id, withdrawn=True))
                withdrawn.append(job_id)
        self._flush()
        return web.json_response({"withdrawn": withdrawn})

    def route_handler(
        self, route: Route
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        """The handler of one user route: JSON in, the function's value as JSON out."""
        verify_request(route.request, self.key)
        name = route.request.function_name or ""
        code = route.request.function_code or ""

        async def handle(request: web.Request) -> web.Response:
            if request.method == "GET":
                kwargs: dict[str, Any] = dict(request.query)
            else:
                raw = await request.read()
                try:
                    kwargs = json.loads(raw) if raw else {}
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    return web.json_response(
                        {"error": f"body is not JSON: {exc}"}, status=400
                    )
                except RecursionError:
                    return web.json_response(
                        {"error": "body is JSON nested too deeply"}, status=400
                    )
                if not isinstance(kwargs, dict):
                    return web.json_response(
                        {
                            "error": "the JSON body must be an object of keyword arguments"
                        },
                        status=400,
                    )
            function = self.executor.load(name, code)
            try:
                value = await invoke(function, [], kwargs)
            except TypeError as exc:
                return web.json_response({"error": str(exc)}, status=422)
            except Exception as exc:  # noqa: BLE001 (the function's error is the answer)
                return web.json_response(
                    {"error": str(exc), "error_type": type(exc).__name__}, status=500
                )
            return web.json_response(value)

        return handle

    def app(self) -> web.Application:
        """The aiohttp application."""
        app = web.Application(middlewares=[self.auth], client_max_size=64 * 1024 * 1024)
        app.router.add_get("/ping", self.ping)
        app.router.add_post("/execute", self.execute)
        app.router.add_post("/cancel", self.cancel)
        app.router.add_post("/withdraw", self.withdraw)
        for route in self.routes:
            app.router.add_route(route.method, route.path, self.route_handler(route))
        for method, path, handler in self.extra_routes:
            app.router.add_route(method, path, handler)
        return app


async def serve(app: WorkerApp, sock: socket.socket) -> None:
    """Serve on an already bound and listening socket until cancelled."""
    _capture.install()
    runner = web.AppRunner(app.app(), access_log=None, handle_signals=False)
    await runner.setup()
    # What exists now (the runtime, its imports, deployed code) lives as long as the
    # worker: out of the collector's sight, a full collection under load costs tens of
    # ms instead of walking every module's objects (~8 us a job of a small fan-out).
    gc.freeze()
    site = web.SockSite(runner, sock)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    watchdog = asyncio.ensure_future(_watch_parent(stop))
    try:
        await stop.wait()
    finally:
        watchdog.cancel()
        stuck = await app.stop_jobs(list(app.running.values()))
        if stuck:
            # Code that cannot be interrupted must not run on unsupervised: end here
            # (waiting for it would also keep the interpreter alive at exit).
            message = f"worker.exit_stuck jobs={len(stuck)}: cancelled code cannot be interrupted\n"
            with contextlib.suppress(OSError):
                os.write(2, message.encode())
            with contextlib.suppress(Exception):
                sys.stdout.flush()
            os._exit(1)
        await runner.cleanup()


def _alive(pid: int) -> bool:
    """True while the client process runs (our parent, or the template's parent)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def _watch_parent(stop: asyncio.Event) -> None:
    """Exit at once when the process that started us is gone (no orphan workers).

    The fallback where there is no parent-death signal (`flash_actors._lifeline`): nobody is
    left to take our results, so running jobs are not waited for.
    """
    del stop
    parent = int(os.environ.get("FLASH_PARENT_PID", "0") or 0)
    if not parent:
        return
    while _alive(parent):  # noqa: ASYNC110 (polling is the portable way)
        await asyncio.sleep(0.5)
    os._exit(1)


def _run(sock: socket.socket, routes_path: str | None) -> None:
    key = bytes.fromhex(os.environ.pop("FLASH_ENDPOINT_KEY", ""))
    token = os.environ.pop("FLASH_WORKER_TOKEN", "")
    if not key or not token:
        msg = "FLASH_ENDPOINT_KEY and FLASH_WORKER_TOKEN must be set"
        raise SystemExit(msg)
    routes: list[Route] = []
    if routes_path:
        with open(routes_path, "rb") as f:
            routes = msgspec.json.decode(f.read(), type=list[Route])
    sock.setblocking(False)  # noqa: FBT003
    resource = deployed_resource()
    if resource:  # deployed mode: the resource's functions from the build's manifest
        from flash_actors.deployed.app import deployed_worker
        from flash_actors.deployed.handler import worker_env
        from flash_actors.errors import ManifestError

        isolation.install(worker_env(os.environ))  # the build folder is the app's code
        try:
            executor, extra = deployed_worker(resource, key)
        except ManifestError as exc:
            msg = f"ManifestError: {exc}"
            raise SystemExit(msg) from None
        app = WorkerApp(key, token, [], executor=executor, extra_routes=extra)
    else:
        isolation.install()  # before any user code: only what RunPod's image would have
        deployed = load_deployed(os.environ.get("FLASH_DEPLOYED_MODULES", ""))
        app = WorkerApp(key, token, routes, deployed)
    with contextlib.suppress(KeyboardInterrupt):
        _event_loop_run(serve(app, sock))


def _event_loop_run(main: Coroutine[Any, Any, None]) -> None:
    """Run the worker's loop: uvloop when installed (the ``fast`` extra), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


def load_deployed(modules: str) -> dict[str, object]:
    """The ``@remote`` functions and classes of deployed code, by name.

    ``modules`` is a comma-separated list of importable modules (``FLASH_DEPLOYED_MODULES``);
    requests without ``function_code`` run these, as Flash's deployed workers do.
    """
    deployed: dict[str, object] = {}
    for name in filter(None, (m.strip() for m in modules.split(","))):
        module = importlib.import_module(name)
        for attribute, value in vars(module).items():
            original = getattr(value, "__wrapped__", None)
            if original is not None and type(value).__name__ in (
                "RemoteFunction",
                "RemoteClass",
            ):
                deployed[attribute] = original
    return deployed


def forked_main(
    sock: socket.socket, env: dict[str, str], log_path: str, routes_path: str | None
) -> None:
    """Entry point of a worker forked from the template process (see the local pool).

    The template has imported this module (and aiohttp) already, so a worker starts in
    milliseconds; here it takes its endpoint's environment and its own log file.
    """
    os.environ.clear()
    os.environ.update(env)
    log_fd = open_private(Path(log_path))  # 0600 whatever the umask
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        _run(sock, routes_path)
    except SystemExit as exc:
        if exc.code not in (None, 0):
            print(exc.code, file=sys.stderr)  # noqa: T201 (what the interpreter would print)
        raise
    except BaseException:
        # The template ends its child with os._exit, which prints nothing: a start-up error
        # (a deployed module that does not import, a bad routes file) is written here.
        traceback.print_exc()
        raise
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python -m flash_actors.worker --fd N [--routes FILE]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m flash_actors.worker")
    parser.add_argument("--fd", type=int, help="inherited listening socket")
    parser.add_argument(
        "--port", type=int, default=0, help="bind 127.0.0.1:PORT instead"
    )
    parser.add_argument("--routes", help="JSON file of load-balancer routes")
    args = parser.parse_args(argv)
    parent = int(os.environ.get("FLASH_PARENT_PID", "0") or 0)
    if parent and not die_with_parent(parent, lambda: os._exit(1)):
        sys.exit(1)  # the process that started us is already gone
    if args.fd is not None:
        sock = socket.socket(fileno=args.fd)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", args.port))
        sock.listen(128)
    _run(sock, args.routes)
