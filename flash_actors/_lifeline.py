"""Processes that die with their parent: Linux's parent-death signal, checked at start.

The daemon's workers must not outlive it: a worker that finishes a job after the daemon died
has nowhere to deliver the result, and the restarted daemon runs the job again. On Linux,
``prctl(PR_SET_PDEATHSIG)`` has the kernel signal a process the moment its parent dies. The
kernel means the parent *thread* that started the process, though, and trio starts processes
from worker threads that end while the parent lives on; so unless the parent is known to
start us from a thread that lives as long as it does (the fork template), the signal is one
we handle (`PARENT_DIED`), and the handler acts only when the parent process is really gone.

The chain holds link by link: daemon -> fork template (which exits when its control socket
closes) -> forked workers (SIGKILL with the template), daemon -> directly started workers,
daemon -> handler launchers (which SIGKILL their process group). Elsewhere the pid watchers
(`flash_actors.worker.server`, `flash_actors.providers.local.daemon.launch`) are the fallback.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import FrameType

__all__ = ["PARENT_DIED", "die_with_parent"]

PR_SET_PDEATHSIG = 1
PARENT_DIED = signal.SIGUSR2
"""The parent-death signal when ``on_death`` is given."""


def die_with_parent(parent: int, on_death: Callable[[], object] | None = None) -> bool:
    """Have the kernel tell this process when its parent dies (Linux; elsewhere a no-op).

    Call it first thing in the child. Without ``on_death`` the signal is SIGKILL: only for a
    parent that starts us from a thread that lives as long as it does. With ``on_death``,
    `PARENT_DIED` is handled in the main thread: ``on_death()`` runs once ``parent`` is no
    longer our parent (a thread of it that ended is not its death).

    Returns:
        False when ``parent`` is already gone (this process was re-parented before it could
        ask), so that the caller exits at once.
    """
    if sys.platform.startswith("linux"):
        signum = signal.SIGKILL
        if on_death is not None:

            def check(signum: int, frame: FrameType | None) -> None:
                del signum, frame
                if os.getppid() != parent:
                    on_death()

            signal.signal(PARENT_DIED, check)
            signum = PARENT_DIED
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
    return os.getppid() == parent
