"""One `flash build` (or preview) at a time per project: an advisory lock in ``.flash/``.

Two builds of one project share ``.flash/.build/`` (the second would empty it under the
first), and two previews ``.flash/.preview/``. The lock is ``flock`` on a file named for
the work, so the kernel releases it however the holder dies; the file holds the holder's pid
for the message the next one gives.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from typing import TYPE_CHECKING

from flash_actors._private import open_private, private_dir
from flash_actors.errors import BuildError

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

__all__ = ["project_lock"]


@contextlib.contextmanager
def project_lock(root: Path, work: str) -> Iterator[None]:
    """Hold ``<root>/.flash/<work>.lock`` while the block runs.

    Raises:
        BuildError: another process holds it (its pid in the message).
    """
    folder = root / ".flash"
    private_dir(folder)
    fd = open_private(folder / f"{work}.lock", os.O_RDWR | os.O_CREAT)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            msg = (
                f"another flash {work} of {root} is running (pid {holder}): wait for it "
                "or stop it first"
            )
            raise BuildError(msg) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)
