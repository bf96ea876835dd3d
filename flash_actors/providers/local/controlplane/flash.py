"""RunPod's Flash control plane on ``flash local``: apps, environments, builds and deploys.

The operations runpod-flash 1.21 sends (``core/api/runpod.py``), with its answers:

- queries: ``myself { flashApps {...} }``, ``flashApp(flashAppId)``,
  ``flashAppByName(flashAppName)``, ``flashEnvironment(flashEnvironmentId)``,
  ``flashEnvironmentByName(input: {flashAppId, name})``, ``flashBuild(flashBuildId)``;
- mutations: ``createFlashApp(input: {name})``, ``createFlashEnvironment(input:
  {flashAppId, name})``, ``prepareFlashArtifactUpload(input: {flashAppId, tarballSize})``
  (an ``uploadUrl`` served by this daemon, see `uploads`),
  ``finalizeFlashArtifactUpload(input: {flashAppId, objectKey, manifest})`` (the archive
  must have arrived whole: it becomes a build), ``updateFlashBuildManifest(input:
  {flashBuildId, manifest})``, ``deployBuildToEnvironment(input: {flashEnvironmentId,
  flashBuildId})`` (unpacks the build and makes it the environment's active one, see
  `deployments`), ``deleteFlashEnvironment(flashEnvironmentId)`` (its endpoints go too),
  ``deleteFlashApp(flashAppId)``.

As on RunPod, deploying a build starts nothing by itself: the deploying client then saves
one endpoint per resource with ``saveEndpoint(input: {..., flashEnvironmentId})`` and the
resource's name in its env (``FLASH_RESOURCE_NAME``), which is what runpod-flash 1.21's
``flash deploy`` and ours send. RunPod's Flash worker image fetches the environment's build
and serves that resource; here such an endpoint is served from the build unpacked for the
environment (our worker's deployed mode): the build active when the endpoint was saved,
which it keeps until it is saved again, so a resource the client left alone keeps running.
Its workers find the environment's other resources the RunPod way (``FLASH_ENVIRONMENT_ID``
and ``getFlashEnvironment``, asked of this daemon).

Names are unique (an app's per account, an environment's per app): a second one is refused.
What is not there is an error whose message holds "app not found" / "environment not
found" / "build not found", which is what runpod-flash looks for to tell "missing" from
"failed". An environment's ``state`` is ``PENDING`` (no build yet) or ``DEPLOYED``; its
``endpoints`` are the endpoints saved for it.

Every change is written to ``controlplane.json`` atomically after the files it points to
exist (archives, unpacked folders), so a daemon killed at any point leaves a store that
names only whole files; what it left beside the store is removed at the next start.
"""

from __future__ import annotations

import datetime
import shutil
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
import msgspec

from flash_actors._logging import get_logger
from flash_actors._private import private_dir
from flash_actors.providers.local.controlplane import deployments, schema as base
from flash_actors.providers.local.controlplane.language import RequestError
from flash_actors.providers.local.controlplane.schema import (
    TYPES,
    _InputObject,
    _int,
    _one,
    _opaque,
    _scalars,
    _Spec,
    _string,
)
from flash_actors.providers.local.controlplane.state import (
    AppRecord,
    BuildRecord,
    EndpointRecord,
    EnvironmentRecord,
    TemplateRecord,
    new_uuid,
)
from flash_actors.providers.local.controlplane.uploads import MAX_ARCHIVE, Uploads

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable
    from pathlib import Path

__all__ = ["BUILDS", "ControlPlane"]

log = get_logger(__name__)

BUILDS = "builds"
NAME_MAX = 191

_CREATE_APP = _InputObject(
    "CreateFlashAppInput", {"name": _string}, frozenset({"name"})
)
_CREATE_ENV = _InputObject(
    "CreateFlashEnvironmentInput",
    {"flashAppId": _string, "name": _string},
    frozenset({"flashAppId", "name"}),
)
_ENV_BY_NAME = _InputObject(
    "FlashEnvironmentByNameInput",
    {"flashAppId": _string, "name": _string},
    frozenset({"flashAppId", "name"}),
)
_PREPARE = _InputObject(
    "PrepareFlashArtifactUploadInput",
    {"flashAppId": _string, "tarballSize": _int},
    frozenset({"flashAppId", "tarballSize"}),
)
_FINALIZE = _InputObject(
    "FinalizeFlashArtifactUploadInput",
    {"flashAppId": _string, "objectKey": _string, "manifest": _opaque},
    frozenset({"flashAppId", "objectKey"}),
)
_UPDATE_MANIFEST = _InputObject(
    "UpdateFlashBuildManifestInput",
    {"flashBuildId": _string, "manifest": _opaque},
    frozenset({"flashBuildId", "manifest"}),
)
_DEPLOY = _InputObject(
    "DeployBuildToEnvironmentInput",
    {"flashEnvironmentId": _string, "flashBuildId": _string},
    frozenset({"flashEnvironmentId", "flashBuildId"}),
)


def _arg(name: str, type_name: str, via: str, *, scalar: bool = False) -> _Spec:
    if scalar:
        return _Spec(None, frozenset({name}), frozenset({name}), via)
    return _one(type_name, name, required=(name,), via=via)


TYPES["Query"].update(
    flashApp=_arg("flashAppId", "FlashApp", "_flash_app"),
    flashAppByName=_arg("flashAppName", "FlashApp", "_flash_app_by_name"),
    flashEnvironment=_arg("flashEnvironmentId", "FlashEnvironment", "_flash_env"),
    flashEnvironmentByName=_arg("input", "FlashEnvironment", "_flash_env_by_name"),
    flashBuild=_arg("flashBuildId", "FlashBuild", "_flash_build"),
)
TYPES["Mutation"].update(
    createFlashApp=_arg("input", "FlashApp", "_create_app"),
    createFlashEnvironment=_arg("input", "FlashEnvironment", "_create_env"),
    prepareFlashArtifactUpload=_arg("input", "FlashArtifactUpload", "_prepare_upload"),
    finalizeFlashArtifactUpload=_arg("input", "FlashBuild", "_finalize_upload"),
    updateFlashBuildManifest=_arg("input", "FlashBuild", "_update_manifest"),
    deployBuildToEnvironment=_arg("input", "FlashEnvironment", "_deploy"),
    deleteFlashApp=_arg("flashAppId", "", "_delete_app", scalar=True),
    deleteFlashEnvironment=_arg("flashEnvironmentId", "", "_delete_env", scalar=True),
)
TYPES["User"]["flashApps"] = _Spec("FlashApp")
TYPES.update(
    FlashApp={
        **_scalars("id", "name", "createdAt"),
        "flashEnvironments": _Spec("FlashEnvironment"),
        "flashBuilds": _Spec("FlashBuild"),
    },
    FlashEnvironment={
        **_scalars("id", "name", "state", "activeBuildId", "createdAt", "flashAppId"),
        "endpoints": _Spec("Endpoint"),
        "networkVolumes": _Spec("NetworkVolume"),
        "activeArtifact": _Spec("FlashArtifact"),
    },
    FlashBuild=_scalars(
        "id", "objectKey", "createdAt", "manifest", "flashAppId", "tarballSize"
    ),
    FlashArtifactUpload=_scalars("uploadUrl", "objectKey", "expiresAt"),
    FlashArtifact=_scalars("objectKey", "downloadUrl", "expiresAt"),
)


def _now() -> str:
    moment = datetime.datetime.now(datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _name(value: str, what: str) -> str:
    if not value.strip():
        raise RequestError(f"{what} is required")
    if not value.isprintable() or len(value) > NAME_MAX:
        msg = f"{what} must be 1-{NAME_MAX} printable characters"
        raise RequestError(msg)
    return value


class ControlPlane(base.ControlPlane):
    """`schema.ControlPlane` with RunPod's Flash apps, environments and builds.

    ``base_url`` (the daemon's own URL, set once it listens) is where upload URLs point.
    """

    def __init__(
        self,
        state_dir: Path,
        apply: Callable[[str, dict[str, Any] | None], Awaitable[None]],
    ) -> None:
        super().__init__(state_dir, apply)
        self.base_url = ""
        self.uploads = Uploads(state_dir)

    # -- start ------------------------------------------------------------------------------

    async def restore(self) -> None:
        """Drop leftovers, unpack again what a crash left half done, register endpoints."""
        async with self._lock:
            await anyio.to_thread.run_sync(self._tidy)
            for env in list(self.state.environments.values()):
                for build_id in sorted(self._kept(env.id)):
                    build = self.state.builds.get(build_id)
                    if build is None:
                        continue
                    try:
                        await self._unpack(env, build)
                    except RequestError as exc:  # its endpoints are logged as failing
                        log.error(
                            "controlplane.environment_restore_failed",
                            environment=env.id,
                            error=exc.message,
                        )
        await super().restore()

    def _tidy(self) -> None:
        """Remove files no record names: partial uploads, orphan archives and folders."""
        self.uploads.clear()
        builds = self.state_dir / BUILDS
        if builds.is_dir():
            for entry in builds.iterdir():
                if entry.name.removesuffix(".tar.gz") not in self.state.builds:
                    entry.unlink(missing_ok=True)
        folder = self.state_dir / deployments.DEPLOYMENTS
        if folder.is_dir():
            for env_dir in folder.iterdir():
                env = self.state.environments.get(env_dir.name)
                if env is None:
                    shutil.rmtree(env_dir, ignore_errors=True)
                else:
                    deployments.prune(self.state_dir, env.id, self._kept(env.id))

    def _kept(self, environment_id: str) -> set[str]:
        """The builds of an environment still needed: its active one, and its endpoints'."""
        env = self.state.environments.get(environment_id)
        kept = {e.flashBuildId for e in self._endpoints_of(environment_id)}
        if env is not None:
            kept.add(env.activeBuildId)
        return {b for b in kept if b}

    def _endpoints_of(self, environment_id: str) -> list[EndpointRecord]:
        """The endpoints saved for an environment."""
        return [
            e
            for e in self.state.endpoints.values()
            if e.flashEnvironmentId == environment_id
        ]

    def _resource_of(self, record: EndpointRecord) -> str:
        """The resource of its environment's build that a deployed endpoint serves."""
        template = self.state.templates.get(record.templateId)
        return deployments.resource_name(record.name, template.env if template else [])

    # -- deployed endpoints (the hooks of `schema.ControlPlane`) ------------------------------

    async def _commit(self, change: base._Change) -> None:
        """`schema.ControlPlane._commit`, then unpacked builds no endpoint serves go."""
        touched = {e.flashEnvironmentId for e in change.endpoints}
        dropped = self.state.endpoints.get(change.drop_endpoint or "")
        if dropped is not None:
            touched.add(dropped.flashEnvironmentId)
        await super()._commit(change)
        for env_id in sorted(e for e in touched if e in self.state.environments):
            await anyio.to_thread.run_sync(
                deployments.prune, self.state_dir, env_id, self._kept(env_id)
            )

    def _pin(self, record: EndpointRecord, template: TemplateRecord) -> EndpointRecord:
        """A deployed endpoint serves its environment's active build, which must have it.

        Raises:
            RequestError: no such environment, no build deployed to it yet, or its build
                has no such resource (the message lists those it has).
        """
        known = self.state.endpoints.get(record.id)
        if record.flashEnvironmentId is None and known is not None:
            # an update that leaves it out (scaling, say) keeps the endpoint's environment
            return msgspec.structs.replace(
                record,
                flashEnvironmentId=known.flashEnvironmentId,
                flashBuildId=known.flashBuildId,
            )
        if record.flashEnvironmentId is None:
            return record
        where = "saveEndpoint(input).flashEnvironmentId"
        env = self._env(record.flashEnvironmentId, where)
        if env.activeBuildId is None:
            msg = (
                f"saveEndpoint: Flash environment {env.name!r} has no build yet: deploy "
                "one to it (deployBuildToEnvironment) before saving its endpoints"
            )
            raise RequestError(msg)
        build = self._build(env.activeBuildId, where)
        resource = deployments.resource_name(record.name, template.env)
        declared = deployments.resource_names(build.manifest)
        if (
            resource not in declared
            and known is not None
            and known.flashEnvironmentId == record.flashEnvironmentId
            and resource == self._resource_of(known)
        ):  # a resource the active build dropped, scaled down before it is deleted
            return msgspec.structs.replace(record, flashBuildId=known.flashBuildId)
        if resource not in declared:
            msg = (
                f"saveEndpoint: the build deployed to {env.name!r} has no resource "
                f"{resource!r} (it has: {', '.join(declared) or 'none'}); name it with "
                "FLASH_RESOURCE_NAME in the endpoint's env"
            )
            raise RequestError(msg)
        return msgspec.structs.replace(record, flashBuildId=env.activeBuildId)

    def _config(
        self,
        record: EndpointRecord,
        template: TemplateRecord,
        handlers: dict[str, Path],
    ) -> dict[str, Any]:
        """A deployed endpoint's config: its resource, from its build's unpacked folder.

        Raises:
            RequestError: its environment or build is gone, or the config cannot run.
        """
        if record.flashEnvironmentId is None:
            return super()._config(record, template, handlers)
        env = self.state.environments.get(record.flashEnvironmentId)
        build_id = record.flashBuildId or (env.activeBuildId if env else None)
        if env is None or build_id is None:
            msg = (
                f"endpoint {record.name!r} belongs to Flash environment "
                f'"{record.flashEnvironmentId}", which has no build here'
            )
            raise RequestError(msg)
        app = self.state.apps.get(env.flashAppId)
        return deployments.deployed_endpoint_config(
            record,
            template,
            handlers,
            folder=deployments.deployment_dir(self.state_dir, env.id, build_id),
            app_name=app.name if app else "",
            environment_name=env.name,
            environment_id=env.id,
        )

    def deployed_endpoint(self, app: str, environment: str, resource: str) -> str:
        """The endpoint running ``resource`` of ``environment`` of ``app`` (deployed mode).

        What runpod-flash 1.21 names with ``X-Flash-App``, ``X-Flash-Environment`` and
        ``X-Flash-Endpoint`` on ``POST /v2/flash/runsync``.

        Raises:
            LookupError: no such app, environment or running resource; the message lists
                what there is.
        """
        apps = {a.name: a for a in self.state.apps.values()}
        found = apps.get(app)
        if found is None:
            known = ", ".join(sorted(apps)) or "none"
            msg = f"no Flash app named {app!r} (apps: {known}): deploy it with `flash deploy send`"
            raise LookupError(msg)
        envs = {
            e.name: e
            for e in self.state.environments.values()
            if e.flashAppId == found.id
        }
        env = envs.get(environment)
        if env is None:
            known = ", ".join(sorted(envs)) or "none"
            msg = f"app {app!r} has no environment {environment!r} (it has: {known})"
            raise LookupError(msg)
        running = {self._resource_of(e): e.id for e in self._endpoints_of(env.id)}
        endpoint = running.get(resource)
        if endpoint is None:
            msg = (
                f"resource {resource!r} does not run in {app}/{environment} (running: "
                f"{', '.join(sorted(running)) or 'none'})"
            )
            raise LookupError(msg)
        return endpoint

    async def receive_upload(
        self, token: str, length: int | None, chunks: AsyncIterator[bytes]
    ) -> tuple[int, bytes]:
        """Answer ``PUT /flash/v1/uploads/<token>`` (see `uploads`)."""
        status, answer = await self.uploads.receive(token, length, chunks)
        return status, msgspec.json.encode(answer)

    # -- the store --------------------------------------------------------------------------

    def _store(
        self,
        *,
        apps: dict[str, AppRecord] | None = None,
        environments: dict[str, EnvironmentRecord] | None = None,
        builds: dict[str, BuildRecord] | None = None,
        endpoints: dict[str, EndpointRecord] | None = None,
    ) -> None:
        """Replace records and write the file; on a failed write nothing changes."""
        state = self.state
        previous = (state.apps, state.environments, state.builds, state.endpoints)
        state.endpoints = state.endpoints if endpoints is None else endpoints
        state.apps = state.apps if apps is None else apps
        state.environments = (
            state.environments if environments is None else environments
        )
        state.builds = state.builds if builds is None else builds
        try:
            state.save()
        except OSError as exc:
            state.apps, state.environments, state.builds, state.endpoints = previous
            msg = f"the control-plane state could not be written: {exc}"
            raise RequestError(msg) from exc

    def _app(self, app_id: Any, where: str) -> AppRecord:
        app = self.state.apps.get(_string(app_id, where))
        if app is None:
            raise RequestError(f'Flash app not found: no app with id "{app_id}"')
        return app

    def _env(self, env_id: Any, where: str) -> EnvironmentRecord:
        env = self.state.environments.get(_string(env_id, where))
        if env is None:
            msg = f'Flash environment not found: no environment with id "{env_id}"'
            raise RequestError(msg)
        return env

    def _build(self, build_id: Any, where: str) -> BuildRecord:
        build = self.state.builds.get(_string(build_id, where))
        if build is None:
            raise RequestError(f'Flash build not found: no build with id "{build_id}"')
        return build

    def _archive(self, build_id: str) -> Path:
        return self.state_dir / BUILDS / f"{build_id}.tar.gz"

    # -- views ------------------------------------------------------------------------------

    def _app_view(self, app: AppRecord) -> dict[str, Any]:
        return {
            "id": app.id,
            "name": app.name,
            "createdAt": app.createdAt,
            "flashEnvironments": [
                self._env_view(e) for e in self.state.environments_of(app.id)
            ],
            "flashBuilds": [self._build_view(b) for b in self.state.builds_of(app.id)],
        }

    def _env_view(self, env: EnvironmentRecord) -> dict[str, Any]:
        endpoints = [self._endpoint_view(e) for e in self._endpoints_of(env.id)]
        state = "PENDING" if env.activeBuildId is None else "DEPLOYED"
        build = self.state.builds.get(env.activeBuildId or "")
        return {
            "id": env.id,
            "name": env.name,
            "flashAppId": env.flashAppId,
            "state": state,
            "activeBuildId": env.activeBuildId,
            "createdAt": env.createdAt,
            "endpoints": endpoints,
            "networkVolumes": [],
            "activeArtifact": (
                {"objectKey": build.objectKey, "downloadUrl": None, "expiresAt": None}
                if build
                else None
            ),
        }

    @staticmethod
    def _build_view(build: BuildRecord) -> dict[str, Any]:
        return {
            "id": build.id,
            "flashAppId": build.flashAppId,
            "objectKey": build.objectKey,
            "createdAt": build.createdAt,
            "manifest": build.manifest,
            "tarballSize": build.size,
        }

    # -- queries ----------------------------------------------------------------------------

    def _myself(self, parent: Any, args: dict[str, Any]) -> dict[str, Any]:
        view = super()._myself(parent, args)
        view["flashApps"] = [self._app_view(a) for a in self.state.apps.values()]
        return view

    def _flash_app(self, parent: Any, args: dict[str, Any]) -> dict[str, Any]:
        return self._app_view(self._app(args.get("flashAppId"), "flashApp(flashAppId)"))

    def _flash_app_by_name(self, parent: Any, args: dict[str, Any]) -> dict[str, Any]:
        name = _string(args.get("flashAppName"), "flashAppByName(flashAppName)")
        app = self.state.app_named(name)
        if app is None:
            raise RequestError(f'Flash app not found: no app named "{name}"')
        return self._app_view(app)

    def _flash_env(self, parent: Any, args: dict[str, Any]) -> dict[str, Any]:
        where = "flashEnvironment(flashEnvironmentId)"
        return self._env_view(self._env(args.get("flashEnvironmentId"), where))

    def _flash_env_by_name(self, parent: Any, args: dict[str, Any]) -> dict[str, Any]:
        data = _ENV_BY_NAME(args.get("input"), "flashEnvironmentByName(input)")
        app = self._app(data["flashAppId"], "flashEnvironmentByName(input).flashAppId")
        for env in self.state.environments_of(app.id):
            if env.name == data["name"]:
                return self._env_view(env)
        msg = (
            f'Flash environment not found: app "{app.name}" has no environment named '
            f'"{data["name"]}"'
        )
        raise RequestError(msg)

    def _flash_build(self, parent: Any, args: dict[str, Any]) -> dict[str, Any]:
        return self._build_view(
            self._build(args.get("flashBuildId"), "flashBuild(flashBuildId)")
        )

    # -- mutations --------------------------------------------------------------------------

    async def _create_app(self, parent: Any, args: dict[str, Any]) -> dict[str, Any]:
        data = _CREATE_APP(args.get("input"), "createFlashApp(input)")
        name = _name(data["name"], "createFlashApp(input).name")
        if self.state.app_named(name) is not None:
            raise RequestError(f'Flash app with name "{name}" already exists')
        app = AppRecord(id=new_uuid(), name=name, createdAt=_now())
        self._store(apps={**self.state.apps, app.id: app})
        log.info("controlplane.app_created", app=app.id, name=name)
        return self._app_view(app)

    async def _create_env(self, parent: Any, args: dict[str, Any]) -> dict[str, Any]:
        data = _CREATE_ENV(args.get("input"), "createFlashEnvironment(input)")
        app = self._app(data["flashAppId"], "createFlashEnvironment(input).flashAppId")
        name = _name(data["name"], "createFlashEnvironment(input).name")
        if any(e.name == name for e in self.state.environments_of(app.id)):
            msg = f'Flash environment "{name}" already exists in app "{app.name}"'
            raise RequestError(msg)
        env = EnvironmentRecord(
            id=new_uuid(), name=name, flashAppId=app.id, createdAt=_now()
        )
        self._store(environments={**self.state.environments, env.id: env})
        log.info("controlplane.environment_created", environment=env.id, name=name)
        return self._env_view(env)

    async def _prepare_upload(
        self, parent: Any, args: dict[str, Any]
    ) -> dict[str, Any]:
        data = _PREPARE(args.get("input"), "prepareFlashArtifactUpload(input)")
        app = self._app(
            data["flashAppId"], "prepareFlashArtifactUpload(input).flashAppId"
        )
        size = data["tarballSize"]
        if not 0 < size <= self.uploads.limit:
            msg = (
                f"prepareFlashArtifactUpload: tarballSize {size} is out of range; an "
                f"archive holds 1 to {self.uploads.limit} bytes ({MAX_ARCHIVE // 2**20} MiB)"
            )
            raise RequestError(msg)
        if not self.base_url:  # pragma: no cover - set before the daemon listens
            raise RequestError(
                "prepareFlashArtifactUpload: the daemon is not listening"
            )
        key = f"flash/{app.id}/{new_uuid()}.tar.gz"
        pending = await anyio.to_thread.run_sync(
            self.uploads.prepare, app.id, size, key
        )
        return {
            "uploadUrl": f"{self.base_url}/flash/v1/uploads/{pending.token}",
            "objectKey": key,
            "expiresAt": pending.expires_at,
        }

    async def _finalize_upload(
        self, parent: Any, args: dict[str, Any]
    ) -> dict[str, Any]:
        data = _FINALIZE(args.get("input"), "finalizeFlashArtifactUpload(input)")
        app = self._app(
            data["flashAppId"], "finalizeFlashArtifactUpload(input).flashAppId"
        )
        pending = self.uploads.arrived(data["objectKey"])
        if pending is None or pending.app_id != app.id:
            msg = (
                f"finalizeFlashArtifactUpload: no archive arrived for objectKey "
                f'"{data["objectKey"]}" of app "{app.name}"; PUT it to the uploadUrl of '
                "prepareFlashArtifactUpload first"
            )
            raise RequestError(msg)
        build = BuildRecord(
            id=new_uuid(),
            flashAppId=app.id,
            objectKey=pending.object_key,
            createdAt=_now(),
            size=pending.size,
            sha256=pending.sha256,
            manifest=data.get("manifest"),
        )
        archive = self._archive(build.id)
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(private_dir, archive.parent)
            pending.path.replace(archive)  # the file first: a record names whole files
            try:
                self._store(builds={**self.state.builds, build.id: build})
            except RequestError:
                archive.unlink(missing_ok=True)
                raise
            self.uploads.done(pending)
        log.info(
            "controlplane.build_created", build=build.id, app=app.id, size=build.size
        )
        return self._build_view(build)

    async def _update_manifest(
        self, parent: Any, args: dict[str, Any]
    ) -> dict[str, Any]:
        data = _UPDATE_MANIFEST(args.get("input"), "updateFlashBuildManifest(input)")
        build = self._build(data["flashBuildId"], "updateFlashBuildManifest(input)")
        build = msgspec.structs.replace(build, manifest=data["manifest"])
        self._store(builds={**self.state.builds, build.id: build})
        return self._build_view(build)

    async def _unpack(self, env: EnvironmentRecord, build: BuildRecord) -> None:
        """Unpack a build for ``env`` (unless it is).

        Raises:
            RequestError: the archive cannot be unpacked.
        """
        folder = deployments.deployment_dir(self.state_dir, env.id, build.id)
        try:
            await anyio.to_thread.run_sync(
                deployments.unpack, self._archive(build.id), folder
            )
        except Exception as exc:
            msg = f"the archive of build {build.id} cannot be unpacked: {exc}"
            raise RequestError(msg) from exc

    async def _deploy(self, parent: Any, args: dict[str, Any]) -> dict[str, Any]:
        data = _DEPLOY(args.get("input"), "deployBuildToEnvironment(input)")
        env = self._env(data["flashEnvironmentId"], "deployBuildToEnvironment(input)")
        build = self._build(data["flashBuildId"], "deployBuildToEnvironment(input)")
        if build.flashAppId != env.flashAppId:
            msg = (
                f"deployBuildToEnvironment: build {build.id} belongs to another app than "
                f"environment {env.name!r}"
            )
            raise RequestError(msg)
        with anyio.CancelScope(shield=True):
            # the folder first: a record names whole files
            await self._unpack(env, build)
            env = msgspec.structs.replace(env, activeBuildId=build.id)
            self._store(environments={**self.state.environments, env.id: env})
            await anyio.to_thread.run_sync(
                deployments.prune, self.state_dir, env.id, self._kept(env.id)
            )
        log.info("controlplane.build_deployed", environment=env.id, build=build.id)
        return self._env_view(env)

    async def _drop_envs(
        self, envs: list[EnvironmentRecord], **also: dict[str, Any]
    ) -> None:
        """Remove environments and their endpoints (workers stopped, queued jobs ended)."""
        gone = {e.id for e in envs}
        dropped = [
            e for e in self.state.endpoints.values() if e.flashEnvironmentId in gone
        ]
        with anyio.CancelScope(shield=True):
            for endpoint in dropped:
                try:
                    await self._apply(endpoint.id, None)
                except Exception as exc:  # noqa: BLE001 (the others still go)
                    log.error(
                        "controlplane.endpoint_not_removed",
                        endpoint=endpoint.id,
                        error=getattr(exc, "message", str(exc)),
                    )
            self._store(
                environments={
                    k: v for k, v in self.state.environments.items() if k not in gone
                },
                endpoints={
                    k: v
                    for k, v in self.state.endpoints.items()
                    if v.flashEnvironmentId not in gone
                },
                **also,
            )
            for env in envs:
                await anyio.to_thread.run_sync(
                    deployments.prune, self.state_dir, env.id, None
                )

    async def _delete_env(self, parent: Any, args: dict[str, Any]) -> bool:
        env = self._env(args.get("flashEnvironmentId"), "deleteFlashEnvironment")
        await self._drop_envs([env])
        log.info("controlplane.environment_deleted", environment=env.id, name=env.name)
        return True

    async def _delete_app(self, parent: Any, args: dict[str, Any]) -> bool:
        app = self._app(args.get("flashAppId"), "deleteFlashApp(flashAppId)")
        builds = self.state.builds_of(app.id)
        gone = {b.id for b in builds}
        await self._drop_envs(
            self.state.environments_of(app.id),
            apps={k: v for k, v in self.state.apps.items() if k != app.id},
            builds={k: v for k, v in self.state.builds.items() if k not in gone},
        )
        for build in builds:
            self._archive(build.id).unlink(missing_ok=True)
        log.info("controlplane.app_deleted", app=app.id, name=app.name)
        return True
