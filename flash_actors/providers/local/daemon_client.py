"""The provider scripts use when a ``flash local`` daemon runs: calls go to its queue.

`GatewayProvider` registers each endpoint's config with the daemon (``PUT
/flash/v1/endpoints/{name}``) and sends every call as a RunPod job through the one data-plane
client (`flash_actors.providers.runpod.dataplane`) over the fast loopback transport, with the
daemon's capabilities declared (long-polled status, caller-chosen job ids, streaming): the job
id is the caller's, so a retried delivery attaches to the job the daemon already has instead
of running it twice. Leaving the caller's scope cancels the job on the daemon. Requests are
signed with keys derived from the daemon's secret (from its record): its workers accept them.
While the provider is entered (``async with``: the runtime does it), small jobs travel
batched, each endpoint's through one `JobFeed` (many jobs per request, many results per long
poll); outside it, and for large jobs and streams, each job waits on a request of its own.

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

import math
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import anyio

from flash_actors._private import open_private, private_dir
from flash_actors.errors import ConfigurationError, DeliveryError
from flash_actors.messages import wire_encoder
from flash_actors.providers.local._http import LoopbackTransport
from flash_actors.providers.local._processes import stop_process
from flash_actors.providers.local.daemon.catalog import config_of
from flash_actors.providers.local.daemon.record import (
    DaemonRecord,
    find_daemon,
    read_record,
)
from flash_actors.providers.runpod.backend import QueueBackend
from flash_actors.providers.runpod.dataplane import FLASH_LOCAL, DataPlane, error_text
from flash_actors.providers.runpod.feed import JobFeed
from flash_actors.serialization import master_secret, secret_key

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping
    from types import TracebackType

    from anyio.abc import Process, TaskGroup

    from flash_actors.providers.runpod.transport import Response
    from flash_actors.resources import ServerlessResource

__all__ = [
    "RECONNECT_ENV",
    "GatewayProvider",
    "reconnect_window",
    "start_private_gateway",
]

_T = TypeVar("_T")
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


class _DaemonTransport:
    """The loopback transport, its failures told apart as "the daemon is unreachable".

    `GatewayProvider.reconnecting` rides those out; an error answer (5xx, 429) stays a plain
    delivery error for the Endpoint actor's retries.
    """

    def __init__(self, provider: GatewayProvider) -> None:
        self.provider = provider

    async def request(
        self,
        method: str,
        url: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> Response:
        try:
            return await self.provider.transport.request(
                method, url, body=body, headers=headers, timeout_s=timeout_s
            )
        except DeliveryError as exc:
            msg = f"{self.provider.describe()} cannot be reached ({_reason(exc)})"
            raise _Unreachable(msg) from exc

    async def aclose(self) -> None:
        await self.provider.transport.aclose()


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
        self._keys: dict[str, bytes | None] = {}
        self.transport = LoopbackTransport(
            record.port, record.api_key, limit=MAX_CONNECTIONS
        )
        self.plane = DataPlane(
            _DaemonTransport(self),
            f"{self.transport.origin}/v2",
            record.api_key,
            capabilities=FLASH_LOCAL,
            key_name="FLASH_LOCAL_API_KEY",
            service=self.describe(),
        )
        self._feeds: dict[str, JobFeed] = {}
        self._tg: TaskGroup | None = None

    async def __aenter__(self) -> GatewayProvider:
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        tg, self._tg = self._tg, None
        try:
            if tg is not None:  # the feeds stop: calls still waiting on them fail
                tg.cancel_scope.cancel()
                await tg.__aexit__(exc_type, exc, tb)
        finally:
            self._feeds.clear()
            await self.aclose()

    @property
    def feeds(self) -> Mapping[str, JobFeed]:
        """The batched-job feed of each endpoint opened while entered, by endpoint name."""
        return self._feeds

    async def _feed(self, endpoint: str) -> JobFeed | None:
        """The endpoint's batched-job feed, started on first use (None when not entered)."""
        if self._tg is None:
            return None
        feed = self._feeds.get(endpoint)
        if feed is None or not feed.running:
            feed = self._feeds[endpoint] = JobFeed(
                self.plane, endpoint, persist=self.reconnecting
            )
            await self._tg.start(feed.run)
        return feed

    async def request(
        self, method: str, path: str, body: bytes = b""
    ) -> tuple[int, bytes]:
        """One request on a pooled keep-alive connection: status and body.

        Raises:
            DeliveryError: the gateway cannot be reached.
        """
        try:
            response = await self.transport.request(
                method, self.transport.origin + path, body=body
            )
        except DeliveryError as exc:
            msg = f"{self.describe()} cannot be reached ({_reason(exc)})"
            raise _Unreachable(msg) from exc
        return response.status, response.body

    def signing_key(self, endpoint: str) -> bytes | None:
        """The key of ``endpoint`` under the daemon's secret, so its workers accept our calls.

        The secret is the daemon's record's, else ``FLASH_SECRET``; a daemon named by
        ``FLASH_LOCAL_URL`` alone gets unsigned requests, which it signs itself for its
        workers (the API key is the authority there), and its results are taken as sent.
        """
        if endpoint in self._keys:
            return self._keys[endpoint]
        secret = self.record.secret or os.environ.get("FLASH_SECRET", "")
        key = (
            secret_key(secret, endpoint, named="the daemon's secret (or FLASH_SECRET)")
            if secret
            else None
        )
        self._keys[endpoint] = key
        return key

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
            if record.secret != self.record.secret:
                self._keys.clear()
            self.record = record
            stale = self.transport
            self.transport = LoopbackTransport(
                record.port, record.api_key, limit=MAX_CONNECTIONS
            )
            self.plane.retarget(
                _DaemonTransport(self), f"{self.transport.origin}/v2", record.api_key
            )
            self.plane.service = self.describe()
            await stale.aclose()

    def job_policy(self, policy: dict[str, int]) -> dict[str, int]:
        """``policy`` plus ``abandonAfter``: the reconnect window, which the daemon enforces."""
        window_ms = max(1, math.ceil(self.reconnect_s * 1000))
        return {**policy, "abandonAfter": window_ms}

    async def open_endpoint(
        self, resource: ServerlessResource, key: bytes | None
    ) -> QueueBackend:
        """Register the endpoint's config with the gateway.

        Raises:
            ConfigurationError: the gateway refused the config (or the handler file is missing).
        """
        del key  # `signing_key`'s: derived from the daemon's secret
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
            msg = f"the local gateway refused endpoint {resource.name!r}: {error_text(data)}"
            raise ConfigurationError(msg)
        return QueueBackend(
            self.plane,
            resource.name,
            persist=self.reconnecting,
            job_policy=self.job_policy,
            feed=await self._feed(resource.name),
        )

    async def aclose(self) -> None:
        """Close connections; stop the private gateway if this provider started one."""
        await self.transport.aclose()
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
