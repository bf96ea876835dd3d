"""Job webhooks: a job's final ``/status`` envelope POSTed to the URL its ``/run`` named.

`check_webhook` refuses, at submission, a URL nothing can be POSTed to; `Webhooks` posts
each ended job's envelope (never its input) from its own task group and HTTP client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import anyio
import httpx

from flash_actors._logging import get_logger
from flash_actors.messages import wire_encoder
from flash_actors.providers.local.daemon.errors import GatewayError
from flash_actors.providers.local.daemon.jobs import stored_envelope

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from flash_actors.providers.local.daemon.jobs import Job
    from flash_actors.providers.local.daemon.store import JobStore

__all__ = ["Webhooks", "check_webhook", "envelope_json"]

log = get_logger(__name__)


def check_webhook(url: str) -> str:
    """The webhook URL if it is one we can POST to: ``http`` or ``https``, a host, a valid port.

    Raises:
        GatewayError: 400 naming the webhook, for anything else.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
        httpx.URL(url)
    except (ValueError, httpx.InvalidURL) as exc:
        msg = f"webhook {url!r} is not a valid URL: {exc}"
        raise GatewayError(400, msg) from exc
    if parts.scheme not in {"http", "https"} or not parts.hostname or port == 0:
        msg = f"webhook {url!r} must be an http:// or https:// URL with a host"
        raise GatewayError(400, msg)
    return url


def envelope_json(payload: Any) -> bytes:
    """Encode an answer (``msgspec.Raw`` values are spliced in as they are)."""
    return wire_encoder.encode(payload)


class Webhooks:
    """Posts ended jobs' envelopes while `serve` runs (a job that ends before is not posted).

    Args:
        store: where a job's output is read from.
    """

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self._tg: TaskGroup | None = None
        self._http: httpx.AsyncClient | None = None

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Post webhooks until cancelled (posts in flight are cancelled with it)."""
        async with (
            httpx.AsyncClient(timeout=10) as http,
            anyio.create_task_group() as tg,
        ):
            self._http = http
            self._tg = tg
            task_status.started()
            try:
                await anyio.sleep_forever()
            finally:
                self._tg = None

    def send(self, job: Job) -> None:
        """A job has ended: post its envelope if it has a webhook (`JobBook`'s ``on_end``)."""
        if job.options.get("webhook") and self._tg is not None:
            self._tg.start_soon(self._post, job)

    async def _post(self, job: Job) -> None:
        """POST the final ``/status`` envelope (never the job's input) to the job's webhook.

        Three tries with backoff, each with 10 s for the answer's status line; the answer's
        body is never read (an endless one cannot fill memory). Whatever goes wrong (a
        refused connection, a bad URL stored by an older version, a bug) is logged: a
        webhook never stops the daemon.
        """
        if self._http is None:
            return
        url = str(job.options["webhook"])
        headers = {"Content-Type": "application/json"}
        for attempt in range(3):
            error = "no answer within 10 s"
            try:
                body = envelope_json(stored_envelope(self.store, job))
                await self.store.wait_committed()  # the end it reports, first
                with anyio.move_on_after(10):
                    async with self._http.stream(
                        "POST", url, content=body, headers=headers
                    ) as response:
                        if response.status_code < 500:
                            return
                        error = f"HTTP {response.status_code}"
            except Exception as exc:  # noqa: BLE001 (a webhook must never stop the daemon)
                error = f"{type(exc).__name__}: {exc}"
            log.warning(
                "webhook.failed",
                job_id=job.id,
                url=url,
                error=error,
                attempt=attempt + 1,
            )
            await anyio.sleep(2**attempt)
