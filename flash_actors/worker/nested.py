"""Remote functions called from inside a remote function: the stubs a worker binds.

A ``@remote`` function that uses another one (``return await inner(x) + 1``) is sent with a
few lines appended to its source (`postamble`), part of the signed code: they call `bind`,
which defines each such name in the function's namespace as a `NestedFunction`, a stub made
from what the caller's process knew of the function (its endpoint's config and its request
template, both in the signed code, so a changed stub is a refused request).

Awaiting a stub on a worker:

- a function of the worker's own endpoint runs here, in this process (no second worker is
  needed, so a single worker cannot wait on itself);
- an endpoint that is already waiting further up the same chain of calls (A -> B -> A) is
  refused with `CallCycleError` at once: its workers may all be busy waiting on this very
  call, and waiting for one could last until the timeout;
- any other endpoint is called through the process that owns the worker (the local provider
  in the user's process: `flash_actors.providers.local.nested`), or through a runtime in
  this process (a ``flash local`` daemon's workers reach its data plane; outside a worker,
  the caller's own runtime).

The chain of endpoints travels with each nested call (`FunctionRequest.call_chain`) and is
seen by the code the call runs through `CALL_CHAIN`.

A stub returns what the same call returns in the caller's process: a `JobOutput` for queue
endpoints, the value for load balancers; errors come back typed.
"""

from __future__ import annotations

import os
import traceback
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgspec

from flash_actors.errors import CallCycleError, FlashRuntimeError, RemoteExecutionError
from flash_actors.jobs import JobOutput, JobStatus
from flash_actors.messages import FunctionRequest
from flash_actors.worker.executor import CALL_CHAIN, Stub, compile_code, invoke

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

__all__ = [
    "CALL_CHAIN",
    "ENDPOINT_ENV",
    "NestedFunction",
    "NestedRef",
    "bind",
    "deployed_chain",
    "own_endpoint",
    "postamble",
    "run_here",
    "set_caller_factory",
]

ENDPOINT_ENV = "FLASH_ENDPOINT_NAME"
"""Set in each worker: the endpoint it serves."""

_caller_factory: Callable[[NestedRef], Any] | None = None


def set_caller_factory(factory: Callable[[NestedRef], Any]) -> None:
    """How a stub makes its call path through a runtime (`flash_actors.remote` sets it)."""
    global _caller_factory
    _caller_factory = factory


class NestedRef(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What a worker needs to call one ``@remote`` function: part of the signed code."""

    name: str
    """The name the calling code uses for it."""
    key: str
    """``module:qualname``."""
    label: str
    endpoint: str
    resource_type: str = ""
    resource: dict[str, Any] = {}
    template: FunctionRequest | None = None
    """Absent for ``self_call``, and where a loop of uses was cut (f uses g uses f)."""
    self_call: bool = False
    """The function calling itself by its own name: the call runs in the process."""
    arg_names: list[str] = []
    method: str | None = None
    path: str | None = None


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(list[NestedRef])


def postamble(refs: list[NestedRef]) -> str:
    """The lines appended to a function's source that bind ``refs`` on the worker."""
    data = _encoder.encode(refs).decode()
    return (
        "\n\n# flash-actors: the @remote functions this code calls (signed with it)\n"
        f"__import__('flash_actors.worker.nested', fromlist=['bind']).bind(globals(), {data!r})\n"
    )


def bind(namespace: dict[str, Any], data: str) -> None:
    """Define each function of ``data`` (from `postamble`) in ``namespace`` as a stub."""
    for ref in _decoder.decode(data):
        namespace[ref.name] = NestedFunction(ref, namespace.get(ref.name))


def own_endpoint() -> str | None:
    """The endpoint this worker serves, or None outside a worker."""
    return os.environ.get(ENDPOINT_ENV) or None


def _cycle_error(chain: tuple[str, ...], own: str | None, target: str) -> Exception:
    path = " -> ".join([*chain, *([own] if own else []), target])
    msg = (
        f"call cycle {path}: endpoint {target!r} is already waiting on this chain of calls, "
        "and its workers may all be busy waiting on it, so the call is refused rather than "
        "left to wait until its timeout. Put the function called back on the calling "
        f"endpoint ({own or '?'!r}: calls within an endpoint run in its worker), or "
        "restructure the calls so that they do not loop"
    )
    return CallCycleError(msg)


def deployed_chain(own: str, target: str) -> list[str]:
    """The ``call_chain`` of a call from deployed resource ``own`` to resource ``target``.

    The resources waiting further up (`CALL_CHAIN`, set from the request this process is
    running), then ``own``.

    Raises:
        CallCycleError: ``target`` is already waiting on this chain (A -> B -> A).
    """
    chain = CALL_CHAIN.get()
    if target in chain:
        raise _cycle_error(chain, own, target)
    return [*chain, own]


def _cut(ref: NestedRef) -> Exception:
    msg = (
        f"{ref.label}() calls back into a function that is already calling it (they use "
        "each other in a loop), and its code was not sent along again; restructure the "
        "calls so that they do not loop"
    )
    return CallCycleError(msg)


class NestedFunction(Stub):
    """A ``@remote`` function as seen from another remote function's code."""

    def __init__(self, ref: NestedRef, defined: Any = None) -> None:
        self.ref = ref
        self.__name__ = ref.label.rpartition(".")[2]
        self.__qualname__ = ref.label
        self._caller: Any = None
        self._target: Any = defined if ref.self_call else None
        self.flash_target: Any = self._target
        """For a self call: the function itself, which the worker runs (see `compile_code`)."""

    def __repr__(self) -> str:
        return f"<remote function {self.ref.key} on {self.ref.endpoint!r}>"

    def __call__(self, *args: Any, **kwargs: Any) -> Coroutine[Any, Any, Any]:
        """Start the call; await it (see the module docstring for what runs where)."""
        return self._call(args, kwargs)

    async def _call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        ref = self.ref
        own = own_endpoint()
        chain = CALL_CHAIN.get()
        if ref.self_call or (own is not None and ref.endpoint == own):
            return await self._here(args, kwargs)
        if ref.endpoint in chain:
            raise _cycle_error(chain, own, ref.endpoint)
        nested_chain = [*chain, own] if own is not None else list(chain)
        # imported here: the provider package is heavy, and most workers never need it
        from flash_actors.providers.local import nested as channel

        owner = channel.owner_address()
        if owner is not None:
            return await channel.call_owner(
                owner, ref.key, ref.endpoint, args, kwargs, nested_chain
            )
        return await self.caller().remote(
            args, kwargs, tuple(ref.arg_names), chain=nested_chain
        )

    def caller(self) -> Any:
        """The call path of a caller-side ``@remote`` function, made from the stub."""
        if self._caller is None:
            if self.ref.template is None:
                raise _cut(self.ref)
            assert _caller_factory is not None  # noqa: S101 (importing flash_actors sets it)
            self._caller = _caller_factory(self.ref)
        return self._caller

    async def _here(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A function of this worker's endpoint: run it in this process."""
        if self._target is None:
            template = self.ref.template
            if template is None:
                raise _cut(self.ref)
            name = template.function_name or ""
            self._target = compile_code(name, template.function_code or "")
        return await run_here(self._target, args, kwargs, queue=self.ref.method is None)


async def run_here(
    target: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    queue: bool,
) -> Any:
    """Run a function of this process's own endpoint here, answering as a remote call would.

    Queue endpoints answer with a `JobOutput` (a failure in it, typed); load balancers with
    the value (a failure raised as it is).
    """
    if not queue:
        return await invoke(target, list(args), kwargs)
    job_id = f"here-{uuid.uuid4().hex}"
    started = datetime.now(UTC)
    try:
        value = await invoke(target, list(args), kwargs)
    except Exception as exc:  # noqa: BLE001 (a queue call's failure is its JobOutput)
        text = "".join(traceback.format_exception(exc))
        cls = type(exc)
        error = (
            exc
            if isinstance(exc, FlashRuntimeError)
            else RemoteExecutionError.from_remote(
                str(exc), f"{cls.__module__}.{cls.__qualname__}", text
            )
        )
        return JobOutput(
            id=job_id,
            status=JobStatus.FAILED,
            error=text,
            started_at=started,
            ended_at=datetime.now(UTC),
            exception=error,
        )
    return JobOutput(
        id=job_id,
        status=JobStatus.COMPLETED,
        output=value,
        started_at=started,
        ended_at=datetime.now(UTC),
    )
