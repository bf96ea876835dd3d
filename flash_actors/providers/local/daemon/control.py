"""Starting, asking and stopping the ``flash local`` daemon: what ``flash local`` calls.

`start_daemon` starts ``python -m flash_actors.providers.local.daemon`` in its own session
(it outlives the caller) and waits until it listens; one state folder, one daemon: when one
already runs, or another start won the race, it names that one. `daemon_status` asks a
running daemon for its endpoints, workers and queues. `stop_daemon` asks it to stop, waits
for its process to exit (SIGTERM, then SIGKILL as a last resort, through
`flash_actors.providers.local._processes.stop_process`), which stops every worker it
started. A record left by a daemon that died is removed when it is found.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from flash_actors._private import open_private, private_dir, secure_state_dir
from flash_actors.errors import ConfigurationError, FlashRuntimeError
from flash_actors.providers.local._processes import PidfdProcess, stop_process
from flash_actors.providers.local.daemon.record import (
    ALREADY_RUNNING,
    DaemonRecord,
    is_gateway,
    pid_alive,
    read_record,
    remove_record,
)
from flash_actors.resources import ServerlessEndpoint

if TYPE_CHECKING:
    from collections.abc import Sequence

    from flash_actors.providers.local._processes import WorkerProcess

__all__ = [
    "START_TIMEOUT_S",
    "STOP_TIMEOUT_S",
    "DaemonControlError",
    "DaemonStart",
    "DaemonStatus",
    "daemon_status",
    "live_daemon",
    "start_daemon",
    "stop_daemon",
]

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
MODULE = "flash_actors.providers.local.daemon"


class DaemonControlError(FlashRuntimeError):
    """The daemon did not start, does not answer, or did not stop; the message says why."""


@dataclass(frozen=True, slots=True)
class DaemonStart:
    """What `start_daemon` found.

    Attributes:
        record: the running daemon.
        started: True if this call started it; False if it was already running (or
            another start won the race).
        log_path: the daemon's log.
    """

    record: DaemonRecord
    started: bool
    log_path: Path


@dataclass(frozen=True, slots=True)
class DaemonStatus:
    """A running daemon and its ``/flash/v1/status`` answer (``table``)."""

    record: DaemonRecord
    table: dict[str, Any]


def live_daemon(state_dir: Path) -> DaemonRecord | None:
    """The daemon running for ``state_dir``, or None; a record its daemon left is removed.

    A hard-killed daemon (or a reboot) leaves its record, and its pid may be another
    program's now: nothing may signal that, nor take it for a daemon.
    """
    record = read_record(state_dir)
    if record is None:
        return None
    if not (pid_alive(record.pid) and is_gateway(record.pid)):
        remove_record(state_dir, record.pid)  # stale: its daemon died
        return None
    return record


def _daemon_command(state_dir: Path, port: int, endpoints: Sequence[str]) -> list[str]:
    """The daemon's command line, its arguments checked first.

    Raises:
        ConfigurationError: a port out of range, or an endpoint spec the daemon would
            refuse (a clear line now rather than its traceback later).
    """
    if not 0 <= port < 65536:
        msg = f"--port must be between 0 and 65535, got {port}"
        raise ConfigurationError(msg)
    command = [sys.executable, "-m", MODULE]
    command += ["--state-dir", str(state_dir), "--port", str(port)]
    for spec in endpoints:
        name, sep, rest = spec.partition("=")
        path = rest.partition(":")[0]
        if not sep or not name or not path.endswith(".py"):
            msg = f"--endpoint wants NAME=HANDLER.py[:WORKERS_MAX], got {spec!r}"
            raise ConfigurationError(msg)
        if not Path(path).is_file():
            msg = f"--endpoint {name}: handler file {path!r} does not exist"
            raise ConfigurationError(msg)
        workers = rest.partition(":")[2] or "1"
        try:
            ServerlessEndpoint(name=name, handler=path, workersMax=int(workers))
        except (ConfigurationError, ValueError) as exc:
            msg = f"--endpoint {spec!r}: {exc}"
            raise ConfigurationError(msg) from exc
        command += ["--endpoint", spec]
    return command


def _secured(state_dir: Path) -> Path:
    """The state folder checked (`secure_state_dir`, before symbolic links resolve), resolved."""
    secure_state_dir(state_dir)
    return state_dir.resolve()


def _spawn(command: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    private_dir(log_path.parent)
    with os.fdopen(open_private(log_path), "ab") as log:
        return subprocess.Popen(  # noqa: S603 (our own module)
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _log_tail(log_path: Path, lines: int) -> str:
    return "\n".join(log_path.read_text(errors="replace").strip().splitlines()[-lines:])


async def start_daemon(
    state_dir: Path,
    *,
    port: int = 0,
    endpoints: Sequence[str] = (),
    runpod_only: bool = False,
) -> DaemonStart:
    """Start the daemon for ``state_dir`` in the background and wait until it listens.

    Args:
        state_dir: the state folder, absolute and not resolved (a symbolic link is
            refused, see `flash_actors._private.secure_state_dir`).
        port: the port on 127.0.0.1 (0: any free one).
        endpoints: handler endpoints to serve, ``NAME=HANDLER.py[:WORKERS_MAX]`` each.
        runpod_only: answer as RunPod does, without the daemon's extensions (the RunPod
            provider's tests use it).

    Raises:
        StateDirError: the state folder is not safely ours.
        ConfigurationError: a bad ``port`` or endpoint spec.
        DaemonControlError: a daemon already runs on another port, or this one did not
            start within `START_TIMEOUT_S` (it is stopped) or exited (its log's end says
            why).
        OSError: the state folder cannot be used.
    """
    state_dir = await anyio.to_thread.run_sync(_secured, state_dir)
    log_path = state_dir / "logs" / "gateway.log"
    record = await anyio.to_thread.run_sync(live_daemon, state_dir)
    if record is not None:
        if port and record.port != port:
            msg = (
                f"flash local is already running on {record.url} (pid {record.pid}), not "
                f"on port {port}; run `flash local down` first"
            )
            raise DaemonControlError(msg)
        return DaemonStart(record, started=False, log_path=log_path)
    command = _daemon_command(state_dir, port, endpoints)
    if runpod_only:
        command.append("--runpod-only")
    process = await anyio.to_thread.run_sync(_spawn, command, log_path)
    try:
        return await _wait_started(process, state_dir, log_path)
    finally:
        with (
            warnings.catch_warnings()
        ):  # the daemon outlives this Popen object on purpose
            warnings.simplefilter("ignore", ResourceWarning)
            del process


async def _wait_started(
    process: subprocess.Popen[bytes], state_dir: Path, log_path: Path
) -> DaemonStart:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        code = process.poll()
        if code == ALREADY_RUNNING:  # another start won the race: wait for it, name it
            return await _wait_other(state_dir, log_path, deadline)
        if code is not None:
            tail = await anyio.to_thread.run_sync(_log_tail, log_path, 15)
            raise DaemonControlError("flash local failed to start:\n" + tail)
        record = read_record(state_dir)
        if record is not None and record.pid == process.pid:
            return DaemonStart(record, started=True, log_path=log_path)
        await anyio.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        await stop_process(_follow(process.pid), STOP_TIMEOUT_S)
    process.poll()  # reap it
    msg = f"flash local did not start within {START_TIMEOUT_S:.0f} s; see {log_path}"
    raise DaemonControlError(msg)


async def _wait_other(state_dir: Path, log_path: Path, deadline: float) -> DaemonStart:
    """Another daemon holds the folder (two starts at once): wait for its record."""
    while time.monotonic() < deadline:
        record = await anyio.to_thread.run_sync(live_daemon, state_dir)
        if record is not None:
            return DaemonStart(record, started=False, log_path=log_path)
        await anyio.sleep(0.05)
    tail = await anyio.to_thread.run_sync(_log_tail, log_path, 1)
    raise DaemonControlError("flash local did not start:\n" + tail)


def _request(record: DaemonRecord, method: str, path: str) -> Any:
    request = urllib.request.Request(  # noqa: S310 (http://127.0.0.1 only)
        record.url + path,
        method=method,
        headers={"Authorization": f"Bearer {record.api_key}"},
        data=b"" if method == "POST" else None,
    )
    with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310
        return json.loads(answer.read())


async def daemon_status(state_dir: Path) -> DaemonStatus | None:
    """The running daemon's endpoints, workers and queues; None when none runs.

    Raises:
        DaemonControlError: it runs but does not answer.
    """
    record = await anyio.to_thread.run_sync(live_daemon, state_dir)
    if record is None:
        return None
    try:
        table = await anyio.to_thread.run_sync(
            _request, record, "GET", "/flash/v1/status"
        )
    except (urllib.error.URLError, OSError) as exc:
        msg = f"flash local (pid {record.pid}) does not answer on {record.url}: {exc}"
        raise DaemonControlError(msg) from exc
    return DaemonStatus(record, table)


async def stop_daemon(state_dir: Path) -> DaemonRecord | None:
    """Stop the running daemon (and so every worker it started); None when none runs.

    It is asked to stop (``POST /flash/v1/shutdown``) and given `STOP_TIMEOUT_S`; then it
    gets SIGTERM and as long again, then SIGKILL. Its record is removed.

    Raises:
        DaemonControlError: it could not be signalled.
    """
    record = await anyio.to_thread.run_sync(live_daemon, state_dir)
    if record is None:
        return None
    try:  # followed before it is asked: its pid cannot be another's by the time we wait
        process: WorkerProcess | None = _follow(record.pid)
    except ProcessLookupError:
        process = None
    with contextlib.suppress(urllib.error.URLError, OSError):  # else the signals below
        await anyio.to_thread.run_sync(_request, record, "POST", "/flash/v1/shutdown")
    if process is not None:
        with anyio.move_on_after(STOP_TIMEOUT_S):
            await process.wait()
        try:
            await stop_process(process, STOP_TIMEOUT_S)
        except PermissionError as exc:
            msg = f"flash local (pid {record.pid}) did not stop"
            raise DaemonControlError(msg) from exc
    await anyio.to_thread.run_sync(remove_record, state_dir, record.pid)
    return record


def _follow(pid: int) -> WorkerProcess:
    """A process that is not our child, as `stop_process` drives it.

    Raises:
        ProcessLookupError: it is gone.
    """
    if hasattr(os, "pidfd_open"):
        return PidfdProcess(pid)
    if not pid_alive(pid):
        raise ProcessLookupError(pid)
    return _PolledProcess(pid)


class _PolledProcess:
    """A process followed by polling its pid, where there is no pidfd (not Linux)."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self._exited = False

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def returncode(self) -> int | None:
        return -1 if self._exited else None

    def send_signal(self, signum: signal.Signals, /) -> None:
        if not self._exited:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    async def wait(self) -> int:
        while pid_alive(self._pid):  # noqa: ASYNC110 (no event for another's exit here)
            await anyio.sleep(0.05)
        self._exited = True
        return -1

    async def aclose(self) -> None:
        pass
