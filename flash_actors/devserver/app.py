"""The dev server's app: the project's ``main.py`` app, Flash's dev routes and the explorer.

Routes, as runpod-flash's ``flash run`` makes them (the URL prefix is the file's path without
``.py``: ``workers/gpu/endpoint.py`` -> ``/workers/gpu/endpoint``):

- a queue function: ``POST <prefix>/runsync`` when its file has one queue function, else
  ``POST <prefix>/<function>/runsync``; the body is ``{"input": {...}}`` with the keyword
  arguments by parameter name (the deployed JSON style), the answer
  ``{"id", "status", "output"}`` (plus ``"error"`` when the job failed);
- a load-balancer function: its own method at ``<prefix>/<its path>``; a JSON body (POST,
  PUT, PATCH, DELETE) or the query string (GET) gives the keyword arguments, path
  parameters (``/items/{id}``) too, and the answer is the function's value.

``@remote`` classes get no dev route (Flash gives each method one; not done here yet).
"""

from __future__ import annotations

import importlib
import inspect
import os
import signal
import sys
import typing
import uuid
from contextlib import asynccontextmanager
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal

import msgspec
import pydantic
from fastapi import FastAPI, HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

import flash_actors
from flash_actors._lifeline import die_with_parent
from flash_actors._logging import get_logger
from flash_actors.build.scanner import scan_project
from flash_actors.devserver.docs import install_docs
from flash_actors.errors import BuildError, FlashRuntimeError
from flash_actors.jobs import JobOutput
from flash_actors.registry import REGISTRY
from flash_actors.remote import RemoteFunction

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from flash_actors.build.scanner import ScannedFunction

__all__ = [
    "AUTO_PROVISION_ENV",
    "PROJECT_ENV",
    "DevRoute",
    "build_app",
    "create_app",
    "dev_routes",
]

log = get_logger(__name__)

#: the project folder `create_app` serves (set by ``flash run`` for uvicorn's processes)
PROJECT_ENV = "FLASH_DEV_PROJECT"
#: ``1``: start every endpoint's workers before serving (``flash run --auto-provision``)
AUTO_PROVISION_ENV = "FLASH_DEV_AUTO_PROVISION"

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class DevRoute(msgspec.Struct, frozen=True, kw_only=True):
    """One dev route: where it is served and the ``@remote`` function it calls."""

    method: str
    path: str
    key: str
    kind: Literal["queue", "load_balancer"]
    resource: str
    file: str


def _prefix(file: str) -> str:
    return "/" + PurePosixPath(file).with_suffix("").as_posix()


def dev_routes(project: Path) -> tuple[list[DevRoute], list[str]]:
    """The dev routes of ``project``'s ``@remote`` functions, and the keys of those not served.

    Reads the source only (`scan_project`); a project with no ``@remote`` function has none.

    Raises:
        BuildError: a file does not parse, or a resource config cannot be resolved.
    """
    try:
        scan = scan_project(project)
    except BuildError as exc:
        if str(exc).startswith("No @remote functions found"):
            return [], []
        raise
    by_file: dict[str, list[ScannedFunction]] = {}
    skipped: list[str] = []
    for fn in scan.functions:
        if fn.kind == "class":
            skipped.append(fn.key)
        else:
            by_file.setdefault(fn.file, []).append(fn)
    routes: list[DevRoute] = []
    for file, functions in sorted(by_file.items()):
        prefix = _prefix(file)
        queue = [fn for fn in functions if fn.http_method is None]
        for fn in queue:
            path = (
                f"{prefix}/runsync"
                if len(queue) == 1
                else f"{prefix}/{fn.qualname}/runsync"
            )
            routes.append(
                DevRoute(
                    method="POST",
                    path=path,
                    key=fn.key,
                    kind="queue",
                    resource=fn.resource,
                    file=file,
                )
            )
        routes.extend(
            DevRoute(
                method=fn.http_method,
                path=f"{prefix}/{fn.http_path.lstrip('/')}",
                key=fn.key,
                kind="load_balancer",
                resource=fn.resource,
                file=file,
            )
            for fn in functions
            if fn.http_method is not None and fn.http_path is not None
        )
    return routes, skipped


# --------------------------------------------------------------------------- input models


def _input_model(name: str, fn: Callable[..., Any]) -> type[pydantic.BaseModel] | None:
    """A model of ``fn``'s keyword arguments (for the explorer and for checking), if any."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 (annotations naming what is not importable here)
        hints = {}
    fields: dict[str, Any] = {}
    for param in signature.parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            return None
        default = ... if param.default is param.empty else param.default
        fields[param.name] = (hints.get(param.name, Any), default)
    for annotate in (True, False):
        try:
            model: type[pydantic.BaseModel] = pydantic.create_model(
                name,
                __config__=pydantic.ConfigDict(
                    extra="forbid", arbitrary_types_allowed=True
                ),
                **(
                    fields
                    if annotate
                    else {key: (Any, value[1]) for key, value in fields.items()}
                ),
            )
        except Exception as exc:  # noqa: BLE001 (a type pydantic cannot describe)
            log.debug("devserver.input_model_failed", function=name, error=repr(exc))
        else:
            return model
    return None


def _kwargs(body: Any) -> dict[str, Any]:
    """The arguments a caller gave (a model: the fields set; a dict: itself)."""
    if isinstance(body, pydantic.BaseModel):
        return {name: getattr(body, name) for name in body.model_fields_set}
    if isinstance(body, dict):
        return dict(body)
    raise HTTPException(422, "the input must be a JSON object of keyword arguments")


def _bad_arguments(key: str, kwargs: dict[str, Any], fn: Callable[..., Any]) -> None:
    try:
        inspect.signature(fn).bind(**kwargs)
    except TypeError as exc:
        raise HTTPException(422, f"{key}: {exc}") from None
    except ValueError:  # no signature: let the call say
        return


def _failure(key: str, exc: BaseException) -> JSONResponse:
    log.warning("devserver.call_failed", function=key, error=repr(exc))
    return JSONResponse(
        {"status": "FAILED", "error": f"{type(exc).__name__}: {exc}"}, status_code=500
    )


def _job_answer(result: Any) -> dict[str, Any]:
    if isinstance(result, JobOutput):
        answer: dict[str, Any] = {
            "id": result.id,
            "status": str(result.status),
            "output": result.output,
        }
        if result.error:
            answer["error"] = result.error
        return answer
    return {"id": str(uuid.uuid4()), "status": "COMPLETED", "output": result}


def _queue_handler(route: DevRoute, fn: RemoteFunction[..., Any]) -> Callable[..., Any]:
    inner = fn.__wrapped__
    model = _input_model(f"{route.resource}_{fn.__wrapped__.__name__}_input", inner)
    body_type: Any = model if model is not None else dict[str, Any]
    # a function without parameters takes no body (as Flash's); {"input": {}} works too
    takes_none = model is not None and not model.model_fields
    request_model = pydantic.create_model(
        f"{route.resource}_{fn.__wrapped__.__name__}_request",
        input=(body_type, {} if takes_none else ...),
    )

    async def runsync(body: Any = None) -> Any:
        kwargs = _kwargs(body.input) if body is not None else {}
        _bad_arguments(route.key, kwargs, inner)
        try:
            result = await fn(**kwargs)
        except (FlashRuntimeError, Exception) as exc:  # noqa: BLE001 (the caller is told)
            return _failure(route.key, exc)
        return _job_answer(result)

    runsync.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [
            inspect.Parameter(
                "body",
                inspect.Parameter.KEYWORD_ONLY,
                annotation=request_model,
                default=None if takes_none else inspect.Parameter.empty,
            )
        ]
    )
    return runsync


def _lb_handler(route: DevRoute, fn: RemoteFunction[..., Any]) -> Callable[..., Any]:
    inner = fn.__wrapped__
    with_body = route.method in _BODY_METHODS
    model = (
        _input_model(f"{route.resource}_{fn.__wrapped__.__name__}_body", inner)
        if with_body
        else None
    )

    async def call(request: Request, body: Any = None) -> Any:
        kwargs = (
            _kwargs(body if body is not None else {})
            if with_body
            else dict(request.query_params)
        )
        kwargs.update(request.path_params)
        _bad_arguments(route.key, kwargs, inner)
        try:
            return await fn(**kwargs)
        except (FlashRuntimeError, Exception) as exc:  # noqa: BLE001 (the caller is told)
            return _failure(route.key, exc)

    params = [
        inspect.Parameter("request", inspect.Parameter.KEYWORD_ONLY, annotation=Request)
    ]
    if with_body:
        params.append(
            inspect.Parameter(
                "body",
                inspect.Parameter.KEYWORD_ONLY,
                annotation=model if model is not None else dict[str, Any],
                default=None,
            )
        )
    call.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return call


# --------------------------------------------------------------------------- the app


def _project_app(project: Path) -> FastAPI | None:
    """The FastAPI ``app`` of the project's ``main.py``, if it has one."""
    if not (project / "main.py").is_file():
        return None
    sys.modules.pop("main", None)
    module = importlib.import_module("main")
    app = getattr(module, "app", None)
    if isinstance(app, FastAPI):
        return app
    log.warning("devserver.no_main_app", file=str(project / "main.py"))
    return None


async def _provision(rt: Any, names: list[str]) -> None:
    for name in names:
        rt.endpoint(name)  # the endpoint actor opens its pool: workersMin workers start
        log.info("devserver.provisioning", endpoint=name)


def build_app(project: Path, *, auto_provision: bool = False) -> FastAPI:
    """The dev server's app for ``project`` (a folder; it goes first on ``sys.path``).

    Raises:
        BuildError: the project's source cannot be scanned (file and line named).
        Exception: whatever importing the project's modules raises.
    """
    project = project.resolve()
    root = str(project)
    if root not in sys.path:
        sys.path.insert(0, root)
    routes, skipped = dev_routes(project)
    app = _project_app(project) or FastAPI(
        title=f"{project.name} (flash run)",
        description="Flash's dev routes for this project's @remote functions.",
    )
    install_docs(app)
    for key in skipped:
        log.warning("devserver.class_not_served", function=key)
    endpoints: list[str] = []
    for route in routes:
        module_name, _, name = route.key.partition(":")
        fn = getattr(importlib.import_module(module_name), name, None)
        if not isinstance(fn, RemoteFunction):
            log.warning("devserver.not_remote", function=route.key)
            continue
        handler = (
            _queue_handler(route, fn)
            if route.kind == "queue"
            else _lb_handler(route, fn)
        )
        app.add_api_route(
            route.path,
            handler,
            methods=[route.method],
            tags=[route.file],
            summary=(inspect.getdoc(fn.__wrapped__) or name).splitlines()[0],
            name=f"{route.key} ({route.kind.replace('_', ' ')})",
        )
        if fn.resource_config.name not in endpoints:
            endpoints.append(fn.resource_config.name)
    if not any(getattr(r, "path", None) == "/ping" for r in app.router.routes):
        app.add_api_route(
            "/ping", _ping, methods=["GET"], tags=["health"], summary="Health check"
        )
    user_lifespan = app.router.lifespan_context
    if auto_provision:
        REGISTRY.keep_warm(
            1
        )  # the dev server's process: every endpoint, one worker warm

    @asynccontextmanager
    async def lifespan(app_: Any) -> AsyncIterator[Any]:
        async with flash_actors.runtime() as rt:
            if auto_provision:
                await _provision(rt, endpoints)
            async with user_lifespan(app_) as state:
                yield state

    app.router.lifespan_context = lifespan
    app.state.flash_dev_routes = routes
    return app


async def _ping() -> dict[str, str]:
    return {"status": "healthy"}


def create_app() -> FastAPI:
    """The app of the folder in `PROJECT_ENV` (uvicorn's factory for ``flash run --reload``).

    It runs in the server process uvicorn's reloader starts: that process stops (as on
    SIGTERM: its runtime stops its workers) when the reloader dies, even by SIGKILL, instead
    of serving on unsupervised.
    """
    supervisor = os.getppid()
    if not die_with_parent(
        supervisor, lambda: os.kill(os.getpid(), signal.SIGTERM)
    ):  # the reloader is gone already
        raise SystemExit(1)
    project = Path(os.environ.get(PROJECT_ENV) or ".")
    return build_app(project, auto_provision=os.environ.get(AUTO_PROVISION_ENV) == "1")
