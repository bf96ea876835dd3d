"""One built resource served from its manifest: the logic behind every generated handler.

A generated ``handler_<resource>.py`` only calls `flash_actors.deployed.serve.main` with its
resource's name; the logic lives here, so that a fix reaches every build (the seeds' "single
source of truth").

What a deployed endpoint accepts as a job's ``input`` (`DeployedHandler.run`):

- Flash's deployed-mode JSON, keyed by parameter name: ``{"a": 1, "b": 2}`` runs
  ``f(a=1, b=2)`` and answers with the return value as plain JSON. ``f`` is the resource's
  function when it has one; a resource with several is told which by ``"function_name"``
  (the qualified name, or ``module:qualname`` where two modules use the same name), which
  is therefore never passed on as an argument. A ``@remote`` class is instantiated once,
  without arguments, and ``"method"`` picks the method (optional when it has one public
  method), as in Flash. ``"__empty"`` (Flash's placeholder for empty input) is dropped.
- A signed `FunctionRequest` without code (our runtime's calls; recognised by its
  ``signature``), run by the `Executor`'s deployed path; the answer is the
  `FunctionResponse` as JSON. Its key is ``FLASH_ENDPOINT_KEY`` (hex), else the one derived
  from ``FLASH_SECRET`` and the resource's name, as our providers derive it.
- A request with ``function_code`` or ``class_code`` is refused, whatever its signature: a
  deployed worker runs only the code it was built with.

A failure answers ``{"success": false, "error", "error_type"}`` (plus ``"traceback"`` when
the function raised), as Flash's deployed handlers do; under the stock ``runpod`` worker the
``error`` key fails the job with that message.

Where the manifest is: ``FLASH_MANIFEST_PATH`` when set, else ``flash_manifest.json`` in the
build folder (the handler's folder), else ``.flash/flash_manifest.json`` there. The build
folder is put on ``sys.path`` so that the resource's modules import, which also runs their
``@remote`` decorators.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from flash_actors.build.manifest import (
    MANIFEST_ENV,
    MANIFEST_FILE,
    MANIFEST_PATH,
    RESOURCE_ENV,
    find_manifest,
    load_manifest,
)
from flash_actors.errors import (
    ConfigurationError,
    FlashRuntimeError,
    ManifestError,
    PayloadSignatureError,
)
from flash_actors.messages import FunctionRequest, FunctionResponse
from flash_actors.serialization import secret_key, to_json, verify_request
from flash_actors.worker.executor import Emit, Executor, invoke

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping

    from flash_actors.build.manifest import ManifestFunction, ManifestResource

__all__ = [
    "DEPLOYED_INPUT",
    "ArgumentError",
    "DeployedExecutor",
    "DeployedFunction",
    "DeployedHandler",
    "DeployedResource",
    "deployed_request",
    "job_result",
    "key_from_env",
    "load_resource",
    "refusal",
    "worker_env",
]

_CODE_FIELDS = ("function_code", "class_code")

DEPLOYED_INPUT = "flash:deployed-input"
"""The ``function_name`` of a `deployed_request` (no function can have it: not a name)."""


def deployed_request(job_input: dict[str, Any]) -> FunctionRequest:
    """Flash's deployed-mode JSON input carried in a `FunctionRequest`, for our worker.

    A ``flash local`` daemon queues a deployed endpoint's plain JSON job as this request
    (json format, the input as ``kwargs``, signed by the daemon like any request it queues);
    the worker's `DeployedExecutor` answers it as `DeployedHandler.run` answers the input,
    the output as ``json_result`` (`job_result` makes it the job's output or error).
    """
    return FunctionRequest(
        function_name=DEPLOYED_INPUT, kwargs=job_input, serialization_format="json"
    )


def worker_env(env: Mapping[str, str]) -> dict[str, str]:
    """A deployed worker's environment for its import checks (`worker.isolation`).

    The build folder goes on ``PYTHONPATH``: it is the app's own code.

    The build folder is the manifest's (`find_manifest` from the current folder).
    """
    root = str(_root_of(find_manifest(Path.cwd())).resolve())
    paths = [root, *(p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)]
    return {**env, "PYTHONPATH": os.pathsep.join(paths)}


class ArgumentError(TypeError):
    """The input does not fit the function's parameters (nothing ran)."""


@dataclass(frozen=True)
class DeployedFunction:
    """One function or class of the resource, imported."""

    key: str
    """``module:qualname``, as in the manifest."""
    entry: ManifestFunction
    target: Any
    """The original function or class (the ``@remote`` wrapper taken off)."""

    @property
    def qualname(self) -> str:
        """The qualified name within its module."""
        return self.entry.qualname or self.entry.name


@dataclass(frozen=True)
class DeployedResource:
    """A resource of a build with its functions imported (`load_resource`)."""

    name: str
    manifest_path: Path
    config: ManifestResource
    functions: dict[str, DeployedFunction]
    """By ``module:qualname``."""

    def objects(self) -> dict[str, Any]:
        """The targets by key, and by bare qualified name where only one has it.

        This is the `Executor`'s deployed map: a `FunctionRequest` names its function by
        either; a bare name two modules share names neither (ask by ``module:qualname``).
        """
        found: dict[str, Any] = {key: f.target for key, f in self.functions.items()}
        names: dict[str, list[DeployedFunction]] = {}
        for function in self.functions.values():
            names.setdefault(function.qualname, []).append(function)
        for name, same in names.items():
            if len(same) == 1 and name not in found:
                found[name] = same[0].target
        return found

    def select(self, name: str | None) -> DeployedFunction:
        """The function ``name`` names (a key or a qualified name); the only one for None.

        Raises:
            ManifestError: no such function, an ambiguous name, or none given where the
                resource has several (the message lists them).
        """
        keys = ", ".join(sorted(self.functions))
        if name is None:
            if len(self.functions) == 1:
                return next(iter(self.functions.values()))
            msg = (
                f'resource {self.name!r} has several functions: say which with "function_name" '
                f"in the input (one of: {keys})"
            )
            raise ManifestError(msg)
        found = self.functions.get(name)
        if found is not None:
            return found
        same = [f for f in self.functions.values() if f.qualname == name]
        if len(same) == 1:
            return same[0]
        if same:
            msg = (
                f"function name {name!r} is ambiguous on resource {self.name!r}: give "
                f'module:qualname as "function_name" (one of: {", ".join(f.key for f in same)})'
            )
            raise ManifestError(msg)
        msg = (
            f"unknown function {name!r}: resource {self.name!r} has {keys} (per "
            f"{self.manifest_path}); if it is new, rebuild with `flash build` and redeploy"
        )
        raise ManifestError(msg)


def load_resource(
    name: str,
    *,
    build_dir: Path | str | None = None,
    manifest_path: Path | str | None = None,
) -> DeployedResource:
    """Import the functions the manifest lists for resource ``name``.

    ``build_dir`` (default: the manifest's folder, or the current one) goes on ``sys.path``
    first, so the build's modules import; importing them runs their ``@remote`` decorators.

    Raises:
        ManifestError: the manifest is missing or invalid, it has no resource ``name`` (or
            that resource no functions), or a listed module or function is not in the build.
            Errors the user's modules raise while importing pass through.
    """
    if manifest_path is not None:
        path = Path(manifest_path)
    else:
        path = find_manifest(Path(build_dir) if build_dir is not None else Path.cwd())
    root = Path(build_dir) if build_dir is not None else _root_of(path)
    try:
        manifest = load_manifest(path)
    except ManifestError as exc:
        msg = (
            f"{exc} (a deployed worker reads {MANIFEST_FILE} from its build folder, or "
            f"the file {MANIFEST_ENV} names)"
        )
        raise ManifestError(msg) from exc
    config = manifest.resources.get(name)
    if config is None:
        known = ", ".join(sorted(manifest.resources)) or "none"
        msg = (
            f"resource {name!r} is not in the manifest {path} (it has: {known}): check "
            f"{RESOURCE_ENV}, or rebuild with `flash build`"
        )
        raise ManifestError(msg)
    if not config.functions:
        msg = f"resource {name!r} has no @remote functions in the manifest {path}: nothing to serve"
        raise ManifestError(msg)
    folder = str(root.resolve())
    if folder not in sys.path:
        sys.path.insert(0, folder)
    functions: dict[str, DeployedFunction] = {}
    for entry in config.functions:
        qualname = entry.qualname or entry.name
        if not entry.module:
            msg = (
                f"the manifest {path} does not say which module {qualname!r} of resource "
                f"{name!r} is in (an old manifest): rebuild with `flash build`"
            )
            raise ManifestError(msg)
        key = f"{entry.module}:{qualname}"
        functions[key] = DeployedFunction(key, entry, _import(key, folder))
    return DeployedResource(name, path, config, functions)


def _root_of(manifest: Path) -> Path:
    folder = manifest.parent
    return folder.parent if folder.name == MANIFEST_PATH.parent.name else folder


def _import(key: str, folder: str) -> Any:
    module_name, _, qualname = key.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name and not module_name.startswith(f"{exc.name}."):
            raise  # a module the user's code imports: its own error
        msg = (
            f"module {module_name!r} (of {key}) is not in the build folder {folder}: "
            "rebuild with `flash build`"
        )
        raise ManifestError(msg) from exc
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            msg = (
                f"{key} is in the manifest but not in {module_name}: the sources changed "
                "after the build; rebuild with `flash build`"
            )
            raise ManifestError(msg) from None
    wrapped = getattr(obj, "__wrapped__", None)
    if wrapped is not None and type(obj).__name__ in ("RemoteFunction", "RemoteClass"):
        return wrapped
    return obj


def key_from_env(resource: str) -> bytes | None:
    """The endpoint key signed requests are checked with (see the module docstring).

    Raises:
        ConfigurationError: ``FLASH_ENDPOINT_KEY`` or ``FLASH_SECRET`` is not hex.
    """
    raw = os.environ.get("FLASH_ENDPOINT_KEY")
    if raw:
        try:
            return bytes.fromhex(raw)
        except ValueError:
            msg = "FLASH_ENDPOINT_KEY must be a hex string (the endpoint's key)"
            raise ConfigurationError(msg) from None
    secret = os.environ.get("FLASH_SECRET")
    return secret_key(secret, resource) if secret else None


def refusal(job_input: dict[str, Any], resource: str) -> str | None:
    """Why a deployed endpoint refuses ``job_input`` (it carries code), or None."""
    for field in _CODE_FIELDS:
        if job_input.get(field):
            what = job_input.get("function_name") or job_input.get("class_name")
            return (
                f"refusing {field} for {what!r}: a deployed worker of resource {resource!r} "
                "runs only the functions built into it, never code sent with a request; "
                "deploy a change with `flash build`"
            )
    return None


class DeployedExecutor(Executor):
    """The `Executor` of a deployed worker: the built functions only, code refused."""

    def __init__(
        self, key: bytes, resource: DeployedResource, *, capture_stdout: bool = False
    ) -> None:
        super().__init__(
            key, deployed=resource.objects(), capture_stdout=capture_stdout
        )
        self.resource = resource
        self.plain: Callable[[Any], Awaitable[Any]] | None = None
        """Answers a `deployed_request`'s input (`DeployedHandler.run`; set by the app)."""

    def _refuse(self, req: FunctionRequest) -> None:
        why = refusal(
            {
                "function_code": req.function_code,
                "class_code": req.class_code,
                "function_name": req.function_name,
                "class_name": req.class_name,
            },
            self.resource.name,
        )
        if why is not None:
            raise ManifestError(why)

    def load(self, name: str, code: str) -> Any:
        """Refused: a deployed worker compiles no code it is sent.

        Raises:
            ManifestError: always.
        """
        self._refuse(FunctionRequest(function_name=name, function_code=code or " "))
        raise AssertionError  # pragma: no cover (refused above)

    async def execute(self, req: FunctionRequest) -> FunctionResponse:
        """`Executor.execute`, for a request without code.

        Raises:
            ManifestError: the request carries code (nothing ran).
            PayloadSignatureError: the request is unsigned or tampered with (nothing ran).
        """
        self._refuse(req)
        if req.function_name == DEPLOYED_INPUT and self.plain is not None:
            return await self._plain(req)
        return await super().execute(req)

    async def _plain(self, req: FunctionRequest) -> FunctionResponse:
        """A `deployed_request`, checked like any request, answered as its input would be."""
        verify_request(req, self._key)  # PayloadSignatureError: nothing runs
        assert self.plain is not None  # noqa: S101 (checked by the caller)
        return FunctionResponse(success=True, json_result=await self.plain(req.kwargs))

    async def stream(self, req: FunctionRequest, emit: Emit) -> FunctionResponse:
        """`Executor.stream`, for a request without code (raises as `execute` does)."""
        self._refuse(req)
        if req.function_name == DEPLOYED_INPUT and self.plain is not None:
            return await self._plain(req)
        return await super().stream(req, emit)


def _failure(exc: BaseException, *, with_traceback: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "success": False,
        "error": f"{type(exc).__name__}: {exc}",
        "error_type": type(exc).__name__,
    }
    if with_traceback:
        out["traceback"] = "".join(traceback.format_exception(exc))
    return out


def job_result(output: Any) -> dict[str, Any]:
    """A handler's output as the stock ``runpod`` worker reports it: ``output``, or ``error``.

    A dict output's ``error`` key fails the job with that message, as RunPod's does.
    """
    if isinstance(output, dict) and "error" in output:
        rest = {k: v for k, v in output.items() if k != "error"}
        return {"error": output["error"], "output": rest}
    return {"output": output}


class DeployedHandler:
    """Answers the jobs of one deployed resource (see the module docstring).

    Args:
        resource: what `load_resource` imported.
        key: the endpoint key signed requests must carry; without one they are refused.
        executor: runs signed requests (default: a `DeployedExecutor` under ``key``).
    """

    def __init__(
        self,
        resource: DeployedResource,
        key: bytes | None,
        *,
        executor: Executor | None = None,
    ) -> None:
        self.resource = resource
        if executor is None and key:
            executor = DeployedExecutor(key, resource)
        self.executor = executor
        self._instances: dict[str, Any] = {}

    async def __call__(self, job: Any) -> Any:
        """The stock ``runpod`` worker's handler: the job in, its output out."""
        job_input = job.get("input") if isinstance(job, dict) else None
        return await self.run(job_input)

    async def run(self, job_input: Any) -> Any:
        """A job's ``input`` in, its output (plain JSON) out; failures are answered."""
        if not isinstance(job_input, dict):
            problem = ManifestError(
                "malformed input: expected a JSON object of keyword arguments, got "
                f"{type(job_input).__name__}"
            )
            return _failure(problem)
        why = refusal(job_input, self.resource.name)
        if why is not None:
            return _failure(ManifestError(why))
        if "signature" in job_input:
            return await self._request(job_input)
        kwargs = dict(job_input)
        kwargs.pop("__empty", None)
        selector = kwargs.pop("function_name", None)
        try:
            if selector is not None and not isinstance(selector, str):
                msg = '"function_name" must be a string naming one of the functions'
                raise ManifestError(msg)
            function = self.resource.select(selector)
            value = await self.call(function, kwargs)
        except (ManifestError, ArgumentError) as exc:
            return _failure(exc)
        except Exception as exc:  # noqa: BLE001 (the function's error is the answer)
            return _failure(exc, with_traceback=True)
        try:
            return to_json(value, what=f"the return value of {function.qualname}()")
        except FlashRuntimeError as exc:
            return _failure(exc)

    async def call(self, function: DeployedFunction, kwargs: dict[str, Any]) -> Any:
        """Run ``function`` with keyword arguments ``kwargs`` (a class: ``"method"`` picks).

        Raises:
            ArgumentError: ``kwargs`` do not fit its parameters, or no method is chosen.
            Exception: what the function raised.
        """
        target = function.target
        label = function.qualname
        if function.entry.is_class:
            target, label = self._method(function, kwargs)
        try:
            inspect.signature(target).bind(**kwargs)
        except TypeError as exc:
            msg = (
                f"{label}(): {exc} (deployed input is a JSON object keyed by parameter "
                'name, e.g. {"input": {"a": 1}})'
            )
            raise ArgumentError(msg) from None
        except ValueError:
            pass  # no signature to check: the call itself will say
        return await invoke(target, [], kwargs)

    def _method(
        self, function: DeployedFunction, kwargs: dict[str, Any]
    ) -> tuple[Any, str]:
        cls = function.target
        methods = sorted(
            name
            for name, member in inspect.getmembers(cls, callable)
            if not name.startswith("_")
        )
        chosen = kwargs.pop("method", None)
        if chosen is None and len(methods) == 1:
            chosen = methods[0]
        if chosen not in methods:
            known = ", ".join(methods)
            msg = (
                f'{function.qualname}: say which method with "method" in the input '
                f"(one of: {known})"
                if chosen is None
                else f"{function.qualname} has no method {chosen!r} (it has: {known})"
            )
            raise ArgumentError(msg)
        instance = self._instances.get(function.key)
        if instance is None:
            instance = self._instances[function.key] = cls()
        return getattr(instance, chosen), f"{function.qualname}.{chosen}"

    async def _request(self, job_input: dict[str, Any]) -> Any:
        if self.executor is None:
            problem = PayloadSignatureError(
                "this worker has no endpoint key to check the request's signature with: "
                "set FLASH_SECRET (the app's secret) or FLASH_ENDPOINT_KEY"
            )
            return _failure(problem)
        try:
            request = msgspec.convert(job_input, FunctionRequest)
        except msgspec.ValidationError as exc:
            return _failure(ManifestError(f"invalid FunctionRequest: {exc}"))
        try:
            response = await self.executor.execute(request)
        except FlashRuntimeError as exc:  # refused before anything ran
            return _failure(exc)
        return msgspec.to_builtins(response)
