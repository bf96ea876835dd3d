"""The Router actor: Flash's ProductionWrapper, forwarding each call to its endpoint.

It asks the Registry where a call's endpoint lives and forwards the call to that endpoint's
actor, which answers the caller directly; the Router itself never waits on a job.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flash_actors.actors import Actor, ActorRef, Forward
from flash_actors.messages import Routed

if TYPE_CHECKING:
    from flash_actors.runtime import FlashRuntime

__all__ = ["Router"]


class Router(Actor[Routed]):
    """Routes `Call`s (and `PayloadCall`s) to Endpoint actors, spawning them on first use."""

    def __init__(self, runtime: FlashRuntime) -> None:
        self._runtime = runtime
        self._endpoints: dict[str, ActorRef[Routed]] = {}

    async def receive(self, message: Routed) -> Forward:
        """Forward the call to its endpoint's actor."""
        ref = self._endpoints.get(message.endpoint)
        if ref is None or ref.is_stopped:
            ref = self._runtime.endpoint(message.endpoint)
            self._endpoints[message.endpoint] = ref
        return Forward(ref, message)
