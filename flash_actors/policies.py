"""Per-message policies: payload limit, retries with backoff, execution timeout, queue TTL.

A `CallPolicy` rides on every `Call`; the Endpoint actor applies it. Queue resources retry by
default (`RetryPolicy.queue_default()`), load-balancer resources never (`RetryPolicy.never()`).
Only failures of delivery are retried (a worker that died, a refused connection, an HTTP 429 or
5xx): an exception raised by the user's function is an answer, not a failure to deliver.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Literal

import msgspec

from flash_actors.errors import ExecutionTimeoutError, PayloadTooLargeError

if TYPE_CHECKING:
    from flash_actors.messages import Call, FunctionRequest

__all__ = [
    "DEFAULT_EXECUTION_TIMEOUT_S",
    "DEFAULT_PAYLOAD_LIMIT",
    "DEFAULT_TTL_S",
    "CallPolicy",
    "Delivery",
    "RetryPolicy",
    "check_payload",
    "expired_error",
    "timeout_error",
]

DEFAULT_PAYLOAD_LIMIT = 10 * 1024 * 1024
"""Largest base64 payload of one call, in bytes (Flash's and RunPod's ``/run`` limit)."""

DEFAULT_EXECUTION_TIMEOUT_S = 600.0
"""RunPod's default ``executionTimeout`` (600000 ms)."""

DEFAULT_TTL_S = 86_400.0
"""RunPod's default job ``ttl`` (86400000 ms): how long a job may wait in the queue."""

Delivery = Literal["queue", "load_balancer"]


class RetryPolicy(msgspec.Struct, kw_only=True, frozen=True, gc=False):
    """How often and how patiently to retry a call whose delivery failed.

    Attributes:
        attempts: total attempts, the first included (1 means no retry).
        backoff_s: delay before the first retry; doubled for each further retry.
        backoff_max_s: upper bound of a single delay.
        jitter: fraction of each delay drawn at random (0.5: between 50% and 100% of it),
            so that callers that failed together do not retry together.
    """

    attempts: int = 3
    backoff_s: float = 0.2
    backoff_max_s: float = 10.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.attempts < 1:
            msg = f"RetryPolicy.attempts must be at least 1, got {self.attempts}"
            raise ValueError(msg)
        if self.backoff_s < 0 or self.backoff_max_s < 0:
            msg = "RetryPolicy delays must not be negative"
            raise ValueError(msg)
        if not 0.0 <= self.jitter <= 1.0:
            msg = f"RetryPolicy.jitter must be within 0..1, got {self.jitter}"
            raise ValueError(msg)

    @classmethod
    def never(cls) -> RetryPolicy:
        """One attempt, no retry (load-balancer resources)."""
        return cls(attempts=1)

    @classmethod
    def queue_default(cls) -> RetryPolicy:
        """Three attempts with exponential backoff from 200 ms (queue resources)."""
        return cls()

    def delay(self, retry: int, *, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (1 for the first retry)."""
        base = min(self.backoff_max_s, self.backoff_s * (2.0 ** max(0, retry - 1)))
        if not self.jitter:
            return base
        draw = (rng or random).random()
        return base * (1.0 - self.jitter * draw)


class CallPolicy(msgspec.Struct, kw_only=True, frozen=True, gc=False):
    """Everything the Endpoint actor enforces on one call.

    Attributes:
        delivery: ``"queue"`` (a job; returns `JobOutput`) or ``"load_balancer"`` (an HTTP
            call; returns the value).
        payload_limit: largest base64 payload in bytes, checked before anything is sent.
        retry: the retry policy for failed deliveries.
        execution_timeout_s: how long one attempt may run; ``None`` for no limit.
        ttl_s: how long a queued job may wait for a worker before it expires.
    """

    delivery: Delivery = "queue"
    payload_limit: int = DEFAULT_PAYLOAD_LIMIT
    retry: RetryPolicy = msgspec.field(default_factory=RetryPolicy.queue_default)
    execution_timeout_s: float | None = DEFAULT_EXECUTION_TIMEOUT_S
    ttl_s: float | None = DEFAULT_TTL_S

    def job_policy(self) -> dict[str, int]:
        """The RunPod job ``policy`` for these limits: ``executionTimeout``/``ttl`` in ms."""
        policy: dict[str, int] = {}
        if self.execution_timeout_s is not None:
            policy["executionTimeout"] = max(1, int(self.execution_timeout_s * 1000))
        if self.ttl_s is not None:
            policy["ttl"] = max(1, int(self.ttl_s * 1000))
        return policy


def _mb(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MB"


def check_payload(
    request: FunctionRequest,
    limit: int,
    *,
    function: str,
    arg_names: tuple[str, ...] = (),
) -> None:
    """Refuse a request whose base64 payload is over ``limit`` bytes.

    Raises:
        PayloadTooLargeError: naming the largest argument, its size, the total and the limit.
    """
    total = sum(map(len, request.args)) + sum(map(len, request.kwargs.values()))
    if request.constructor_args or request.constructor_kwargs:
        total += sum(map(len, request.constructor_args))
        total += sum(map(len, request.constructor_kwargs.values()))
    if total <= limit:
        return
    sizes: list[tuple[str, int]] = []
    for i, text in enumerate(request.args):
        sizes.append((arg_names[i] if i < len(arg_names) else f"#{i}", len(text)))
    sizes.extend((name, len(text)) for name, text in request.kwargs.items())
    sizes.extend(
        (f"constructor #{i}", len(t)) for i, t in enumerate(request.constructor_args)
    )
    sizes.extend(
        (f"constructor {name}", len(t))
        for name, t in request.constructor_kwargs.items()
    )
    name, size = max(sizes, key=lambda item: item[1])
    msg = (
        f"{function}(): argument {name!r} is {_mb(size)} as base64 cloudpickle, and the whole "
        f"payload is {_mb(total)}, over the {_mb(limit)} limit. Pass a URL or a path on a "
        "network volume instead of the data itself (or raise payloadLimitBytes on the resource)"
    )
    raise PayloadTooLargeError(msg)


def timeout_error(call: Call, job_id: str) -> ExecutionTimeoutError:
    """The error of a job that ran past ``call.policy.execution_timeout_s``."""
    return ExecutionTimeoutError(
        f"{call.function}() ran longer than its execution timeout of "
        f"{call.policy.execution_timeout_s:g} s on endpoint {call.endpoint!r} (job {job_id}); "
        "it was stopped"
    )


def expired_error(call: Call, job_id: str) -> ExecutionTimeoutError:
    """The error of a job that waited in the queue longer than ``call.policy.ttl_s``."""
    return ExecutionTimeoutError(
        f"job {job_id} of {call.function}() expired after waiting {call.policy.ttl_s:g} s in "
        f"the queue of endpoint {call.endpoint!r} (ttl); no worker took it"
    )
