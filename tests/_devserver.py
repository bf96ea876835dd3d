"""Shared by the ``flash run`` / ``flash init`` tests: start the real ``flash run``, stop it.

Everything runs the real command in a subprocess on 127.0.0.1 and is stopped by PID.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests._daemon import descendants, kill_all, wait_gone


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


class DevServer:
    """``flash run ARGS`` in ``cwd``; `stop` sends Ctrl-C and checks nothing is left."""

    def __init__(
        self,
        cwd: Path,
        *args: str,
        python: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.cwd = cwd
        self.log = cwd.parent / f"flash-run-{time.monotonic_ns()}.log"
        command = (
            [python, "-m", "flash_actors_cli.main", "run", *args]
            if python
            else [sys.executable, "-m", "flash_actors_cli.main", "run", *args]
        )
        full_env = (
            dict(os.environ) if env is None else env
        )  # env: the whole environment
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=full_env
            )
        self.seen: set[int] = set()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def remember(self) -> list[int]:
        """Record (and return) every process below the server now."""
        found = descendants(self.proc.pid)
        self.seen.update(found)
        return found

    def wait_up(self, port: int, seconds: float = 30) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                msg = f"flash run exited ({self.proc.returncode}):\n{self.output()}"
                raise AssertionError(msg)
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ping", timeout=2).is_success:
                    self.remember()
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        msg = f"flash run did not answer on {port}:\n{self.output()}"
        raise AssertionError(msg)

    def stop(self) -> None:
        """Ctrl-C (SIGINT to the command only); every process it started must be gone."""
        self.remember()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        left = wait_gone(sorted(self.seen))
        kill_all(left)
        assert not left, f"left running after Ctrl-C: {left}\n{self.output()}"

    def __enter__(self) -> DevServer:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.stop()
            return
        with contextlib.suppress(AssertionError):  # the test's own failure shows
            self.stop()
