"""Build archives uploaded to ``flash local``: RunPod's presigned-URL upload, served locally.

``prepareFlashArtifactUpload`` asks `Uploads.prepare` for an upload: a one-time token (32
random bytes) and an ``objectKey``. The archive is then sent as RunPod's clients send it to
a presigned URL, ``PUT {daemon}/flash/v1/uploads/<token>`` with no API key (the token is
the credential, as a presigned URL's signature is), answered by `Uploads.receive`:

- the token must be known and not expired (1 hour); once an archive arrived under it,
  it is spent (a later PUT is a 403); a PUT that failed (broken, or the wrong size) can be
  sent again;
- the body must be exactly the ``tarballSize`` declared (``Content-Length`` checked
  before reading, the bytes while reading) and at most `MAX_ARCHIVE`;
- it is written to ``uploads/.<key>.part`` (0600), fsynced and renamed to
  ``uploads/<key>.tar.gz``: a file there is whole.

``finalizeFlashArtifactUpload`` then takes the arrived file (`Uploads.arrived`) and makes it
a build. Pending uploads live in memory: after a daemon restart they are gone (their
files too, `Uploads.clear`) and the client prepares a new one.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio.to_thread

from flash_actors._logging import get_logger
from flash_actors._private import open_private, private_dir

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

__all__ = ["MAX_ARCHIVE", "UPLOAD_TTL_S", "Pending", "Uploads"]

log = get_logger(__name__)

MAX_ARCHIVE = 500 * 1024 * 1024
"""Largest archive accepted (RunPod's limit for Flash builds, 500 MiB)."""
UPLOAD_TTL_S = 3600.0
"""How long an upload URL stays valid."""
UPLOADS = "uploads"


@dataclass
class Pending:
    """One prepared upload: who may send what, and whether it arrived."""

    token: str
    app_id: str
    object_key: str
    size: int
    expires: float  # time.time()
    path: Path
    state: str = "waiting"  # "receiving", "arrived"
    sha256: str = ""

    @property
    def expires_at(self) -> str:
        """The expiry as RunPod writes times (ISO 8601, UTC)."""
        return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(self.expires))


class Uploads:
    """Pending uploads of one daemon, their files under ``<state folder>/uploads``."""

    def __init__(self, state_dir: Path, *, limit: int = MAX_ARCHIVE) -> None:
        self.folder = state_dir / UPLOADS
        self.limit = limit
        self._by_token: dict[str, Pending] = {}
        self._by_key: dict[str, Pending] = {}

    def clear(self) -> None:
        """Remove what earlier runs left (no pending upload survives a restart)."""
        if self.folder.is_dir():
            for entry in self.folder.iterdir():
                entry.unlink(missing_ok=True)

    def prepare(self, app_id: str, size: int, object_key: str) -> Pending:
        """A new upload of ``size`` bytes for ``app_id`` (size checked by the caller)."""
        now = time.time()
        for stale in [p for p in self._by_token.values() if p.expires < now]:
            self._forget(stale)
        private_dir(self.folder)
        token = secrets.token_urlsafe(32)
        pending = Pending(
            token=token,
            app_id=app_id,
            object_key=object_key,
            size=size,
            expires=now + UPLOAD_TTL_S,
            path=self.folder / f"{secrets.token_hex(16)}.tar.gz",
        )
        self._by_token[token] = pending
        self._by_key[object_key] = pending
        return pending

    def arrived(self, object_key: str) -> Pending | None:
        """The upload of ``object_key`` if its archive arrived whole."""
        pending = self._by_key.get(object_key)
        if pending is None or pending.state != "arrived":
            return None
        return pending

    def done(self, pending: Pending) -> None:
        """Forget an upload whose file was taken (made a build)."""
        self._forget(pending)

    def _forget(self, pending: Pending) -> None:
        self._by_token.pop(pending.token, None)
        self._by_key.pop(pending.object_key, None)
        pending.path.unlink(missing_ok=True)

    async def receive(
        self, token: str, length: int | None, chunks: AsyncIterator[bytes]
    ) -> tuple[int, dict[str, str]]:
        """Answer ``PUT /flash/v1/uploads/<token>``: the HTTP status and a JSON answer."""
        pending = self._by_token.get(token)
        if pending is None or pending.expires < time.time():
            return 403, {"error": "this upload URL is not valid (unknown or expired)"}
        if pending.state == "arrived":
            return 403, {"error": "this upload URL was used already"}
        if pending.state == "receiving":
            return 409, {"error": "an upload to this URL is in progress"}
        if length is None:
            return 411, {"error": "Content-Length is required"}
        if length > self.limit:
            return 413, {
                "error": f"the archive is {length} bytes; the limit is {self.limit}"
            }
        if length != pending.size:
            msg = f"the body is {length} bytes; {pending.size} were announced"
            return 400, {"error": msg}
        pending.state = "receiving"
        part = pending.path.with_name(f".{pending.path.name}.part")
        try:
            status, answer = await self._write(pending, part, chunks)
        except BaseException:
            pending.state = "waiting"
            part.unlink(missing_ok=True)
            raise
        if status != 200:
            pending.state = "waiting"
            part.unlink(missing_ok=True)
        return status, answer

    async def _write(
        self, pending: Pending, part: Path, chunks: AsyncIterator[bytes]
    ) -> tuple[int, dict[str, str]]:
        digest = hashlib.sha256()
        fd = open_private(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        size = 0
        with os.fdopen(fd, "wb") as out:
            async for chunk in chunks:
                size += len(chunk)
                if size > pending.size:
                    msg = f"the body is over the {pending.size} bytes announced"
                    return 413, {"error": msg}
                digest.update(chunk)
                await anyio.to_thread.run_sync(out.write, chunk)
            if size != pending.size:
                msg = f"the body ended after {size} of {pending.size} bytes"
                return 400, {"error": msg}
            await anyio.to_thread.run_sync(out.flush)
            await anyio.to_thread.run_sync(os.fsync, out.fileno())
        await anyio.to_thread.run_sync(part.replace, pending.path)
        pending.sha256 = digest.hexdigest()
        pending.state = "arrived"
        log.info(
            "controlplane.upload_arrived",
            object_key=pending.object_key,
            size=size,
            sha256=pending.sha256,
        )
        return 200, {"objectKey": pending.object_key}
