"""The deployment archive (``.flash/artifact.tar.gz``): reproducible, atomic, under RunPod's limit.

`write_archive` packs a build folder into a gzipped tar whose bytes depend only on the files'
paths, contents and executable bits: entries sorted by path, every time set to
``SOURCE_DATE_EPOCH`` (or 0), owner and group 0 with no names, modes fixed (``0o755`` for
folders and executables, ``0o644`` for other files), and a gzip header with time 0 and no file
name. Two builds of the same tree give the same bytes.

The archive is written to a temporary file next to the output and renamed over it once
complete, so a failure or Ctrl-C never leaves a half-written archive (an older one stays).

RunPod Serverless takes deployment packages up to 500 MB (the seeds' "Managing bundle size"):
the limit applies to the uploaded file, so to the compressed archive, counted in MiB as
runpod-flash counts it (`MAX_ARCHIVE_BYTES`). Writing stops as soon as the compressed output
passes it, and the `BuildError` lists the largest top-level folders of the build (packages,
by uncompressed size).
"""

from __future__ import annotations

import gzip
import os
import stat
import tarfile
from pathlib import Path
from typing import IO, TYPE_CHECKING

import msgspec

from flash_actors._progress import format_bytes
from flash_actors.errors import BuildError

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = [
    "ARCHIVE_PATH",
    "MAX_ARCHIVE_BYTES",
    "ArchiveInfo",
    "largest_entries",
    "source_date_epoch",
    "write_archive",
]

ARCHIVE_PATH = Path(".flash") / "artifact.tar.gz"
#: RunPod Serverless' deployment limit, on the compressed archive (500 MiB).
MAX_ARCHIVE_BYTES = 500 * 1024 * 1024
_COMPRESS_LEVEL = 6
_SHOWN_LARGEST = 8


class ArchiveInfo(msgspec.Struct, kw_only=True, frozen=True):
    """A written archive."""

    path: Path
    #: compressed size in bytes
    size: int
    #: files in it (folders not counted)
    files: int
    #: the files' total uncompressed size in bytes
    uncompressed: int


def source_date_epoch() -> int:
    """The archive's timestamp: ``SOURCE_DATE_EPOCH`` when set, else 0.

    Raises:
        BuildError: ``SOURCE_DATE_EPOCH`` is not a non-negative integer.
    """
    raw = os.environ.get("SOURCE_DATE_EPOCH", "")
    if raw == "":
        return 0
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0 or value >= 8**11:  # the tar header's 11 octal digits
        msg = f"SOURCE_DATE_EPOCH={raw!r} is not a Unix time in seconds: set an integer or unset it"
        raise BuildError(msg)
    return value


def _walk(root: Path) -> Iterator[Path]:
    """Every path under ``root``, parents before children, siblings sorted by name."""
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        yield entry
        if entry.is_dir() and not entry.is_symlink():
            yield from _walk(entry)


def _tree_size(path: Path) -> int:
    if path.is_symlink() or not path.is_dir():
        return path.lstat().st_size
    return sum(_tree_size(child) for child in path.iterdir())


def largest_entries(root: Path, count: int = _SHOWN_LARGEST) -> list[tuple[str, int]]:
    """The ``count`` largest top-level entries of ``root`` (name, uncompressed bytes)."""
    sizes = [(entry.name, _tree_size(entry)) for entry in root.iterdir()]
    sizes.sort(key=lambda item: (-item[1], item[0]))
    return sizes[:count]


class _TooLargeError(Exception):
    """The compressed output passed the limit (internal: becomes a BuildError)."""


class _Counted:
    """A binary file that counts what is written and stops at ``limit`` bytes."""

    def __init__(self, raw: IO[bytes], limit: int) -> None:
        self.raw = raw
        self.limit = limit
        self.written = 0

    def write(self, data: bytes) -> int:
        self.written += len(data)
        if self.written > self.limit:
            raise _TooLargeError
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()


def _info(path: Path, name: str, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mtime = mtime
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode):
        info.type = tarfile.SYMTYPE
        info.linkname = os.readlink(path)
        info.mode = 0o777
    elif stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
    elif stat.S_ISREG(st.st_mode):
        info.type = tarfile.REGTYPE
        info.size = st.st_size
        info.mode = 0o755 if st.st_mode & 0o111 else 0o644
    else:
        msg = f"{path}: not a file, folder or link, so it cannot go into the archive: remove it"
        raise BuildError(msg)
    return info


def _too_large(root: Path, limit: int) -> BuildError:
    largest = ", ".join(
        f"{name} {format_bytes(size)}" for name, size in largest_entries(root)
    )
    msg = (
        f"the archive is over RunPod's {format_bytes(limit)} limit (compressed); the "
        f"largest parts of the build (uncompressed): {largest}: --exclude the packages the "
        "base image has (e.g. --exclude torch,torchvision) or drop dependencies"
    )
    return BuildError(msg)


def write_archive(
    build_dir: Path, output: Path, *, max_bytes: int = MAX_ARCHIVE_BYTES
) -> ArchiveInfo:
    """Pack ``build_dir``'s contents into the gzipped tar ``output`` (see the module).

    Paths in the archive are relative to ``build_dir``. ``output`` is replaced atomically.

    Raises:
        BuildError: the compressed archive would pass ``max_bytes`` (the message lists the
            largest top-level folders), a special file is in the build, ``SOURCE_DATE_EPOCH``
            is bad, or the archive cannot be written.
    """
    mtime = source_date_epoch()
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    files = uncompressed = 0
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("wb") as raw:
            counted = _Counted(raw, max_bytes)
            with (
                gzip.GzipFile(
                    filename="",
                    mode="wb",
                    fileobj=counted,
                    compresslevel=_COMPRESS_LEVEL,
                    mtime=0,
                ) as zipped,
                tarfile.open(
                    fileobj=zipped, mode="w", format=tarfile.PAX_FORMAT
                ) as tar,
            ):
                for path in _walk(build_dir):
                    info = _info(path, path.relative_to(build_dir).as_posix(), mtime)
                    if info.isreg():
                        files += 1
                        uncompressed += info.size
                        with path.open("rb") as data:
                            tar.addfile(info, data)
                    else:
                        tar.addfile(info)
            raw.flush()
            os.fsync(raw.fileno())
        size = tmp.stat().st_size
        tmp.replace(output)
    except _TooLargeError:
        tmp.unlink(missing_ok=True)
        raise _too_large(build_dir, max_bytes) from None
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        msg = f"cannot write the archive {output}: {exc.strerror or exc}: check the folder and free space"
        raise BuildError(msg) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return ArchiveInfo(path=output, size=size, files=files, uncompressed=uncompressed)
