"""How scripts find a running ``flash local`` daemon: ``.flash/local.json`` or ``FLASH_LOCAL_URL``.

The daemon writes its record (base URL, PID, API key and the master secret that signs remote
calls) atomically, readable by its owner only, once it listens; it removes it when it stops.
A record whose PID is gone is stale and ignored. ``FLASH_LOCAL_URL`` names a daemon directly;
its API key then comes from ``FLASH_LOCAL_API_KEY`` (or ``RUNPOD_API_KEY``) and its secret from
``FLASH_SECRET`` unless the record in ``.flash/`` is for the same URL.

Setting ``FLASH_LOCAL=0`` makes scripts ignore any daemon and use the embedded provider.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from flash_actors._private import open_private, private_dir
from flash_actors.errors import FlashRuntimeError

__all__ = [
    "ALREADY_RUNNING",
    "LOCK_NAME",
    "RECORD_NAME",
    "DaemonRecord",
    "DaemonRunningError",
    "find_daemon",
    "is_gateway",
    "lock_state_dir",
    "pid_alive",
    "read_record",
    "remove_record",
    "write_record",
]

RECORD_NAME = "local.json"
LOCK_NAME = "daemon.lock"
ALREADY_RUNNING = 3
"""The daemon's exit code when another daemon holds the state folder's lock."""


class DaemonRunningError(FlashRuntimeError):
    """Another daemon holds the state folder's lock; ``pid`` is its process id (0: unknown)."""

    def __init__(self, state_dir: Path, pid: int) -> None:
        holder = f"pid {pid}" if pid else "another process"
        super().__init__(
            f"flash local is already running in {state_dir} ({holder} holds "
            f"{state_dir / LOCK_NAME}); one state folder, one daemon"
        )
        self.pid = pid


def lock_state_dir(state_dir: Path) -> int:
    """Take the state folder's exclusive lock; held until this process exits.

    One folder, one daemon: two daemons on one SQLite queue would run every job twice. The
    lock (``flock`` on ``daemon.lock``, taken before the store is opened) is released by the
    kernel when the daemon dies however it dies, so a stale lock cannot outlive it. The file
    then holds the daemon's pid, for the message the next one gives. The descriptor is not
    inherited by the processes the daemon starts.

    Raises:
        DaemonRunningError: another process holds the lock (its pid in the message).
    """
    private_dir(state_dir)
    fd = open_private(state_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = int(os.pread(fd, 32, 0).decode(errors="replace").strip() or 0)
        except ValueError:
            holder = 0
        os.close(fd)
        raise DaemonRunningError(state_dir, holder) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


@dataclass(frozen=True, slots=True)
class DaemonRecord:
    """A running daemon: where it listens and what opens it.

    Attributes:
        url: base URL, ``http://127.0.0.1:PORT`` (the data plane is under ``/v2``).
        pid: the daemon's process id (0 when it was named by ``FLASH_LOCAL_URL``).
        api_key: what clients send as ``Authorization: Bearer <key>``.
        secret: the master secret (hex) remote calls are signed with; empty if unknown.
    """

    url: str
    pid: int
    api_key: str
    secret: str = ""

    @property
    def port(self) -> int:
        """The TCP port on 127.0.0.1."""
        return int(self.url.rsplit(":", 1)[1].split("/", 1)[0])


def pid_alive(pid: int) -> bool:
    """True if a process with this id exists (and is not a zombie we could reap)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with Path(f"/proc/{pid}/stat").open() as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def write_record(state_dir: Path, record: DaemonRecord) -> Path:
    """Write the record atomically (temporary file, then rename), mode 0600."""
    private_dir(state_dir)
    path = state_dir / RECORD_NAME
    tmp = state_dir / f".{RECORD_NAME}.{os.getpid()}.tmp"
    fd = open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    with os.fdopen(fd, "w") as out:
        json.dump(asdict(record), out)
        out.flush()
        os.fsync(out.fileno())
    tmp.replace(path)
    return path


def read_record(state_dir: Path) -> DaemonRecord | None:
    """The record in ``state_dir``, live or not; None if absent or unreadable."""
    try:
        data = json.loads((state_dir / RECORD_NAME).read_text())
        return DaemonRecord(
            url=str(data["url"]),
            pid=int(data["pid"]),
            api_key=str(data["api_key"]),
            secret=str(data.get("secret", "")),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remove_record(state_dir: Path, pid: int) -> None:
    """Remove the record if it is this daemon's."""
    record = read_record(state_dir)
    if record is not None and record.pid == pid:
        (state_dir / RECORD_NAME).unlink(missing_ok=True)


def find_daemon(state_dir: Path | str = ".flash") -> DaemonRecord | None:
    """The daemon scripts here should send their calls to, or None (use the embedded one)."""
    if os.environ.get("FLASH_LOCAL", "").strip().lower() in {"0", "false", "no", "off"}:
        return None
    state = Path(state_dir)
    record = read_record(state)
    url = os.environ.get("FLASH_LOCAL_URL", "").strip().rstrip("/")
    if url:
        if url.endswith("/v2"):
            url = url[: -len("/v2")]
        if record is not None and record.url == url:
            return record
        key = os.environ.get("FLASH_LOCAL_API_KEY") or os.environ.get(
            "RUNPOD_API_KEY", ""
        )
        return DaemonRecord(url=url, pid=0, api_key=key, secret="")
    if record is not None and pid_alive(record.pid) and is_gateway(record.pid):
        return record
    return None


def is_gateway(pid: int) -> bool:
    """False when the PID was reused by another program (the daemon died uncleanly)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc (macOS): trust the live PID
    return b"flash_actors.providers.local.daemon" in cmdline
