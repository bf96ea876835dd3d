"""Flash apps, environments and builds through RunPod's control plane: `FlashApps`.

The queries and mutations runpod-flash 1.21 sends (same operation names, arguments and
selections), through our `ControlPlane` client, so one piece of code works against RunPod
and against ``flash local``. A build is sent as Flash sends it: ``prepareFlashArtifactUpload``
gives an upload URL, the archive is ``PUT`` there (``Content-Type: application/gzip``, no
API key: the URL carries its own authorization), and ``finalizeFlashArtifactUpload`` makes
it a build with the manifest. ``deployBuildToEnvironment`` then makes an environment run it.

Lookups by name return None when RunPod answers "... not found" (the test runpod-flash
makes); every other failure raises as `ControlPlane.execute` raises it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast, runtime_checkable

import anyio.to_thread

from flash_actors.errors import (
    ConfigurationError,
    DeliveryError,
    GraphQLError,
    GraphQLQueryError,
)
from flash_actors.providers.runpod.transport import FileUploader

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from pathlib import Path

    from flash_actors.providers.runpod.graphql import ControlPlane
    from flash_actors.providers.runpod.transport import Transport

__all__ = [
    "CREATE_APP",
    "CREATE_ENVIRONMENT",
    "DELETE_APP",
    "DELETE_ENVIRONMENT",
    "DEPLOY_BUILD",
    "FINALIZE_UPLOAD",
    "GET_APP",
    "GET_APP_BY_NAME",
    "GET_BUILD",
    "GET_ENVIRONMENT",
    "GET_ENVIRONMENT_BY_NAME",
    "LIST_APPS",
    "LIST_BUILDS",
    "LIST_ENVIRONMENTS",
    "MAX_ARCHIVE",
    "PREPARE_UPLOAD",
    "UPDATE_BUILD_MANIFEST",
    "ByteProgress",
    "FlashApps",
    "Upload",
]

MAX_ARCHIVE = 500 * 1024 * 1024
"""Largest archive RunPod takes for a Flash build (500 MiB)."""
UPLOAD_TIMEOUT_S = 600.0
"""The longest an upload may take (runpod-flash's per-attempt limit)."""

LIST_APPS = (
    "query getFlashApps { myself { flashApps { id name flashEnvironments { id name state "
    "createdAt activeBuildId } flashBuilds { id createdAt } } } }"
)
GET_APP = (
    "query getFlashApp($input: String!) { flashApp(flashAppId: $input) { id name "
    "flashEnvironments { id name state } flashBuilds { id objectKey createdAt } } }"
)
GET_APP_BY_NAME = (
    "query getFlashAppByName($flashAppName: String!) { flashAppByName(flashAppName: "
    "$flashAppName) { id name flashEnvironments { id name state activeBuildId createdAt } "
    "flashBuilds { id objectKey createdAt } } }"
)
CREATE_APP = (
    "mutation createFlashApp($input: CreateFlashAppInput!) { createFlashApp(input: "
    "$input) { id name } }"
)
CREATE_ENVIRONMENT = (
    "mutation createFlashEnvironment($input: CreateFlashEnvironmentInput!) { "
    "createFlashEnvironment(input: $input) { id name } }"
)
GET_ENVIRONMENT = (
    "query getFlashEnvironment($flashEnvironmentId: String!) { flashEnvironment("
    "flashEnvironmentId: $flashEnvironmentId) { id name state activeBuildId createdAt "
    "endpoints { id name } networkVolumes { id name } } }"
)
GET_ENVIRONMENT_BY_NAME = (
    "query getFlashEnvironmentByName($input: FlashEnvironmentByNameInput!) { "
    "flashEnvironmentByName(input: $input) { id name state activeBuildId endpoints { id "
    "name } networkVolumes { id name } } }"
)
LIST_ENVIRONMENTS = (
    "query listFlashEnvironments($flashAppId: String!) { flashApp(flashAppId: "
    "$flashAppId) { flashEnvironments { id name state activeBuildId createdAt } } }"
)
LIST_BUILDS = (
    "query listFlashBuilds($flashAppId: String!) { flashApp(flashAppId: $flashAppId) { "
    "flashBuilds { id objectKey createdAt } } }"
)
GET_BUILD = (
    "query getFlashBuild($input: String!) { flashBuild(flashBuildId: $input) { id "
    "manifest } }"
)
PREPARE_UPLOAD = (
    "mutation PrepareArtifactUpload($input: PrepareFlashArtifactUploadInput!) { "
    "prepareFlashArtifactUpload(input: $input) { uploadUrl objectKey expiresAt } }"
)
FINALIZE_UPLOAD = (
    "mutation FinalizeArtifactUpload($input: FinalizeFlashArtifactUploadInput!) { "
    "finalizeFlashArtifactUpload(input: $input) { id manifest } }"
)
UPDATE_BUILD_MANIFEST = (
    "mutation updateFlashBuildManifest($input: UpdateFlashBuildManifestInput!) { "
    "updateFlashBuildManifest(input: $input) { id manifest } }"
)
DEPLOY_BUILD = (
    "mutation deployBuildToEnvironment($input: DeployBuildToEnvironmentInput!) { "
    "deployBuildToEnvironment(input: $input) { id name activeArtifact { objectKey "
    "downloadUrl expiresAt } } }"
)
DELETE_APP = (
    "mutation deleteFlashApp($flashAppId: String!) { deleteFlashApp(flashAppId: "
    "$flashAppId) }"
)
DELETE_ENVIRONMENT = (
    "mutation deleteFlashEnvironment($flashEnvironmentId: String!) { "
    "deleteFlashEnvironment(flashEnvironmentId: $flashEnvironmentId) }"
)


@dataclass(frozen=True, slots=True)
class Upload:
    """A build sent by `FlashApps.upload_build`: the build, its size and the time it took."""

    build: dict[str, Any]
    size: int
    seconds: float


@runtime_checkable
class ByteProgress(Protocol):
    """A progress callback that also takes bytes: what `FlashApps.upload_build` reports to.

    The ``flash`` command's steps are one (`flash_actors_cli._target.StepProgress`).
    """

    def __call__(self, line: str) -> None:
        """A new status line."""
        ...

    def transferred(self, done: int, total: int) -> None:
        """``done`` of ``total`` bytes sent so far."""
        ...


def _not_found(exc: GraphQLError) -> bool:
    return "not found" in str(exc).lower()


def _field(data: Mapping[str, Any], name: str) -> Any:
    if name not in data:
        msg = f"the control plane's answer has no {name!r}"
        raise GraphQLQueryError(msg)
    return data[name]


def _check_archive(archive: Path) -> int:
    """The archive's size, after checking it is a gzip file within `MAX_ARCHIVE`."""
    if not archive.is_file():
        msg = f"no build archive at {archive}; run `flash build` first"
        raise ConfigurationError(msg)
    with archive.open("rb") as fh:
        if fh.read(2) != b"\x1f\x8b":
            msg = f"{archive} is not a .tar.gz archive; run `flash build` again"
            raise ConfigurationError(msg)
    size = archive.stat().st_size
    if size > MAX_ARCHIVE:
        msg = (
            f"{archive} is {size / 2**20:.1f} MiB; the limit is {MAX_ARCHIVE // 2**20} "
            "MiB: leave out packages the base image has (`flash build --exclude ...`)"
        )
        raise ConfigurationError(msg)
    return size


class FlashApps:
    """Flash's app, environment and build operations (see the module docstring).

    Args:
        control: the GraphQL client (RunPod's, or ``flash local``'s URL and key).
        transport: what sends the archive to its upload URL (usually the control's).
    """

    def __init__(self, control: ControlPlane, transport: Transport) -> None:
        self.control = control
        self.transport = transport

    # -- apps -------------------------------------------------------------------------------

    async def list_apps(self) -> list[dict[str, Any]]:
        """Every app with its environments and builds."""
        data = await self.control.execute(LIST_APPS)
        myself = _field(data, "myself") or {}
        return list(myself.get("flashApps") or [])

    async def app_by_name(self, name: str) -> dict[str, Any] | None:
        """The app named ``name`` (with environments and builds), or None."""
        try:
            data = await self.control.execute(GET_APP_BY_NAME, {"flashAppName": name})
        except GraphQLError as exc:
            if _not_found(exc):
                return None
            raise
        return cast("dict[str, Any] | None", _field(data, "flashAppByName"))

    async def create_app(self, name: str) -> dict[str, Any]:
        """A new app (``{"id", "name"}``); RunPod refuses a name already taken."""
        data = await self.control.execute(CREATE_APP, {"input": {"name": name}})
        return cast("dict[str, Any]", _field(data, "createFlashApp"))

    async def delete_app(self, app_id: str) -> None:
        """Delete an app, its environments and its builds."""
        await self.control.execute(DELETE_APP, {"flashAppId": app_id})

    # -- environments -----------------------------------------------------------------------

    async def list_environments(self, app_id: str) -> list[dict[str, Any]]:
        """An app's environments (``id name state activeBuildId createdAt``)."""
        data = await self.control.execute(LIST_ENVIRONMENTS, {"flashAppId": app_id})
        app = _field(data, "flashApp") or {}
        return list(app.get("flashEnvironments") or [])

    async def environment(self, environment_id: str) -> dict[str, Any]:
        """One environment with its endpoints and network volumes."""
        data = await self.control.execute(
            GET_ENVIRONMENT, {"flashEnvironmentId": environment_id}
        )
        return cast("dict[str, Any]", _field(data, "flashEnvironment"))

    async def environment_by_name(
        self, app_id: str, name: str
    ) -> dict[str, Any] | None:
        """The app's environment named ``name`` (with its endpoints), or None."""
        try:
            data = await self.control.execute(
                GET_ENVIRONMENT_BY_NAME, {"input": {"flashAppId": app_id, "name": name}}
            )
        except GraphQLError as exc:
            if _not_found(exc):
                return None
            raise
        return cast("dict[str, Any] | None", _field(data, "flashEnvironmentByName"))

    async def create_environment(self, app_id: str, name: str) -> dict[str, Any]:
        """A new environment of the app (``{"id", "name"}``)."""
        data = await self.control.execute(
            CREATE_ENVIRONMENT, {"input": {"flashAppId": app_id, "name": name}}
        )
        return cast("dict[str, Any]", _field(data, "createFlashEnvironment"))

    async def delete_environment(self, environment_id: str) -> None:
        """Delete an environment (its endpoints are the caller's to remove first)."""
        await self.control.execute(
            DELETE_ENVIRONMENT, {"flashEnvironmentId": environment_id}
        )

    # -- builds -----------------------------------------------------------------------------

    async def list_builds(self, app_id: str) -> list[dict[str, Any]]:
        """An app's builds (``id objectKey createdAt``), newest first."""
        data = await self.control.execute(LIST_BUILDS, {"flashAppId": app_id})
        app = _field(data, "flashApp") or {}
        return list(app.get("flashBuilds") or [])

    async def build(self, build_id: str) -> dict[str, Any]:
        """One build with its manifest."""
        data = await self.control.execute(GET_BUILD, {"input": build_id})
        return cast("dict[str, Any]", _field(data, "flashBuild"))

    async def update_build_manifest(
        self, build_id: str, manifest: Mapping[str, Any]
    ) -> None:
        """Replace a build's manifest."""
        await self.control.execute(
            UPDATE_BUILD_MANIFEST,
            {"input": {"flashBuildId": build_id, "manifest": dict(manifest)}},
        )

    async def upload_build(
        self,
        app_id: str,
        archive: Path,
        manifest: Mapping[str, Any],
        *,
        progress: Callable[[str], None] | None = None,
    ) -> Upload:
        """Send ``archive`` as a new build of the app, with ``manifest``.

        Args:
            app_id: the app.
            archive: ``.flash/artifact.tar.gz`` as ``flash build`` writes it.
            manifest: the build's manifest (``.flash/flash_manifest.json``).
            progress: called with a line at each step (asking for the URL, sending,
                finalizing); a `ByteProgress` also gets the bytes sent as they go
                (streamed from disk when the transport is a `FileUploader`).

        Raises:
            ConfigurationError: no archive there, not a gzip file, or over `MAX_ARCHIVE`.
            DeliveryError: the upload URL refused the archive or did not answer.
        """
        say = progress or (lambda line: None)
        size = await anyio.to_thread.run_sync(_check_archive, archive)
        data = await self.control.execute(
            PREPARE_UPLOAD, {"input": {"flashAppId": app_id, "tarballSize": size}}
        )
        target = _field(data, "prepareFlashArtifactUpload") or {}
        url, key = target.get("uploadUrl"), target.get("objectKey")
        if not isinstance(url, str) or not isinstance(key, str):
            msg = "prepareFlashArtifactUpload gave no uploadUrl and objectKey"
            raise GraphQLQueryError(msg)
        say(f"uploading {size / 2**20:.1f} MiB")
        sent = progress.transferred if isinstance(progress, ByteProgress) else None
        headers = {"Content-Type": "application/gzip"}
        started = time.monotonic()
        if sent is not None:
            sent(0, size)
        if isinstance(self.transport, FileUploader):
            answer = await self.transport.upload_file(
                "PUT",
                url,
                archive,
                size,
                headers=headers,
                timeout_s=UPLOAD_TIMEOUT_S,
                sent=None if sent is None else lambda done: sent(done, size),
            )
        else:
            body = await anyio.to_thread.run_sync(archive.read_bytes)
            answer = await self.transport.request(
                "PUT", url, body=body, headers=headers, timeout_s=UPLOAD_TIMEOUT_S
            )
            if sent is not None:
                sent(len(body), size)
        seconds = time.monotonic() - started
        if not 200 <= answer.status < 300:
            detail = answer.body[:200].decode("utf-8", "replace")
            msg = f"the upload URL answered HTTP {answer.status}: {detail}"
            raise DeliveryError(msg)
        say(f"uploaded {size / 2**20:.1f} MiB in {seconds:.1f} s; finalizing")
        data = await self.control.execute(
            FINALIZE_UPLOAD,
            {
                "input": {
                    "flashAppId": app_id,
                    "objectKey": key,
                    "manifest": dict(manifest),
                }
            },
        )
        build = cast("dict[str, Any]", _field(data, "finalizeFlashArtifactUpload"))
        return Upload(build=build, size=size, seconds=seconds)

    async def deploy_build(self, environment_id: str, build_id: str) -> dict[str, Any]:
        """Make an environment run a build; returns the environment (``activeArtifact``)."""
        data = await self.control.execute(
            DEPLOY_BUILD,
            {"input": {"flashEnvironmentId": environment_id, "flashBuildId": build_id}},
        )
        return cast("dict[str, Any]", _field(data, "deployBuildToEnvironment"))
