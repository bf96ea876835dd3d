"""A bare worker process (``python -m flash_actors.worker``) for the tests that speak to it.

It serves on a loopback socket this process binds and hands over, as the local pool does; the
caller gets its port and bearer token, and the process once it answers ``/ping``. It is stopped
by its PID (SIGTERM, then SIGKILL) when the block ends.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from collections.abc import Iterator


@contextlib.contextmanager
def worker_process(
    env: dict[str, str],
) -> Iterator[tuple[int, str, subprocess.Popen[bytes]]]:
    """Start a worker with ``env`` added to ours: its port, token and process."""
    token = secrets.token_hex(8)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "flash_actors.worker", "--fd", str(listener.fileno())],
        pass_fds=[listener.fileno()],
        env={**os.environ, "FLASH_WORKER_TOKEN": token, **env},
    )
    listener.close()
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ping").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.05)
        yield port, token, process
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
