"""``flash local up | status | down``: the local gateway daemon.

``up`` starts ``python -m flash_actors.providers.local.daemon`` in its own session (it outlives the
command), waits until it listens and prints its URL (one state folder, one daemon: when
another ``up`` won the race, it says who runs); ``status`` prints its endpoints,
workers and queues; ``down`` asks it to stop, waits for its PID to exit (SIGTERM, then
SIGKILL as a last resort) and so stops every worker it started.
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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flash_actors._private import (
    StateDirError,
    open_private,
    private_dir,
    secure_state_dir,
)
from flash_actors.errors import ConfigurationError
from flash_actors.providers.local.daemon.record import (
    ALREADY_RUNNING,
    RECORD_NAME,
    DaemonRecord,
    is_gateway,
    pid_alive,
    read_record,
)
from flash_actors.resources import ServerlessEndpoint

if TYPE_CHECKING:
    import argparse

__all__ = ["add_parser", "run"]

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0


def add_parser(commands: Any) -> None:
    """Add ``flash local`` and its sub-commands to ``flash``'s sub-parsers."""
    local = commands.add_parser(
        "local",
        help="run the local gateway daemon (RunPod's API on 127.0.0.1)",
        description="The local gateway: warm workers across runs, RunPod's API on 127.0.0.1.",
    )
    local.add_argument(
        "--state-dir",
        default=".flash",
        help="where the daemon keeps its record, queue and logs (default: .flash)",
    )
    sub = local.add_subparsers(dest="local_command", metavar="COMMAND", required=True)
    up = sub.add_parser("up", help="start the daemon in the background")
    up.add_argument(
        "--port", type=int, default=0, help="port on 127.0.0.1 (default: any free)"
    )
    up.add_argument(
        "--endpoint",
        action="append",
        default=[],
        metavar="NAME=HANDLER.py[:WORKERS_MAX]",
        help="serve a RunPod handler file as endpoint NAME (repeatable)",
    )
    sub.add_parser("status", help="show endpoints, workers and queue depths")
    sub.add_parser("down", help="stop the daemon and every worker it started")


def _request(record: DaemonRecord, method: str, path: str) -> Any:
    request = urllib.request.Request(  # noqa: S310 (http://127.0.0.1 only)
        record.url + path,
        method=method,
        headers={"Authorization": f"Bearer {record.api_key}"},
        data=b"" if method == "POST" else None,
    )
    with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310
        return json.loads(answer.read())


def _live(state_dir: Path) -> DaemonRecord | None:
    record = read_record(state_dir)
    if record is None:
        return None
    # a hard-killed daemon (or a reboot) leaves its record, and its pid may be another
    # program's now: `down` must not signal that, nor `up` take it for a daemon
    if not (pid_alive(record.pid) and is_gateway(record.pid)):
        (state_dir / RECORD_NAME).unlink(missing_ok=True)  # stale: its daemon died
        return None
    return record


def _up(args: argparse.Namespace, state_dir: Path) -> int:
    record = _live(state_dir)
    if record is not None:
        if args.port and record.port != args.port:
            print(
                f"flash local is already running on {record.url} (pid {record.pid}), not on "
                f"port {args.port}; run `flash local down` first",
                file=sys.stderr,
            )
            return 1
        print(f"flash local is already running: {record.url}/v2 (pid {record.pid})")
        return 0
    if not 0 <= args.port < 65536:
        print(f"--port must be between 0 and 65535, got {args.port}", file=sys.stderr)
        return 2
    command = [
        sys.executable,
        "-m",
        "flash_actors.providers.local.daemon",
        "--state-dir",
        str(state_dir),
        "--port",
        str(args.port),
    ]
    for spec in args.endpoint:
        name, sep, rest = spec.partition("=")
        path = rest.partition(":")[0]
        if not sep or not name or not path.endswith(".py"):
            print(
                f"--endpoint wants NAME=HANDLER.py[:WORKERS_MAX], got {spec!r}",
                file=sys.stderr,
            )
            return 2
        if not Path(path).is_file():
            print(
                f"--endpoint {name}: handler file {path!r} does not exist",
                file=sys.stderr,
            )
            return 2
        workers = rest.partition(":")[2] or "1"
        try:  # the daemon's own checks, before it starts (a clear line, not its traceback)
            ServerlessEndpoint(name=name, handler=path, workersMax=int(workers))
        except (ConfigurationError, ValueError) as exc:
            print(f"--endpoint {spec!r}: {exc}", file=sys.stderr)
            return 2
        command += ["--endpoint", spec]
    log_path = private_dir(state_dir / "logs") / "gateway.log"
    with os.fdopen(open_private(log_path), "ab") as log:
        process = subprocess.Popen(  # noqa: S603 (our own module)
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            code = process.poll()
            if code == ALREADY_RUNNING:
                return _already_running(state_dir, log_path, deadline)
            if code is not None:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
                print(
                    "flash local failed to start:\n" + "\n".join(tail), file=sys.stderr
                )
                return 1
            record = read_record(state_dir)
            if record is not None and record.pid == process.pid:
                print(f"flash local is up: {record.url}/v2 (pid {record.pid})")
                print(f"  RUNPOD_ENDPOINT_BASE_URL={record.url}/v2")
                print(f"  RUNPOD_API_KEY={record.api_key}")
                print(f"  logs: {log_path}")
                return 0
            time.sleep(0.05)
        print(
            f"flash local did not start within {START_TIMEOUT_S:.0f} s; see {log_path}",
            file=sys.stderr,
        )
        _stop_pid(process.pid)
        return 1
    finally:
        with (
            warnings.catch_warnings()
        ):  # the daemon outlives this Popen object on purpose
            warnings.simplefilter("ignore", ResourceWarning)
            del process


def _already_running(state_dir: Path, log_path: Path, deadline: float) -> int:
    """Another daemon holds the folder (two ``up`` at once): wait for it, then name it."""
    while time.monotonic() < deadline:
        record = _live(state_dir)
        if record is not None:
            print(f"flash local is already running: {record.url}/v2 (pid {record.pid})")
            return 0
        time.sleep(0.05)
    tail = log_path.read_text(errors="replace").strip().splitlines()[-1:]
    print("flash local did not start:\n" + "\n".join(tail), file=sys.stderr)
    return 1


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            cell.ljust(width) for cell, width in zip(row, widths, strict=True)
        ).rstrip()
        for row in rows
    )


def _status(state_dir: Path) -> int:
    record = _live(state_dir)
    if record is None:
        print("flash local is not running (start it with `flash local up`)")
        return 1
    try:
        status = _request(record, "GET", "/flash/v1/status")
    except (urllib.error.URLError, OSError) as exc:
        print(
            f"flash local (pid {record.pid}) does not answer on {record.url}: {exc}",
            file=sys.stderr,
        )
        return 1
    uptime = int(time.time() - float(status["started"]))
    print(f"flash local: {record.url}/v2 (pid {record.pid}, up {uptime} s)")
    rows = [
        [
            "ENDPOINT",
            "KIND",
            "WORKERS",
            "IDLE",
            "RUNNING",
            "STARTING",
            "QUEUED",
            "IN PROGRESS",
            "COMPLETED",
            "FAILED",
        ]
    ]
    for endpoint in status["endpoints"]:
        jobs, workers = endpoint["jobs"], endpoint["workers"]
        total = workers["idle"] + workers["running"] + workers["initializing"]
        rows.append(
            [
                endpoint["name"],
                endpoint["kind"]
                if endpoint["kind"] == "flash"
                else "handler " + Path(endpoint["handler"]).name,
                f"{total}/{endpoint['workersMax']}",
                str(workers["idle"]),
                str(workers["running"]),
                str(workers["initializing"]),
                str(jobs["inQueue"]),
                str(jobs["inProgress"]),
                str(jobs["completed"]),
                str(jobs["failed"]),
            ]
        )
    if len(rows) == 1:
        print(
            "no endpoints yet: they appear when a script or `--endpoint` registers one"
        )
    else:
        print(_table(rows))
    return 0


def _stop_pid(pid: int) -> bool:
    """SIGTERM, wait, then SIGKILL; True once the process is gone."""
    for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                return True
            time.sleep(0.05)
    return not pid_alive(pid)


def _down(state_dir: Path) -> int:
    record = _live(state_dir)
    if record is None:
        print("flash local is not running")
        return 0
    with contextlib.suppress(urllib.error.URLError, OSError):  # else the signals below
        _request(record, "POST", "/flash/v1/shutdown")
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline and pid_alive(record.pid):
        time.sleep(0.05)
    if pid_alive(record.pid) and not _stop_pid(record.pid):
        print(f"flash local (pid {record.pid}) did not stop", file=sys.stderr)
        return 1
    (state_dir / RECORD_NAME).unlink(missing_ok=True)
    print(f"flash local stopped (pid {record.pid})")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run ``flash local <command>``; returns the exit code."""
    if args.local_command == "up":
        given = Path(args.state_dir).absolute()  # not resolved: a link is refused
        try:
            secure_state_dir(given)
        except StateDirError as exc:
            print(f"flash local: {exc}", file=sys.stderr)
            return 1
    state_dir = Path(args.state_dir).resolve()
    if args.local_command == "up":
        try:
            return _up(args, state_dir)
        except OSError as exc:  # e.g. its logs/ is a file: say so, not a traceback
            print(f"flash local: cannot use {state_dir}: {exc}", file=sys.stderr)
            return 1
    if args.local_command == "status":
        return _status(state_dir)
    return _down(state_dir)
