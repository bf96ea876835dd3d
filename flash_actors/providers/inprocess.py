"""The in-process provider: the worker's executor, run inside the caller's process.

It stands in until the local provider's worker processes exist, and it is the "no worker"
path of the call-latency benchmark. Requests still cross the wire format (JSON encode and
decode, signed base64 cloudpickle payloads), so what cannot travel fails here too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio

from flash_actors.messages import (
    Call,
    FunctionResponse,
    request_decoder,
    response_decoder,
    wire_encoder,
)
from flash_actors.policies import timeout_error
from flash_actors.worker.executor import Executor

if TYPE_CHECKING:
    from anyio.streams.memory import MemoryObjectSendStream

    from flash_actors.resources import ServerlessResource

__all__ = ["InProcessBackend", "InProcessProvider"]


class InProcessBackend:
    """One endpoint's executor in this process; ``capacity`` jobs at once."""

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
        """Run the request through a wire round trip, within the execution timeout."""
        wire_request = request_decoder.decode(wire_encoder.encode(call.request))
        with anyio.move_on_after(call.policy.execution_timeout_s):
            if chunks is None:
                response = await self._executor.execute(wire_request)
            else:
                response = await self._executor.stream(wire_request, chunks.send)
            return response_decoder.decode(wire_encoder.encode(response))
        raise timeout_error(call, job_id)

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

    async def open_endpoint(
        self, resource: ServerlessResource, key: bytes
    ) -> InProcessBackend:
        """A backend for ``resource``."""
        del resource
        return InProcessBackend(key, self.capacity)

    async def aclose(self) -> None:
        """Nothing to release."""
