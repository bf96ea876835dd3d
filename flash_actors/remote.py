"""``@remote``: turn a function or class into awaitable calls on an endpoint.

``@remote(resource_config=...)`` checks its arguments at decoration time, warns about names the
function takes from module scope (they will not exist on the worker), registers the resource
config, and returns a `RemoteFunction` (or a `RemoteClass`). A call builds a `Call` message
(signed base64 cloudpickle arguments plus the resource's policies; from a function's second
call on, the arguments are pickled when it is called) and, awaited, asks the runtime's Router
or the endpoint for the answer: a `JobOutput` for queue resources, the value itself for
load-balancer resources and for ``local=True``.

A ``@remote`` function that uses other ``@remote`` functions (``await inner(x)``) is sent
with stubs for them appended to its signed source (`flash_actors.worker.nested`): the worker
runs calls to its own endpoint in process and sends the others back here (`run_nested`) or
to the daemon. In deployed code (``FLASH_RESOURCE_NAME`` set) a call to a function of the
worker's own resource runs in the process; the others go through the Router.
"""

from __future__ import annotations

import ast
import difflib
import functools
import inspect
import textwrap
import types
import uuid
import weakref
from collections.abc import Awaitable, Callable
from typing import (
    TYPE_CHECKING,
    Any,
    Generic,
    Literal,
    Never,
    ParamSpec,
    Protocol,
    TypeVar,
    overload,
)

import anyio
import anyio.lowlevel
import msgspec
import sniffio

from flash_actors._scoping import warn_outer_references
from flash_actors.actors import Envelope, Reply
from flash_actors.build.manifest import deployed_resource
from flash_actors.errors import (
    ActorStoppedError,
    ConfigurationError,
    ExecutionTimeoutError,
    InvalidRemoteTargetError,
    ManifestError,
)
from flash_actors.messages import Call, FunctionRequest
from flash_actors.policies import CallPolicy, check_payload
from flash_actors.registry import REGISTRY, resource_from_config
from flash_actors.resources import LoadBalancerResource, ServerlessResource
from flash_actors.runtime import current_runtime, get_runtime, set_nested_runner
from flash_actors.serialization import (
    DecodedRequest,
    RequestSigner,
    decode_request,
    decode_result,
    encode_result,
    endpoint_key,
)
from flash_actors.worker.executor import invoke
from flash_actors.worker.installer import check_requirements, check_system_packages
from flash_actors.worker.nested import (
    NestedRef,
    deployed_chain,
    postamble,
    run_here,
    set_caller_factory,
)

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from flash_actors._scoping import OuterReference
    from flash_actors.actors import ActorRef
    from flash_actors.jobs import JobOutput
    from flash_actors.runtime import FlashRuntime

__all__ = [
    "ChunkStream",
    "RemoteClass",
    "RemoteFunction",
    "RemoteInstance",
    "RemoteMethod",
    "remote",
    "run_nested",
]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")
R_co = TypeVar("R_co", covariant=True)

HTTP_METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH")
_PARAMETERS = (
    "resource_config",
    "dependencies",
    "system_dependencies",
    "accelerate_downloads",
    "local",
    "method",
    "path",
)


class _Spec:
    """What ``@remote(...)`` was given, checked."""

    __slots__ = (
        "accelerate_downloads",
        "dependencies",
        "local",
        "method",
        "path",
        "resource",
        "system_dependencies",
    )

    def __init__(
        self,
        resource: ServerlessResource,
        dependencies: list[str],
        system_dependencies: list[str],
        accelerate_downloads: bool,  # noqa: FBT001
        local: bool,  # noqa: FBT001
        method: str | None,
        path: str | None,
    ) -> None:
        self.resource = resource
        self.dependencies = dependencies
        self.system_dependencies = system_dependencies
        self.accelerate_downloads = accelerate_downloads
        self.local = local
        self.method = method
        self.path = path


async def _raising(exc: Exception) -> Never:
    """Raise ``exc`` when awaited (a call that failed before it was sent)."""
    raise exc


def _source(obj: Callable[..., Any] | type, label: str) -> tuple[str, ast.stmt]:
    """The object's source without its decorators, dedented, and its parsed node."""
    try:
        source = textwrap.dedent(inspect.getsource(obj))
    except (OSError, TypeError) as exc:
        msg = (
            f"@remote {label}: cannot read its source code ({exc}); the worker runs the "
            "source, so define it in a .py file (not in an interactive session or exec)"
        )
        raise ConfigurationError(msg) from exc
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:  # e.g. a lambda inside a larger expression
        msg = f"@remote {label}: its source cannot be parsed on its own: {exc}"
        raise InvalidRemoteTargetError(msg) from exc
    node = tree.body[0]
    if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        msg = f"@remote {label}: expected a def or class statement, found {type(node).__name__}"
        raise InvalidRemoteTargetError(msg)
    lines = source.splitlines(keepends=True)
    return "".join(lines[node.lineno - 1 : node.end_lineno]), node


def _positional_names(
    fn: Callable[..., Any], *, skip_self: bool = False
) -> tuple[str, ...]:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return ()
    if skip_self and params:
        params = params[1:]
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(p.name for p in params if p.kind in kinds)


def _check_spec(spec: _Spec, label: str) -> None:
    resource = spec.resource
    resource.validate()
    if resource.is_load_balancer:
        if not spec.method or not spec.path:
            msg = (
                f"@remote {label}: {type(resource).__name__} {resource.name!r} is a load "
                "balancer, so each function needs an HTTP route: add method= and path=, e.g. "
                '@remote(api, method="POST", path="/api/process")'
            )
            raise ConfigurationError(msg)
        if spec.method.upper() not in HTTP_METHODS:
            msg = (
                f"@remote {label}: method={spec.method!r} is not supported; use one of "
                f"{', '.join(HTTP_METHODS)}"
            )
            raise ConfigurationError(msg)
        spec.method = spec.method.upper()
        if not spec.path.startswith("/"):
            msg = f'@remote {label}: path={spec.path!r} must start with "/", e.g. "/{spec.path}"'
            raise ConfigurationError(msg)
    elif spec.method is not None or spec.path is not None:
        msg = (
            f"@remote {label}: method= and path= apply only to load-balancer resources, and "
            f"{type(resource).__name__} {resource.name!r} is a queue resource; remove them, "
            "or use LiveLoadBalancer / CpuLiveLoadBalancer for an HTTP route"
        )
        raise ConfigurationError(msg)
    for field, values in (
        ("dependencies", spec.dependencies),
        ("system_dependencies", spec.system_dependencies),
    ):
        items: list[object] = list(values)
        if not all(isinstance(v, str) and v.strip() for v in items):
            msg = f"@remote {label}: {field} must be a list of non-empty strings, got {values!r}"
            raise ConfigurationError(msg)
    try:  # the installer checks them again where it acts on them
        check_requirements(spec.dependencies)
        check_system_packages(spec.system_dependencies)
    except ConfigurationError as exc:
        msg = f"@remote {label}: {exc}"
        raise ConfigurationError(msg) from None


class _Route:
    """Where the Router sent this call site's calls: in which runtime, at which registry state."""

    __slots__ = ("endpoint", "generation", "runtime")

    def __init__(
        self, runtime: FlashRuntime, generation: int, endpoint: ActorRef[Call]
    ) -> None:
        self.runtime = weakref.ref(runtime)
        self.generation = generation
        self.endpoint = endpoint


class _Caller:
    """The shared call path of functions and class methods.

    Calls go caller -> Router -> Endpoint actor. The Router's answer for this call site (the
    Endpoint actor it forwarded to) is remembered, and later calls go to that actor directly
    while it is the same runtime, the registry has not changed and the actor still runs;
    otherwise the Router is asked again. It saves one actor hop per call (~15%).
    """

    __slots__ = (
        "_deployed",
        "_endpoint",
        "_function_key",
        "_key",
        "_label",
        "_policy",
        "_route",
        "_signer",
        "spec",
        "template",
    )

    def __init__(
        self, spec: _Spec, template: FunctionRequest, label: str, *, key: str = ""
    ) -> None:
        self.spec = spec
        self.template = template
        self._label = label
        self._function_key = key
        self._endpoint = spec.resource.name
        self._policy: CallPolicy = spec.resource.call_policy()
        self._key: bytes | None = None
        self._signer: RequestSigner | None = None
        self._route: _Route | None = None
        self._deployed = deployed_resource()  # the resource of this deployed process

    def signer(self, key: bytes | None) -> RequestSigner:
        """The request signer for ``key`` (rebuilt only when the key changes)."""
        if key is not self._key or self._signer is None:
            self._signer = RequestSigner(key, self.template)
            self._key = key
        return self._signer

    def key(self) -> bytes:
        """This process's key for the endpoint: what ``local=True`` calls sign with."""
        return endpoint_key(self._endpoint)

    def request(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        arg_names: tuple[str, ...],
        **extra: Any,
    ) -> FunctionRequest:
        """A request signed with this process's key (``local=True`` calls)."""
        return self.signer(self.key()).sign(args, kwargs, arg_names=arg_names, **extra)

    def _decode_locally(
        self, request: FunctionRequest, arg_names: tuple[str, ...]
    ) -> tuple[bytes, DecodedRequest]:
        """``local=True``: the payload checks a remote call gets, then the decoded arguments."""
        check_payload(
            request,
            self._policy.payload_limit,
            function=self._label,
            arg_names=arg_names,
        )
        key = self.key()
        return key, decode_request(request, key)

    def _call_message(
        self,
        request: FunctionRequest,
        arg_names: tuple[str, ...],
        stream_to: Any = None,
    ) -> Call:
        return Call(
            endpoint=self._endpoint,
            function=self._label,
            request=request,
            policy=self._policy,
            arg_names=arg_names,
            http_method=self.spec.method,
            http_path=self.spec.path,
            stream_to=stream_to,
            key=self._function_key,
        )

    def remote(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        arg_names: tuple[str, ...],
        *,
        chain: list[str] | None = None,
        **extra: Any,
    ) -> Coroutine[Any, Any, Any]:
        """The call signed with the runtime's provider's key and sent: await it for the answer.

        ``chain``: the endpoints waiting on this call (a nested call's, see
        `flash_actors.worker.nested`); it travels with the request.

        While a runtime runs and the endpoint's actor takes calls in the caller's task (every
        call after the first), the call is signed here and the actor's own coroutine is
        returned: no frame of this function waits with the call (~0.4 KB per call in
        flight). Whatever that raises is raised when the call is awaited, as on the other
        path (`_remote`).
        """
        if (
            self._route is not None
            and chain is None
            and not extra
            and self._deployed is None
            and self._route.endpoint.inline_ready
        ):
            try:
                runtime = current_runtime()
            except (RuntimeError, sniffio.AsyncLibraryNotFoundError):
                runtime = None  # not in an event loop: `_remote` says so when awaited
            route = None if runtime is None else self._live_route(runtime)
            if route is not None and runtime is not None:
                try:
                    request = self.signer(runtime.signing_key(self._endpoint)).sign(
                        args, kwargs, arg_names=arg_names
                    )
                    return route.endpoint.call(self._call_message(request, arg_names))
                except Exception as exc:  # noqa: BLE001 (raised when awaited)
                    return _raising(exc)
        return self._remote(args, kwargs, arg_names, chain=chain, **extra)

    def _live_route(self, runtime: FlashRuntime) -> _Route | None:
        """The endpoint this function's last call reached, if still valid in ``runtime``."""
        route = self._route
        if (
            route is not None
            and route.generation == runtime.registry.generation
            and route.runtime() is runtime
            and not route.endpoint.is_stopped
        ):
            return route
        return None

    async def _remote(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        arg_names: tuple[str, ...],
        *,
        chain: list[str] | None = None,
        **extra: Any,
    ) -> Any:
        """`remote` on any path: finds the runtime (maybe starting it) and the route."""
        if chain is None and self._deployed is not None:  # deployed: another resource's
            chain = deployed_chain(
                self._deployed, self._endpoint
            )  # A -> B -> A: refused
        runtime = current_runtime() or await get_runtime()  # no await once one runs
        request = self.signer(runtime.signing_key(self._endpoint)).sign(
            args, kwargs, arg_names=arg_names, **extra
        )
        if chain:
            request = msgspec.structs.replace(request, call_chain=chain)
        call = self._call_message(request, arg_names)
        generation = runtime.registry.generation
        reply: Reply | None = None
        try:
            route = self._live_route(runtime)
            if route is not None:
                if route.endpoint.inline_ready:  # handled in this task (Actor.inline)
                    return await route.endpoint.call(call)
                reply = route.endpoint.new_reply()
                try:
                    await route.endpoint.forward(Envelope(call, reply))
                except ActorStoppedError:
                    reply = None  # it stopped since: not delivered, ask the Router
            if reply is None:
                router = runtime.router
                reply = router.new_reply()
                await router.forward(Envelope(call, reply))
            return await reply.wait()
        except BaseException:
            if reply is not None:
                reply.cancel()
            raise
        finally:
            if reply is not None and reply.forwarded_to is not None:
                self._route = _Route(runtime, generation, reply.forwarded_to)

    def remote_stream(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], arg_names: tuple[str, ...]
    ) -> ChunkStream:
        """Chunks of a streaming call, through the Router to the endpoint.

        The arguments are pickled now (an argument that cannot travel fails here), and
        signed with the runtime's key when the stream opens.
        """
        self.request(args, kwargs, arg_names)  # fail now on what cannot be pickled

        async def open_stream() -> tuple[_Next, _Close]:
            send, receive = anyio.create_memory_object_stream[Any](16)
            runtime = await get_runtime()
            request = self.signer(runtime.signing_key(self._endpoint)).sign(
                args, kwargs, arg_names=arg_names
            )
            reply = Reply()
            message = self._call_message(request, arg_names, send)
            await runtime.router.forward(Envelope(message, reply))

            async def next_chunk() -> Any:
                try:
                    return await receive.receive()
                except anyio.EndOfStream:
                    receive.close()
                    await reply.wait()  # raises the remote error, if any
                    raise StopAsyncIteration from None

            def close() -> None:
                receive.close()
                if not reply.done:
                    reply.cancel()  # the consumer left early: stop the job

            return next_chunk, close

        return ChunkStream(open_stream)

    def local_stream(
        self,
        request: FunctionRequest,
        arg_names: tuple[str, ...],
        target: Callable[..., Any],
    ) -> ChunkStream:
        """``local=True`` streaming: each chunk makes the serialization round trip."""

        async def open_stream() -> tuple[_Next, _Close]:
            key, decoded = self._decode_locally(request, arg_names)

            def travel(chunk: Any) -> Any:
                return decode_result(*encode_result(chunk, key), key)

            if inspect.isasyncgenfunction(target):
                agen = target(*decoded.args, **decoded.kwargs)

                async def next_async() -> Any:
                    return travel(await agen.__anext__())

                return next_async, lambda: None
            if inspect.isgeneratorfunction(target):
                gen = target(*decoded.args, **decoded.kwargs)

                async def next_sync() -> Any:
                    await anyio.lowlevel.checkpoint()
                    try:
                        return travel(next(gen))
                    except StopIteration:
                        raise StopAsyncIteration from None

                return next_sync, gen.close
            pending = [await invoke(target, decoded.args, decoded.kwargs)]

            async def next_value() -> Any:
                await anyio.lowlevel.checkpoint()
                if not pending:
                    raise StopAsyncIteration
                return travel(pending.pop())

            return next_value, lambda: None

        return ChunkStream(open_stream)

    async def local(
        self,
        request: FunctionRequest,
        arg_names: tuple[str, ...],
        target: Callable[..., Any],
    ) -> Any:
        """Run in-process, with the arguments and the result making the wire round trip."""
        key, decoded = self._decode_locally(request, arg_names)
        timeout = self._policy.execution_timeout_s
        with anyio.move_on_after(timeout) as scope:
            value = await invoke(target, decoded.args, decoded.kwargs)
        if scope.cancelled_caught:
            msg = f"{self._label}() ran longer than its execution timeout of {timeout:g} s"
            raise ExecutionTimeoutError(msg)
        text, signature = encode_result(value, key)
        return decode_result(text, signature, key)


_Next = Callable[[], Awaitable[Any]]
_Close = Callable[[], None]


class ChunkStream:
    """What ``f.stream(...)`` returns: iterate it with ``async for``.

    Nothing starts until the first iteration. Leaving the loop early (``break``, an
    exception), ``await stream.aclose()`` or leaving ``async with stream:`` stops the remote
    job at once; it is a plain object, not an async generator, so no event loop has to
    finalize it later.
    """

    def __init__(self, opener: Callable[[], Awaitable[tuple[_Next, _Close]]]) -> None:
        self._opener = opener
        self._next: _Next | None = None
        self._close: _Close | None = None
        self._done = False

    def __aiter__(self) -> ChunkStream:
        return self

    async def __anext__(self) -> Any:
        if self._done:
            raise StopAsyncIteration
        if self._next is None:
            self._next, self._close = await self._opener()
        try:
            return await self._next()
        except BaseException:
            self._finish()
            raise

    def _finish(self) -> None:
        if not self._done:
            self._done = True
            if self._close is not None:
                self._close()

    async def aclose(self) -> None:
        """Stop the stream (and the remote job, if it still runs)."""
        self._finish()

    async def __aenter__(self) -> ChunkStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._finish()

    def __del__(self) -> None:
        self._finish()


class RemoteFunction(Generic[P, R_co]):
    """A function decorated with ``@remote``; calling it returns an awaitable.

    Attributes:
        resource_config: the endpoint the function runs on.
        key: ``module:qualname``, its key in the Registry and the manifest.
        __wrapped__: the original function (run by ``local=True``).
    """

    def __init__(
        self,
        fn: Callable[P, Any],
        spec: _Spec,
        uses: list[str] | None = None,
    ) -> None:
        self.__wrapped__ = fn
        functools.update_wrapper(self, fn)
        self.resource_config = spec.resource
        self._label = fn.__qualname__
        self.key = f"{fn.__module__}:{fn.__qualname__}"
        self._arg_names = _positional_names(fn)
        code, _ = _source(fn, f"function {fn.__qualname__!r}")
        self._code = code
        template = FunctionRequest(
            function_name=fn.__name__,
            function_code=code,
            dependencies=spec.dependencies or None,
            system_dependencies=spec.system_dependencies or None,
            accelerate_downloads=spec.accelerate_downloads,
        )
        self._base = template
        self._caller = _Caller(spec, template, fn.__qualname__, key=self.key)
        self._local = spec.local
        # In deployed code, this resource's own functions run here (see the module docstring).
        self._here = deployed_resource() == spec.resource.name
        self._in_process = self._local or self._here
        # Module-level names it uses that are (or may become: defined further down) @remote
        # functions. Their stubs are made at the first call, once the module is complete;
        # only that first call pays for it, and functions that use none never do.
        self._uses = uses or []
        if self._uses:
            self._call = self._bind_then_call  # type: ignore[method-assign]

    async def _bind_then_call(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        self.bind_calls()  # and the class's _call is used from now on
        return await self._call(args, kwargs)

    def bind_calls(self) -> None:
        """Append to the code sent the stubs of the remote functions it uses (once)."""
        if "_call" not in self.__dict__:
            return
        del self.__dict__["_call"]
        template = self._template(frozenset())
        self._caller = _Caller(self._caller.spec, template, self._label, key=self.key)

    def _template(self, seen: frozenset[str]) -> FunctionRequest:
        """The request template with stubs for the remote functions the code uses now.

        ``seen``: functions whose templates are being made further up: a loop of calls
        (f uses g, g uses f) is cut there (see `nested_ref`).
        """
        base = self._base
        if not self._uses:
            return base
        namespace = getattr(self.__wrapped__, "__globals__", {})
        seen |= {self.key}
        refs = []
        for name in self._uses:
            value = namespace.get(name)
            if value is self:
                spec = self._caller.spec
                refs.append(
                    NestedRef(
                        name=name,
                        key=self.key,
                        label=self._label,
                        endpoint=self.resource_config.name,
                        self_call=True,
                        method=spec.method,
                        path=spec.path,
                    )
                )
            elif isinstance(value, RemoteFunction):
                refs.append(value.nested_ref(name, seen))
                _NESTED[value.key] = value
        if not refs:
            return base
        return msgspec.structs.replace(base, function_code=self._code + postamble(refs))

    def __repr__(self) -> str:
        return f"<RemoteFunction {self._label} on {self.resource_config.name!r}>"

    @property
    def function_request_template(self) -> FunctionRequest:
        """The static part of the requests this function sends (name, code, dependencies)."""
        self.bind_calls()
        return self._caller.template

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, R_co]:
        """Start a call; await the result (see the module docstring for what it is)."""
        if (
            self._in_process or "_call" in self.__dict__
        ):  # local, or stubs to bind first
            return self._call(args, kwargs)
        return self._caller.remote(args, kwargs, self._arg_names)  # one frame less

    def stream(self, *args: P.args, **kwargs: P.kwargs) -> ChunkStream:
        """Consume a generator (or async generator) function's chunks while it runs.

        Chunks come as the worker yields them, through bounded buffers: a slow consumer
        slows the generator down (back-pressure). Leaving the loop early (``break``, an
        exception) cancels the job. The remote error, typed, is raised from the loop.
        Awaiting the function normally instead returns the list of chunks.
        """
        if self._local:
            request = self._caller.request(args, kwargs, self._arg_names)
            return self._caller.local_stream(request, self._arg_names, self.__wrapped__)
        self.bind_calls()
        return self._caller.remote_stream(args, kwargs, self._arg_names)

    async def _call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self._in_process:
            if not self._local:  # deployed code: a function of this worker's resource
                queue = not self.resource_config.is_load_balancer
                return await run_here(self.__wrapped__, args, kwargs, queue=queue)
            request = self._caller.request(args, kwargs, self._arg_names)
            return await self._caller.local(request, self._arg_names, self.__wrapped__)
        return await self._caller.remote(args, kwargs, self._arg_names)

    def nested_ref(self, name: str, seen: frozenset[str] = frozenset()) -> NestedRef:
        """What a worker needs to call this function from code that names it ``name``.

        Inside a loop of uses (``seen`` holds this function) the stub has no code: the
        worker can still call it through the runtime's channel, and refuses what would need
        the code (see `flash_actors.worker.nested`).
        """
        resource = self.resource_config
        spec = self._caller.spec
        return NestedRef(
            name=name,
            key=self.key,
            label=self._label,
            endpoint=resource.name,
            resource_type=type(resource).__name__,
            resource=msgspec.to_builtins(resource),
            template=None if self.key in seen else self._template(seen),
            arg_names=list(self._arg_names),
            method=spec.method,
            path=spec.path,
        )


_NESTED: dict[str, RemoteFunction[..., Any]] = {}
"""``module:qualname`` -> the functions other remote functions' code calls: those (and only
those) a worker may ask this process to call (`run_nested`)."""


def _uses(target: Any, found: list[OuterReference]) -> list[str]:
    """The module-level names ``target`` uses that may be (or become) ``@remote`` functions.

    Those bound to one now, those not defined yet, and the function's own name when it
    calls itself.
    """
    namespace = getattr(target, "__globals__", None)
    if namespace is None:  # a class: its module's namespace
        module = inspect.getmodule(target)
        namespace = vars(module) if module is not None else {}
    names = [
        ref.name
        for ref in found
        if ref.kind == "undefined"
        or (
            ref.kind in ("global", "import")
            and isinstance(namespace.get(ref.name), RemoteFunction)
        )
    ]
    if inspect.isfunction(target) and _loads_global(target.__code__, target.__name__):
        names.append(target.__name__)
    return names


def _stubs(target: Any, names: list[str]) -> list[NestedRef] | None:
    """The stubs of a class's code: the remote functions it uses now."""
    module = inspect.getmodule(target)
    namespace = vars(module) if module is not None else {}
    refs = []
    for name in names:
        value = namespace.get(name)
        if isinstance(value, RemoteFunction):
            refs.append(value.nested_ref(name))
            _NESTED[value.key] = value
    return refs or None


def _stub_caller(ref: NestedRef) -> _Caller:
    """The call path of a stub (`flash_actors.worker.nested`) through a runtime here."""
    assert ref.template is not None  # noqa: S101 (the stub checks it)
    resource = resource_from_config(ref.resource_type, ref.endpoint, ref.resource)
    REGISTRY.register(resource, owner=f"function {ref.label!r}")
    spec = _Spec(resource, [], [], True, False, ref.method, ref.path)  # noqa: FBT003
    return _Caller(spec, ref.template, ref.label, key=ref.key)


set_caller_factory(_stub_caller)


def _loads_global(code: types.CodeType, name: str) -> bool:
    """True if ``code`` (or code nested in it) may load the global ``name``."""
    if name in code.co_names:
        return True
    return any(
        isinstance(const, types.CodeType) and _loads_global(const, name)
        for const in code.co_consts
    )


async def run_nested(
    key: str, args: tuple[Any, ...], kwargs: dict[str, Any], chain: list[str]
) -> Any:
    """A worker's call of ``key``, made here through this context's runtime.

    Raises:
        ManifestError: ``key`` is no function that code sent from here calls.
    """
    fn = _NESTED.get(key)
    if fn is None:
        msg = f"function {key!r} is not one that code sent from this process calls"
        raise ManifestError(msg)
    if fn._local:  # noqa: SLF001 (local=True: it runs here, as it would for the caller)
        return await fn(*args, **kwargs)
    fn.bind_calls()
    return await fn._caller.remote(args, kwargs, fn._arg_names, chain=chain)  # noqa: SLF001


set_nested_runner(run_nested)


class RemoteMethod:
    """An awaitable method of a `RemoteInstance`."""

    __slots__ = ("_instance", "_name")

    def __init__(self, instance: RemoteInstance[Any], name: str) -> None:
        self._instance = instance
        self._name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Coroutine[Any, Any, Any]:
        """Start the method call on the remote instance; await the result."""
        return self._instance.call_method(self._name, args, kwargs)


class RemoteInstance(Generic[T]):
    """A handle on one instance of a ``@remote`` class, living on the endpoint's workers.

    Every method call carries the instance id and the constructor arguments, so a worker that
    has not seen the instance yet builds it once and keeps it for later calls.
    """

    def __init__(
        self, owner: RemoteClass[T], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        self._owner = owner
        self._args = args
        self._kwargs = kwargs
        self.instance_id = uuid.uuid4().hex
        self._local_instance: Any = None

    def __repr__(self) -> str:
        return f"<RemoteInstance of {self._owner.__qualname__} id={self.instance_id}>"

    def __getattr__(self, name: str) -> RemoteMethod:
        if name.startswith("_"):
            raise AttributeError(name)
        self._owner.check_method(name)
        return RemoteMethod(self, name)

    async def call_method(
        self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """Call method ``name`` on the remote instance (what `RemoteMethod` awaits)."""
        owner = self._owner
        caller = owner.caller
        arg_names = owner.method_args.get(name, ())
        extra: dict[str, Any] = {
            "constructor_args": self._args,
            "constructor_kwargs": self._kwargs,
            "instance_id": self.instance_id,
            "method_name": name,
        }
        if not owner.local:
            return await caller.remote(args, kwargs, arg_names, **extra)
        request = caller.request(args, kwargs, arg_names, **extra)
        if self._local_instance is None:
            decoded = decode_request(request, caller.key())
            self._local_instance = owner.__wrapped__(
                *decoded.constructor_args, **decoded.constructor_kwargs
            )
        return await caller.local(
            request, arg_names, getattr(self._local_instance, name)
        )


class RemoteClass(Generic[T]):
    """A class decorated with ``@remote``; calling it returns a `RemoteInstance` handle."""

    def __init__(
        self, cls: type[T], spec: _Spec, calls: list[NestedRef] | None = None
    ) -> None:
        self._cls = cls
        self.__wrapped__ = cls
        self.__name__ = cls.__name__
        self.__qualname__ = cls.__qualname__
        self.__doc__ = cls.__doc__
        self.__module__ = cls.__module__
        self.resource_config = spec.resource
        self.local = spec.local
        code, _ = _source(cls, f"class {cls.__qualname__!r}")
        if calls:
            code += postamble(calls)
        self.method_args = {
            name: _positional_names(member, skip_self=True)
            for name, member in inspect.getmembers(cls, callable)
            if not name.startswith("_")
        }
        template = FunctionRequest(
            execution_type="class",
            class_name=cls.__name__,
            class_code=code,
            dependencies=spec.dependencies or None,
            system_dependencies=spec.system_dependencies or None,
            accelerate_downloads=spec.accelerate_downloads,
        )
        key = (
            f"{cls.__module__}:{cls.__qualname__}"  # the manifest's (deployed lookups)
        )
        self.caller = _Caller(spec, template, cls.__qualname__, key=key)

    def __repr__(self) -> str:
        return (
            f"<RemoteClass {self._cls.__qualname__} on {self.resource_config.name!r}>"
        )

    def check_method(self, name: str) -> None:
        """Raise `AttributeError` (with a suggestion) unless ``name`` is a public method."""
        if name not in self.method_args:
            hint = difflib.get_close_matches(name, self.method_args, n=1)
            more = f"; did you mean {hint[0]!r}?" if hint else ""
            msg = f"{self._cls.__qualname__} has no public method {name!r}{more}"
            raise AttributeError(msg)

    def __call__(self, *args: Any, **kwargs: Any) -> RemoteInstance[T]:
        """A handle on a new remote instance built with these constructor arguments."""
        return RemoteInstance(self, args, kwargs)


class _ValueDecorator(Protocol):
    """``@remote`` for load balancers and ``local=True``: calls return the value."""

    @overload
    def __call__(self, target: type[T], /) -> RemoteClass[T]: ...  # type: ignore[overload-overlap]
    @overload
    def __call__(
        self, target: Callable[P, Awaitable[R]], /
    ) -> RemoteFunction[P, R]: ...
    @overload
    def __call__(self, target: Callable[P, R], /) -> RemoteFunction[P, R]: ...


class _QueueDecorator(Protocol):
    """``@remote`` for queue resources: calls return `JobOutput`."""

    @overload
    def __call__(self, target: type[T], /) -> RemoteClass[T]: ...  # type: ignore[overload-overlap]
    @overload
    def __call__(self, target: Callable[P, Any], /) -> RemoteFunction[P, JobOutput]: ...


@overload
def remote(
    resource_config: ServerlessResource,
    dependencies: list[str] | None = None,
    system_dependencies: list[str] | None = None,
    accelerate_downloads: bool = True,  # noqa: FBT001, FBT002
    *,
    local: Literal[True],
    method: str | None = None,
    path: str | None = None,
) -> _ValueDecorator: ...
@overload
def remote(
    resource_config: LoadBalancerResource,
    dependencies: list[str] | None = None,
    system_dependencies: list[str] | None = None,
    accelerate_downloads: bool = True,  # noqa: FBT001, FBT002
    local: Literal[False] = False,  # noqa: FBT002
    method: str | None = None,
    path: str | None = None,
) -> _ValueDecorator: ...
@overload
def remote(
    resource_config: ServerlessResource,
    dependencies: list[str] | None = None,
    system_dependencies: list[str] | None = None,
    accelerate_downloads: bool = True,  # noqa: FBT001, FBT002
    local: bool = False,  # noqa: FBT001, FBT002
    method: str | None = None,
    path: str | None = None,
) -> _QueueDecorator: ...
def remote(
    resource_config: object = None,
    dependencies: list[str] | None = None,
    system_dependencies: list[str] | None = None,
    accelerate_downloads: bool = True,  # noqa: FBT001, FBT002
    local: bool = False,  # noqa: FBT001, FBT002
    method: str | None = None,
    path: str | None = None,
    **unexpected: Never,
) -> Any:
    """Mark a function or class for remote execution on ``resource_config``'s endpoint.

    Args:
        resource_config: the endpoint (one of the eight resource classes).
        dependencies: pip packages the worker installs before running it.
        system_dependencies: apt packages the worker installs.
        accelerate_downloads: let RunPod accelerate model and package downloads.
        local: run in this process (arguments and result still make the serialization
            round trip) and return the function's own value.
        method: HTTP method of the route (load-balancer resources only).
        path: HTTP path of the route, starting with "/" (load-balancer resources only).
        **unexpected: keyword arguments Flash does not have: refused, with a "did you mean".

    Returns:
        A decorator. Calls of the decorated function are awaitable (plain ``def`` functions
        too): queue resources give a `JobOutput`; load-balancer resources and ``local=True``
        give the value and raise the remote error, typed as the remote exception.

    Raises:
        ConfigurationError: at decoration time, for arguments that cannot work; the message
            names the function and the fix.
    """
    if unexpected:
        name = next(iter(unexpected))
        hint = difflib.get_close_matches(name, _PARAMETERS, n=1)
        more = f"; did you mean {hint[0]!r}?" if hint else ""
        msg = f"remote() got an unexpected keyword argument {name!r}{more}"
        raise ConfigurationError(msg)
    if not isinstance(resource_config, ServerlessResource):
        msg = (
            "remote() needs resource_config=, an endpoint config such as "
            f"LiveServerless(name=...); got {resource_config!r}"
        )
        if callable(resource_config):
            msg += " (write @remote(resource_config=...), not a bare @remote)"
        raise ConfigurationError(msg)
    if resource_config.handler is not None:
        msg = (
            f"remote(): endpoint {resource_config.name!r} runs the RunPod handler file "
            f"{resource_config.handler!r}; send it dictionary payloads with "
            "`await endpoint.run({...})` instead of decorating functions with it"
        )
        raise ConfigurationError(msg)
    spec = _Spec(
        resource_config,
        list(dependencies or []),
        list(system_dependencies or []),
        accelerate_downloads,
        local,
        method,
        path,
    )

    def decorate(target: Any) -> Any:
        if inspect.isclass(target):
            label = f"class {target.__qualname__!r}"
            if resource_config.is_load_balancer:
                msg = (
                    f"@remote {label}: load-balancer resources serve functions on HTTP "
                    "routes; put classes on a queue resource (LiveServerless, ...)"
                )
                raise ConfigurationError(msg)
        elif inspect.isfunction(target):
            label = f"function {target.__qualname__!r}"
        else:
            msg = (
                "@remote decorates a function (def / async def) or a class, not "
                f"{type(target).__name__} {target!r}"
            )
            raise InvalidRemoteTargetError(msg)
        _check_spec(spec, label)
        REGISTRY.register(resource_config, owner=label)
        found = warn_outer_references(target, stacklevel=3)
        uses = _uses(target, found)
        if inspect.isclass(target):
            return RemoteClass(target, spec, _stubs(target, uses))
        function: RemoteFunction[..., Any] = RemoteFunction(target, spec, uses)
        if spec.method is not None and spec.path is not None:
            REGISTRY.register_route(
                resource_config.name,
                spec.method,
                spec.path,
                label,
                function.function_request_template,
            )
        REGISTRY.register_function(function.key, resource_config.name)
        return function

    return decorate
