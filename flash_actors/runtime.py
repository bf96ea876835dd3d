"""The flash-actors runtime: the actor system, the Router, the Registry and the provider.

``async with flash_actors.runtime():`` scopes one explicitly; remote calls made inside the block
(and in tasks started inside it) use it, and leaving the block stops every endpoint and worker
it started. Calls from other tasks of the same event loop while the block is open (a web
server's request handlers, when a service enters the runtime in its lifespan task) use it too.
Without such a block the first awaited remote call starts a runtime hosted by the running event
loop (see `flash_actors.actors._hosting`), shut down cleanly when the loop ends,
so a plain ``asyncio.run(main())`` or ``trio.run(main)`` script needs nothing more.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import anyio

from flash_actors.actors import ActorRef, ActorSystem
from flash_actors.actors._hosting import current_hosted, hosted, loop_identity
from flash_actors.endpoint import EndpointActor
from flash_actors.messages import PayloadCall
from flash_actors.providers.registry import make_provider
from flash_actors.registry import REGISTRY, Registry
from flash_actors.resources import set_submitter
from flash_actors.router import Router

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable
    from types import TracebackType

    from flash_actors.jobs import JobOutput
    from flash_actors.messages import Call, Routed
    from flash_actors.providers.base import Provider
    from flash_actors.resources import ServerlessResource

__all__ = [
    "FlashRuntime",
    "current_runtime",
    "get_runtime",
    "runtime",
    "set_nested_runner",
]

ENDPOINT_MAILBOX = 4096
ENDPOINT_CONCURRENCY = 4096

_current: ContextVar[FlashRuntime | None] = ContextVar(
    "flash_actors_runtime", default=None
)

# Runtimes open in each event loop (id of the loop -> the loop, innermost last). A task that did
# not inherit a block's context (uvicorn runs the ASGI lifespan in a task of its own, and each
# request in another) uses the innermost open one, not a second, implicit runtime.
_open: dict[int, tuple[object, list[FlashRuntime]]] = {}

_nested_runner: (
    Callable[[str, tuple[Any, ...], dict[str, Any], list[str]], Awaitable[Any]] | None
) = None


def set_nested_runner(
    runner: Callable[[str, tuple[Any, ...], dict[str, Any], list[str]], Awaitable[Any]],
) -> None:
    """How a worker's nested call is made here (`flash_actors.remote.run_nested` sets it)."""
    global _nested_runner
    _nested_runner = runner


class FlashRuntime:
    """One running runtime. Make it with `runtime()`; it is not reentrant.

    Args:
        provider: where endpoints run: a `Provider`, or its name in
            `flash_actors.providers.registry` (default: ``FLASH_PROVIDER``, else ``"local"``).
        registry: function and endpoint lookup (default: the process-wide registry that
            ``@remote`` fills, backed by ``.flash/flash_manifest.json`` when present).
    """

    def __init__(
        self,
        *,
        provider: Provider | str | None = None,
        registry: Registry | None = None,
    ) -> None:
        self.provider: Provider = (
            provider
            if provider is not None and not isinstance(provider, str)
            else make_provider(provider)
        )
        self.registry = registry or REGISTRY
        self.system = ActorSystem()
        self._router: ActorRef[Routed] | None = None

    @property
    def router(self) -> ActorRef[Routed]:
        """The Router actor (the ProductionWrapper)."""
        if self._router is None:
            msg = "the runtime is not running"
            raise RuntimeError(msg)
        return self._router

    async def __aenter__(self) -> FlashRuntime:
        await self.provider.__aenter__()
        try:
            await self.system.__aenter__()
        except BaseException:
            await self.provider.__aexit__(None, None, None)
            raise
        self._router = self.system.spawn(
            lambda: Router(self), name="router", mailbox_size=ENDPOINT_MAILBOX
        )
        serve_nested = getattr(self.provider, "serve_nested", None)
        if serve_nested is not None:  # its workers' nested calls come back through us
            serve_nested(self._nested_call)
        return self

    async def _nested_call(
        self,
        key: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        chain: list[str],
    ) -> Any:
        """A worker's call of another remote function, made here in this runtime."""
        assert _nested_runner is not None  # noqa: S101 (importing flash_actors sets it)
        token = _current.set(self)
        try:
            return await _nested_runner(key, args, kwargs, chain)
        finally:
            _current.reset(token)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.system.__aexit__(exc_type, exc, tb)
        finally:
            try:
                with anyio.CancelScope(shield=True):
                    await self.provider.aclose()
            finally:
                # Not inside the shield: the provider's task group must exit in nesting order.
                await self.provider.__aexit__(None, None, None)

    def signing_key(self, endpoint: str) -> bytes | None:
        """The key calls to ``endpoint`` are signed with (the provider's; see `Provider`)."""
        return self.provider.signing_key(endpoint)

    def endpoint(self, name: str) -> ActorRef[Routed]:
        """The Endpoint actor of endpoint ``name``, spawned on first use.

        Raises:
            ManifestError: no resource config of that name is registered.
        """
        actor_name = f"endpoint:{name}"
        ref = self.system.get(actor_name)
        if ref is None:
            resource = self.registry.resource(name)
            ref = self.system.spawn(
                lambda: EndpointActor(resource, self.provider),
                name=actor_name,
                mailbox_size=ENDPOINT_MAILBOX,
                max_concurrency=ENDPOINT_CONCURRENCY,
            )
        return ref

    async def call(self, call: Call) -> Any:
        """Send a call through the Router and wait for its answer."""
        return await self.router.ask(call)

    async def submit(
        self, resource: ServerlessResource, payload: dict[str, Any]
    ) -> JobOutput:
        """Run one dictionary job on a handler endpoint (``await endpoint.run({...})``)."""
        self.registry.register(resource)
        job = PayloadCall(
            endpoint=resource.name,
            input=payload.get("input", payload),
            policy=resource.call_policy(),
        )
        result: JobOutput = await self.router.ask(job)
        return result


@asynccontextmanager
async def runtime(
    *, provider: Provider | str | None = None, registry: Registry | None = None
) -> AsyncIterator[FlashRuntime]:
    """Run a flash-actors runtime for the duration of the block.

    Remote calls inside the block (and in tasks it starts) go through this runtime, and so do
    calls from other tasks of this event loop while it is open (the innermost one, if several).
    On exit, queued work is finished (normal exit) or cancelled (exception, cancellation), and
    every endpoint and worker the runtime started is stopped.
    """
    async with FlashRuntime(provider=provider, registry=registry) as rt:
        token = _current.set(rt)
        loop = loop_identity()[1]
        entry = _open.get(id(loop))
        if entry is None or entry[0] is not loop:
            entry = _open[id(loop)] = (loop, [])
        entry[1].append(rt)
        try:
            yield rt
        finally:
            entry[1].remove(rt)
            if not entry[1] and _open.get(id(loop)) is entry:
                del _open[id(loop)]
            _current.reset(token)


def _open_in_loop() -> FlashRuntime | None:
    loop = loop_identity()[1]
    entry = _open.get(id(loop))
    if entry is None or entry[0] is not loop or not entry[1]:
        return None
    return entry[1][-1]


def current_runtime() -> FlashRuntime | None:
    """The runtime remote calls made here would use, if one is running (no await)."""
    rt = _current.get() or _open_in_loop()
    if rt is not None:
        return rt
    hosted_rt: FlashRuntime | None = current_hosted()
    return hosted_rt


async def get_runtime() -> FlashRuntime:
    """The runtime of this context, else the innermost one open in this event loop.

    With neither, the loop's implicit runtime is started (or joined).
    """
    rt = _current.get() or _open_in_loop()
    if rt is not None:
        return rt
    hosted_rt: FlashRuntime | None = current_hosted()
    if hosted_rt is not None:
        return hosted_rt
    return await hosted(FlashRuntime)


async def submit_payload(
    resource: ServerlessResource, payload: dict[str, Any]
) -> JobOutput:
    """``await resource.run(payload)``: the job on this context's runtime."""
    runtime = await get_runtime()
    return await runtime.submit(resource, payload)


set_submitter(submit_payload)
