"""The control plane's records: endpoints, templates and Flash apps, kept in one private file.

``<state folder>/controlplane.json`` (0600, see `flash_actors._private`) holds every endpoint
and template saved through GraphQL, and every Flash app, environment and build. It is rewritten whole on each change, atomically (a
temporary file, fsync, rename), so a crash leaves the old or the new state and never half of
one; the daemon reads it back at start. Ids look like RunPod's: 14 lowercase letters and
digits for an endpoint, 10 for a template, random, and kept for the record's life; Flash
apps, environments and builds get UUIDs, as RunPod gives them. A build's archive lives in
``builds/<build id>.tar.gz`` beside the file (written before its record, see `ControlPlane`).
"""

from __future__ import annotations

import os
import secrets
import string
import uuid
from typing import TYPE_CHECKING, Any

import msgspec

from flash_actors._private import open_private
from flash_actors.errors import ConfigurationError

if TYPE_CHECKING:
    from pathlib import Path

__all__ = [
    "STATE_NAME",
    "AppRecord",
    "BuildRecord",
    "ControlPlaneState",
    "EndpointRecord",
    "EnvironmentRecord",
    "TemplateRecord",
    "new_id",
    "new_uuid",
]

STATE_NAME = "controlplane.json"
ENDPOINT_ID_LENGTH = 14
TEMPLATE_ID_LENGTH = 10
_ID_ALPHABET = string.ascii_lowercase + string.digits


def new_id(length: int, taken: Any = ()) -> str:
    """A random id of ``length`` lowercase letters and digits, not in ``taken``."""
    while True:
        candidate = "".join(secrets.choice(_ID_ALPHABET) for _ in range(length))
        if candidate not in taken:
            return candidate


def new_uuid() -> str:
    """A random UUID (RunPod's Flash ids look like this)."""
    return str(uuid.uuid4())


class TemplateRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A saved template (RunPod's ``PodTemplate``); ``env`` is ``[{"key", "value"}]``."""

    id: str
    name: str
    imageName: str = ""
    dockerArgs: str = ""
    containerDiskInGb: int = 10
    volumeInGb: int = 0
    volumeMountPath: str | None = None
    ports: str = ""
    env: list[dict[str, str]] = []
    isServerless: bool = True
    containerRegistryAuthId: str = ""
    readme: str = ""
    startScript: str = ""
    startSsh: bool = False
    isPublic: bool = False
    advancedStart: bool = False


class EndpointRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A saved endpoint (RunPod's ``EndpointInput`` as stored); ``id`` names it in the daemon."""

    id: str
    name: str
    templateId: str
    gpuIds: str = ""
    gpuCount: int = 1
    instanceIds: list[str] | None = None
    networkVolumeId: str | None = None
    networkVolumeIds: list[dict[str, str | None]] = []
    locations: str | None = None
    idleTimeout: int = 5
    scalerType: str = "QUEUE_DELAY"
    scalerValue: int = 4
    workersMin: int = 0
    workersMax: int = 3
    workersPFBTarget: int = 0
    allowedCudaVersions: str = ""
    minCudaVersion: str | None = None
    executionTimeoutMs: int = 0  # RunPod's default (600 s)
    type: str = "QB"
    flashBootType: str | None = None
    flashEnvironmentId: str | None = None
    createdAt: str = ""
    version: int = 0
    #: the build of its Flash environment it serves (the environment's active one when it
    #: was saved); not part of RunPod's input: the daemon sets it
    flashBuildId: str | None = None


class AppRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A Flash app: a name (unique) owning environments and builds."""

    id: str
    name: str
    createdAt: str


class BuildRecord(msgspec.Struct, frozen=True, kw_only=True):
    """An uploaded build: its archive (``builds/<id>.tar.gz``), size, digest and manifest."""

    id: str
    flashAppId: str
    objectKey: str
    createdAt: str
    size: int
    sha256: str
    manifest: Any = None


class EnvironmentRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A Flash environment of an app and its active build.

    Its resources run as the endpoints saved with its ``flashEnvironmentId`` (as on RunPod,
    the deploying client creates them: see ``controlplane.flash``).
    """

    id: str
    name: str
    flashAppId: str
    createdAt: str
    activeBuildId: str | None = None


class _File(msgspec.Struct, kw_only=True):
    endpoints: list[EndpointRecord] = []
    templates: list[TemplateRecord] = []
    apps: list[AppRecord] = []
    environments: list[EnvironmentRecord] = []
    builds: list[BuildRecord] = []


_decoder = msgspec.json.Decoder(_File)


class ControlPlaneState:
    """Endpoints and templates by id, read from ``state_dir`` and written back by `save`.

    Raises:
        ConfigurationError: at construction, when the file exists but cannot be read.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / STATE_NAME
        self.endpoints: dict[str, EndpointRecord] = {}
        self.templates: dict[str, TemplateRecord] = {}
        self.apps: dict[str, AppRecord] = {}
        self.environments: dict[str, EnvironmentRecord] = {}
        self.builds: dict[str, BuildRecord] = {}
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            msg = f"the control-plane state {str(self.path)!r} cannot be read: {exc}"
            raise ConfigurationError(msg) from exc
        try:
            loaded = _decoder.decode(data)
        except (msgspec.DecodeError, RecursionError) as exc:
            msg = (
                f"the control-plane state {str(self.path)!r} is not valid ({exc}); "
                "move it away to start with no endpoints or templates"
            )
            raise ConfigurationError(msg) from exc
        self.endpoints = {record.id: record for record in loaded.endpoints}
        self.templates = {record.id: record for record in loaded.templates}
        self.apps = {record.id: record for record in loaded.apps}
        self.environments = {record.id: record for record in loaded.environments}
        self.builds = {record.id: record for record in loaded.builds}

    def new_endpoint_id(self) -> str:
        """A fresh endpoint id (14 characters)."""
        return new_id(ENDPOINT_ID_LENGTH, self.endpoints)

    def new_template_id(self) -> str:
        """A fresh template id (10 characters)."""
        return new_id(TEMPLATE_ID_LENGTH, self.templates)

    def template_named(self, name: str) -> TemplateRecord | None:
        """The template of that name, if any (names are unique, as on RunPod)."""
        for template in self.templates.values():
            if template.name == name:
                return template
        return None

    def users_of(self, template_id: str) -> list[EndpointRecord]:
        """The endpoints that run a template."""
        return [e for e in self.endpoints.values() if e.templateId == template_id]

    def app_named(self, name: str) -> AppRecord | None:
        """The Flash app of that name, if any (names are unique)."""
        return next((a for a in self.apps.values() if a.name == name), None)

    def environments_of(self, app_id: str) -> list[EnvironmentRecord]:
        """An app's environments, oldest first."""
        return [e for e in self.environments.values() if e.flashAppId == app_id]

    def builds_of(self, app_id: str) -> list[BuildRecord]:
        """An app's builds, newest first (as RunPod lists them)."""
        found = [b for b in self.builds.values() if b.flashAppId == app_id]
        return sorted(found, key=lambda b: b.createdAt, reverse=True)

    def save(self) -> None:
        """Write the state atomically (temporary file, fsync, rename), mode 0600."""
        data = msgspec.json.encode(
            _File(
                endpoints=list(self.endpoints.values()),
                templates=list(self.templates.values()),
                apps=list(self.apps.values()),
                environments=list(self.environments.values()),
                builds=list(self.builds.values()),
            )
        )
        tmp = self.path.with_name(f".{STATE_NAME}.{os.getpid()}.tmp")
        fd = open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            tmp.replace(self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
