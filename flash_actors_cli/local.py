"""``flash local up | status | down``: the local gateway daemon.

``up`` starts the daemon in the background, waits until it listens and prints its URL (one
state folder, one daemon: when another ``up`` won the race, it says who runs); ``status``
prints its endpoints, workers and queues (``--json``: the daemon's own status document);
``down`` stops it and so every worker it started. Each calls one function of
`flash_actors.providers.local.daemon.control` and prints. Failures are one ``flash: error:``
line and a hint (``-v`` adds the traceback): exit code 2 for a bad option, else 1.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from flash_actors._private import StateDirError
from flash_actors.errors import ConfigurationError
from flash_actors.providers.local.daemon.control import (
    DaemonControlError,
    daemon_status,
    start_daemon,
    stop_daemon,
)
from flash_actors_cli._target import STATE_DIR_HINT, fail

if TYPE_CHECKING:
    import argparse

__all__ = ["add_parser", "run"]


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
        help="serve a RunPod handler file as endpoint NAME (repeatable) (default: none)",
    )
    up.add_argument(
        "--runpod-only",
        action="store_true",
        help="answer exactly as RunPod does, without this daemon's extensions "
        "(caller job ids, long-polled status, the stream flag) (default: off)",
    )
    status = sub.add_parser("status", help="show endpoints, workers and queue depths")
    status.add_argument(
        "--json",
        action="store_true",
        help="print the daemon's record and status as JSON instead of a table "
        "(default: off)",
    )
    down = sub.add_parser("down", help="stop the daemon and every worker it started")
    for parser in (up, status, down):
        parser.add_argument(
            "--verbose",
            "-v",
            action="store_true",
            help="show a failure's traceback (default: off)",
        )


def _daemon_error(exc: DaemonControlError, log: Path, *, verbose: bool) -> int:
    """A daemon that did not start or answer: its message, cut to one line, and a hint."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    if len(lines) > 1:  # "failed to start:" and the end of its log; its last line: why
        text = f"{text.rstrip(':')}: {lines[-1].strip().removeprefix('flash local: ')}"
    return fail(text, f"see {log}; -v shows the traceback", verbose=verbose)


def _up(args: argparse.Namespace) -> int:
    given = Path(args.state_dir).absolute()  # not resolved: a link is refused
    try:
        start = anyio.run(
            lambda: start_daemon(
                given,
                port=args.port,
                endpoints=args.endpoint,
                runpod_only=args.runpod_only,
            )
        )
    except StateDirError as exc:
        return fail(str(exc), STATE_DIR_HINT, verbose=args.verbose)
    except ConfigurationError as exc:
        return fail(
            str(exc),
            "`flash local up --help` shows the options",
            verbose=args.verbose,
            code=2,
        )
    except DaemonControlError as exc:
        return _daemon_error(exc, given / "logs" / "gateway.log", verbose=args.verbose)
    except OSError as exc:  # e.g. its logs/ is a file: say so, not a traceback
        return fail(
            f"cannot use {Path(args.state_dir).resolve()}: {exc}",
            "check that folder and its permissions; -v shows the traceback",
            verbose=args.verbose,
        )
    record = start.record
    if not start.started:
        print(f"flash local is already running: {record.url}/v2 (pid {record.pid})")
        return 0
    print(f"flash local is up: {record.url}/v2 (pid {record.pid})")
    print(f"  RUNPOD_ENDPOINT_BASE_URL={record.url}/v2")
    print(f"  RUNPOD_API_BASE_URL={record.url}")
    print(f"  RUNPOD_API_KEY={record.api_key}")
    print(f"  logs: {start.log_path}")
    return 0


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            cell.ljust(width) for cell, width in zip(row, widths, strict=True)
        ).rstrip()
        for row in rows
    )


def _status(state_dir: Path, args: argparse.Namespace) -> int:
    try:
        found = anyio.run(daemon_status, state_dir)
    except DaemonControlError as exc:
        return _daemon_error(
            exc, state_dir / "logs" / "gateway.log", verbose=args.verbose
        )
    if found is None:
        return fail("flash local is not running", "start it with `flash local up`")
    record, status = found.record, found.table
    if args.json:
        print(
            json.dumps(
                {"url": record.url, "pid": record.pid, **status},
                indent=2,
                sort_keys=True,
                default=str,
            )
        )
        return 0
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


def _down(state_dir: Path, args: argparse.Namespace) -> int:
    try:
        record = anyio.run(stop_daemon, state_dir)
    except DaemonControlError as exc:
        return _daemon_error(
            exc, state_dir / "logs" / "gateway.log", verbose=args.verbose
        )
    if record is None:
        print("flash local is not running")
        return 0
    print(f"flash local stopped (pid {record.pid})")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run ``flash local <command>``; returns the exit code."""
    if args.local_command == "up":
        return _up(args)
    state_dir = Path(args.state_dir).resolve()
    if args.local_command == "status":
        return _status(state_dir, args)
    return _down(state_dir, args)
