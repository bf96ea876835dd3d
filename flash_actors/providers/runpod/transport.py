"""The HTTP transport under the RunPod clients: request in, response out, errors mapped once.

Everything that talks to RunPod (the GraphQL control plane, the ``/v2`` data plane) sends its
requests through a `Transport`, so the wire can be swapped: `HttpsTransport` goes to the
network over one shared httpx client, `RecordingTransport` (the test transport) records each
request and answers it from a function you give it.

The contract every transport keeps:

- ``url`` is absolute; the transport adds nothing to it.
- An HTTP error status (4xx, 5xx) is an answer: it is returned, never raised.
- A server that cannot be reached, a connection that breaks, or no answer within
  ``timeout_s`` raises `DeliveryError` naming the host and the reason. Whether the request
  reached the server is unknown then; callers retry by their policy.
- Response header names are lower-case.

A transport that can also stream a file from disk (`FileUploader`: `HttpsTransport`) says
how many bytes have gone out as they go; `FlashApps.upload_build` uses that for its progress.
"""

from __future__ import annotations

import inspect
import platform
from importlib import metadata
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

import anyio.lowlevel
import httpx
import msgspec

from flash_actors.errors import ConfigurationError, DeliveryError, NotDeliveredError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
    from pathlib import Path

__all__ = [
    "UPLOAD_CHUNK",
    "FileUploader",
    "HttpsTransport",
    "RecordedRequest",
    "RecordingTransport",
    "Response",
    "Transport",
    "default_user_agent",
    "json_response",
]

DEFAULT_CONNECT_TIMEOUT_S = 10.0
"""How long `HttpsTransport` waits for a connection when a request gives no ``timeout_s``."""
UPLOAD_CHUNK = 1024 * 1024
"""Bytes read from disk and sent at a time by `HttpsTransport.upload_file`."""


def default_user_agent() -> str:
    """The User-Agent of flash-actors, in runpod-flash's form.

    ``flash-actors/<version> (Python <version>; <OS> <release>; <machine>)``.
    """
    try:
        version = metadata.version("flash-actors")
    except metadata.PackageNotFoundError:  # pragma: no cover - run from a bare checkout
        version = "0"
    return (
        f"flash-actors/{version} (Python {platform.python_version()}; "
        f"{platform.system()} {platform.release()}; {platform.machine()})"
    )


class Response(NamedTuple):
    """One HTTP answer: status, the whole body, and the headers with lower-case names."""

    status: int
    body: bytes
    headers: Mapping[str, str]


class Transport(Protocol):
    """Sends one HTTP request and returns its response (see the module docstring)."""

    async def request(
        self,
        method: str,
        url: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> Response:
        """Send ``method url`` with ``body`` and ``headers``; return the whole response.

        Args:
            method: ``"GET"``, ``"POST"``, ...
            url: the absolute URL.
            body: the request body, sent as is.
            headers: request headers; the transport may add its own (``User-Agent``).
            timeout_s: the longest wait for the connection and for each read; ``None``
                uses the transport's default.

        Raises:
            DeliveryError: the server cannot be reached, the connection broke, or no
                answer came within ``timeout_s``; names the host and the reason.
        """
        ...

    async def aclose(self) -> None:
        """Close the transport's connections."""
        ...


@runtime_checkable
class FileUploader(Protocol):
    """A `Transport` that can also send a file from disk, telling the bytes as they go."""

    async def upload_file(
        self,
        method: str,
        url: str,
        path: Path,
        size: int,
        *,
        headers: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
        sent: Callable[[int], None] | None = None,
    ) -> Response:
        """Send the first ``size`` bytes of ``path`` as the body (``Content-Length: size``).

        Args:
            method: ``"PUT"``, ``"POST"``, ...
            url: the absolute URL.
            path: the file to send.
            size: how many bytes of it to send (its size when it was checked).
            headers: request headers.
            timeout_s: as for `Transport.request`.
            sent: called with the number of bytes sent so far, after each chunk.

        Raises:
            DeliveryError: as `Transport.request`; also when the file is shorter than
                ``size``.
        """
        ...


def _origin(url: httpx.URL) -> str:
    """``scheme://host[:port]`` of a URL: what an error names (no credentials, no query)."""
    return f"{url.scheme}://{url.netloc.decode('ascii')}"


def _reason(exc: httpx.HTTPError, timeout_s: float | None) -> str:
    """A short, plain reason for a transport failure."""
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.ConnectTimeout):
        return f"no connection within {timeout_s or DEFAULT_CONNECT_TIMEOUT_S:g} s"
    if isinstance(exc, httpx.PoolTimeout):
        within = f" within {timeout_s:g} s" if timeout_s else ""
        return f"no free connection in the pool{within}"
    if isinstance(exc, httpx.TimeoutException):
        return f"no answer within {timeout_s:g} s" if timeout_s else "timed out"
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect ({detail})"
    if isinstance(exc, httpx.RemoteProtocolError):
        return f"the connection broke ({detail})"
    if isinstance(exc, (httpx.ReadError, httpx.WriteError, httpx.CloseError)):
        return f"the connection broke ({detail})"
    return f"{type(exc).__name__}: {detail}"


class HttpsTransport:
    """`Transport` over one httpx client shared by every request (asyncio and trio).

    The client is created on the first request and reused, so connections are kept alive
    across calls; it belongs to the event loop of that first request. ``aclose()`` closes it
    (a later request opens a new one). Proxies and CA bundles come from the environment as
    httpx reads them (``HTTPS_PROXY``, ``NO_PROXY``, ``SSL_CERT_FILE``); redirects are not
    followed.

    Args:
        user_agent: sent as ``User-Agent`` unless a request sets its own (default:
            `default_user_agent()`, ``flash-actors/<version> (...)``).
        max_connections: most connections open at once, over all hosts.
    """

    def __init__(
        self, *, user_agent: str | None = None, max_connections: int = 256
    ) -> None:
        self._user_agent = user_agent or default_user_agent()
        self._limits = httpx.Limits(
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
        )
        self._client: httpx.AsyncClient | None = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                limits=self._limits,
                headers={"User-Agent": self._user_agent},
                timeout=httpx.Timeout(None, connect=DEFAULT_CONNECT_TIMEOUT_S),
                follow_redirects=False,
                trust_env=True,
            )
        return self._client

    async def request(
        self,
        method: str,
        url: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> Response:
        """Send one request (see `Transport.request`).

        Without ``timeout_s`` the connection must open within `DEFAULT_CONNECT_TIMEOUT_S`
        and reads wait as long as the server takes.

        Raises:
            DeliveryError: unreachable server, broken connection or timeout (names the
                host and the reason).
            ConfigurationError: ``url`` is not an absolute http or https URL.
        """
        target = self._target(method, url)
        return await self._send(method, target, body, headers, timeout_s)

    async def upload_file(
        self,
        method: str,
        url: str,
        path: Path,
        size: int,
        *,
        headers: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
        sent: Callable[[int], None] | None = None,
    ) -> Response:
        """Stream ``size`` bytes of ``path`` in `UPLOAD_CHUNK` pieces (see `FileUploader`).

        The body goes with ``Content-Length`` (never chunked: presigned upload URLs refuse
        that), read from disk as it is sent, so a large archive is never held in memory.

        Raises:
            DeliveryError: unreachable server, broken connection, timeout, or a file
                shorter than ``size``.
            ConfigurationError: ``url`` is not an absolute http or https URL.
        """
        target = self._target(method, url)
        tell = sent or (lambda n: None)

        async def chunks() -> AsyncIterator[bytes]:
            done = 0
            async with await anyio.open_file(path, "rb") as fh:
                while done < size:
                    chunk = await fh.read(min(UPLOAD_CHUNK, size - done))
                    if not chunk:
                        msg = (
                            f"{path} shrank to {done} bytes while it was sent ({size})"
                        )
                        raise OSError(msg)
                    yield chunk
                    done += len(chunk)
                    tell(done)

        sized = {
            **{
                k: v
                for k, v in (headers or {}).items()
                if k.lower() != "content-length"
            },
            "Content-Length": str(size),
        }
        try:
            return await self._send(method, target, chunks(), sized, timeout_s)
        except OSError as exc:
            msg = f"{method} {_origin(target)}{target.path}: {exc}"
            raise DeliveryError(msg) from exc

    @staticmethod
    def _target(method: str, url: str) -> httpx.URL:
        try:
            target = httpx.URL(url)
        except httpx.InvalidURL as exc:
            msg = f"{method} {url!r}: not a valid URL ({exc})"
            raise ConfigurationError(msg) from exc
        if target.scheme not in ("http", "https") or not target.host:
            msg = f"{method} {url!r}: need an absolute http:// or https:// URL"
            raise ConfigurationError(msg)
        return target

    async def _send(
        self,
        method: str,
        target: httpx.URL,
        body: bytes | AsyncIterator[bytes] | None,
        headers: Mapping[str, str] | None,
        timeout_s: float | None,
    ) -> Response:
        timeout = (
            httpx.Timeout(timeout_s)
            if timeout_s is not None
            else httpx.Timeout(None, connect=DEFAULT_CONNECT_TIMEOUT_S)
        )
        try:
            answer = await self._http().request(
                method, target, content=body, headers=headers, timeout=timeout
            )
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            # no connection (none opened, or none free in the pool), so nothing was sent:
            # safe to send again
            msg = f"{method} {_origin(target)}{target.path}: {_reason(exc, timeout_s)}"
            raise NotDeliveredError(msg) from exc
        except httpx.HTTPError as exc:
            msg = f"{method} {_origin(target)}{target.path}: {_reason(exc, timeout_s)}"
            raise DeliveryError(msg) from exc
        return Response(
            answer.status_code, answer.content, dict(answer.headers.items())
        )

    async def aclose(self) -> None:
        """Close the shared client and its connections (idempotent)."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


class RecordedRequest(NamedTuple):
    """One request as `RecordingTransport` saw it (header names lower-case)."""

    method: str
    url: str
    body: bytes | None
    headers: Mapping[str, str]
    timeout_s: float | None

    def json(self) -> Any:
        """The body decoded as JSON (``None`` without a body)."""
        return None if self.body is None else msgspec.json.decode(self.body)


class RecordingTransport:
    """The test transport: records every request and answers it from ``handler``.

    It stands in for a remote service (the RunPod cloud) in tests and in users' own tests:
    ``handler`` receives each `RecordedRequest` and returns the `Response` (or an awaitable
    of one); it may raise `DeliveryError` to play an unreachable server. Requests are kept
    in order in ``requests``.

    Example:
        ```python
        transport = RecordingTransport(lambda req: json_response({"data": {}}))
        await transport.request("POST", "https://api.runpod.io/graphql", body=b"{}")
        assert transport.requests[0].url == "https://api.runpod.io/graphql"
        ```
    """

    def __init__(
        self, handler: Callable[[RecordedRequest], Response | Awaitable[Response]]
    ) -> None:
        self.handler = handler
        self.requests: list[RecordedRequest] = []
        self.closed = False

    async def request(
        self,
        method: str,
        url: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> Response:
        """Record the request and return ``handler``'s answer (see `Transport.request`)."""
        await anyio.lowlevel.checkpoint()
        recorded = RecordedRequest(
            method,
            url,
            body,
            {k.lower(): v for k, v in (headers or {}).items()},
            timeout_s,
        )
        self.requests.append(recorded)
        answer = self.handler(recorded)
        if inspect.isawaitable(answer):
            answer = await answer
        return answer

    async def aclose(self) -> None:
        """Mark the transport closed (``closed`` becomes true)."""
        await anyio.lowlevel.checkpoint()
        self.closed = True


def json_response(
    data: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    """A `Response` carrying ``data`` as JSON (for `RecordingTransport` handlers)."""
    return Response(
        status,
        msgspec.json.encode(data),
        {
            "content-type": "application/json",
            **{k.lower(): v for k, v in (headers or {}).items()},
        },
    )
