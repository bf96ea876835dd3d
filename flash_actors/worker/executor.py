"""Runs one `FunctionRequest`: authenticate, load the code, call it, sign the result.

The same executor serves a worker process and the in-process provider, so a function behaves
the same in both: its source is compiled into a fresh namespace (annotations are not
evaluated), so only what the function imports itself exists; classes keep their instances by
``instance_id``; sync functions run in a worker thread, async ones on the event loop; a
generator's chunks are collected into a list.

Cancelling a job cancels an async function at its next ``await``. Sync code in a thread cannot
be interrupted: the job's task waits for the thread (it is never abandoned, so it never looks
finished while the code still runs), and `Blocking` tells the worker so, which then recycles
itself instead of pretending the job stopped.

Nothing is unpickled and no code is compiled before the request's signature has been checked.

A request in Flash's json format (``serialization_format: "json"``) gets its arguments as the
plain JSON values it carries and answers with ``json_result`` (each chunk too, when it
streams): nothing is pickled on that path, and a return value that is not plain JSON fails the
call with a `SerializationError` naming its type.
"""

from __future__ import annotations
import __future__

import builtins
import contextvars
import inspect
import linecache
import traceback
from collections.abc import Awaitable, Callable
from contextlib import aclosing, nullcontext
from inspect import CO_COROUTINE
from types import FunctionType
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from flash_actors.errors import RemoteExecutionError
from flash_actors.messages import FunctionRequest, FunctionResponse
from flash_actors.serialization import (
    DecodedRequest,
    decode_request,
    encode_result,
    to_json,
)
from flash_actors.volumes import apply_downloads
from flash_actors.worker._capture import capture_stdout
from flash_actors.worker.installer import activate

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "BLOCKING",
    "CALL_CHAIN",
    "Blocking",
    "Emit",
    "Executor",
    "Stub",
    "compile_code",
    "invoke",
    "run_in_thread",
]

Emit = Callable[[FunctionResponse], Awaitable[None]]
"""Receives each chunk of a streaming call."""

_COMPILE_FLAGS = __future__.annotations.compiler_flag


class Blocking:
    """How many threads a job is running its code in; it cannot be cancelled while any is."""

    __slots__ = ("threads",)

    def __init__(self) -> None:
        self.threads = 0


BLOCKING: contextvars.ContextVar[Blocking | None] = contextvars.ContextVar(
    "flash_job_blocking", default=None
)
"""Set by the worker in each job's task, so that it can tell a stuck job from a slow one."""


async def run_in_thread(func: Callable[..., Any], *args: Any) -> Any:
    """``func(*args)`` in a worker thread, counted in the job's `Blocking` while it runs.

    Cancellation waits for the thread to finish (the thread is never abandoned).
    """
    state = BLOCKING.get()
    if state is not None:
        state.threads += 1
    try:
        return await anyio.to_thread.run_sync(func, *args)
    finally:
        if state is not None:
            state.threads -= 1


def _qualified_type(exc: BaseException) -> str:
    if isinstance(exc, RemoteExecutionError) and exc.remote_type:
        return exc.remote_type  # a nested call's error, raised on: keep its own type
    cls = type(exc)
    return f"{cls.__module__}.{cls.__qualname__}"


def _user_traceback(exc: BaseException) -> str:
    """The traceback from the first frame of the remote code (our own frames dropped)."""
    first = tb = exc.__traceback__
    while tb is not None and not tb.tb_frame.f_code.co_filename.startswith(
        "<flash-remote"
    ):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb or first))


CALL_CHAIN: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "flash_call_chain", default=()
)
"""Endpoints waiting on the job running in this context, outermost first (a nested call's
``call_chain``; see `flash_actors.worker.nested`)."""


class Stub:
    """Base of the objects a function's code binds its remote functions' names to.

    ``flash_target``: for a function that calls itself by name, the function itself (what
    the worker runs; see `flash_actors.worker.nested`).
    """

    flash_target: Any = None


def compile_code(name: str, code: str) -> Any:
    """Run ``code`` in a fresh module namespace and return the object it names ``name``.

    Raises:
        LookupError: the code does not define ``name``.
    """
    filename = f"<flash-remote {name}>"
    linecache.cache[filename] = (
        len(code),
        None,
        code.splitlines(keepends=True),
        filename,
    )
    namespace: dict[str, Any] = {
        "__name__": "__flash_remote__",
        "__builtins__": builtins,
    }
    exec(  # noqa: S102 (the request's signature was checked by the caller)
        compile(code, filename, "exec", flags=_COMPILE_FLAGS, dont_inherit=True),
        namespace,
    )
    if name not in namespace:
        msg = f"the code sent for {name!r} does not define {name!r}"
        raise LookupError(msg)
    obj = namespace[name]
    # A function that calls itself has its name bound to a stub (flash_actors.worker.nested)
    if isinstance(obj, Stub) and obj.flash_target is not None:
        return obj.flash_target
    return obj


class Executor:
    """Executes requests for one endpoint.

    Args:
        key: the endpoint's MAC key; requests must be signed with it.
        deployed: functions and classes of deployed code, by name, for requests that carry
            no source (``function_code`` absent).
    """

    def __init__(
        self,
        key: bytes,
        *,
        deployed: Mapping[str, Any] | None = None,
        capture_stdout: bool = False,
    ) -> None:
        self._key = key
        self._capture = capture_stdout
        # What a function may raise and still get an answer. ``sys.exit()`` raised out of
        # the job's task would stop a worker (and the retried job the next one). In a
        # worker (``capture_stdout``) no signal raises KeyboardInterrupt (its loop handles
        # SIGINT), so only the function can; in-process it may be the user's Ctrl-C.
        self._failures: tuple[type[BaseException], ...] = (
            (Exception, SystemExit, KeyboardInterrupt)
            if capture_stdout
            else (Exception, SystemExit)
        )
        self._deployed = dict(deployed or {})
        self._code_cache: dict[tuple[str, str], Any] = {}
        self._instances: dict[str, Any] = {}

    def load(self, name: str, code: str) -> Any:
        """Compile ``code`` in a fresh namespace once and return the object named ``name``."""
        cache_key = (name, code)
        obj = self._code_cache.get(cache_key)
        if obj is None:
            obj = compile_code(name, code)
            self._code_cache[cache_key] = obj
        return obj

    def _target(
        self, req: FunctionRequest, decoded: DecodedRequest
    ) -> Callable[..., Any]:
        if req.execution_type == "class":
            class_name = req.class_name or ""
            cls = (
                self.load(class_name, req.class_code)
                if req.class_code
                else self._deployed_obj(class_name)
            )
            instance_id = req.instance_id or ""
            instance = self._instances.get(instance_id) if instance_id else None
            if instance is None:
                if not req.create_new_instance and instance_id:
                    msg = f"no instance {instance_id!r} of {class_name} on this worker"
                    raise LookupError(msg)
                instance = cls(*decoded.constructor_args, **decoded.constructor_kwargs)
                if instance_id:
                    self._instances[instance_id] = instance
            method: Callable[..., Any] = getattr(instance, req.method_name)
            return method
        name = req.function_name or ""
        if req.function_code:
            fn: Callable[..., Any] = self.load(name, req.function_code)
            return fn
        return self._deployed_obj(name)  # type: ignore[no-any-return]

    def _deployed_obj(self, name: str) -> Any:
        try:
            return self._deployed[name]
        except KeyError:
            msg = f"{name!r} is not part of the code deployed on this worker and no source was sent"
            raise LookupError(msg) from None

    async def execute(self, req: FunctionRequest) -> FunctionResponse:
        """Run the request and describe the outcome; the function's errors become a response.

        A generator function's chunks are collected into a list.

        Raises:
            PayloadSignatureError: the request is unsigned or tampered with (nothing ran).
        """
        return await self._run(req, None)

    async def stream(self, req: FunctionRequest, emit: Emit) -> FunctionResponse:
        """Run a generator function, handing each chunk to ``emit`` as it is produced.

        Each chunk is a successful `FunctionResponse` carrying one signed result; ``emit``
        applies back-pressure by taking its time. The returned response ends the stream
        (an error, or success with no result). A plain function streams one chunk.

        Raises:
            PayloadSignatureError: the request is unsigned or tampered with (nothing ran).
        """
        return await self._run(req, emit)

    async def _run(self, req: FunctionRequest, emit: Emit | None) -> FunctionResponse:
        decoded = decode_request(req, self._key)
        stdout = ""
        result: str | None = None
        signature: str | None = None
        json_result: Any = None
        as_json = req.serialization_format == "json"
        # a nested call's code sees which endpoints wait on it (flash_actors.worker.nested)
        chain = CALL_CHAIN.set(tuple(req.call_chain)) if req.call_chain else None
        try:
            if req.dependencies:
                await activate(req.dependencies)
            apply_downloads(req.accelerate_downloads)
            target = self._target(req, decoded)
            with capture_stdout() if self._capture else nullcontext() as printed:
                try:
                    if emit is None:
                        value = await invoke(target, decoded.args, decoded.kwargs)
                        if as_json:
                            json_result = to_json(value, what=_returned(req))
                        else:
                            result, signature = encode_result(value, self._key)
                    else:
                        send = self._emitter(emit, req) if as_json else None
                        await _drive(
                            target,
                            decoded.args,
                            decoded.kwargs,
                            send or self._emitter(emit),
                        )
                finally:
                    stdout = printed.getvalue() if printed is not None else ""
        except self._failures as exc:  # the function's failure is the answer
            return FunctionResponse(
                success=False,
                error=_user_traceback(exc),
                error_type=_qualified_type(exc),
                error_message=str(exc),
                instance_id=req.instance_id,
                stdout=stdout or None,
            )
        finally:
            if chain is not None:
                CALL_CHAIN.reset(chain)
        return FunctionResponse(
            success=True,
            result=result,
            json_result=json_result,
            signature=signature,
            instance_id=req.instance_id,
            stdout=stdout or None,
        )

    def _emitter(
        self, emit: Emit, json_of: FunctionRequest | None = None
    ) -> Callable[[Any], Awaitable[None]]:
        """Sends each chunk signed and pickled, or as ``json_result`` for ``json_of``."""
        if json_of is not None:
            what = _returned(json_of, "a chunk")

            async def send_json(chunk: Any) -> None:
                value = to_json(chunk, what=what)
                await emit(FunctionResponse(success=True, json_result=value))

            return send_json

        async def send(chunk: Any) -> None:
            text, signature = encode_result(chunk, self._key)
            await emit(FunctionResponse(success=True, result=text, signature=signature))

        return send

    def forget_instances(self) -> None:
        """Drop every class instance (a recycled worker starts clean)."""
        self._instances.clear()


_DONE = object()


def _returned(req: FunctionRequest, what: str = "the return value") -> str:
    """``what`` of the request's function or method, for error messages."""
    if req.execution_type == "class":
        return f"{what} of {req.class_name}.{req.method_name}()"
    return f"{what} of {req.function_name}()"


async def _drive(
    target: Callable[..., Any],
    args: list[Any],
    kwargs: dict[str, Any],
    send: Callable[[Any], Awaitable[None]],
) -> None:
    """Run ``target`` and send each chunk it produces (one chunk for a plain function)."""
    if inspect.isasyncgenfunction(target):
        async with aclosing(target(*args, **kwargs)) as chunks:
            async for chunk in chunks:
                await send(chunk)
        return
    if inspect.isgeneratorfunction(target):
        generator = await run_in_thread(lambda: target(*args, **kwargs))
        while (chunk := await run_in_thread(next, generator, _DONE)) is not _DONE:
            await send(chunk)
        return
    await send(await invoke(target, args, kwargs))


async def invoke(
    target: Callable[..., Any], args: list[Any], kwargs: dict[str, Any]
) -> Any:
    """Call ``target`` the way a worker does.

    Coroutine functions are awaited, sync code runs in a worker thread, and generators are
    collected into lists.
    """
    if type(target) is FunctionType and target.__code__.co_flags & CO_COROUTINE:
        # a plain ``async def`` (what ``inspect.iscoroutinefunction`` finds at length)
        return await target(*args, **kwargs)
    if inspect.iscoroutinefunction(target):
        return await target(*args, **kwargs)
    if inspect.isasyncgenfunction(target):
        async with aclosing(target(*args, **kwargs)) as chunks:
            return [chunk async for chunk in chunks]
    if inspect.isgeneratorfunction(target):
        return await run_in_thread(lambda: list(target(*args, **kwargs)))
    value = await run_in_thread(lambda: target(*args, **kwargs))
    if inspect.isawaitable(value):  # a sync callable that returned an awaitable
        return await value
    return value
