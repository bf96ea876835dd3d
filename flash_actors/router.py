"""The Router actor: Flash's ProductionWrapper, forwarding each call to its endpoint.

It asks the Registry where a call's endpoint lives and forwards the call to that endpoint's
actor, which answers the caller directly; the Router itself never waits on a job.

In deployed code (a worker started with ``FLASH_RESOURCE_NAME``), calls to functions of the
worker's own resource never get here (they run in the process, see `flash_actors.remote`);
the others are looked up by ``module:qualname`` in the manifest-backed Registry. If nothing
loaded a manifest yet, the first such call loads one: ``FLASH_MANIFEST_PATH``, else
``flash_manifest.json`` in the working directory (where an unpacked archive has it), else
``.flash/flash_manifest.json``. A function the manifest does not know, or no manifest at all,
is a `ManifestError`. In development the call's own endpoint is
used, checked against a loaded manifest when it lists the function.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flash_actors.actors import Actor, ActorRef, Forward
from flash_actors.build.manifest import deployed_resource, find_manifest
from flash_actors.errors import ManifestError
from flash_actors.messages import Call, Routed

if TYPE_CHECKING:
    from flash_actors.runtime import FlashRuntime

__all__ = ["Router"]


class Router(Actor[Routed]):
    """Routes `Call`s (and `PayloadCall`s) to Endpoint actors, spawning them on first use."""

    def __init__(self, runtime: FlashRuntime) -> None:
        self._runtime = runtime
        self._endpoints: dict[str, ActorRef[Routed]] = {}
        self._deployed = deployed_resource()

    def _resolve(self, call: Call) -> str:
        """The endpoint of ``call`` by its function's ``module:qualname`` (see module doc)."""
        registry = self._runtime.registry
        if self._deployed is not None and not registry.manifest_functions:
            registry.load(find_manifest())  # ManifestError: missing or invalid
        endpoint = registry.manifest_functions.get(call.key)
        if endpoint is None:
            if self._deployed is None:
                return call.endpoint
            msg = (
                f"function {call.key!r} (called from resource {self._deployed!r}) is not in "
                "the manifest: rebuild the app with `flash build` and deploy it again"
            )
            raise ManifestError(msg)
        if endpoint != call.endpoint:
            msg = (
                f"the manifest puts {call.key!r} on {endpoint!r}, but the code puts it on "
                f"{call.endpoint!r}: rebuild the app with `flash build`"
            )
            raise ManifestError(msg)
        return endpoint

    async def receive(self, message: Routed) -> Forward:
        """Forward the call to its endpoint's actor."""
        name = message.endpoint
        if isinstance(message, Call) and message.key:
            name = self._resolve(message)
        ref = self._endpoints.get(name)
        if ref is None or ref.is_stopped:
            ref = self._runtime.endpoint(name)
            self._endpoints[name] = ref
        return Forward(ref, message)
