"""``python -m flash_actors.gateway.launch HANDLER.py``: run a RunPod handler file as a worker.

The file runs unmodified, as ``__main__`` with its own folder first on ``sys.path``. Before
that the process arranges to die with the daemon that started it (``FLASH_PARENT_PID``):
Linux's parent-death signal, and on every platform a thread that watches the parent.
"""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import sys
import threading
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1


def _watch_parent(parent: int) -> None:
    while True:
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(3)
            os._exit(1)
        time.sleep(1)


def main() -> None:
    """Tie this process to the daemon, then run the handler file."""
    if len(sys.argv) != 2:
        sys.exit("usage: python -m flash_actors.gateway.launch HANDLER.py")
    handler = Path(sys.argv[1]).resolve()
    parent = int(os.environ.get("FLASH_PARENT_PID", "0") or 0)
    if parent:
        if sys.platform.startswith("linux"):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:
            sys.exit(1)  # the daemon is already gone
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    sys.argv = [str(handler)]
    sys.path.insert(0, str(handler.parent))
    runpy.run_path(str(handler), run_name="__main__")


if __name__ == "__main__":
    main()
