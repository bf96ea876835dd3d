"""The worker's HTTP server (aiohttp, on its own asyncio loop, loopback only).

Routes:

- ``POST /execute``: ``{"jobs": [{"id", "request": FunctionRequest, "stream"?, "ahead"?},
  ...], "concurrency"?}`` as msgpack (our client) or JSON. The worker runs at most
  ``concurrency`` jobs at once (default 1: the endpoint's ``max_concurrency``, the same in
  every batch), in arrival order; the others wait in the worker. The reply streams one
  answer per job as it finishes (length-prefixed msgpack frames, or JSON lines for a JSON
  body): ``{"id", "response": FunctionResponse}``,
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
import hmac
import importlib
import json
import os
import signal
import socket
import struct
import sys
import traceback
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


class _Running:
    """One job of this worker, from its arrival to its answer."""

    __slots__ = ("blocking", "scope", "started", "task", "withdrawn")

    def __init__(self, scope_class: type[anyio.CancelScope]) -> None:
        self.blocking = Blocking()
        self.scope = scope_class()
        self.started = False
        self.withdrawn = False
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


def _json_line(done: Done) -> bytes:
    return _json.encode(done) + b"\n"


def _msgpack_frame(done: Done) -> bytes:
    payload = _msgpack.encode(done)
    return _FRAME.pack(len(payload)) + payload


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
        self.running: dict[str, _Running] = {}
        self._slots: asyncio.Semaphore | None = None  # sized by the first batch
        # asyncio's cancel scope class, looked up once (``anyio.CancelScope()`` asks
        # sniffio for the backend each time)
        self._scope_class: type[anyio.CancelScope] | None = None
        self.worker_id = os.environ.get("FLASH_WORKER_ID") or None

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
        frame = _msgpack_frame if packed else _json_line
        content_type = (
            "application/x-flash-frames" if packed else "application/x-ndjson"
        )
        response = web.StreamResponse(headers={"Content-Type": content_type})
        queue: asyncio.Queue[Done] = asyncio.Queue()
        write_lock = asyncio.Lock()
        entries: list[_Running] = []

        async def write(done: Done) -> None:
            async with (
                write_lock
            ):  # chunks and final answers of several jobs interleave
                await response.write(frame(done))

        # The jobs are known here before the client sees the answer's headers, so that a
        # /withdraw or /cancel sent after that finds them. They wait for the headers.
        await write_lock.acquire()
        if self._scope_class is None:
            self._scope_class = type(anyio.CancelScope())
        for job in batch.jobs:
            entry = _Running(self._scope_class)
            entries.append(entry)
            self.running[job.id] = entry
            task = asyncio.ensure_future(self._run_job(job, entry, batch, queue, write))
            entry.task = task
            task.add_done_callback(
                functools.partial(
                    self._finished, job_id=job.id, entry=entry, queue=queue
                )
            )
        try:
            await response.prepare(request)
        except BaseException:
            for entry in entries:
                entry.scope.cancel()  # nobody would hear their answers
            raise
        finally:
            write_lock.release()
        left = len(batch.jobs)
        while left:
            # Answers that finished together leave in one write (one TCP segment), so the
            # client frees their slots at once and refills them with a full batch; a job
            # that starts as another ends says so in the same write.
            frames = [await queue.get()]
            while not queue.empty():
                frames.append(queue.get_nowait())
            left -= sum(1 for done in frames if not done.started)
            async with write_lock:
                await response.write(b"".join(frame(done) for done in frames))
        await response.write_eof()
        return response

    async def _run_job(
        self,
        job: Job,
        entry: _Running,
        batch: Batch,
        queue: asyncio.Queue[Done],
        write: Callable[[Done], Awaitable[None]],
    ) -> FunctionResponse | None:
        """Wait for a slot, then run the job; ``None`` when it never started."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(max(1, batch.concurrency))
        BLOCKING.set(entry.blocking)  # this task's own context
        with entry.scope:
            waited = self._slots.locked()
            async with self._slots:
                if entry.withdrawn or entry.scope.cancel_called:
                    return None
                entry.started = True
                if job.ahead or waited:
                    queue.put_nowait(Done(id=job.id, started=True))
                # The executor checks the signature before it unpickles or compiles
                # anything; a refusal is the task's PayloadSignatureError (see _finished).
                if job.stream:
                    return await self.executor.stream(
                        job.request, self._chunk_writer(job.id, write)
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
        self,
        task: asyncio.Task[FunctionResponse | None],
        *,
        job_id: str,
        entry: _Running,
        queue: asyncio.Queue[Done],
    ) -> None:
        if self.running.get(job_id) is entry:
            del self.running[job_id]
        if entry.withdrawn and not entry.started:
            done = Done(id=job_id, withdrawn=True)
        elif task.cancelled():
            done = Done(id=job_id, response=_CANCELLED)
        elif (exc := task.exception()) is not None:
            done = Done(id=job_id, refused=f"{type(exc).__name__}: {exc}")
        else:
            done = Done(id=job_id, response=self._stamped(task.result() or _CANCELLED))
        queue.put_nowait(done)

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
        """Cancel these jobs and wait a little for them; return those that cannot stop."""
        for entry in entries:
            entry.scope.cancel()
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
            if entry is not None and not entry.started and not entry.withdrawn:
                entry.withdrawn = True
                entry.scope.cancel()
                withdrawn.append(job_id)
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
