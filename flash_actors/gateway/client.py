"""The provider scripts use when a ``flash local`` daemon runs: calls go to its queue.

`GatewayProvider` registers each endpoint's config with the daemon (``PUT
/flash/v1/endpoints/{name}``) and sends every call as a RunPod job: ``runsync`` with the
Flash ``FunctionRequest`` as ``input`` (long-polling ``status`` if the wait runs out), or
``run`` + ``stream`` polls for ``f.stream(...)``. The job id is the caller's, so a retried
delivery attaches to the job the daemon already has instead of running it twice. Leaving the
caller's scope cancels the job on the daemon.

A call rides out a restart of the daemon (``flash local down``/``up``, or a killed daemon
started again): while the daemon cannot be reached, the call retries, resubmitting under its
own job id, for up to ``FLASH_LOCAL_RECONNECT_S`` seconds (default 30) from the moment it
found the daemon gone; only then is it reported failed (`DeliveryError`, naming the daemon).
Every job is submitted with that window as its ``abandonAfter`` policy, and a daemon that
comes back later than that after its last sign of life cancels the job before dispatching
anything (see ``gateway.daemon``): a call reported failed does not run afterwards.

The same client talks to the private gateway an embedded local provider starts for handler
endpoints (`start_private_gateway`).
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import msgspec

from flash_actors._private import open_private, private_dir
from flash_actors.errors import (
    ConfigurationError,
    DeliveryError,
    ExecutionTimeoutError,
    FlashRuntimeError,
    RemoteExecutionError,
)
from flash_actors.jobs import JobOutput, JobStatus
from flash_actors.messages import FunctionResponse, wire_encoder
from flash_actors.providers.local._http import Connection
from flash_actors.providers.local._processes import stop_process
from flash_actors.providers.local.daemon.catalog import config_of
from flash_actors.providers.local.daemon.record import (
    DaemonRecord,
    find_daemon,
    read_record,
)
from flash_actors.serialization import master_secret

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from types import TracebackType

    from anyio.abc import Process
    from anyio.streams.memory import MemoryObjectSendStream

    from flash_actors.messages import Call
    from flash_actors.resources import ServerlessResource

__all__ = [
    "RECONNECT_ENV",
    "GatewayBackend",
    "GatewayProvider",
    "reconnect_window",
    "start_private_gateway",
]

_T = TypeVar("_T")
TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"})
LONG_WAIT_MS = 300_000
MAX_CONNECTIONS = 256  # requests in flight to the gateway at once (each waits on a job)
RECONNECT_ENV = "FLASH_LOCAL_RECONNECT_S"
DEFAULT_RECONNECT_S = 30.0
MAX_RECONNECT_S = 86_400.0


def reconnect_window() -> float:
    """Seconds a call keeps trying to reach a daemon that went away (``FLASH_LOCAL_RECONNECT_S``).

    Raises:
        ConfigurationError: the variable is not a number of seconds between 0 and one day.
    """
    raw = os.environ.get(RECONNECT_ENV, "").strip()
    if not raw:
        return DEFAULT_RECONNECT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= MAX_RECONNECT_S or math.isnan(value):
        msg = (
            f"{RECONNECT_ENV} must be a number of seconds from 0 to 86400, got {raw!r}"
        )
        raise ConfigurationError(msg)
    return value


class _Unreachable(DeliveryError):
    """The gateway could not be reached, or went away in the middle of an answer."""


class _Chunk(msgspec.Struct):
    output: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)


class Envelope(msgspec.Struct):
    """A data-plane answer: ``/run``, ``/runsync``, ``/status`` and ``/stream`` share it."""

    id: str = ""
    status: str = ""
    output: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)
    error: str | None = None
    delayTime: int | None = None
    executionTime: int | None = None
    workerId: str | None = None
    stream: list[_Chunk] = []


_envelope = msgspec.json.Decoder(Envelope)
_response = msgspec.json.Decoder(FunctionResponse)


class _JobBody(msgspec.Struct, omit_defaults=True):
    input: Any
    id: str
    policy: dict[str, int]
    stream: bool = False


class GatewayProvider:
    """Endpoints on a running gateway (the ``flash local`` daemon or a private one).

    Args:
        record: where the gateway listens and its API key.
        process: the private gateway this provider started and stops (None for a daemon).
        state_dir: the private gateway's state folder, removed with it.
        reconnect_s: how long a call keeps trying to reach a gateway that went away
            (default: `reconnect_window`, or 0 for a private gateway, which nobody restarts).
        rediscover: where to look for the daemon again while it cannot be reached (it may
            come back on another port); default: the record in ``.flash`` (as found at
            construction) for a daemon, nothing for a private gateway.
        owner_token: the private gateway's owner token: lets this process register handler
            files outside the folder the gateway serves (only it knows the token).
    """

    name = "local"

    def __init__(
        self,
        record: DaemonRecord,
        *,
        process: Process | None = None,
        state_dir: Path | None = None,
        reconnect_s: float | None = None,
        rediscover: Callable[[], DaemonRecord | None] | None = None,
        owner_token: str = "",
    ) -> None:
        self.record = record
        self.owner_token = owner_token
        self.process = process
        self.state_dir = state_dir
        if reconnect_s is None:
            reconnect_s = 0.0 if process is not None else reconnect_window()
        self.reconnect_s = reconnect_s
        if rediscover is None and process is None:
            state = Path(".flash").absolute()
            rediscover = lambda: find_daemon(state)  # noqa: E731
        self._rediscover = rediscover
        self._looked_at = 0.0
        self._cut_off: dict[str, float] = {}  # key -> when the gateway was found gone
        self._idle: list[Connection] = []
        self._limit = anyio.Semaphore(MAX_CONNECTIONS)
        self._opened: dict[str, GatewayBackend] = {}

    async def __aenter__(self) -> GatewayProvider:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def request(
        self, method: str, path: str, body: bytes = b""
    ) -> tuple[int, bytes]:
        """One request on a pooled keep-alive connection: status and body.

        Raises:
            DeliveryError: the gateway cannot be reached.
        """
        async with self._limit:
            reused = bool(self._idle)
            conn = (
                self._idle.pop()
                if self._idle
                else Connection(self.record.port, self.record.api_key)
            )
            try:
                try:
                    response = await conn.request(method, path, body)
                except DeliveryError:
                    if not reused:
                        raise
                    # The gateway closes keep-alive connections idle past its timeout (it
                    # never closes one with a request in flight): send again on a new one.
                    await conn.aclose()
                    response = await conn.request(method, path, body)
                data = await response.read()
            except DeliveryError as exc:
                await conn.aclose()
                msg = f"{self.describe()} cannot be reached ({_reason(exc)})"
                raise _Unreachable(msg) from exc
            except BaseException:
                await conn.aclose()
                raise
            self._idle.append(conn)
            return response.status, data

    def describe(self) -> str:
        """The gateway, for messages: its URL, and its pid when known."""
        kind = (
            "the local gateway"
            if self.process is not None
            else "the flash local daemon"
        )
        pid = f" (pid {self.record.pid})" if self.record.pid else ""
        return f"{kind} at {self.record.url}{pid}"

    async def reconnecting(self, key: str, attempt: Callable[[], Awaitable[_T]]) -> _T:
        """Run ``attempt`` until it reaches the gateway, for up to `reconnect_s`.

        ``attempt`` must be safe to repeat (a submit under the caller's job id is). The window
        starts when the gateway is first found gone, and is kept per ``key`` across calls
        (the Endpoint actor's own retries do not restart it); an attempt that starts after
        it has passed and fails ends the call.

        Raises:
            DeliveryError: the gateway stayed out of reach for the whole window.
        """
        delay = 0.05
        while True:
            started = anyio.current_time()
            try:
                result = await attempt()
            except _Unreachable as exc:
                first = self._cut_off.setdefault(key, anyio.current_time())
                if started - first >= self.reconnect_s:
                    msg = (
                        f"{self.describe()} could not be reached for "
                        f"{self.reconnect_s:g} s ({RECONNECT_ENV}); gave up on {key}, "
                        f"which will not run after this ({_reason(exc)})"
                    )
                    raise DeliveryError(msg) from exc
                await self._look_again()
                if len(self._cut_off) > 100_000:  # keys of calls that gave up long ago
                    horizon = anyio.current_time() - 2 * self.reconnect_s - 60
                    self._cut_off = {
                        k: t for k, t in self._cut_off.items() if t > horizon
                    }
                await anyio.sleep(delay)
                delay = min(1.0, delay * 2)
            else:
                self._cut_off.pop(key, None)
                return result

    async def _look_again(self) -> None:
        """Follow a daemon that came back elsewhere (at most every 0.2 s)."""
        now = anyio.current_time()
        if self._rediscover is None or now - self._looked_at < 0.2:
            return
        self._looked_at = now
        record = self._rediscover()
        if record is not None and record != self.record:
            self.record = record
            stale, self._idle = self._idle, []
            for conn in stale:
                await conn.aclose()

    def job_policy(self, policy: dict[str, int]) -> dict[str, int]:
        """``policy`` plus ``abandonAfter``: the reconnect window, which the daemon enforces."""
        window_ms = max(1, math.ceil(self.reconnect_s * 1000))
        return {**policy, "abandonAfter": window_ms}

    async def open_endpoint(
        self, resource: ServerlessResource, key: bytes
    ) -> GatewayBackend:
        """Register the endpoint's config with the gateway.

        Raises:
            ConfigurationError: the gateway refused the config (or the handler file is missing).
        """
        del key  # the gateway signs with the same master secret (its record's)
        config = config_of(resource)
        if resource.handler is not None:
            handler = await anyio.Path(resource.handler).resolve()
            if not await handler.is_file():
                msg = f"endpoint {resource.name!r}: handler file {str(handler)!r} does not exist"
                raise ConfigurationError(msg)
            config["resource"]["handler"] = str(handler)
        body = wire_encoder.encode(config)
        path = f"/flash/v1/endpoints/{resource.name}"
        if self.owner_token:  # our own private gateway: the token rides in the query
            path += f"?owner={self.owner_token}"
        status, data = await self.reconnecting(
            f"endpoint {resource.name}",
            lambda: self.request("PUT", path, body),
        )
        if status != 200:
            msg = f"the local gateway refused endpoint {resource.name!r}: {_error_text(data)}"
            raise ConfigurationError(msg)
        backend = GatewayBackend(self, resource.name)
        self._opened[resource.name] = backend
        return backend

    async def aclose(self) -> None:
        """Close connections; stop the private gateway if this provider started one."""
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.aclose()
        process, self.process = self.process, None
        if process is not None:
            with anyio.CancelScope(shield=True):
                await stop_process(process, 10)
            if self.state_dir is not None:
                shutil.rmtree(self.state_dir, ignore_errors=True)


def _reason(exc: BaseException) -> str:
    """Why the gateway could not be reached, from the OS error under ``exc``."""
    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    if isinstance(root, DeliveryError) or not str(root):
        return "it closed the connection"
    return str(root)


def _error_text(data: bytes) -> str:
    try:
        decoded = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return data.decode(errors="replace")[:500]
    if isinstance(decoded, dict) and "error" in decoded:
        return str(decoded["error"])
    return str(decoded)[:500]


class GatewayBackend:
    """One endpoint on the gateway, as the Endpoint actor sees it."""

    capacity = 4096  # the gateway queues; let calls through to it

    def __init__(self, provider: GatewayProvider, endpoint: str) -> None:
        self.provider = provider
        self.endpoint = endpoint
        self._base = f"/v2/{endpoint}"

    async def _call(self, method: str, path: str, body: bytes = b"") -> Envelope:
        status, data = await self.provider.request(method, self._base + path, body)
        if status == 401:
            msg = "the local gateway rejected the API key (FLASH_LOCAL_API_KEY)"
            raise ConfigurationError(msg)
        if status >= 500 or status == 429:
            msg = f"the local gateway could not take the job ({status}): {_error_text(data)}"
            raise DeliveryError(msg)
        if status != 200:
            msg = f"the local gateway refused the job ({status}): {_error_text(data)}"
            raise FlashRuntimeError(msg)
        return _envelope.decode(data)

    async def submit(
        self,
        payload: Any,
        policy: dict[str, int],
        job_id: str,
        *,
        sync: bool,
        stream: bool = False,
    ) -> Envelope:
        """Queue a job (``runsync`` waits for it); returns the gateway's answer."""
        body = wire_encoder.encode(
            _JobBody(input=payload, id=job_id, policy=policy, stream=stream)
        )
        path = f"/runsync?wait={LONG_WAIT_MS}" if sync else "/run"
        return await self._call("POST", path, body)

    async def wait(self, envelope: Envelope) -> Envelope:
        """Long-poll the job's status until it ends."""
        while envelope.status not in TERMINAL:
            envelope = await self._call(
                "GET", f"/status/{envelope.id}?wait={LONG_WAIT_MS}"
            )
        return envelope

    async def cancel(self, job_id: str) -> None:
        """Cancel the job on the gateway (best effort, shielded)."""
        with anyio.CancelScope(shield=True), contextlib.suppress(FlashRuntimeError):
            await self._call("POST", f"/cancel/{job_id}")

    async def _submit_and_wait(
        self, payload: Any, policy: dict[str, int], job_id: str
    ) -> Envelope:
        """``runsync``, then long-poll: repeatable (the job id makes the submit idempotent)."""

        async def attempt() -> Envelope:
            envelope = await self.submit(payload, policy, job_id, sync=True)
            return await self.wait(envelope)

        return await self.provider.reconnecting(f"job {job_id}", attempt)

    async def run_payload(
        self, payload: Any, policy: dict[str, int], job_id: str
    ) -> JobOutput:
        """A dictionary job (handler endpoints), waited for: its `JobOutput`."""
        policy = self.provider.job_policy(policy)
        try:
            envelope = await self._submit_and_wait(payload, policy, job_id)
        except anyio.get_cancelled_exc_class():
            await self.cancel(job_id)
            raise
        return job_output(envelope)

    async def execute(
        self,
        call: Call,
        *,
        job_id: str,
        chunks: MemoryObjectSendStream[FunctionResponse] | None = None,
    ) -> FunctionResponse:
        """Run ``call.request`` as a job on the gateway; see `EndpointBackend.execute`."""
        job_policy = self.provider.job_policy(call.policy.job_policy())
        try:
            if chunks is None:
                envelope = await self._submit_and_wait(call.request, job_policy, job_id)
            else:
                envelope = await self.provider.reconnecting(
                    f"job {job_id}",
                    lambda: self.submit(
                        call.request, job_policy, job_id, sync=False, stream=True
                    ),
                )
                try:
                    envelope = await self._stream(envelope.id, chunks)
                except _Unreachable:
                    # Chunks already went to the caller: no second run. Cancel the job
                    # once the daemon is back (or it drops the job, see `job_policy`).
                    await self.provider.reconnecting(
                        f"job {job_id}", lambda: self._call("POST", f"/cancel/{job_id}")
                    )
                    raise
        except anyio.get_cancelled_exc_class():
            await self.cancel(job_id)
            raise
        return _response_of(envelope)

    async def _stream(
        self, job_id: str, chunks: MemoryObjectSendStream[FunctionResponse]
    ) -> Envelope:
        while True:
            envelope = await self._call("GET", f"/stream/{job_id}?wait=30000")
            for chunk in envelope.stream:
                await chunks.send(_response.decode(chunk.output))
            if envelope.status in TERMINAL and not envelope.stream:
                return await self._call("GET", f"/status/{job_id}")

    async def aclose(self) -> None:
        """Nothing to stop: the gateway keeps the endpoint's workers warm for the next run."""


def job_output(envelope: Envelope) -> JobOutput:
    """A handler job's final envelope as a `JobOutput`; a handler's exception comes back typed."""
    ended = datetime.now(UTC)
    execution_ms = envelope.executionTime or 0
    started = (
        ended - timedelta(milliseconds=execution_ms)
        if envelope.delayTime is not None
        else None
    )
    output = msgspec.json.decode(envelope.output) if envelope.output else None
    status = JobStatus(envelope.status)
    error = envelope.error or ""
    exception: FlashRuntimeError | None = None
    if status is JobStatus.COMPLETED and error:
        status = JobStatus.FAILED
    if status is not JobStatus.COMPLETED:
        exception = _handler_error(error) or FlashRuntimeError(
            error or f"job {envelope.id} ended {status.value}"
        )
    return JobOutput(
        id=envelope.id,
        status=status,
        output=output if status is JobStatus.COMPLETED else None,
        error=error,
        started_at=started,
        ended_at=ended,
        delay_time_ms=envelope.delayTime or 0,
        execution_time_ms=execution_ms,
        worker_id=envelope.workerId,
        exception=exception,
    )


def _handler_error(error: str) -> RemoteExecutionError | None:
    """A stock worker's error JSON (``error_type`` like ``<class 'ValueError'>``), typed."""
    try:
        info = msgspec.json.decode(error)
    except msgspec.DecodeError:
        return None
    if not isinstance(info, dict) or "error_message" not in info:
        return None
    kind = str(info.get("error_type", ""))
    if kind.startswith("<class '") and kind.endswith("'>"):
        kind = kind[len("<class '") : -2]
    if "." not in kind:
        kind = f"builtins.{kind}"
    return RemoteExecutionError.from_remote(
        str(info["error_message"]), kind, str(info.get("error_traceback", ""))
    )


def _response_of(envelope: Envelope) -> FunctionResponse:
    if envelope.status == "COMPLETED":
        return _response.decode(envelope.output)
    error = envelope.error or f"job {envelope.id} ended {envelope.status}"
    if envelope.status == "TIMED_OUT":
        raise ExecutionTimeoutError(error)
    if envelope.status == "CANCELLED":
        msg = f"job {envelope.id} was cancelled on the local gateway ({error})"
        raise FlashRuntimeError(msg)
    raise FlashRuntimeError(error)


async def start_private_gateway(log_dir: Path) -> GatewayProvider:
    """Start a gateway tied to this process (for handler endpoints without a daemon).

    Raises:
        DeliveryError: it did not come up within 30 s (its log is named).
    """
    state_dir = Path(tempfile.mkdtemp(prefix="flash-gateway-"))
    private_dir(log_dir)
    log_path = log_dir / f"gateway-{os.getpid()}.log"
    env = dict(os.environ)
    env["FLASH_LOCAL_API_KEY"] = f"fl-{secrets.token_hex(16)}"
    env["FLASH_SECRET"] = master_secret().hex()
    owner = env["FLASH_LOCAL_OWNER_TOKEN"] = secrets.token_hex(16)
    with os.fdopen(open_private(log_path), "ab") as out:
        process = await anyio.open_process(
            [
                sys.executable,
                "-m",
                "flash_actors.providers.local.daemon",
                "--state-dir",
                str(state_dir),
                "--parent-pid",
                str(os.getpid()),
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    with anyio.move_on_after(30):
        while process.returncode is None:
            record = read_record(state_dir)
            if record is not None and record.pid == process.pid:
                return GatewayProvider(
                    record, process=process, state_dir=state_dir, owner_token=owner
                )
            await anyio.sleep(0.02)
    with anyio.CancelScope(shield=True):
        await stop_process(process, 10)
    shutil.rmtree(state_dir, ignore_errors=True)
    msg = f"the local gateway for handler endpoints did not start; see {log_path}"
    raise DeliveryError(msg)
