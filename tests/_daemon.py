"""Shared by the tests that run a `flash local` daemon: start it, find its processes, stop them.

Everything here drives real processes on 127.0.0.1 by PID; nothing is mocked.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from flash_actors.providers.local.daemon.record import (
    DaemonRecord,
    pid_alive,
    read_record,
)

FILES = Path(__file__).parent / "gateway_files"
ECHO = FILES / "echo_handler.py"
GEN = FILES / "stream_handler.py"


def flash(
    *args: str, cwd: Path, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flash_actors_cli.main", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_script(
    name: str, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> Any:
    """Run ``gateway_files/<name>`` and return the JSON it prints."""
    done = subprocess.run(
        [sys.executable, str(FILES / name), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def workers_of(url: str) -> list[int]:
    """Every process started for the gateway at ``url``: RunPod's variables point at it."""
    needle = f"RUNPOD_WEBHOOK_GET_JOB={url}/".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if needle in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
    return found


def wait_gone(pids: list[int], seconds: float = 15) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        alive = [p for p in pids if pid_alive(p)]
        if not alive:
            return []
        time.sleep(0.05)
    return [p for p in pids if pid_alive(p)]


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class Daemon:
    """A daemon started with ``flash local up`` in ``state_dir``."""

    def __init__(
        self, state_dir: Path, *endpoints: str, runpod_only: bool = False
    ) -> None:
        self.state_dir = state_dir
        self.endpoints = endpoints
        self.runpod_only = runpod_only
        self.record: DaemonRecord | None = None
        self.up()

    def up(self) -> None:
        self.state_dir.parent.mkdir(parents=True, exist_ok=True)
        args = ["local", "--state-dir", str(self.state_dir), "up"]
        for spec in self.endpoints:
            args += ["--endpoint", spec]
        if self.runpod_only:
            args.append("--runpod-only")
        done = flash(*args, cwd=self.state_dir.parent)
        assert done.returncode == 0, done.stderr + done.stdout
        self.record = read_record(self.state_dir)
        assert self.record is not None
        assert self.record.url.startswith("http://127.0.0.1:")
        assert f"{self.record.url}/v2" in done.stdout

    @property
    def pid(self) -> int:
        assert self.record is not None
        return self.record.pid

    def client(self) -> httpx.Client:
        assert self.record is not None
        return httpx.Client(
            base_url=self.record.url,
            headers={"Authorization": f"Bearer {self.record.api_key}"},
            timeout=60,
        )

    def down(self) -> None:
        done = flash(
            "local",
            "--state-dir",
            str(self.state_dir),
            "down",
            cwd=self.state_dir.parent,
        )
        assert done.returncode == 0, done.stderr

    def stop(self) -> None:
        """Finalizer: down, then make sure by PID that nothing is left."""
        if self.record is None:
            return
        assert self.record is not None
        leftovers = [self.pid, *descendants(self.pid), *workers_of(self.record.url)]
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
            self.down()
        left = wait_gone(sorted({*leftovers, *workers_of(self.record.url)}), 10)
        kill_all(left)
        assert left == [], f"processes left running: {left}"


def run_job(
    client: httpx.Client, endpoint: str, payload: dict[str, Any], **extra: Any
) -> str:
    answer = client.post(f"/v2/{endpoint}/run", json={"input": payload, **extra})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["status"] == "IN_QUEUE"
    job_id: str = body["id"]
    return job_id


def wait_for(
    client: httpx.Client, endpoint: str, job_id: str, statuses: set[str]
) -> dict[str, Any]:
    deadline = time.monotonic() + 45
    while True:
        body: dict[str, Any] = client.get(f"/v2/{endpoint}/status/{job_id}").json()
        if body["status"] in statuses or time.monotonic() > deadline:
            return body
        time.sleep(0.05)
