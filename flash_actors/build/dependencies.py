"""A build's Python dependencies, installed for RunPod's workers (Linux x86_64) on any machine.

`plan_dependencies` gathers what a build installs: every resource's ``dependencies`` (from the
manifest), the project's ``requirements.txt`` and flash-actors' own runtime dependencies (read
from its package metadata, so that the generated handlers can import `flash_actors` on a
worker). `install_dependencies` hands them to uv in one resolution, into the build folder
(``--target``), as manylinux x86_64 binary wheels for the target Python, whatever the machine
the build runs on: ``--python-platform x86_64-manylinux_2_28`` (glibc 2.28, which RunPod's
Debian and Ubuntu images exceed) and ``--only-binary :all:``. A package with no such wheel fails
the build with a `BuildError` that names it. The console scripts uv writes (``bin/``) are
dropped: they name this machine's interpreter.

Excluded packages are left out of the resolution (uv's ``--excludes``): the package and
whatever only it pulls in are not installed (``--exclude torch`` drops torch's CUDA wheels
too); a package that something else also needs is still installed. Always excluded:
``flash-actors`` itself (the build copies the running copy instead, `copy_runtime`) and
``uv`` (a build tool, not needed on a worker). GPU resources' base image ships torch,
torchvision and torchaudio (`GPU_BASE_PACKAGES`), so they are excluded by default when the app
has a GPU resource, unless a CPU resource lists one in its own ``dependencies`` (a CPU worker's
slim image lacks them). A CPU resource that needs torch only through another package must list
torch itself.
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from flash_actors._logging import get_logger
from flash_actors._progress import Progress
from flash_actors.errors import BuildError, ConfigurationError
from flash_actors.worker.installer import (
    _Output,
    _run,
    _uv_binary,
    check_requirement,
    uv_cache_dir,
)

if TYPE_CHECKING:
    from flash_actors.build.manifest import Manifest

__all__ = [
    "ALWAYS_EXCLUDED",
    "GPU_BASE_PACKAGES",
    "PYTHON_PLATFORM",
    "DependencyPlan",
    "InstallResult",
    "copy_runtime",
    "install_dependencies",
    "plan_dependencies",
    "runtime_requirements",
]

log = get_logger(__name__)

#: What a GPU worker's PyTorch base image already has (the seeds' "Managing bundle size").
GPU_BASE_PACKAGES = ("torch", "torchaudio", "torchvision")
#: Never installed into a build: ourselves (copied instead) and uv (a build tool).
ALWAYS_EXCLUDED = ("flash-actors", "uv")
#: uv's target platform: manylinux wheels for x86_64 up to glibc 2.28.
PYTHON_PLATFORM = "x86_64-manylinux_2_28"
_RUNTIME_DIST = "flash-actors"
_REQUIREMENTS_FILE = "requirements.txt"


class DependencyPlan(msgspec.Struct, kw_only=True, frozen=True):
    """What a build installs, and what it leaves to the base images."""

    #: canonical requirements from the resources' ``dependencies``, sorted, unique
    requirements: list[str]
    #: resource name -> its canonical requirements (for naming a failing package's owner)
    by_resource: dict[str, list[str]]
    #: the project's ``requirements.txt``, when it has one
    requirements_file: str | None
    #: flash-actors' runtime dependencies, from its metadata (``uv`` left out)
    runtime: list[str]
    #: canonical names left out of the resolution, and why each is
    excluded: dict[str, str]


class InstallResult(msgspec.Struct, kw_only=True, frozen=True):
    """What uv installed: ``name==version`` lines, sorted."""

    installed: list[str]
    python_version: str


def _name(spec: str) -> str:
    try:
        return str(canonicalize_name(Requirement(spec).name))
    except InvalidRequirement:
        return str(canonicalize_name(spec.strip()))


def runtime_requirements() -> list[str]:
    """flash-actors' own runtime requirements (no extras, no ``uv``), from its metadata.

    Raises:
        BuildError: flash-actors' metadata cannot be read (it is not installed as a package).
    """
    try:
        requires = importlib.metadata.requires(_RUNTIME_DIST) or []
    except importlib.metadata.PackageNotFoundError:
        msg = (
            f"cannot read {_RUNTIME_DIST}'s package metadata, so the build cannot know its "
            "runtime dependencies: install it as a package (pip install -e .) and run again"
        )
        raise BuildError(msg) from None
    kept: list[str] = []
    for text in requires:
        req = Requirement(text)
        if req.marker is not None and "extra" in str(req.marker):
            continue
        if canonicalize_name(req.name) in ALWAYS_EXCLUDED:
            continue
        kept.append(str(req))
    return sorted(kept)


def _is_cpu(manifest: Manifest, resource: str) -> bool:
    config = manifest.resources[resource]
    return config.resource_type.startswith("Cpu") or bool(
        config.config.get("instanceIds")
    )


def plan_dependencies(
    manifest: Manifest, project_dir: Path, *, exclude: list[str] | tuple[str, ...] = ()
) -> DependencyPlan:
    """What to install for ``manifest``'s resources (see the module for the exclusions).

    Raises:
        BuildError: a resource's dependency or an ``--exclude`` entry is not a package
            requirement (the message names it and its resource).
    """
    by_resource: dict[str, list[str]] = {}
    for name, resource in manifest.resources.items():
        specs: set[str] = set()
        for fn in resource.functions:
            for dep in fn.dependencies or []:
                try:
                    specs.add(check_requirement(dep))
                except ConfigurationError as exc:
                    msg = f"{fn.module}:{fn.qualname} on {name!r}: {exc}"
                    raise BuildError(msg) from None
        if specs:
            by_resource[name] = sorted(specs)
    excluded: dict[str, str] = {}
    for entry in exclude:
        if not entry.strip():
            continue
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", entry.strip()):
            msg = (
                f"--exclude {entry!r} is not a package name: give names separated by "
                "commas (e.g. --exclude torch,torchvision)"
            )
            raise BuildError(msg)
        excluded[str(canonicalize_name(entry.strip()))] = "--exclude"
    has_gpu = any(not _is_cpu(manifest, name) for name in manifest.resources)
    if has_gpu:
        cpu_needs = {
            _name(spec)
            for name, specs in by_resource.items()
            if _is_cpu(manifest, name)
            for spec in specs
        }
        for package in GPU_BASE_PACKAGES:
            if package not in cpu_needs:
                excluded.setdefault(package, "in the GPU base image")
    requirements_file = project_dir / _REQUIREMENTS_FILE
    return DependencyPlan(
        requirements=sorted({spec for specs in by_resource.values() for spec in specs}),
        by_resource=by_resource,
        requirements_file=str(requirements_file)
        if requirements_file.is_file()
        else None,
        runtime=runtime_requirements(),
        excluded=dict(sorted(excluded.items())),
    )


# ------------------------------------------------------------------------------ install

_NO_WHEEL = (
    re.compile(r"Wheels are required for `([^`]+)`"),
    re.compile(r"Because (?:all versions of |only )?([A-Za-z0-9._-]+)\S* has no (?:usable )?wheels"),
    re.compile(r"([A-Za-z0-9._-]+)(?:==\S+)? has no wheels with a matching"),
    re.compile(r"([A-Za-z0-9._-]+)(?:==\S+)? has no usable wheels"),
)  # fmt: skip
_NOT_FOUND = re.compile(
    r"Because ([A-Za-z0-9._-]+) was not found in the package registry"
)
_INSTALLED = re.compile(r"^ \+ (\S+)==(\S+)")
_TOO_OLD = (
    "unexpected argument '--excludes'",
    "unexpected argument '--python-platform'",
)


def _uv() -> str:
    binary, why_not = _uv_binary()
    if binary is None:
        msg = (
            f"installing dependencies for Linux x86_64 needs uv, but {why_not}: "
            "install uv (pip install uv) and build again"
        )
        raise BuildError(msg)
    return binary


def _owners(plan: DependencyPlan, package: str) -> str:
    owners = [
        name
        for name, specs in plan.by_resource.items()
        if any(_name(spec) == package for spec in specs)
    ]
    if owners:
        return f" (a dependency of {', '.join(repr(o) for o in owners)})"
    if package in {_name(spec) for spec in plan.runtime}:
        return " (a dependency of flash-actors)"
    return ""


def _failure(
    plan: DependencyPlan, lines: list[str], python_version: str, code: int
) -> str:
    text = " ".join(
        " ".join(lines).split()
    )  # uv wraps its messages at the terminal's width
    for pattern in _NO_WHEEL:
        if match := pattern.search(text):
            package = str(canonicalize_name(match[1]))
            return (
                f"{package}{_owners(plan, package)} has no manylinux x86_64 wheel for "
                f"Python {python_version} (only a source distribution, or wheels for "
                "other platforms or Pythons): pick a version with a manylinux wheel or "
                "remove it"
            )
    if match := _NOT_FOUND.search(text):
        package = str(canonicalize_name(match[1]))
        return (
            f"{package}{_owners(plan, package)} is not on the package index: check the "
            "name, or remove it"
        )
    if any(marker in text for marker in _TOO_OLD):
        return (
            "this uv is too old to install for another platform with exclusions: "
            "upgrade it (pip install -U uv) and build again"
        )
    if "cause: " in text:  # the resolver's explanation, without its hints
        reason = text.split("cause: ", 1)[1].split(" hint: ", 1)[0]
    else:
        kept = [line.strip() for line in lines if line.strip()]
        reason = next(
            (line for line in kept if line.startswith("error:")),
            kept[-1] if kept else "no output",
        )
    return (
        f"installing dependencies failed (uv exited with {code}): {reason.rstrip('.')}: fix the "
        "requirement it names (-v shows uv's output)"
    )


def install_dependencies(
    plan: DependencyPlan, target: Path, *, python_version: str
) -> InstallResult:
    """Install ``plan`` into ``target`` as manylinux x86_64 wheels for ``python_version``.

    Progress shows while uv runs (`flash_actors._progress`: a live line on a terminal, log
    lines otherwise). uv's download cache is the runtime's (`uv_cache_dir`), so a rebuild
    downloads nothing new; files are copied into the build, never hard-linked.

    Raises:
        BuildError: uv is missing, or it could not install; the message's first line names
            the package without a wheel, or the package that does not exist, and what to do;
            uv's output follows on the next lines.
    """
    binary = _uv()
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="flash-build-") as scratch:
        excludes = Path(scratch) / "excludes.txt"
        excludes.write_text(
            "".join(f"{name}\n" for name in sorted({*plan.excluded, *ALWAYS_EXCLUDED})),
            encoding="utf-8",
        )
        output = _install(binary, plan, target, excludes, python_version)
    (target / ".lock").unlink(missing_ok=True)  # uv's lock on the target, not a package
    # console scripts name this machine's interpreter: of no use on a worker, and they
    # would make the archive differ between machines
    shutil.rmtree(target / "bin", ignore_errors=True)
    installed = sorted(
        f"{match[1]}=={match[2]}"
        for line in output.lines
        if (match := _INSTALLED.match(line))
    )
    log.info("build.deps.installed", count=len(installed))
    return InstallResult(installed=installed, python_version=python_version)


def _install(
    binary: str,
    plan: DependencyPlan,
    target: Path,
    excludes: Path,
    python_version: str,
) -> _Output:
    command = [
        binary, "pip", "install",
        "--target", str(target),
        "--python", sys.executable,
        "--python-platform", PYTHON_PLATFORM,
        "--python-version", python_version,
        "--only-binary", ":all:",
        "--excludes", str(excludes),
        "--cache-dir", str(uv_cache_dir()),
        "--link-mode", "copy",
        "--no-progress",
        "--color", "never",
        *plan.runtime,
        *plan.requirements,
    ]  # fmt: skip
    if plan.requirements_file is not None:
        command += ["-r", plan.requirements_file]
    log.info(
        "build.deps.install",
        packages=plan.requirements,
        requirements_file=plan.requirements_file,
        excluded=sorted(plan.excluded),
        python=python_version,
    )
    shown = Progress(
        f"installing dependencies for Linux x86_64, Python {python_version}",
        installer="uv",
    )
    with shown:
        output = _Output("uv", shown)
        code = _run(command, output)
        if code != 0:
            reason = _failure(plan, output.lines, python_version, code)
            log.warning("build.deps.failed", reason=reason)
            tail = "\n".join(line for line in output.lines[-30:] if line.strip())
            raise BuildError(f"{reason}\nuv's output:\n{tail}")
    return output


def copy_runtime(target: Path) -> list[str]:
    """Copy the running `flash_actors` package (pure Python) into ``target``.

    Returns the top-level names it wrote (``["flash_actors"]``).

    Raises:
        BuildError: ``target`` already has a ``flash_actors`` (the project has one).
    """
    import flash_actors

    source = Path(flash_actors.__file__).parent
    dest = target / "flash_actors"
    if dest.exists():
        msg = (
            f"the project has its own {dest.name!r} module, which would hide the "
            "flash-actors runtime on a worker: rename it"
        )
        raise BuildError(msg)
    shutil.copytree(
        source, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo")
    )
    return ["flash_actors"]
