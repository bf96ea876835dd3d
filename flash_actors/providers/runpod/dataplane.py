"""The RunPod data-plane client: ``{base}/{endpoint_id}/{run,runsync,status,...}``.

One client for every server that speaks RunPod's data plane (PROTOCOL.md section 1): RunPod
itself over HTTPS, and the ``flash local`` daemon over our fast loopback transport. The
transport is swappable (`flash_actors.providers.runpod.transport`), and what only our daemon
offers is a declared `Capabilities`, never an assumption:

- ``long_poll``: ``/status/{id}?wait=ms`` holds the answer until the job changes; without it
  status is polled with backoff (`Backoff`). ``/runsync?wait=ms`` (RunPod's own, 1..300 s)
  holds the answer until the job ends, on every server.
- ``job_ids``: ``/run`` takes the caller's ``id``, so sending a submission again attaches to
  the job already there. Without it a submission is sent again only when it provably never
  arrived (`NotDeliveredError`); a connection that broke after the request was sent raises
  `DeliveryUncertainError`, which nobody retries, so no job runs twice.
- ``stream_flag``: ``"stream": true`` in ``/run`` makes the server keep a generator's chunks
  for ``/stream/{id}``.
- ``batch``: ``/runbatch`` takes many jobs (with ids) at once and ``/feed/{feed}`` long-polls
  their results, many per answer (`flash_actors.providers.runpod.feed`).

HTTP answers map onto the error tree: 401/403 -> `ConfigurationError` naming the key's
variable; 429 and 503 -> `NotDeliveredError` (nothing was created); other 5xx ->
`DeliveryError`; 404 and other 4xx -> `FlashRuntimeError` with the server's message.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio
import msgspec

from flash_actors.errors import (
    ConfigurationError,
    DeliveryError,
    DeliveryUncertainError,
    FlashRuntimeError,
    NotDeliveredError,
)
from flash_actors.messages import wire_encoder

if TYPE_CHECKING:
    from collections.abc import Mapping

    from flash_actors.providers.runpod.transport import Response, Transport

__all__ = [
    "FLASH_LOCAL",
    "RUNPOD",
    "TERMINAL",
    "Backoff",
    "Capabilities",
    "DataPlane",
    "Envelope",
    "error_text",
]

TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"})
LONG_WAIT_MS = 300_000
SYNC_GRACE_S = 30.0
"""How much longer than its ``?wait=`` a ``/runsync`` request may go unanswered before the
transport gives up on it (the server answers when the wait runs out, but not to the ms)."""


class Capabilities(msgspec.Struct, frozen=True, kw_only=True):
    """What a data-plane server offers beyond RunPod's documented API (see the module doc)."""

    long_poll: bool = False
    job_ids: bool = False
    stream_flag: bool = False
    batch: bool = False


RUNPOD = Capabilities()
"""RunPod Serverless: the documented API only."""

FLASH_LOCAL = Capabilities(long_poll=True, job_ids=True, stream_flag=True, batch=True)
"""The ``flash local`` daemon."""


class Backoff(msgspec.Struct, frozen=True, kw_only=True):
    """Status polling without long-poll: ``first_s`` doubling up to ``max_s``."""

    first_s: float = 0.05
    max_s: float = 1.0


class _Chunk(msgspec.Struct, gc=False):
    output: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)


class Envelope(msgspec.Struct, gc=False):
    """A data-plane answer: ``/run``, ``/runsync``, ``/status`` and ``/stream`` share it."""

    id: str = ""
    status: str = ""
    output: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)
    error: str | None = None
    delayTime: int | None = None
    executionTime: int | None = None
    workerId: str | None = None
    stream: list[_Chunk] = []

    @property
    def terminal(self) -> bool:
        """The job has ended (COMPLETED, FAILED, CANCELLED or TIMED_OUT)."""
        return self.status in TERMINAL


_envelope = msgspec.json.Decoder(Envelope)


class _JobBody(msgspec.Struct, omit_defaults=True, gc=False):
    input: Any
    policy: dict[str, int] = {}
    id: str | None = None
    webhook: str | None = None
    stream: bool = False


def error_text(data: bytes) -> str:
    """The message of an error answer: its ``error`` (or ``message``) field, else its text."""
    try:
        decoded = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return data.decode(errors="replace")[:500]
    if isinstance(decoded, dict):
        for name in ("error", "message"):
            if name in decoded:
                return str(decoded[name])[:2000]
    return str(decoded)[:500]


class DataPlane:
    """RunPod's data plane at ``base_url`` (``https://api.runpod.ai/v2`` or a daemon's).

    Args:
        transport: how requests travel (`Transport`).
        base_url: the ``/v2`` base, without a trailing slash.
        api_key: sent as ``Authorization: Bearer <key>``.
        capabilities: what the server offers beyond RunPod's API.
        key_name: the variable the key comes from, for error messages.
        service: the server's name in messages (``"RunPod"``, ``"the flash local daemon"``).
        backoff: how status is polled without long-poll.
    """

    def __init__(
        self,
        transport: Transport,
        base_url: str,
        api_key: str,
        *,
        capabilities: Capabilities = RUNPOD,
        key_name: str = "RUNPOD_API_KEY",
        service: str = "RunPod",
        backoff: Backoff | None = None,
    ) -> None:
        self.capabilities = capabilities
        self.key_name = key_name
        self.service = service
        self.backoff = backoff or Backoff()
        self.retarget(transport, base_url, api_key)

    def retarget(self, transport: Transport, base_url: str, api_key: str) -> None:
        """Send from now on to ``base_url`` with ``api_key`` (a daemon that moved)."""
        self.transport = transport
        self.base_url = base_url.rstrip("/")
        self.headers: Mapping[str, str] = {
            "authorization": f"Bearer {api_key}",
            "content-type": "application/json",
        }

    async def call(
        self,
        method: str,
        endpoint_id: str,
        path: str,
        body: bytes | None = None,
        *,
        submit: bool = False,
        timeout_s: float | None = None,
    ) -> bytes:
        """One request to ``{base}/{endpoint_id}{path}``: the answer's body when 200.

        With ``submit`` (a ``/run`` or ``/runsync`` without a caller-chosen id), a failure
        after the request may have arrived raises `DeliveryUncertainError` instead of a
        retryable `DeliveryError`. ``timeout_s`` is the transport's (`Transport.request`).
        """
        url = f"{self.base_url}/{endpoint_id}{path}"
        try:
            response = await self.transport.request(
                method, url, body=body, headers=self.headers, timeout_s=timeout_s
            )
        except NotDeliveredError:
            raise
        except DeliveryError as exc:
            if not submit:
                raise
            msg = (
                f"the connection to {self.service} broke after the job was sent to "
                f"endpoint {endpoint_id!r} ({exc}); it may be running there, so it was not "
                "sent again (a second submission could run it twice)"
            )
            raise DeliveryUncertainError(msg) from exc
        if response.status == 200:
            return response.body
        self.raise_for(response, f"{endpoint_id}{path}", submit=submit)
        raise AssertionError("unreachable")  # pragma: no cover

    def raise_for(self, response: Response, what: str, *, submit: bool = False) -> None:
        """Raise the error an answer other than 200 means (see the module docstring)."""
        status = response.status
        text = error_text(response.body)
        where = what.split("?")[0]
        if status in (401, 403):
            msg = (
                f"{self.service} rejected the API key ({self.key_name}) at {self.base_url} "
                f"(HTTP {status}): {text}"
            )
            raise ConfigurationError(msg)
        if status in (429, 503):
            msg = f"{self.service} did not take {where} ({status}): {text}"
            raise NotDeliveredError(msg)
        if status >= 500:
            msg = f"{self.service} failed on {where} ({status}): {text}"
            if submit:
                msg += "; the job may have been created, so it was not sent again"
                raise DeliveryUncertainError(msg)
            raise DeliveryError(msg)
        if status == 404:
            msg = f"{self.service}: no such endpoint or job ({where}): {text}"
            raise FlashRuntimeError(msg)
        msg = f"{self.service} refused {where} ({status}): {text}"
        raise FlashRuntimeError(msg)

    async def run(
        self,
        endpoint_id: str,
        payload: Any,
        *,
        policy: dict[str, int] | None = None,
        job_id: str | None = None,
        webhook: str | None = None,
        stream: bool = False,
        sync_wait_ms: int | None = None,
    ) -> Envelope:
        """Queue a job (``/run``), or with ``sync_wait_ms`` wait for it (``/runsync``).

        ``job_id`` and ``stream`` are sent only where the server declares them.
        """
        body = self.job_body(
            payload, policy=policy, job_id=job_id, webhook=webhook, stream=stream
        )
        return await self.run_body(
            endpoint_id, body, with_id=job_id is not None, sync_wait_ms=sync_wait_ms
        )

    def job_body(
        self,
        payload: Any,
        *,
        policy: dict[str, int] | None = None,
        job_id: str | None = None,
        webhook: str | None = None,
        stream: bool = False,
    ) -> bytes:
        """A job as ``/run`` takes it; ``job_id`` and ``stream`` only where the server has them."""
        caps = self.capabilities
        return wire_encoder.encode(
            _JobBody(
                input=payload,
                policy=policy or {},
                id=job_id if caps.job_ids else None,
                webhook=webhook,
                stream=stream and caps.stream_flag,
            )
        )

    async def run_body(
        self,
        endpoint_id: str,
        body: bytes,
        *,
        with_id: bool,
        sync_wait_ms: int | None = None,
    ) -> Envelope:
        """`run` with the job already encoded (`job_body`); ``with_id``: it carries its id.

        A ``/runsync`` may go unanswered for its whole wait: the transport waits that long
        and `SYNC_GRACE_S` more before it gives up on the answer.
        """
        if sync_wait_ms is None:
            path, timeout_s = "/run", None
        else:
            path = f"/runsync?wait={sync_wait_ms}"
            timeout_s = sync_wait_ms / 1000 + SYNC_GRACE_S
        data = await self.call(
            "POST",
            endpoint_id,
            path,
            body,
            submit=not (with_id and self.capabilities.job_ids),
            timeout_s=timeout_s,
        )
        return _envelope.decode(data)

    async def runsync(
        self,
        endpoint_id: str,
        payload: Any,
        *,
        wait_ms: int = 90_000,
        policy: dict[str, int] | None = None,
        job_id: str | None = None,
    ) -> Envelope:
        """Queue a job and wait up to ``wait_ms`` for it (``/runsync``); maybe not ended."""
        return await self.run(
            endpoint_id, payload, policy=policy, job_id=job_id, sync_wait_ms=wait_ms
        )

    async def status(
        self, endpoint_id: str, job_id: str, *, wait_ms: int | None = None
    ) -> Envelope:
        """The job's envelope (``?wait=`` only where the server long-polls)."""
        path = f"/status/{job_id}"
        if wait_ms is not None and self.capabilities.long_poll:
            path += f"?wait={wait_ms}"
        return _envelope.decode(await self.call("GET", endpoint_id, path))

    async def stream(
        self, endpoint_id: str, job_id: str, *, wait_ms: int | None = None
    ) -> Envelope:
        """The chunks buffered since the last call (``/stream/{id}``)."""
        path = f"/stream/{job_id}"
        if wait_ms is not None and self.capabilities.long_poll:
            path += f"?wait={wait_ms}"
        return _envelope.decode(await self.call("GET", endpoint_id, path))

    async def cancel(self, endpoint_id: str, job_id: str) -> Envelope:
        """Cancel a queued or running job."""
        return _envelope.decode(
            await self.call("POST", endpoint_id, f"/cancel/{job_id}")
        )

    async def retry(self, endpoint_id: str, job_id: str) -> Envelope:
        """Queue a FAILED or TIMED_OUT job again under its id."""
        return _envelope.decode(
            await self.call("POST", endpoint_id, f"/retry/{job_id}")
        )

    async def purge_queue(self, endpoint_id: str) -> dict[str, Any]:
        """Remove the endpoint's queued jobs: ``{"removed": n, "status": ...}``."""
        return _json_object(await self.call("POST", endpoint_id, "/purge-queue"))

    async def health(self, endpoint_id: str) -> dict[str, Any]:
        """Job and worker counts: ``{"jobs": {...}, "workers": {...}}``."""
        return _json_object(await self.call("GET", endpoint_id, "/health"))

    async def metrics(self, endpoint_id: str) -> dict[str, Any]:
        """The endpoint's metrics (``/metrics``)."""
        return _json_object(await self.call("GET", endpoint_id, "/metrics"))

    async def wait(self, endpoint_id: str, envelope: Envelope) -> Envelope:
        """Wait until the job ends: long-polled, or polled with `Backoff`."""
        if self.capabilities.long_poll:
            while not envelope.terminal:
                envelope = await self.status(
                    endpoint_id, envelope.id, wait_ms=LONG_WAIT_MS
                )
            return envelope
        delay = self.backoff.first_s
        while not envelope.terminal:
            await anyio.sleep(delay)
            delay = min(self.backoff.max_s, delay * 2)
            envelope = await self.status(endpoint_id, envelope.id)
        return envelope


def _json_object(data: bytes) -> dict[str, Any]:
    value = msgspec.json.decode(data)
    if not isinstance(value, dict):
        msg = f"expected a JSON object, got {type(value).__name__}"
        raise FlashRuntimeError(msg)
    return value
