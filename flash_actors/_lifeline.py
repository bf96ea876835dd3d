"""Processes that die with their parent: Linux's parent-death signal, checked at start.

The daemon's workers must not outlive it: a worker that finishes a job after the daemon died
has nowhere to deliver the result, and the restarted daemon runs the job again. On Linux,
``prctl(PR_SET_PDEATHSIG)`` has the kernel signal a process the moment its parent dies (more
exactly, the parent *thread* that started it, so processes are started from the thread that
lives as long as the parent: the event loop's). The chain holds link by link: daemon ->
fork template -> forked workers, daemon -> directly started workers, daemon -> handler
launchers. Elsewhere the pid watchers (`flash_actors.worker.server`,
`flash_actors.gateway.launch`) are the fallback.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

__all__ = ["die_with_parent"]

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int, signum: int = signal.SIGKILL) -> bool:
    """Have the kernel send ``signum`` to this process when its parent dies (Linux).

    Call it first thing in the child. Returns False when the parent is already gone (this
    process was re-parented before it could ask), so the caller exits at once.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
    return os.getppid() == parent
