"""The worker's HTTP server (aiohttp, on its own asyncio loop, loopback only).

Routes:

- ``POST /execute``: ``{"jobs": [{"id", "request": FunctionRequest, "stream"?}, ...]}`` as
  msgpack (our client) or JSON. The jobs run concurrently; the reply streams one answer per
  job as it finishes (length-prefixed msgpack frames, or JSON lines for a JSON body):
  ``{"id", "response": FunctionResponse}``, ``{"id", "chunk": ...}`` for each chunk of a
  streaming job, or ``{"id", "refused": "..."}`` for a request whose signature does not hold
  (nothing of it was unpickled).
- ``POST /cancel``: ``{"ids": [...]}`` cancels those running jobs.
- ``GET /ping``: liveness, with the number of running jobs.
- Load-balancer workers also serve the user's own routes (``method`` + ``path``), calling the
  function with the JSON body (or the query string for GET) as keyword arguments and
  answering with its value as JSON.

Every route but ``/ping`` needs ``Authorization: Bearer <token>`` (401 otherwise).
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
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web

from flash_actors.messages import FunctionRequest, FunctionResponse, Route
from flash_actors.serialization import verify_request
from flash_actors.worker import _capture
from flash_actors.worker.executor import Executor, invoke

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine

__all__ = ["WorkerApp", "forked_main", "main", "serve"]


class Job(msgspec.Struct, frozen=True):
    """One job of an ``/execute`` batch."""

    id: str
    request: FunctionRequest
    stream: bool = False


class Batch(msgspec.Struct, frozen=True):
    """The body of ``/execute``."""

    jobs: list[Job]


class Done(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One line of the ``/execute`` reply."""

    id: str
    response: FunctionResponse | None = None
    chunk: FunctionResponse | None = None
    refused: str | None = None


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


def _json_line(done: Done) -> bytes:
    return _json.encode(done) + b"\n"


def _msgpack_frame(done: Done) -> bytes:
    payload = _msgpack.encode(done)
    return _FRAME.pack(len(payload)) + payload


class WorkerApp:
    """The state of one worker process.

    Args:
        key: the endpoint's HMAC key.
        token: the bearer token callers must present.
        routes: user routes (load-balancer workers).
    """

    def __init__(
        self,
        key: bytes,
        token: str,
        routes: list[Route],
        deployed: dict[str, object] | None = None,
    ) -> None:
        self.executor = Executor(key, capture_stdout=True, deployed=deployed)
        self.key = key
        self.token = token
        self.routes = routes
        self.running: dict[str, asyncio.Task[FunctionResponse]] = {}

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
            body = await request.read()
            batch = (_batch_msgpack if packed else _batch_json).decode(body)
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
        await response.prepare(request)
        queue: asyncio.Queue[Done] = asyncio.Queue()
        write_lock = asyncio.Lock()

        async def write(done: Done) -> None:
            async with (
                write_lock
            ):  # chunks and final answers of several jobs interleave
                await response.write(frame(done))

        for job in batch.jobs:
            # The executor checks the signature before it unpickles or compiles anything;
            # a refusal comes back as the task's PayloadSignatureError (see _finished).
            if job.stream:
                task = asyncio.ensure_future(
                    self.executor.stream(job.request, self._chunk_writer(job.id, write))
                )
            else:
                task = asyncio.ensure_future(self.executor.execute(job.request))
            self.running[job.id] = task
            task.add_done_callback(
                functools.partial(self._finished, job_id=job.id, queue=queue)
            )
        left = len(batch.jobs)
        while left:
            # Answers that finished together leave in one write (one TCP segment), so the
            # client frees their slots at once and refills them with a full batch.
            frames = [await queue.get()]
            while len(frames) < left and not queue.empty():
                frames.append(queue.get_nowait())
            left -= len(frames)
            async with write_lock:
                await response.write(b"".join(frame(done) for done in frames))
        await response.write_eof()
        return response

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
        task: asyncio.Task[FunctionResponse],
        *,
        job_id: str,
        queue: asyncio.Queue[Done],
    ) -> None:
        self.running.pop(job_id, None)
        if task.cancelled():
            done = Done(
                id=job_id,
                response=FunctionResponse(
                    success=False, error="cancelled", error_type="cancelled"
                ),
            )
        elif (exc := task.exception()) is not None:
            done = Done(id=job_id, refused=f"{type(exc).__name__}: {exc}")
        else:
            done = Done(id=job_id, response=task.result())
        queue.put_nowait(done)

    async def cancel(self, request: web.Request) -> web.Response:
        """Cancel running jobs by id."""
        try:
            body = _cancel_json.decode(await request.read() or b"{}")
        except (msgspec.DecodeError, RecursionError) as exc:
            return web.json_response({"error": f"invalid cancel: {exc}"}, status=400)
        cancelled = []
        for job_id in body.ids:
            task = self.running.get(job_id)
            if task is not None:
                task.cancel()
                cancelled.append(job_id)
        return web.json_response({"cancelled": cancelled})

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
        for route in self.routes:
            app.router.add_route(route.method, route.path, self.route_handler(route))
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
        for task in list(app.running.values()):
            task.cancel()
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
    """Stop when the process that started us is gone (no orphan workers)."""
    parent = int(os.environ.get("FLASH_PARENT_PID", "0") or 0)
    if not parent:
        return
    while _alive(parent):  # noqa: ASYNC110 (polling is the portable way)
        await asyncio.sleep(0.5)
    stop.set()


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
    deployed = load_deployed(os.environ.get("FLASH_DEPLOYED_MODULES", ""))
    with contextlib.suppress(KeyboardInterrupt):
        _event_loop_run(serve(WorkerApp(key, token, routes, deployed), sock))


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
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    _run(sock, routes_path)


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
    if args.fd is not None:
        sock = socket.socket(fileno=args.fd)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", args.port))
        sock.listen(128)
    _run(sock, args.routes)
