"""Real dependency installs: one cached virtual environment per dependency set.

``@remote(dependencies=[...])`` is honoured for real: each entry must be a requirement (a
package name with optional extras, version specifiers and environment marker, PEP 508 without
URLs); `check_requirements` refuses anything else (paths, URLs, ``pkg @ url``, pip options)
with `ConfigurationError` naming the entry, at decoration time and again here, since requests
come from outside. pip gets the canonical text of each parsed requirement, never the text as
sent. The set is normalised (canonical, sorted, de-duplicated) and hashed; the environment for that hash lives under the
cache directory (``FLASH_CACHE_DIR``, default ``~/.cache/flash-actors/envs``) and is reused by
every endpoint and every run. It is a ``venv`` whose ``site-packages`` the worker puts first on
its path for jobs that need it; the packages are installed with pip, binary wheels only. A
file lock makes concurrent first calls (threads, tasks, processes) install once; an environment
is used only once its ``.complete`` marker exists, so an interrupted install is redone, never
half-used. A failed install raises `DependencyInstallError` naming the packages and pip's
reason.

``system_dependencies`` are Debian package names (``name``, ``name:arch``, ``name=version``;
`check_system_packages`) and go through ``apt-get`` when this process may use it (root,
apt-get present), after ``--``; otherwise the call fails with an error naming the packages.

Who calls these checks the request's signature first: the dependency lists are signed with the
code (`flash_actors.serialization`).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib
import os
import re
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import anyio
import anyio.lowlevel
import anyio.to_thread
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from flash_actors._logging import get_logger
from flash_actors._progress import progress
from flash_actors.errors import ConfigurationError, DependencyInstallError

__all__ = [
    "activate",
    "apt_install_command",
    "cache_root",
    "check_requirement",
    "check_requirements",
    "check_system_package",
    "check_system_packages",
    "dependency_key",
    "ensure_environment",
    "ensure_system_packages",
    "site_packages",
]

log = get_logger(__name__)

# In-process locks, per event loop (an anyio.Lock belongs to the loop that made it).
_locks: weakref.WeakKeyDictionary[object, dict[str, anyio.Lock]] = (
    weakref.WeakKeyDictionary()
)


def cache_root() -> Path:
    """Where environments are cached (``FLASH_CACHE_DIR`` or ``~/.cache/flash-actors/envs``)."""
    env = os.environ.get("FLASH_CACHE_DIR")
    if env:
        return Path(env)
    return (
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        / "flash-actors"
        / "envs"
    )


_MAX_SPEC = 500
_ARCHIVES = (".whl", ".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz", ".tar.xz",
             ".txz", ".tlz", ".tar.lz", ".tar.lzma")  # fmt: skip
"""What pip takes for a package file when a requirement ends with it (its archive types)."""
_PRINTABLE = re.compile(r"[ -~]+")
"""Printable ASCII: no tabs, newlines, NULs or look-alike letters in a spec."""


def check_requirement(spec: object) -> str:
    """The canonical text of one pip requirement, or `ConfigurationError` naming ``spec``.

    Accepted: a package name with optional extras, version specifiers and an environment
    marker (``"numpy"``, ``"Pillow[avif]>=10,<12"``, ``"uvloop; sys_platform != 'win32'"``).
    Markers only select a requirement for this interpreter and platform; they fetch and
    run nothing. Refused: anything pip would read as a path, a URL or an option (``./dir``,
    ``/abs/path``, ``file:...``, ``git+https://...``, ``pkg @ url``, ``-e``,
    ``--index-url ...``), and specs with characters outside printable ASCII.

    Also refused: ``===`` (arbitrary strings) and versions ending in an archive's
    extension (``==1.0+a.whl``), which pip would take for a file name. The canonical text
    handed to pip (normalised name and extras, sorted specifiers, then the marker) has no
    dots in the name, and no ``/``, ``:`` or ``@`` before the marker.
    """
    if not isinstance(spec, str):
        msg = f"dependency {spec!r} is not a string"
        raise ConfigurationError(msg)
    return _canonical_requirement(spec)


@functools.lru_cache(maxsize=1024)  # a worker checks the same few specs on every call
def _canonical_requirement(spec: str) -> str:
    if not spec.strip() or len(spec) > _MAX_SPEC or not _PRINTABLE.fullmatch(spec):
        msg = (
            f"dependency {spec!r} is not a requirement: use a package name with optional "
            "extras and version specifiers, in printable ASCII, under "
            f"{_MAX_SPEC} characters (e.g. 'numpy>=1.26')"
        )
        raise ConfigurationError(msg)
    try:
        req = Requirement(spec)
    except InvalidRequirement as exc:
        reason = str(exc).splitlines()[0]
        msg = (
            f"dependency {spec!r} is not a requirement ({reason}): use a package name with "
            "optional extras and version specifiers (e.g. 'numpy>=1.26'); paths, URLs and "
            "pip options are refused"
        )
        raise ConfigurationError(msg) from None
    if req.url is not None:
        msg = (
            f"dependency {spec!r} is a direct reference (name @ URL), which is refused: "
            "name the package and a version (e.g. 'numpy==1.26.4') instead"
        )
        raise ConfigurationError(msg)
    for specifier in req.specifier:
        if specifier.operator == "===" or specifier.version.lower().endswith(_ARCHIVES):
            # pip reads "x==1.0+a.whl" as a file name; "===" takes any string (PEP 440)
            msg = (
                f"dependency {spec!r} has the version {specifier}, which pip could read as "
                "a file name: use a plain version (e.g. 'numpy==1.26.4'); '===' is refused"
            )
            raise ConfigurationError(msg)
    text = str(canonicalize_name(req.name))
    if req.extras:
        text += "[" + ",".join(sorted(canonicalize_name(e) for e in req.extras)) + "]"
    text += str(req.specifier)
    if req.marker is not None:
        text += f"; {req.marker}"
    return text


def check_requirements(dependencies: list[str]) -> list[str]:
    """The canonical texts of a dependency list (see `check_requirement`).

    Raises:
        ConfigurationError: an entry is not a requirement; the message names it.
    """
    return [check_requirement(dep) for dep in dependencies]


_DEB_NAME = re.compile(
    r"(?P<name>[a-z0-9][a-z0-9+.-]+)"  # Debian policy 5.6.1
    r"(?::(?P<arch>[a-z0-9][a-z0-9-]*))?"
    r"(?:=(?P<version>(?:[0-9]+:)?[0-9][A-Za-z0-9.+~-]*))?"  # policy 5.6.12
)
_DEB_FILES = (".deb", ".udeb", ".ddeb", ".dsc", ".changes")


def check_system_package(package: object) -> str:
    """One apt package, checked: ``name``, ``name:arch``, ``name=version``.

    Names follow Debian policy (lowercase letters, digits, ``+ - .``, at least two
    characters, starting with a letter or digit). Refused besides: a name ending in ``-``
    (apt reads ``pkg-`` as "remove pkg") or in a package file's extension (apt installs
    ``x.deb`` from a file), releases (``pkg/stable``), globs and options.

    Raises:
        ConfigurationError: ``package`` is not such a name; the message names it.
    """
    if not isinstance(package, str):
        msg = f"system dependency {package!r} is not a string"
        raise ConfigurationError(msg)
    match = _DEB_NAME.fullmatch(package) if len(package) <= 200 else None
    name = match.group("name") if match else ""
    if match is None or name.endswith("-") or name.endswith(_DEB_FILES):
        msg = (
            f"system dependency {package!r} is not a Debian package name: use lowercase "
            "letters, digits and + - . (e.g. 'ffmpeg', 'libgl1', 'curl=7.88.1-10'); "
            "paths, options and patterns are refused"
        )
        raise ConfigurationError(msg)
    return package


def check_system_packages(packages: list[str]) -> list[str]:
    """Every entry checked by `check_system_package`.

    Raises:
        ConfigurationError: an entry is not a Debian package name; the message names it.
    """
    return [check_system_package(package) for package in packages]


def normalise(dependencies: list[str]) -> list[str]:
    """The canonical form of a dependency list: checked, canonical, sorted, unique.

    Raises:
        ConfigurationError: an entry is not a requirement (see `check_requirement`).
    """
    return sorted(set(check_requirements(dependencies)))


def dependency_key(dependencies: list[str]) -> str:
    """The cache key of a dependency set (Python version included)."""
    text = "\n".join(
        [
            f"python{sys.version_info.major}.{sys.version_info.minor}",
            *normalise(dependencies),
        ]
    )
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def site_packages(env_dir: Path) -> Path:
    """The ``site-packages`` directory of an environment made by this module."""
    return (
        env_dir
        / "lib"
        / f"python{sys.version_info.major}.{sys.version_info.minor}"
        / "site-packages"
    )


def _pip_tail(output: str, lines: int = 12) -> str:
    kept = [line for line in output.strip().splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


def _install_locked(env_dir: Path, dependencies: list[str]) -> None:
    """Create the environment and install into it, under an inter-process file lock."""
    env_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_path = env_dir.with_suffix(".lock")
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if (env_dir / ".complete").exists():
                return
            if env_dir.exists():  # an interrupted install: start again
                shutil.rmtree(env_dir)
            subprocess.run(  # noqa: S603 (our own interpreter, fixed arguments)
                [sys.executable, "-m", "venv", "--without-pip", str(env_dir)],
                check=True,
                capture_output=True,
            )
            command = [
                sys.executable, "-m", "pip", "--python", str(env_dir / "bin" / "python"),
                "install", "--only-binary=:all:", "--disable-pip-version-check",
                "--no-input", *dependencies,
            ]  # fmt: skip
            proc = subprocess.run(command, capture_output=True, text=True, check=False)  # noqa: S603
            if proc.returncode != 0:
                shutil.rmtree(env_dir, ignore_errors=True)
                reason = _pip_tail(proc.stderr or proc.stdout)
                msg = (
                    f"could not install dependencies {', '.join(dependencies)} "
                    f"(pip exited with {proc.returncode}):\n{reason}"
                )
                raise DependencyInstallError(msg)
            (env_dir / ".complete").write_text("\n".join(dependencies) + "\n")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


async def ensure_environment(
    dependencies: list[str], *, endpoint: str = ""
) -> Path | None:
    """The environment for ``dependencies``, installed on first use; ``None`` for none.

    The caller has checked the request's signature; the specs are checked here again.

    Raises:
        ConfigurationError: an entry is not a requirement (nothing was installed).
        DependencyInstallError: pip could not install them (the message names the packages
            and gives pip's reason).
    """
    deps = normalise(dependencies)
    if not deps:
        return None
    key = dependency_key(deps)
    env_dir = cache_root() / key
    if (env_dir / ".complete").exists():
        return env_dir
    lock = _locks.setdefault(anyio.lowlevel.current_token(), {}).setdefault(
        key, anyio.Lock()
    )
    async with lock:
        if (env_dir / ".complete").exists():
            return env_dir
        started = anyio.current_time()
        log.info("deps.install", endpoint=endpoint, packages=deps, env=str(env_dir))
        with progress(f"installing {', '.join(deps)} for {endpoint or 'an endpoint'}"):
            await anyio.to_thread.run_sync(
                _install_locked, env_dir, deps, abandon_on_cancel=False
            )
        log.info(
            "deps.installed",
            endpoint=endpoint,
            packages=deps,
            seconds=round(anyio.current_time() - started, 2),
        )
    return env_dir


def _missing_system_packages(packages: list[str]) -> list[str]:
    missing = []
    for package in packages:
        proc = subprocess.run(  # noqa: S603
            ["dpkg-query", "-W", "-f=${Status}", "--", package],  # noqa: S607
            capture_output=True,
            text=True,
            check=False,
        )
        if "install ok installed" not in proc.stdout:
            missing.append(package)
    return missing


def apt_install_command(packages: list[str]) -> list[str]:
    """The ``apt-get`` command line that installs ``packages`` (checked; ``--`` before them).

    Raises:
        ConfigurationError: an entry is not a Debian package name.
    """
    return [
        "apt-get", "install", "-y", "--no-install-recommends",
        "--", *check_system_packages(packages),
    ]  # fmt: skip


def _apt_install(packages: list[str]) -> None:
    packages = check_system_packages(packages)
    if shutil.which("dpkg-query") is None or shutil.which("apt-get") is None:
        msg = (
            f"system_dependencies {', '.join(packages)} need apt-get, which this machine "
            "does not have; install them yourself or run the endpoint elsewhere"
        )
        raise DependencyInstallError(msg)
    missing = _missing_system_packages(packages)
    if not missing:
        return
    if os.geteuid() != 0:
        msg = (
            f"system_dependencies {', '.join(missing)} are not installed and this process "
            "may not run apt-get (not root); install them with "
            f"`sudo apt-get install -y {' '.join(missing)}`"
        )
        raise DependencyInstallError(msg)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    proc = subprocess.run(  # noqa: S603
        apt_install_command(missing),
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    if proc.returncode != 0:
        msg = (
            f"apt-get could not install {', '.join(missing)} (exit {proc.returncode}):\n"
            f"{_pip_tail(proc.stderr or proc.stdout)}"
        )
        raise DependencyInstallError(msg)


async def ensure_system_packages(packages: list[str], *, endpoint: str = "") -> None:
    """Install missing apt packages, or raise `DependencyInstallError` saying why not.

    The caller has checked the request's signature; the names are checked here again.

    Raises:
        ConfigurationError: an entry is not a Debian package name (nothing was run).
        DependencyInstallError: the packages are missing and apt-get cannot install them.
    """
    if not packages:
        return
    packages = check_system_packages(packages)
    log.info("deps.system", endpoint=endpoint, packages=packages)
    with progress(f"checking system packages {', '.join(packages)}"):
        await anyio.to_thread.run_sync(
            _apt_install, list(packages), abandon_on_cancel=False
        )


_active: set[str] = set()


async def activate(dependencies: list[str]) -> None:
    """Make the environment of ``dependencies`` importable in this process (a worker).

    Installs it first if no one has yet (a request from a client that did not provision it).
    The caller has checked the request's signature; `ensure_environment` checks the specs.

    Raises:
        ConfigurationError: an entry is not a requirement (nothing was installed).
        DependencyInstallError: pip could not install them.
    """
    env_dir = await ensure_environment(dependencies)
    if env_dir is None or env_dir.name in _active:
        return
    path = str(site_packages(env_dir))
    if path not in sys.path:
        sys.path.insert(0, path)
    importlib.invalidate_caches()
    _active.add(env_dir.name)
