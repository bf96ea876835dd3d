"""The in-process provider: the worker's executor, run inside the caller's process.

It stands in until the local provider's worker processes exist, and it is the "no worker"
path of the call-latency benchmark. Requests still cross the wire format (JSON encode and
decode, signed base64 cloudpickle payloads), so what cannot travel fails here too. It is not
isolated: functions import whatever the caller's environment has (strict imports,
`flash_actors.worker.isolation`, hold in worker processes only).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flash_actors.messages import (
    Call,
    FunctionResponse,
    request_decoder,
    response_decoder,
    wire_encoder,
)
from flash_actors.providers.base import ENFORCES_NONE
from flash_actors.serialization import endpoint_key
from flash_actors.worker.executor import Executor

if TYPE_CHECKING:
    from anyio.streams.memory import MemoryObjectSendStream

    from flash_actors.resources import ServerlessResource

__all__ = ["InProcessBackend", "InProcessProvider"]


class InProcessBackend:
    """One endpoint's executor in this process; ``capacity`` jobs at once.

    It enforces no policy itself: the Endpoint actor applies the TTL and the timeout.
    """

    enforces = ENFORCES_NONE

    def __init__(self, key: bytes, capacity: int) -> None:
        self.capacity = capacity
        self._executor = Executor(key)

    async def execute(
        self,
        call: Call,
        *,
        job_id: str,
        chunks: MemoryObjectSendStream[FunctionResponse] | None = None,
    ) -> FunctionResponse:
        """Run the request through a wire round trip."""
        del job_id
        wire_request = request_decoder.decode(wire_encoder.encode(call.request))
        if chunks is None:
            response = await self._executor.execute(wire_request)
        else:
            response = await self._executor.stream(wire_request, chunks.send)
        return response_decoder.decode(wire_encoder.encode(response))

    async def aclose(self) -> None:
        """Drop class instances."""
        self._executor.forget_instances()


class InProcessProvider:
    """Runs every endpoint in this process.

    Args:
        capacity: jobs one endpoint runs at once.
    """

    name = "inprocess"

    def __init__(self, *, capacity: int = 1024) -> None:
        self.capacity = capacity

    async def __aenter__(self) -> InProcessProvider:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None

    def signing_key(self, endpoint: str) -> bytes:
        """This process's key for ``endpoint`` (`flash_actors.serialization.endpoint_key`)."""
        return endpoint_key(endpoint)

    async def open_endpoint(
        self, resource: ServerlessResource, key: bytes | None
    ) -> InProcessBackend:
        """A backend for ``resource``."""
        del resource
        return InProcessBackend(key or endpoint_key("inprocess"), self.capacity)

    async def aclose(self) -> None:
        """Nothing to release."""
