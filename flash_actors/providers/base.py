"""The provider interface: what an Endpoint actor needs from wherever workers run.

Policies have one owner each. A backend lists in ``enforces`` the policies it applies itself
(``"ttl"``: a job that waits too long for a worker expires; ``"execution_timeout"``: a job that
runs too long is stopped); the Endpoint actor applies the others. Retries of failed
deliveries are always the Endpoint actor's; a service that re-runs a job whose worker died
(the ``flash local`` daemon, RunPod) does so inside the one delivery.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from types import TracebackType

    from anyio.streams.memory import MemoryObjectSendStream

    from flash_actors.messages import Call, FunctionResponse
    from flash_actors.resources import ServerlessResource

__all__ = ["ENFORCES_ALL", "ENFORCES_NONE", "EndpointBackend", "Enforced", "Provider"]

Enforced = Literal["ttl", "execution_timeout"]
ENFORCES_ALL: frozenset[Enforced] = frozenset({"ttl", "execution_timeout"})
ENFORCES_NONE: frozenset[Enforced] = frozenset()


class EndpointBackend(Protocol):
    """The workers of one endpoint, as its Endpoint actor sees them.

    Attributes:
        capacity: how many jobs may run at once; the Endpoint actor queues the rest.
        enforces: the policies this backend applies itself (see the module docstring).
    """

    capacity: int
    enforces: frozenset[Enforced]

    async def execute(
        self,
        call: Call,
        *,
        job_id: str,
        chunks: MemoryObjectSendStream[FunctionResponse] | None = None,
    ) -> FunctionResponse:
        """Run ``call.request`` on a worker and return its response.

        For the policies in ``enforces`` the backend raises `ExecutionTimeoutError` itself
        (TTL while the job waits for a worker, execution timeout while it runs). With ``chunks``, the
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
        name: ``"inprocess"``, ``"local"`` or ``"runpod"`` (see `flash_actors.providers.registry`).
    """

    name: str

    def signing_key(self, endpoint: str) -> bytes | None:
        """The MAC key that requests to ``endpoint`` are signed with (and results checked).

        Each provider owns where its secret comes from; ``None`` means its workers do not
        check signatures (RunPod's stock Flash workers) and requests go unsigned.
        """
        ...

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
        self, resource: ServerlessResource, key: bytes | None
    ) -> EndpointBackend:
        """Provision (or find) the endpoint for ``resource``.

        ``key`` is `signing_key`'s for it (``None``: unsigned).
        """
        ...

    async def aclose(self) -> None:
        """Release everything the provider started."""
        ...
