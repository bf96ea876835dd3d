"""`flash build`'s pipeline: scan, manifest, handlers, dependencies and the archive.

`build_project` reads a project without running it and produces ``.flash/artifact.tar.gz``:

1. scan the sources for ``@remote`` (`flash_actors.build.scanner`) and write
   ``.flash/flash_manifest.json`` (`flash_actors.build.manifest`);
2. in the build folder ``.flash/.build/`` (emptied first): install the dependencies as
   manylinux x86_64 wheels for the target Python (`flash_actors.build.dependencies`), copy the
   flash-actors runtime, the project's files (Python and data: the scan's ignore rules,
   ``.gitignore`` and ``.flashignore``, apply exactly as they do to the scan) and the manifest, and generate the
   handlers (`flash_actors.build.handlers`);
3. pack the folder into the archive (`flash_actors.build.archive`: reproducible, atomic, under
   RunPod's 500 MB limit).

The build folder is removed afterwards, whether the build succeeded or not, unless
``keep_build`` is set. Every failure is a `BuildError` with one line that says what to do.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from flash_actors.build._lock import project_lock
from flash_actors.build.archive import (
    ARCHIVE_PATH,
    MAX_ARCHIVE_BYTES,
    ArchiveInfo,
    write_archive,
)
from flash_actors.build.dependencies import (
    copy_runtime,
    install_dependencies,
    plan_dependencies,
)
from flash_actors.build.handlers import write_handlers
from flash_actors.build.imports import check_imports
from flash_actors.build.manifest import (
    MANIFEST_PATH,
    Manifest,
    build_manifest,
    encode_manifest,
)
from flash_actors.build.scanner import project_files, scan_project
from flash_actors.errors import BuildError

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "BUILD_DIR",
    "MANIFEST_NAME",
    "SUPPORTED_PYTHONS",
    "BuildOptions",
    "BuildResult",
    "build_project",
    "target_python_version",
]

#: The build folder, relative to the project.
BUILD_DIR = Path(".flash") / ".build"
#: The manifest's name inside the build folder (and so at the archive's root).
MANIFEST_NAME = "flash_manifest.json"
#: The Python versions a build can target (those flash-actors runs on).
SUPPORTED_PYTHONS = ("3.11", "3.12", "3.13", "3.14")


class BuildOptions(msgspec.Struct, kw_only=True, frozen=True):
    """How to build: `flash build`'s options."""

    #: the archive (default ``<project>/.flash/artifact.tar.gz``)
    output: Path | None = None
    #: keep ``.flash/.build/`` afterwards
    keep_build: bool = False
    #: packages a base image has, left out of the archive (see `plan_dependencies`)
    exclude: tuple[str, ...] = ()
    #: the target's ``3.X`` (default: the running interpreter's)
    python_version: str | None = None
    #: the archive's size limit in bytes, compressed
    max_archive_bytes: int = MAX_ARCHIVE_BYTES


class BuildResult(msgspec.Struct, kw_only=True, frozen=True):
    """What `build_project` built."""

    manifest: Manifest
    manifest_path: Path
    archive: ArchiveInfo
    python_version: str
    #: the project's files copied into the build, relative POSIX paths
    sources: list[str]
    #: generated handler files, relative to the build folder
    handlers: list[str]
    #: ``name==version`` of every installed package
    installed: list[str]
    #: package name -> why it was left out
    excluded: dict[str, str]
    #: the kept build folder, or ``None`` when it was removed
    build_dir: Path | None


def target_python_version(requested: str | None) -> str:
    """The target's ``3.X``: ``requested``, else the running interpreter's.

    Raises:
        BuildError: not one of `SUPPORTED_PYTHONS`.
    """
    version = requested or f"{sys.version_info.major}.{sys.version_info.minor}"
    if version not in SUPPORTED_PYTHONS:
        msg = (
            f"Python {version} is not a build target: choose --python-version from "
            f"{', '.join(SUPPORTED_PYTHONS)}"
        )
        raise BuildError(msg)
    return version


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        msg = f"cannot write {path}: {exc.strerror or exc}: check the folder's permissions"
        raise BuildError(msg) from exc


def _fresh_dir(path: Path) -> None:
    """Empty ``path`` (a folder of ours), refusing a link that could point anywhere."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        msg = f"{path} is not a folder (a link or a file): remove it and build again"
        raise BuildError(msg)
    try:
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
    except OSError as exc:
        msg = f"cannot prepare the build folder {path}: {exc.strerror or exc}: remove it and build again"
        raise BuildError(msg) from exc


def _copy_sources(root: Path, files: list[str], build_dir: Path) -> None:
    """Copy the project's files into the build, refusing a module a package already has."""
    taken = {
        entry.name.split(".", 1)[0]
        for entry in build_dir.iterdir()
        if not entry.name.endswith((".dist-info", ".data"))
    }
    for rel in files:
        dest = build_dir / rel
        module = rel.split("/", 1)[0].removesuffix(".py")
        if module in taken or dest.exists():
            msg = (
                f"{rel}: the project's module {module!r} has the name of an installed "
                "package or of flash-actors' runtime, and would hide it on a worker (or be "
                "hidden): rename the module"
            )
            raise BuildError(msg)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / rel, dest)
        except OSError as exc:
            msg = f"{rel}: cannot copy into the build: {exc.strerror or exc}"
            raise BuildError(msg) from exc


def build_project(
    project_dir: Path | str,
    options: BuildOptions | None = None,
    progress: Callable[[str], None] | None = None,
) -> BuildResult:
    """Build ``project_dir`` into its deployment archive (see the module).

    ``progress`` receives one line per step (``"scanning ..."``); installing dependencies
    also shows `flash_actors._progress`'s live line or log lines.

    Raises:
        BuildError: any step failed, or another build of the project runs; the message
            says which and what to do.
    """
    root = Path(project_dir).resolve()
    with project_lock(root, "build"):
        return _build(root, options or BuildOptions(), progress or (lambda _line: None))


def _build(
    root: Path, options: BuildOptions, say: Callable[[str], None]
) -> BuildResult:
    python_version = target_python_version(options.python_version)
    output = (options.output or root / ARCHIVE_PATH).absolute()
    build_dir = root / BUILD_DIR
    if output == build_dir or build_dir in output.parents:
        msg = f"--output {output} is inside the build folder {build_dir}: write it elsewhere"
        raise BuildError(msg)

    say(f"scanning {root} for @remote functions")
    scan = scan_project(root)
    manifest = build_manifest(
        scan, python_version=python_version, project_name=root.name
    )
    manifest_bytes = encode_manifest(manifest)
    manifest_path = root / MANIFEST_PATH
    _write_atomic(manifest_path, manifest_bytes)

    plan = plan_dependencies(manifest, root, exclude=options.exclude)
    _fresh_dir(build_dir)
    try:
        installed = install_dependencies(plan, build_dir, python_version=python_version)
        copy_runtime(build_dir)
        shipped = project_files(root)
        _copy_sources(root, shipped, build_dir)
        check_imports(build_dir, shipped, base_image=plan.excluded)
        _write_atomic(build_dir / MANIFEST_NAME, manifest_bytes)
        handlers = write_handlers(manifest, build_dir)
        say(f"packing {output}")
        archive = write_archive(build_dir, output, max_bytes=options.max_archive_bytes)
    finally:
        if not options.keep_build:
            shutil.rmtree(build_dir, ignore_errors=True)
    return BuildResult(
        manifest=manifest,
        manifest_path=manifest_path,
        archive=archive,
        python_version=python_version,
        sources=shipped,
        handlers=sorted(path.as_posix() for path in handlers),
        installed=installed.installed,
        excluded=plan.excluded,
        build_dir=build_dir if options.keep_build else None,
    )
