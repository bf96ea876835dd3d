"""Real dependency installs: one cached virtual environment per dependency set.

``@remote(dependencies=[...])`` is honoured for real: each entry must be a requirement (a
package name with optional extras, version specifiers and environment marker, PEP 508 without
URLs); `check_requirements` refuses anything else (paths, URLs, ``pkg @ url``, pip options)
with `ConfigurationError` naming the entry, at decoration time and again here, since requests
come from outside. The installer gets the canonical text of each parsed requirement, never the
text as sent. The set is normalised (canonical, sorted, de-duplicated) and hashed; the
environment for that hash lives in ``envs/`` under the cache root (``FLASH_CACHE_DIR``,
default ``~/.cache/flash-actors``) and is reused by every endpoint and every run. It is a
virtual environment whose ``site-packages`` the worker puts first on its path for jobs that
need it.

Installs use uv (``uv venv``, ``uv pip install``), binary wheels only, with uv's cache in
``uv/`` under the same root and ``--link-mode hardlink``: a package is downloaded and unpacked
once into that cache, and every environment that names it hard-links the same files (same
inode, no second copy on disk). Where hard links fail (another filesystem), uv copies, and
this process says so once (``deps.link_copy``). pip (``python -m pip``, binary wheels only) is
the fallback where uv cannot run (no ``uv`` binary for this platform, or ``FLASH_INSTALLER=pip``
forces it); ``deps.installer`` says which ran and why pip was chosen. pip shares nothing between
environments beyond its download cache.

A file lock makes concurrent first calls (threads, tasks, processes) install once; an
environment is used only once its ``.complete`` marker exists, so an interrupted install is
redone, never half-used. A failed install raises `DependencyInstallError` naming the packages
and the installer's reason. Progress (`flash_actors._progress`) shows the packages being
downloaded, their bytes where the installer announces them, and the elapsed time.

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
from typing import NamedTuple

import anyio
import anyio.lowlevel
import anyio.to_thread
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from flash_actors._logging import get_logger
from flash_actors._progress import Progress, format_bytes, progress
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
    "envs_root",
    "installer",
    "site_packages",
    "uv_cache_dir",
]

log = get_logger(__name__)

# In-process locks, per event loop (an anyio.Lock belongs to the loop that made it).
_locks: weakref.WeakKeyDictionary[object, dict[str, anyio.Lock]] = (
    weakref.WeakKeyDictionary()
)


def cache_root() -> Path:
    """The cache root (``FLASH_CACHE_DIR`` or ``~/.cache/flash-actors``).

    Environments live in ``envs/`` and uv's cache in ``uv/`` under it: one filesystem, so
    environments can hard-link the cache's files.
    """
    env = os.environ.get("FLASH_CACHE_DIR")
    if env:
        return Path(env)
    return (
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "flash-actors"
    )


def envs_root() -> Path:
    """Where the dependency environments are (``envs/`` under `cache_root`)."""
    return cache_root() / "envs"


def uv_cache_dir() -> Path:
    """The uv cache, shared by every environment (``uv/`` under `cache_root`)."""
    return cache_root() / "uv"


class Installer(NamedTuple):
    """The installer this process uses: ``"uv"`` (with its binary) or ``"pip"`` (and why)."""

    name: str
    uv: str | None
    reason: str


_INSTALLER_VALUES = ("", "auto", "uv", "pip")


@functools.cache
def _uv_binary() -> tuple[str | None, str]:
    """The uv binary and ``""``, or ``None`` and why uv cannot run here (once per process)."""
    try:
        import uv  # a runtime dependency, but wheels exist only for common platforms

        binary = uv.find_uv_bin()
    except (ImportError, FileNotFoundError) as exc:
        return None, f"uv is not available for this platform ({exc})"
    try:
        proc = subprocess.run(  # noqa: S603 (the uv package's own binary, fixed arguments)
            [binary, "--version"],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"uv could not run ({exc})"
    if proc.returncode != 0:
        return None, f"uv could not run (exit {proc.returncode}: {proc.stderr.strip()})"
    return binary, ""


_announced: set[Installer] = set()


def installer() -> Installer:
    """The installer to use: uv, or pip where uv cannot run or ``FLASH_INSTALLER=pip``.

    ``FLASH_INSTALLER`` is ``uv``, ``pip`` or unset (uv where it runs). The first use of pip in
    a process logs ``deps.installer`` with the reason.

    Raises:
        ConfigurationError: ``FLASH_INSTALLER`` has another value.
        DependencyInstallError: ``FLASH_INSTALLER=uv`` but uv cannot run here.
    """
    wanted = os.environ.get("FLASH_INSTALLER", "").strip().lower()
    if wanted not in _INSTALLER_VALUES:
        msg = (
            f"FLASH_INSTALLER={wanted!r} is not an installer: use 'uv' or 'pip', or leave "
            "it unset (uv where it runs, else pip)"
        )
        raise ConfigurationError(msg)
    if wanted == "pip":
        chosen = Installer("pip", None, "FLASH_INSTALLER=pip")
    else:
        binary, why_not = _uv_binary()
        if binary is not None:
            chosen = Installer("uv", binary, "")
        elif wanted == "uv":
            msg = f"FLASH_INSTALLER=uv, but {why_not}; unset it to fall back to pip"
            raise DependencyInstallError(msg)
        else:
            chosen = Installer("pip", None, why_not)
    if chosen not in _announced:
        _announced.add(chosen)
        if chosen.name == "pip":
            log.warning("deps.installer", installer="pip", reason=chosen.reason)
        else:
            log.info("deps.installer", installer="uv", binary=chosen.uv)
    return chosen


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


_UNITS = {"B": 1, "kB": 1000, "KB": 1000, "MB": 1000**2, "GB": 1000**3,
          "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}  # fmt: skip
_UV_DOWNLOADING = re.compile(r"Downloading (\S+) \(([\d.]+)\s*([kKMG]?i?B)\)")
_UV_DOWNLOADED = re.compile(r"\s*Downloaded (\S+)")
_UV_COUNT = re.compile(r"(Resolved|Prepared|Installed) (\d+) packages?\b")
_PIP_COLLECTING = re.compile(r"Collecting (\S+)")
_PIP_DOWNLOADING = re.compile(r"\s*Downloading (\S+) \(([\d.]+)\s*([kKMG]?i?B)\)")
_PIP_INSTALLING = re.compile(r"Installing collected packages: (.+)")
_LINK_COPY = ("Failed to hardlink", "falling back to full copy")
"""What uv prints when it cannot hard-link from its cache and copies instead."""

_link_copy_said = False


class _Output:
    """Reads an installer's output as it comes: progress steps, counts, hard-link fallback."""

    def __init__(self, name: str, shown: Progress) -> None:
        self.name = name
        self.shown = shown
        self.lines: list[str] = []
        self.counts: dict[str, int] = {}
        self.downloads: dict[str, int] = {}
        self.downloaded = 0
        self.copied = False
        self._pending: str | None = None  # pip: the download in flight

    def feed(self, line: str) -> None:
        line = line.rstrip()
        self.lines.append(line)
        if self.name == "uv":
            self._uv(line)
        else:
            self._pip(line)

    def _size(self, number: str, unit: str) -> int:
        return int(float(number) * _UNITS.get(unit, 1))

    def _finish_download(self, package: str) -> None:
        size = self.downloads.get(package, 0)
        self.downloaded += size
        self.shown.update(f"downloaded {package}", add_done=size)

    def _uv(self, line: str) -> None:
        if match := _UV_DOWNLOADING.match(line):
            package, size = match[1], self._size(match[2], match[3])
            self.downloads[package] = size
            self.shown.update(
                f"downloading {package} ({format_bytes(size)})", add_total=size
            )
        elif match := _UV_DOWNLOADED.match(line):
            self._finish_download(match[1])
        elif match := _UV_COUNT.match(line):
            what, n = match[1].lower(), int(match[2])
            self.counts[what] = n
            step = {"resolved": "resolved", "prepared": "downloaded and unpacked",
                    "installed": "installed"}[what]  # fmt: skip
            self.shown.update(f"{step} {n} package{'s' if n != 1 else ''}")
        elif any(text in line for text in _LINK_COPY):
            self.copied = True

    def _pip(self, line: str) -> None:
        if match := _PIP_COLLECTING.match(line):
            self._close_pending()
            self.shown.update(f"collecting {match[1]}")
        elif match := _PIP_DOWNLOADING.match(line):
            self._close_pending()
            package, size = match[1], self._size(match[2], match[3])
            self.downloads[package] = size
            self._pending = package
            self.shown.update(
                f"downloading {package} ({format_bytes(size)})", add_total=size
            )
        elif match := _PIP_INSTALLING.match(line):
            self._close_pending()
            packages = [p.strip() for p in match[1].split(",")]
            self.counts["installed"] = len(packages)
            self.shown.update(f"installing {', '.join(packages)}")

    def _close_pending(self) -> None:
        if self._pending is not None:
            self._finish_download(self._pending)
            self._pending = None


def _run(command: list[str], output: _Output) -> int:
    """Run an installer command, feeding its output (stdout and stderr) to ``output``."""
    env = {**os.environ, "NO_COLOR": "1", "PIP_PROGRESS_BAR": "off"}
    with subprocess.Popen(  # noqa: S603 (our own interpreter or uv's binary, checked specs)
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        encoding="utf-8",
        errors="replace",
        env=env,
    ) as proc:
        assert proc.stdout is not None  # noqa: S101 (stdout=PIPE)
        for line in proc.stdout:
            output.feed(line)
    return proc.returncode


def _commands(installer: Installer, env_dir: Path, deps: list[str]) -> list[list[str]]:
    """The commands that create ``env_dir`` and install ``deps`` into it, binary wheels only."""
    python = str(env_dir / "bin" / "python")
    if installer.uv is not None:
        return [
            [installer.uv, "venv", "--quiet", "--no-python-downloads",
             "--python", sys.executable, str(env_dir)],
            [installer.uv, "pip", "install", "--python", python,
             "--cache-dir", str(uv_cache_dir()), "--link-mode", "hardlink",
             "--only-binary", ":all:", "--color", "never", *deps],
        ]  # fmt: skip
    return [
        [sys.executable, "-m", "venv", "--without-pip", str(env_dir)],
        [sys.executable, "-m", "pip", "--python", python, "install",
         "--only-binary=:all:", "--disable-pip-version-check", "--no-input",
         "--progress-bar", "off", *deps],
    ]  # fmt: skip


def _install_locked(
    env_dir: Path, dependencies: list[str], installer: Installer, shown: Progress
) -> _Output | None:
    """Create the environment and install into it, under an inter-process file lock.

    Returns what the installer said, or ``None`` when another process finished it first.
    """
    global _link_copy_said  # said once per process
    env_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_path = env_dir.with_suffix(".lock")
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if (env_dir / ".complete").exists():
                return None
            if env_dir.exists():  # an interrupted install: start again
                shutil.rmtree(env_dir)
            output = _Output(installer.name, shown)
            create, install = _commands(installer, env_dir, dependencies)
            shown.update("creating the environment")
            returncode = _run(create, output)
            if returncode == 0:
                shown.update(f"resolving ({installer.name})")
                returncode = _run(install, output)
            if returncode != 0:
                shutil.rmtree(env_dir, ignore_errors=True)
                reason = _pip_tail("\n".join(output.lines))
                msg = (
                    f"could not install dependencies {', '.join(dependencies)} "
                    f"({installer.name} exited with {returncode}):\n{reason}"
                )
                raise DependencyInstallError(msg)
            if output.copied and not _link_copy_said:
                _link_copy_said = True
                log.warning(
                    "deps.link_copy",
                    cache=str(uv_cache_dir()),
                    env=str(env_dir),
                    reason="hard links from uv's cache failed (another filesystem?): "
                    "uv copied the files, so environments do not share them",
                )
            (env_dir / ".complete").write_text("\n".join(dependencies) + "\n")
            return output
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


async def ensure_environment(
    dependencies: list[str], *, endpoint: str = ""
) -> Path | None:
    """The environment for ``dependencies``, installed on first use; ``None`` for none.

    The caller has checked the request's signature; the specs are checked here again.
    Progress is shown while it installs (`flash_actors._progress`); ``deps.install`` and
    then ``deps.installed`` or ``deps.failed`` are logged.

    Raises:
        ConfigurationError: an entry is not a requirement, or ``FLASH_INSTALLER`` is not
            an installer (nothing was installed).
        DependencyInstallError: the installer could not install them (the message names
            the packages and gives the installer's reason).
    """
    deps = normalise(dependencies)
    if not deps:
        return None
    key = dependency_key(deps)
    env_dir = envs_root() / key
    if (env_dir / ".complete").exists():
        return env_dir
    lock = _locks.setdefault(anyio.lowlevel.current_token(), {}).setdefault(
        key, anyio.Lock()
    )
    async with lock:
        if (env_dir / ".complete").exists():
            return env_dir
        chosen = installer()
        log.info(
            "deps.install",
            endpoint=endpoint,
            packages=deps,
            env=str(env_dir),
            installer=chosen.name,
            **({"reason": chosen.reason} if chosen.reason else {}),
        )
        shown = Progress(
            f"installing {', '.join(deps)} for {endpoint or 'an endpoint'}",
            installer=chosen.name,
        )
        with shown:
            try:
                output = await anyio.to_thread.run_sync(
                    _install_locked,
                    env_dir,
                    deps,
                    chosen,
                    shown,
                    abandon_on_cancel=False,
                )
            except BaseException as exc:
                log.warning(
                    "deps.failed",
                    endpoint=endpoint,
                    packages=deps,
                    installer=chosen.name,
                    seconds=round(shown.elapsed, 2),
                    reason=str(exc).splitlines()[0] if str(exc) else repr(exc),
                )
                raise
            fetched = output.counts.get("prepared", 0) if output else 0
            if output and output.name == "pip":  # pip does not say what it downloaded
                fetched = len(output.downloads)
            installed = output.counts.get("installed", 0) if output else 0
            downloaded = output.downloaded if output else 0
            summary = (
                f"{chosen.name}: {installed} installed, {fetched} downloaded"
                + (f" ({format_bytes(downloaded)})" if downloaded else "")
                if output
                else "installed by another process"
            )
            shown.end(ok=True, summary=summary)
        log.info(
            "deps.installed",
            endpoint=endpoint,
            packages=deps,
            installer=chosen.name,
            installed=installed,
            fetched=fetched,
            downloaded_bytes=downloaded,
            seconds=round(shown.elapsed, 2),
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
        DependencyInstallError: the installer (uv or pip) could not install them.
    """
    env_dir = await ensure_environment(dependencies)
    if env_dir is None or env_dir.name in _active:
        return
    path = str(site_packages(env_dir))
    if path not in sys.path:
        sys.path.insert(0, path)
    importlib.invalidate_caches()
    _active.add(env_dir.name)
