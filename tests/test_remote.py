"""``@remote``: decoration-time validation and the call path through the actor runtime."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from flash_actors import (
    ConfigurationError,
    CpuLiveLoadBalancer,
    CpuLiveServerless,
    DeliveryError,
    ExecutionTimeoutError,
    FlashRuntimeError,
    InvalidRemoteTargetError,
    JobOutput,
    JobStatus,
    LiveLoadBalancer,
    LiveServerless,
    PayloadTooLargeError,
    RemoteExecutionError,
    RetryPolicy,
    SerializationError,
    remote,
    runtime,
)
from flash_actors.providers.inprocess import InProcessBackend, InProcessProvider

if TYPE_CHECKING:
    from pathlib import Path

    from flash_actors.messages import Call, FunctionResponse
    from flash_actors.resources import ServerlessResource

# --- validation at decoration time ---------------------------------------------------


def test_load_balancer_needs_method_and_path() -> None:
    api = LiveLoadBalancer(name="val-lb-1")
    with pytest.raises(
        ConfigurationError, match=r"function '[\w.<>]*handler'.*add method= and path="
    ):

        @remote(api)
        async def handler() -> dict[str, str]:
            return {}


def test_path_must_start_with_slash() -> None:
    api = LiveLoadBalancer(name="val-lb-2")
    with pytest.raises(ConfigurationError, match=r"path='api/x' must start with \"/\""):

        @remote(api, method="POST", path="api/x")
        async def handler() -> dict[str, str]:
            return {}


def test_method_must_be_known() -> None:
    api = LiveLoadBalancer(name="val-lb-3")
    with pytest.raises(
        ConfigurationError,
        match=r"method='FETCH' is not supported; use one of GET, POST",
    ):

        @remote(api, method="FETCH", path="/x")
        async def handler() -> dict[str, str]:
            return {}


def test_method_and_path_refused_on_queue_resource() -> None:
    cfg = LiveServerless(name="val-q-1")
    with pytest.raises(
        ConfigurationError, match=r"apply only to load-balancer resources"
    ):

        @remote(cfg, method="POST", path="/x")
        async def handler() -> None:
            return None


def test_workers_min_over_max_caught_at_decoration_after_mutation() -> None:
    cfg = LiveServerless(name="val-q-2")
    cfg.workersMin = 5
    with pytest.raises(
        ConfigurationError, match=r"workersMin \(5\) is greater than workersMax"
    ):

        @remote(cfg)
        async def handler() -> None:
            return None


def test_two_configs_with_one_name_are_refused() -> None:
    first = LiveServerless(name="val-dup", workersMax=2)

    @remote(first)
    async def one() -> None:
        return None

    same = LiveServerless(name="val-dup", workersMax=2)

    @remote(same)  # equal config under the same name: fine
    async def two() -> None:
        return None

    other = LiveServerless(name="val-dup", workersMax=3)
    with pytest.raises(
        ConfigurationError,
        match=r"configs are named 'val-dup' .*: they differ in workersMax=2 vs 3\. ",
    ):

        @remote(other)
        async def three() -> None:
            return None


def test_only_functions_and_classes() -> None:
    cfg = LiveServerless(name="val-q-3")
    with pytest.raises(
        InvalidRemoteTargetError, match=r"decorates a function .* or a class, not int"
    ):
        remote(cfg)(42)  # type: ignore[call-overload]
    with pytest.raises(TypeError):
        remote(cfg)(print)


def test_unknown_keyword_suggests_the_right_one() -> None:
    cfg = LiveServerless(name="val-q-4")
    with pytest.raises(
        ConfigurationError,
        match=r"unexpected keyword argument 'dependancies'; did you mean 'dependencies'\?",
    ):
        remote(cfg, dependancies=["numpy"])  # type: ignore[call-overload]


def test_missing_resource_config() -> None:
    with pytest.raises(ConfigurationError, match=r"remote\(\) needs resource_config="):
        remote(None)  # type: ignore[call-overload]


def test_duplicate_route_refused() -> None:
    api = LiveLoadBalancer(name="val-lb-4")

    @remote(api, method="GET", path="/same")
    async def first() -> dict[str, int]:
        return {}

    with pytest.raises(
        ConfigurationError,
        match=r"route GET /same of endpoint 'val-lb-4' is already taken",
    ):

        @remote(api, method="GET", path="/same")
        async def second() -> dict[str, int]:
            return {}


# --- the call path --------------------------------------------------------------------

QUEUE = CpuLiveServerless(name="calls-queue")
API = CpuLiveLoadBalancer(name="calls-api")


@remote(QUEUE)
async def add(x: int, y: int) -> int:
    return x + y


@remote(QUEUE)
def sync_mul(x: int, y: int) -> int:
    return x * y


@remote(QUEUE)
async def fails(x: int) -> int:
    raise ValueError(f"bad input {x}")


@remote(API, method="POST", path="/process")
async def process(x: int, y: int) -> dict[str, int]:
    return {"result": x + y}


@remote(API, method="GET", path="/broken")
async def broken() -> dict[str, int]:
    raise KeyError("missing")


@remote(QUEUE, local=True)
async def local_echo(value: Any) -> Any:
    return value


@remote(QUEUE)
class Accumulator:
    def __init__(self, start: int) -> None:
        self.total = start

    async def add(self, n: int) -> int:
        self.total += n
        return self.total

    def get(self) -> int:
        return self.total


async def test_queue_call_returns_job_output() -> None:
    async with runtime():
        job = await add(2, 3)
    assert isinstance(job, JobOutput)
    assert job.status == JobStatus.COMPLETED == "COMPLETED"
    assert job.output == 5
    assert not job.error
    assert job.started_at is not None
    assert job.ended_at is not None
    assert job.started_at <= job.ended_at


async def test_plain_def_calls_are_awaitable() -> None:
    async with runtime():
        job = await sync_mul(6, 7)
    assert job.output == 42


async def test_queue_error_lands_in_job_output_and_raises_typed_on_request() -> None:
    async with runtime():
        job = await fails(7)
    assert job.status == JobStatus.FAILED
    assert "ValueError: bad input 7" in job.error
    assert "Traceback (most recent call last)" in job.error
    assert "in fails" in job.error
    with pytest.raises(ValueError, match=r"^bad input 7") as info:
        job.raise_for_error()
    assert isinstance(info.value, RemoteExecutionError)
    assert "raise ValueError" in info.value.remote_traceback


async def test_load_balancer_returns_value_and_raises_typed_errors() -> None:
    async with runtime():
        assert await process(2, 3) == {"result": 5}
        with pytest.raises(KeyError) as info:
            await broken()
    assert isinstance(info.value, RemoteExecutionError)
    assert info.value.remote_type == "builtins.KeyError"


async def test_local_runs_in_process_and_returns_value() -> None:
    assert await local_echo({"a": 1}) == {"a": 1}  # no runtime needed


async def test_local_call_still_fails_for_values_that_cannot_travel() -> None:
    with pytest.raises(
        SerializationError, match=r"cannot serialize argument 'value' \(lock\)"
    ):
        await local_echo(threading.Lock())


@remote(QUEUE)
async def echo_value(value: Any) -> Any:
    return value


async def test_a_call_that_cannot_be_sent_fails_when_awaited_on_every_path() -> None:
    # The first call goes through the Router; later ones are signed when the function is
    # called (the endpoint takes them inline): either way nothing raises before the await,
    # and a failed call does not stop the next.
    async with runtime():
        for _ in range(2):
            call = echo_value(threading.Lock())  # no error here
            with pytest.raises(
                SerializationError, match=r"cannot serialize argument 'value' \(lock\)"
            ):
                await call
            assert (await echo_value([1, 2])).output == [1, 2]
        values = [{"n": 1}]
        call = echo_value(values)
        values.append(
            {"n": 2}
        )  # after the call was made: the call has the list as it was
        assert (await call).output == [{"n": 1}]


async def test_payload_limit_checked_before_sending() -> None:
    small = CpuLiveServerless(name="calls-small", payloadLimitBytes=1000)

    @remote(small)
    async def take(blob: bytes, tag: str = "") -> int:
        return len(blob)

    async with runtime():
        assert (await take(b"x" * 100)).output == 100
        with pytest.raises(
            PayloadTooLargeError,
            match=r"take\(\): argument 'blob' is 0\.0 MB .* over the 0\.0 MB limit",
        ):
            await take(b"x" * 5000, tag="t")


async def test_payload_limit_default_is_ten_megabytes() -> None:
    async with runtime():
        with pytest.raises(
            PayloadTooLargeError,
            match=r"argument 'x' is 10\.7 MB as base64 .* over the 10\.0 MB limit",
        ):
            await add(b"\0" * (8 * 1024 * 1024), 1)  # type: ignore[arg-type]


async def test_class_instances_keep_state() -> None:
    async with runtime():
        # mypy does not apply class decorators to the class's type; the handle is untyped.
        first: Any = Accumulator(10)
        second: Any = Accumulator(100)
        assert (await first.add(1)).output == 11
        assert (await first.add(2)).output == 13
        assert (await second.add(1)).output == 101
        assert (await first.get()).output == 13
    with pytest.raises(
        AttributeError, match=r"has no public method 'ad'; did you mean 'add'\?"
    ):
        first.ad  # noqa: B018


async def test_thousand_calls_gathered() -> None:
    results: list[int] = []
    async with runtime():

        async def one(i: int) -> None:
            job = await add(i, 1)
            results.append(job.output)

        async with anyio.create_task_group() as tg:
            for i in range(1000):
                tg.start_soon(one, i)
    assert sorted(results) == list(range(1, 1001))


async def test_cancelling_the_caller_cancels_the_job(tmp_path: Path) -> None:
    cfg = CpuLiveServerless(name="calls-cancel")

    @remote(cfg)
    async def slow(folder: str) -> None:
        import pathlib

        import anyio

        (pathlib.Path(folder) / "started").touch()
        try:
            await anyio.sleep(30)
        except anyio.get_cancelled_exc_class():
            (pathlib.Path(folder) / "cancelled").touch()
            raise

    async with runtime() as rt:
        with anyio.move_on_after(30) as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(slow, str(tmp_path))
                while not (tmp_path / "started").exists():
                    await anyio.sleep(0.005)
                tg.cancel_scope.cancel()
        assert not scope.cancelled_caught
        with anyio.fail_after(
            30
        ):  # the job is cancelled soon after its caller, not left running
            while not (tmp_path / "cancelled").exists():
                await anyio.sleep(0.005)
            # the caller's side lets go of the job once the worker says it stopped
            while rt.endpoint("calls-cancel").statistics().in_flight:
                await anyio.sleep(0.005)


async def test_execution_timeout_queue_and_load_balancer() -> None:
    cfg = CpuLiveServerless(name="calls-timeout", executionTimeoutMs=100)
    api = CpuLiveLoadBalancer(name="calls-timeout-api", executionTimeoutMs=100)

    @remote(cfg)
    async def sleepy() -> None:
        import anyio as anyio_

        await anyio_.sleep(30)

    @remote(api, method="GET", path="/sleepy")
    async def sleepy_api() -> None:
        import anyio as anyio_

        await anyio_.sleep(30)

    async with runtime():
        job = await sleepy()
        assert job.status == JobStatus.TIMED_OUT
        assert "ran longer than its execution timeout of 0.1 s" in job.error
        with pytest.raises(ExecutionTimeoutError, match=r"execution timeout of 0\.1 s"):
            await sleepy_api()


async def test_queued_job_expires_after_ttl(tmp_path: Path) -> None:
    cfg = CpuLiveServerless(name="calls-ttl", ttlMs=50)
    release = tmp_path / "release"

    @remote(cfg)
    def hold(path: str) -> str:
        import os
        import time

        while not os.path.exists(path):
            time.sleep(0.005)
        return "held"

    outcomes: list[JobOutput] = []
    async with runtime(provider=InProcessProvider(capacity=1)):
        async with anyio.create_task_group() as tg:

            async def first() -> None:
                outcomes.append(await hold(str(release)))

            tg.start_soon(first)
            await anyio.sleep(0.01)
            expired = await hold(str(release))  # waits behind the first: capacity 1
            release.touch()
    assert expired.status == JobStatus.TIMED_OUT
    assert (
        "expired after waiting 0.05 s in the queue of endpoint 'calls-ttl' (ttl)"
        in expired.error
    )
    assert outcomes[0].output == "held"


class FlakyBackend(InProcessBackend):
    """Fault injection at the provider boundary: the first deliveries are lost."""

    def __init__(self, key: bytes, failures: int) -> None:
        super().__init__(key, capacity=8)
        self.failures = failures
        self.attempts = 0

    async def execute(
        self, call: Call, *, job_id: str, chunks: Any = None
    ) -> FunctionResponse:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise DeliveryError(f"connection refused (attempt {self.attempts})")
        return await super().execute(call, job_id=job_id, chunks=chunks)


class FlakyProvider(InProcessProvider):
    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.backends: list[FlakyBackend] = []

    async def open_endpoint(
        self, resource: ServerlessResource, key: bytes | None
    ) -> FlakyBackend:
        assert key is not None
        backend = FlakyBackend(key, self.failures)
        self.backends.append(backend)
        return backend


async def test_queue_resources_retry_failed_deliveries() -> None:
    cfg = CpuLiveServerless(
        name="calls-retry", retryPolicy=RetryPolicy(attempts=3, backoff_s=0.001)
    )

    @remote(cfg)
    async def value() -> int:
        return 7

    provider = FlakyProvider(failures=2)
    async with runtime(provider=provider):
        job = await value()
    assert job.output == 7
    assert provider.backends[0].attempts == 3


async def test_retries_give_up_after_the_last_attempt() -> None:
    cfg = CpuLiveServerless(
        name="calls-retry-out", retryPolicy=RetryPolicy(attempts=2, backoff_s=0.001)
    )

    @remote(cfg)
    async def value() -> int:
        return 7

    provider = FlakyProvider(failures=5)
    async with runtime(provider=provider):
        job = await value()
    assert job.status == JobStatus.FAILED
    assert "connection refused (attempt 2)" in job.error
    assert provider.backends[0].attempts == 2
    with pytest.raises(DeliveryError):
        job.raise_for_error()


async def test_load_balancer_never_retries() -> None:
    api = CpuLiveLoadBalancer(name="calls-lb-noretry")

    @remote(api, method="GET", path="/v")
    async def value() -> dict[str, int]:
        return {"v": 1}

    provider = FlakyProvider(failures=1)
    async with runtime(provider=provider):
        with pytest.raises(DeliveryError, match=r"attempt 1"):
            await value()
    assert provider.backends[0].attempts == 1


async def test_errors_from_runtime_are_flash_errors() -> None:
    async with runtime():
        with pytest.raises(FlashRuntimeError):
            await add(b"\0" * (8 * 1024 * 1024), 1)  # type: ignore[arg-type]
