"""The provider interface: what an Endpoint actor needs from wherever workers run."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from types import TracebackType

    from anyio.streams.memory import MemoryObjectSendStream

    from flash_actors.messages import Call, FunctionResponse
    from flash_actors.resources import ServerlessResource

__all__ = ["EndpointBackend", "Provider"]


class EndpointBackend(Protocol):
    """The workers of one endpoint, as its Endpoint actor sees them.

    Attributes:
        capacity: how many jobs may run at once; the Endpoint actor queues the rest.
    """

    capacity: int

    async def execute(
        self,
        call: Call,
        *,
        job_id: str,
        chunks: MemoryObjectSendStream[FunctionResponse] | None = None,
    ) -> FunctionResponse:
        """Run ``call.request`` on a worker and return its response.

        The backend applies ``call.policy``'s execution timeout and, while the job waits for
        a worker, its TTL, raising `ExecutionTimeoutError` for either. With ``chunks``, the
        function's chunks are sent there as they come (waiting when it is full) and the
        returned response only ends the stream.

        Cancelling the caller stops the job on the worker.

        Raises:
            DeliveryError: the request could not reach a worker, or its worker died
                (the Endpoint actor retries these by policy).
        """
        ...

    async def aclose(self) -> None:
        """Stop the endpoint's workers."""
        ...


class Provider(Protocol):
    """Makes endpoint backends; one provider serves a whole runtime.

    Attributes:
        name: ``"inprocess"``, ``"local"`` or ``"runpod"``.
    """

    name: str

    async def __aenter__(self) -> Any:
        """Start the provider's background tasks (entered by the runtime's task)."""
        ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Any:
        """Stop them; every worker the provider started is gone afterwards."""
        ...

    async def open_endpoint(
        self, resource: ServerlessResource, key: bytes
    ) -> EndpointBackend:
        """Provision (or find) the endpoint for ``resource``; ``key`` signs its payloads."""
        ...

    async def aclose(self) -> None:
        """Release everything the provider started."""
        ...
