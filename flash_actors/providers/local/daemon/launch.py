"""``python -m flash_actors.providers.local.daemon.launch HANDLER.py``: one handler worker, and all it starts.

The launcher leads its own process group (the daemon starts it in a new session) and runs
the handler file, unmodified, as ``python HANDLER.py`` in that group. Stock ``runpod``
workers start helper processes of their own (a heartbeat process), so stopping a worker
means stopping the group: on SIGTERM or SIGINT the launcher sends SIGTERM to the whole
group, waits up to 3 s, then SIGKILLs what is left. When the daemon that started it dies
(``FLASH_PARENT_PID``: Linux's parent-death signal, and a thread watching the parent on every
platform) the group is SIGKILLed at once: a job finished after that has nowhere to go, and
the restarted daemon runs it again. When the handler exits by itself, the rest of its group
goes with it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from flash_actors._lifeline import die_with_parent

if TYPE_CHECKING:
    from types import FrameType

GRACE_S = 3.0


def _end_group(child: subprocess.Popen[bytes] | None, code: int) -> None:
    """SIGTERM the group (not us), wait for the handler, SIGKILL the group (us included)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        os.killpg(0, signal.SIGTERM)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=GRACE_S)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.killpg(0, signal.SIGKILL)  # whatever is left, this process last
    finally:
        os._exit(code)


def _kill_group() -> None:
    """The daemon is gone: SIGKILL the whole group, this process included, no grace."""
    try:
        os.killpg(0, signal.SIGKILL)
    finally:
        os._exit(1)


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    _kill_group()


def main() -> None:
    """Tie the group to the daemon, run the handler, end the group with it."""
    if len(sys.argv) != 2:
        sys.exit(
            "usage: python -m flash_actors.providers.local.daemon.launch HANDLER.py"
        )
    handler = Path(sys.argv[1]).resolve()
    parent = int(os.environ.get("FLASH_PARENT_PID", "0") or 0)
    child: subprocess.Popen[bytes] | None = None

    def stop(signum: int, frame: FrameType | None) -> None:
        del frame
        _end_group(child, 128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if parent:
        if not die_with_parent(parent, _kill_group):
            sys.exit(1)  # the daemon is already gone
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    child = subprocess.Popen([sys.executable, str(handler)], cwd=handler.parent)  # noqa: S603
    code = child.wait()
    _end_group(None, code)


if __name__ == "__main__":
    main()
