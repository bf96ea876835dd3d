"""Shared by the tests that run `flash build --preview`: write an app, preview it, stop it.

Real processes by PID, real HTTP on 127.0.0.1; nothing is mocked.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx

from tests._daemon import descendants, kill_all, wait_gone


def clean_env() -> dict[str, str]:
    """This environment without our settings, RunPod's or a PYTHONPATH to the sources."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FLASH_", "RUNPOD_", "PYTHON"))
    }


def write_app(root: Path, files: dict[str, str]) -> Path:
    root.mkdir(parents=True)
    for name, text in files.items():
        (root / name).write_text(textwrap.dedent(text))
    return root


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class Preview:
    """``flash build --preview --port PORT`` running in ``project``, until `stop`."""

    def __init__(self, project: Path, *, port: int | None = None) -> None:
        self.project = project
        self.port = port or free_port()
        self.log = project.parent / f"{project.name}-preview.log"
        self.info_file = project / ".flash" / ".preview" / "preview.json"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [
                    *(sys.executable, "-m", "flash_actors_cli.main", "build"),
                    *("--preview", "--port", str(self.port)),
                ],
                cwd=project,
                env=clean_env(),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.pids: list[int] = []
        self.info: dict[str, Any] = {}

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, seconds: float = 150) -> dict[str, Any]:
        """Until it has written preview.json; every process it started is then known."""
        deadline = time.monotonic() + seconds
        while not self.info_file.is_file():
            assert self.process.poll() is None, self.output()[-3000:]
            assert time.monotonic() < deadline, self.output()[-3000:]
            time.sleep(0.05)
        self.info = json.loads(self.info_file.read_text())
        self.pids = sorted({*self.info["pids"], *descendants(self.process.pid)})
        return self.info

    def runsync(self, resource: str, job_input: Any) -> httpx.Response:
        return httpx.post(
            f"{self.info['daemon_url']}/v2/{resource}/runsync",
            json={"input": job_input},
            headers={"Authorization": f"Bearer {self.info['api_key']}"},
            timeout=60,
        )

    def stop(self, signum: int = signal.SIGINT) -> int:
        """Send ``signum``; the exit code once it has exited (30 s at most)."""
        self.process.send_signal(signum)
        return self.process.wait(timeout=30)

    def kill(self) -> None:
        """Whatever is left (a failed test): SIGKILL by PID."""
        left = [*self.pids, *descendants(self.process.pid)]
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        kill_all(left)
        wait_gone(left)


def cleanup(preview: Preview) -> None:
    """A fixture's finalizer: nothing it started outlives the test."""
    if preview.process.poll() is None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            preview.stop(signal.SIGTERM)
    preview.kill()
