"""Private files and folders: what goes under a state folder (``.flash``) is its owner's alone.

The state folder holds the daemon's API key, its master secret (whoever reads it can sign code
the workers run) and every job's input and output, so each folder is created 0700 and each
file 0600 whatever the umask, and a file or folder found looser is tightened. A state folder
that belongs to another user, or is a symbolic link, is refused (`StateDirError`): we neither
use nor change what is not plainly ours.
"""

from __future__ import annotations

import os
import stat
from typing import TYPE_CHECKING

from flash_actors.errors import ConfigurationError

if TYPE_CHECKING:
    from pathlib import Path

__all__ = [
    "StateDirError",
    "open_private",
    "private_dir",
    "private_file",
    "secure_state_dir",
    "write_private",
]

DIR_MODE = 0o700
FILE_MODE = 0o600


class StateDirError(ConfigurationError):
    """A state folder that is not safely ours: another user's, or a symbolic link."""


def private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) as 0700 folders; tighten ``path`` if it is looser.

    Folders that already exist above ``path`` are left as they are (the state folder itself
    is checked once by `secure_state_dir`).
    """
    missing: list[Path] = []
    here = path
    while not here.exists() and here != here.parent:
        missing.append(here)
        here = here.parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, DIR_MODE)
        except FileExistsError:
            pass
        else:
            os.chmod(
                folder, DIR_MODE
            )  # mkdir's mode is cut by the umask, never widened
    _tighten(path, DIR_MODE)
    return path


def open_private(
    path: Path, flags: int = os.O_WRONLY | os.O_CREAT | os.O_APPEND
) -> int:
    """``os.open`` a file, created 0600 (an existing one tightened to 0600); the descriptor.

    A symbolic link at ``path`` is refused (``O_NOFOLLOW``), so a planted link cannot point a
    log at someone else's file.
    """
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
            os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def private_file(path: Path) -> Path:
    """Make sure ``path`` exists as a 0600 file (created empty if missing)."""
    os.close(open_private(path, os.O_WRONLY | os.O_CREAT))
    return path


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to a 0600 file (replacing its content)."""
    fd = open_private(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def secure_state_dir(path: Path) -> Path:
    """Check a state folder before use: create it 0700, or tighten what is in it.

    Everything already under it that we own and that others could read or enter (older
    versions created 0755 folders and 0644 files) is tightened to 0700/0600.

    Raises:
        StateDirError: it is a symbolic link, not a folder, or belongs to another user.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return private_dir(path)
    if stat.S_ISLNK(info.st_mode):
        msg = (
            f"state folder {str(path)!r} is a symbolic link; refusing to keep secrets "
            "where it points. Pass the real folder with --state-dir (or remove the link)"
        )
        raise StateDirError(msg)
    if not stat.S_ISDIR(info.st_mode):
        msg = f"state folder {str(path)!r} exists and is not a folder"
        raise StateDirError(msg)
    if info.st_uid != os.getuid():
        msg = (
            f"state folder {str(path)!r} belongs to another user (uid {info.st_uid}, you are "
            f"uid {os.getuid()}); use a folder of your own with --state-dir"
        )
        raise StateDirError(msg)
    _tighten(path, DIR_MODE)
    for root, dirs, files in os.walk(path):  # os.walk does not follow symbolic links
        for name in dirs:
            _tighten(os.path.join(root, name), DIR_MODE)
        for name in files:
            _tighten(os.path.join(root, name), FILE_MODE)
    return path


def _tighten(path: Path | str, mode: int) -> None:
    """Drop group and other bits of something we own (links and others' files untouched)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode) or info.st_uid != os.getuid():
        return
    if stat.S_IMODE(info.st_mode) & 0o077:
        os.chmod(path, stat.S_IMODE(info.st_mode) & ~0o077 | (mode & 0o700))
