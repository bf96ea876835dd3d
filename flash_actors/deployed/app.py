"""The HTTP side of deployed code (aiohttp, in worker processes only).

- `deployed_worker`: what our worker (`flash_actors.worker.server`) runs in deployed mode:
  ``/execute`` runs signed requests for the built functions only (code refused),
  ``POST /runsync`` takes Flash's deployed-mode input ``{"input": {...}}`` and answers as
  RunPod's ``/runsync`` does (``{"id", "status": "COMPLETED", "output"}``, or ``"FAILED"``
  with ``"error"``), and a load-balanced resource also serves its own routes.
- `serve_load_balancer`: the standalone app of a load-balanced resource (what its generated
  handler runs): its routes, ``GET /ping``, and ``POST /execute`` for a signed
  `FunctionRequest` without code (JSON in, the `FunctionResponse` out; code refused).

A route calls its function with the JSON body's keys (the query string's for GET) as
keyword arguments and answers with the value as JSON: 400 for a body that is not a JSON
object, 422 when the arguments do not fit, 500 with ``error`` and ``error_type`` when the
function raises.
"""

from __future__ import annotations

import json
import os
import secrets
from typing import TYPE_CHECKING, Any

from aiohttp import web

from flash_actors.deployed.handler import (
    ArgumentError,
    DeployedExecutor,
    DeployedHandler,
    job_result,
    load_resource,
)
from flash_actors.errors import ManifestError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from flash_actors.deployed.handler import DeployedFunction

    Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

__all__ = ["deployed_worker", "load_balancer_app", "serve_load_balancer"]


def _runsync(handler: DeployedHandler) -> Handler:
    async def runsync(request: web.Request) -> web.Response:
        body = await _json_object(request)
        if isinstance(body, web.Response):
            return body
        if "input" not in body:
            return web.json_response(
                {"error": 'the body must be {"input": {...}}'}, status=400
            )
        result = job_result(await handler.run(body["input"]))
        job_id = body.get("id") if isinstance(body.get("id"), str) else None
        status = "FAILED" if "error" in result else "COMPLETED"
        return web.json_response(
            {"id": job_id or f"sync-{secrets.token_hex(8)}", "status": status, **result}
        )

    return runsync


def _route(handler: DeployedHandler, function: DeployedFunction) -> Handler:
    async def route(request: web.Request) -> web.Response:
        if request.method == "GET":
            kwargs: dict[str, Any] = dict(request.query)
        else:
            body = await _json_object(request, empty_ok=True)
            if isinstance(body, web.Response):
                return body
            kwargs = body
        try:
            value = await handler.call(function, kwargs)
        except ArgumentError as exc:
            return web.json_response({"error": str(exc)}, status=422)
        except Exception as exc:  # noqa: BLE001 (the function's error is the answer)
            return web.json_response(
                {"error": str(exc), "error_type": type(exc).__name__}, status=500
            )
        return web.json_response(value)

    return route


async def _json_object(
    request: web.Request, *, empty_ok: bool = False
) -> dict[str, Any] | web.Response:
    raw = await request.read()
    if not raw and empty_ok:
        return {}
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return web.json_response({"error": f"body is not JSON: {exc}"}, status=400)
    except RecursionError:
        return web.json_response(
            {"error": "body is JSON nested too deeply"}, status=400
        )
    if not isinstance(body, dict):
        return web.json_response(
            {"error": "the JSON body must be an object"}, status=400
        )
    return body


def _user_routes(handler: DeployedHandler) -> list[tuple[str, str, Handler]]:
    return [
        (f.entry.http_method, f.entry.http_path, _route(handler, f))
        for f in handler.resource.functions.values()
        if f.entry.http_method and f.entry.http_path
    ]


def deployed_worker(
    resource: str, key: bytes
) -> tuple[DeployedExecutor, list[tuple[str, str, Handler]]]:
    """The executor and extra routes of our worker serving ``resource`` (deployed mode).

    Raises:
        ManifestError: see `load_resource`.
    """
    loaded = load_resource(resource)
    executor = DeployedExecutor(key, loaded, capture_stdout=True)
    handler = DeployedHandler(loaded, key, executor=executor)
    executor.plain = (
        handler.run
    )  # plain JSON jobs queued by a daemon (deployed_request)
    return executor, [("POST", "/runsync", _runsync(handler)), *_user_routes(handler)]


def load_balancer_app(handler: DeployedHandler) -> web.Application:
    """The standalone app of a load-balanced resource (see the module docstring)."""

    async def ping(request: web.Request) -> web.Response:
        del request
        return web.json_response({"status": "healthy"})

    async def execute(request: web.Request) -> web.Response:
        body = await _json_object(request)
        if isinstance(body, web.Response):
            return body
        if "signature" not in body and not any(
            body.get(f) for f in ("function_code", "class_code")
        ):
            problem = ManifestError(
                "/execute takes a signed FunctionRequest; call the resource's own routes "
                "with plain JSON"
            )
            return web.json_response(
                {"success": False, "error": f"ManifestError: {problem}"}, status=400
            )
        return web.json_response(await handler.run(body))

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_get("/ping", ping)
    app.router.add_post("/execute", execute)
    for method, path, route in _user_routes(handler):
        app.router.add_route(method, path, route)
    return app


def serve_load_balancer(handler: DeployedHandler, argv: list[str] | None) -> None:
    """Run `load_balancer_app` until SIGTERM or Ctrl-C.

    ``--host`` (default ``FLASH_HOST``, else 0.0.0.0 on RunPod and 127.0.0.1 elsewhere) and
    ``--port`` (default ``PORT``, else 8000). A client that disconnects cancels its route's
    function (its ``await`` raises ``CancelledError``).
    """
    import argparse

    on_runpod = bool(os.environ.get("RUNPOD_POD_ID"))
    parser = argparse.ArgumentParser(prog="handler")
    parser.add_argument(
        "--host",
        default=os.environ.get("FLASH_HOST")
        or ("0.0.0.0" if on_runpod else "127.0.0.1"),  # noqa: S104 (RunPod's proxy)
    )
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    args = parser.parse_args(argv)
    web.run_app(
        load_balancer_app(handler),
        host=args.host,
        port=args.port,
        print=None,
        access_log=None,
        handler_cancellation=True,
    )
