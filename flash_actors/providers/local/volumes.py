"""Network volumes on this machine: one private folder per volume id, kept across runs.

An endpoint with ``networkVolumeId`` (or ``networkVolume=NetworkVolume(...)``: its ``id``,
else its ``name``) gets the folder ``<volumes root>/<id>``, shared by every endpoint, every
runtime and the ``flash local`` daemon that name the same volume, and never removed by us.
The root is ``FLASH_VOLUMES_DIR``, else ``$XDG_DATA_HOME/flash-actors/volumes``
(``~/.local/share/flash-actors/volumes``): a volume holds data, not a cache. Folders are
created 0700 (`flash_actors._private`); a volume folder that is a symbolic link or another
user's is refused. Ids are checked by `flash_actors.resources.check_volume_id`, so none can
lead out of the root.

Workers find their volume in ``FLASH_VOLUME_PATH`` (`flash_actors.volumes.volume_path`)
and, where RunPod mounts it, at ``/runpod-volume`` (``FLASH_RUNPOD_VOLUME_LINK`` names
another path; empty: none) when that can be made a symbolic link to the folder. RunPod
mounts a volume per worker; here the path is one for the whole machine, so:

- it is created only where nothing is, or re-pointed only when it is our own link (ours:
  owned by this user and pointing straight into this root); anything else is left alone;
- it points at one volume at a time: a process that uses it (to start workers of that
  volume) holds a shared lock on ``<root>/.runpod-volume.lock`` until it exits, and it is
  re-pointed to another volume only when no process holds it;
- a worker of a second volume meanwhile finds its volume through ``FLASH_VOLUME_PATH`` and
  `volume_path` only (a warning names the link and both volumes): code that opens
  ``/runpod-volume`` itself would see the first volume there.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from flash_actors._logging import get_logger
from flash_actors._private import StateDirError, open_private, private_dir
from flash_actors.resources import check_volume_id
from flash_actors.volumes import (
    DOWNLOAD_ENV,
    RUNPOD_VOLUME,
    VOLUME_ID_ENV,
    VOLUME_PATH_ENV,
)

if TYPE_CHECKING:
    from flash_actors.resources import ServerlessResource

__all__ = [
    "LINK_ENV",
    "ROOT_ENV",
    "apply_volume",
    "claim_link",
    "link_path",
    "volume_dir",
    "volumes_root",
]

log = get_logger(__name__)

ROOT_ENV = "FLASH_VOLUMES_DIR"
"""Where volume folders are kept (default ``$XDG_DATA_HOME/flash-actors/volumes``)."""
LINK_ENV = "FLASH_RUNPOD_VOLUME_LINK"
"""The machine-wide path made to point at a worker's volume (default ``/runpod-volume``;
empty: none)."""

MODEL_CACHES = {
    "HF_HOME": ".hf-cache",
    "HF_HUB_CACHE": ".hf-cache/hub",
    "HF_DATASETS_CACHE": ".hf-cache/datasets",
    "TORCH_HOME": ".torch-cache",
}
"""``accelerate_downloads``'s model caches, inside the volume (``.hf-cache`` is where
RunPod's Flash worker puts Hugging Face's cache on a volume)."""

_claims: dict[str, tuple[str, int]] = {}
"""Per link path: the volume folder it points at for this process, and the locked file."""
_warned: set[tuple[str, str]] = set()


def volumes_root() -> Path:
    """The folder that holds every volume (``FLASH_VOLUMES_DIR``, see the module)."""
    configured = os.environ.get(ROOT_ENV)
    if configured:
        return Path(configured).absolute()
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data).absolute() / "flash-actors" / "volumes"


def link_path() -> Path | None:
    """The path made to point at a worker's volume, or ``None`` (``FLASH_RUNPOD_VOLUME_LINK``)."""
    configured = os.environ.get(LINK_ENV, RUNPOD_VOLUME)
    return Path(configured).absolute() if configured else None


def _check_ours(path: Path, what: str) -> None:
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        msg = (
            f"{what} {str(path)!r} is a symbolic link or not a folder; refusing to keep "
            f"volumes there: remove it, or set {ROOT_ENV} to a folder of your own"
        )
        raise StateDirError(msg)
    if info.st_uid != os.getuid():
        msg = (
            f"{what} {str(path)!r} belongs to another user (uid {info.st_uid}); set "
            f"{ROOT_ENV} to a folder of your own"
        )
        raise StateDirError(msg)


def volume_dir(volume_id: str) -> Path:
    """The folder of ``volume_id``, created 0700 (with the root) when missing.

    Raises:
        ConfigurationError: ``volume_id`` is not a plain id (`check_volume_id`).
        StateDirError: the root or the folder is a symbolic link or another user's.
    """
    check_volume_id(volume_id, "network volume")
    root = volumes_root()
    private_dir(root)
    _check_ours(root, "volumes folder")
    folder = root / volume_id
    with contextlib.suppress(FileExistsError):
        os.mkdir(folder, 0o700)
    _check_ours(folder, "volume folder")
    return private_dir(folder)


def _points_at(link: Path) -> str | None:
    """Where ``link`` points, when it is our own link into the volumes root, else ``None``.

    Raises:
        FileNotFoundError: nothing is at ``link``.
    """
    info = os.lstat(link)
    if not stat.S_ISLNK(info.st_mode) or info.st_uid != os.getuid():
        return None
    target = os.readlink(link)
    if os.path.dirname(target) != str(volumes_root()):
        return None
    return target


def claim_link(folder: Path) -> bool:
    """Make the link (`link_path`) point at ``folder`` for this process, if it may (module doc).

    True when it points there (and this process holds it until it exits); False when there
    is no link path, or it is taken, someone else's, or cannot be made here.
    """
    link = link_path()
    if link is None:
        return False
    target = str(folder)
    held = _claims.get(str(link))
    if held is not None:
        return held[0] == target or _taken(link, target, held[0])
    fd = open_private(volumes_root() / ".runpod-volume.lock", os.O_RDWR | os.O_CREAT)
    try:
        for _ in range(3):
            try:
                current = _points_at(link)
            except FileNotFoundError:
                current = ""  # nothing there
            except OSError as exc:
                return _cannot(link, exc)
            if current is None:
                return _taken(link, target, "something that is not our link")
            if current == target:
                try:  # never waits: an exclusive hold lasts only while a link moves
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    if _points_at(link) == target:
                        _claims[str(link)] = (target, fd)
                        fd = -1
                        return True
                fcntl.flock(fd, fcntl.LOCK_UN)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return _taken(link, target, current)
            try:
                _repoint(link, target, replace=bool(current))
            except OSError as exc:
                return _cannot(link, exc)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        return _taken(link, target, "a link that keeps changing")
    finally:
        if fd >= 0:
            os.close(fd)


def _repoint(link: Path, target: str, *, replace: bool) -> None:
    """Make ``link`` point at ``target``: a new link, or our old one replaced atomically."""
    if not replace:
        os.symlink(target, link)  # fails if anything appeared meanwhile: never clobbers
        return
    spare = link.with_name(f".{link.name}.{os.getpid()}.new")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(spare)
    os.symlink(target, spare)
    try:
        if _points_at(link) is None:  # checked again under the lock, just before
            msg = f"{link} is no longer our link"
            raise FileExistsError(msg)
        os.replace(spare, link)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(spare)
        raise


def _taken(link: Path, target: str, holder: str) -> bool:
    if (str(link), target) not in _warned:
        _warned.add((str(link), target))
        log.warning(
            "volume.link_taken",
            link=str(link),
            volume=target,
            holder=holder,
            hint=f"workers find their volume in ${VOLUME_PATH_ENV} (volume_path())",
        )
    return False


def _cannot(link: Path, exc: OSError) -> bool:
    if (str(link), "") not in _warned:
        _warned.add((str(link), ""))
        log.info(
            "volume.no_link",
            link=str(link),
            error=repr(exc),
            hint=f"workers find their volume in ${VOLUME_PATH_ENV} (volume_path())",
        )
    return False


def apply_volume(resource: ServerlessResource, env: dict[str, str]) -> None:
    """Give a worker of ``resource`` its volume: set (or clear) the variables in ``env``.

    ``FLASH_VOLUME_PATH`` and ``FLASH_VOLUME_ID`` name the volume's folder and id; the
    folder is created and the ``/runpod-volume`` link claimed (`claim_link`).
    ``FLASH_DOWNLOAD_ENV`` holds the model caches that ``accelerate_downloads`` points into
    the volume (`flash_actors.volumes.apply_downloads`), but for those the endpoint's own
    ``env`` sets. Without a volume, inherited values of these variables are removed.

    Raises:
        ConfigurationError: the volume id is not a plain id.
        StateDirError: the volumes folder is not safely ours.
    """
    for name in (VOLUME_PATH_ENV, VOLUME_ID_ENV, DOWNLOAD_ENV):
        env.pop(name, None)
    volume_id = resource.volume_id
    if volume_id is None:
        return
    folder = volume_dir(volume_id)
    claim_link(folder)
    env[VOLUME_PATH_ENV] = str(folder)
    env[VOLUME_ID_ENV] = volume_id
    own = resource.worker_env()
    caches = {
        name: str(folder / where)
        for name, where in MODEL_CACHES.items()
        if name not in own
    }
    env[DOWNLOAD_ENV] = json.dumps(caches)
