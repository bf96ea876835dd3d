"""The ``flash local`` daemon's state folder and its life (issue 9, items 2, 8, 9 and 10).

- Everything under ``.flash/`` is its owner's alone, whatever the umask (the store holds the
  API key, the master secret and every job's data); a looser folder is tightened, a linked
  or foreign one refused.
- One folder, one daemon: two ``flash local up`` at once start one daemon.
- A killed daemon's workers die with it, so only jobs running at that moment run twice.
- Calls ride out a daemon restart; a call reported failed does not run afterwards.

Real processes, signals, files and sockets on 127.0.0.1; every process is stopped by PID.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from flash_actors.providers.local.daemon.record import LOCK_NAME, read_record
from tests._daemon import (
    FILES,
    Daemon,
    descendants,
    flash,
    kill_all,
    wait_gone,
    workers_of,
)

COUNT = FILES / "count_handler.py"


def _loose(root: Path) -> list[str]:
    """Everything under ``root`` (itself included) that is not 0700 (folders) / 0600 (files)."""
    wrong = []
    for path in [root, *root.rglob("*")]:
        info = path.lstat()
        want = 0o700 if stat.S_ISDIR(info.st_mode) else 0o600
        if stat.S_IMODE(info.st_mode) != want:
            wrong.append(f"{oct(stat.S_IMODE(info.st_mode))} {path}")
    return wrong


def _script(name: str, *args: str, cwd: Path, env: dict[str, str] | None = None) -> Any:
    done = subprocess.run(
        [sys.executable, str(FILES / name), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        umask=0,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@contextlib.contextmanager
def _umask(mask: int) -> Any:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


# -- item 2: a private state folder ----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_everything_under_the_state_folder_is_private_whatever_the_umask(
    tmp_path: Path,
) -> None:
    state = tmp_path / ".flash"
    (state / "logs").mkdir(parents=True)
    old_log = state / "logs" / "gateway.log"
    old_log.write_text("from an older version\n")
    for path, mode in ((state, 0o777), (state / "logs", 0o777), (old_log, 0o666)):
        path.chmod(mode)
    with _umask(0):
        d = Daemon(state, f"count={COUNT}:1")
    try:
        with d.client() as client:
            done = client.post(
                "/v2/count/runsync",
                json={"input": {"log": str(tmp_path / "runs.log")}},
            ).json()
            assert done["status"] == "COMPLETED", done
        # a Flash endpoint too: the fork template's workers open their own logs
        assert _script("remote_script.py", "asyncio", cwd=tmp_path)["x"] == 1
        names = {p.name for p in state.rglob("*")}
        assert {"gateway.sqlite3", "gateway.sqlite3-wal", "local.json"} <= names
        assert {LOCK_NAME, "gateway.log", "count", "gw-remote"} <= names
        assert _loose(state) == []
    finally:
        d.stop()
    assert _loose(state) == []

    # the embedded provider (no daemon) keeps its worker logs private as well
    embedded = tmp_path / "embedded"
    embedded.mkdir()
    env = {**os.environ, "FLASH_LOCAL": "0"}
    assert _script("remote_script.py", "asyncio", cwd=embedded, env=env)["x"] == 1
    assert list((embedded / ".flash" / "logs" / "gw-remote").glob("*.log"))
    assert _loose(embedded / ".flash") == []


def test_a_linked_or_foreign_state_folder_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    done = flash("local", "--state-dir", "link", "up", cwd=tmp_path)
    started = read_record(real)
    if started is not None:  # it followed the link: stop what it started
        kill_all([started.pid, *descendants(started.pid)])
    assert done.returncode == 1
    assert re.match(
        r"flash: error: state folder '.*/link' is a symbolic link; refusing",
        done.stderr,
    ), done.stderr
    assert list(real.iterdir()) == []
    if os.getuid() == 0:  # only root can hand a folder to another user
        foreign = tmp_path / "foreign"
        foreign.mkdir(mode=0o755)
        os.chown(foreign, 54321, 54321)
        done = flash("local", "--state-dir", "foreign", "up", cwd=tmp_path)
        assert done.returncode == 1
        assert re.match(
            r"flash: error: state folder '.*/foreign' belongs to another user \(uid 54321",
            done.stderr,
        ), done.stderr
        assert list(foreign.iterdir()) == []


# -- item 8: one folder, one daemon ----------------------------------------------------------


def _daemons_of(state: Path) -> list[int]:
    """Every daemon process serving ``state`` (by its command line)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                if (
                    b"flash_actors.providers.local.daemon" in argv
                    and str(state).encode() in argv
                ):
                    found.append(int(entry.name))
    return found


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_two_ups_at_once_start_one_daemon(tmp_path: Path) -> None:
    state = tmp_path / ".flash"
    command = [
        sys.executable,
        "-m",
        "flash_actors_cli.main",
        "local",
        "--state-dir",
        str(state),
        "up",
        "--endpoint",
        f"count={COUNT}:2",
    ]
    ups = [
        subprocess.Popen(
            command,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [up.communicate(timeout=60)[0] for up in ups]
    record = read_record(state)
    d = Daemon.__new__(Daemon)  # adopt the daemon that won, for the finalizer
    d.state_dir, d.endpoints, d.record = state, (), record
    try:
        assert [up.returncode for up in ups] == [0, 0], outputs
        assert record is not None
        assert _daemons_of(state) == [record.pid]
        # one says it started the daemon, the other that it was already running; both name it
        assert sorted(o.splitlines()[0].split(":")[0] for o in outputs) == [
            "flash local is already running",
            "flash local is up",
        ], outputs
        for output in outputs:
            assert f"{record.url}/v2 (pid {record.pid})" in output
        assert (state / LOCK_NAME).read_text().strip() == str(record.pid)
        runs = tmp_path / "runs.log"
        with d.client() as client:
            ids = []
            for _ in range(6):
                answer = client.post(
                    "/v2/count/run", json={"input": {"log": str(runs)}}
                )
                assert answer.status_code == 200, answer.text
                ids.append(answer.json()["id"])
            for job_id in ids:
                deadline = time.monotonic() + 60
                while (
                    status := client.get(f"/v2/count/status/{job_id}").json()["status"]
                ) != "COMPLETED" and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert status == "COMPLETED"
        counts = collections.Counter(runs.read_text().split())
        assert sorted(counts) == sorted(ids)
        assert set(counts.values()) == {1}  # no job ran twice
    finally:
        kill_all([p for p in _daemons_of(state) if record is None or p != record.pid])
        d.stop()


# -- items 9 and 10: a killed or restarted daemon --------------------------------------------


def _runs(log: Path) -> tuple[collections.Counter[str], collections.Counter[str]]:
    """How often each job started and ended, from ``state_script.py``'s log."""
    starts: collections.Counter[str] = collections.Counter()
    ends: collections.Counter[str] = collections.Counter()
    if log.exists():
        for line in log.read_text().splitlines():
            kind, _, job = line.partition(" ")
            (starts if kind == "start" else ends)[job] += 1
    return starts, ends


def _wait_started(log: Path, count: int, script: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while sum(_runs(log)[0].values()) < count:
        assert script.poll() is None, script.communicate()
        assert time.monotonic() < deadline, "the script's calls did not start"
        time.sleep(0.01)


def _start_script(
    tmp_path: Path, log: Path, n: int, seconds: float, **env: str
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            str(FILES / "state_script.py"),
            "asyncio",
            str(log),
            str(n),
            str(seconds),
        ],
        cwd=tmp_path,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _result(script: subprocess.Popen[str]) -> Any:
    out, err = script.communicate(timeout=120)
    assert script.returncode == 0, err[-3000:]
    return json.loads(out)


def _stop(script: subprocess.Popen[str]) -> None:
    if script.poll() is None:
        script.kill()
        script.communicate()


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_a_killed_daemon_takes_its_workers_with_it(tmp_path: Path) -> None:
    """SIGKILL of the daemon: every worker and the fork template go at once, no job running
    then finishes afterwards, the script's calls all complete once the daemon is back, and
    only the jobs that had started by the kill run twice (at-least-once delivery)."""
    d = Daemon(tmp_path / ".flash", f"count={COUNT}:1")
    log = tmp_path / "runs.log"
    script = _start_script(tmp_path, log, 12, 1.5)
    try:
        with d.client() as client:  # a handler worker as well: a busy launcher group
            answer = client.post(
                "/v2/count/run",
                json={"input": {"log": str(tmp_path / "h.log"), "seconds": 30}},
            )
            assert answer.status_code == 200
        _wait_started(log, 1, script)
        assert d.record is not None
        processes = [*descendants(d.pid), *workers_of(d.record.url)]
        assert len(processes) >= 4  # template, Flash worker, handler launcher + handler
        os.kill(d.pid, signal.SIGKILL)
        ended = _runs(log)[1]
        assert wait_gone([d.pid, *processes], 10) == []
        # A job may have started in the instant between the kill and its worker's death
        # (the kill is not atomic across processes); none finished after it.
        started, ended_after = _runs(log)
        assert ended_after == ended
        assert set(started) - set(ended)  # jobs were running at the kill
        d.up()
        result = _result(script)
        assert result == {"ok": list(range(12)), "failed": {}}
        starts, ends = _runs(log)
        assert set(ends) == {str(i) for i in range(12)}
        twice = {job for job, n in starts.items() if n > 1}
        assert twice <= set(started)  # only jobs started before the kill ran twice
    finally:
        _stop(script)
        d.stop()


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_calls_ride_out_a_daemon_restart(tmp_path: Path) -> None:
    d = Daemon(tmp_path / ".flash")
    log = tmp_path / "runs.log"
    script = _start_script(tmp_path, log, 200, 0.05)
    try:
        _wait_started(log, 20, script)
        processes = descendants(d.pid)
        # what `flash local down` does, without the start-up of a second CLI process
        os.kill(d.pid, signal.SIGTERM)
        assert sum(_runs(log)[1].values()) < 200  # calls in flight
        assert wait_gone([d.pid, *processes], 20) == []
        started = set(_runs(log)[0])
        d.up()
        result = _result(script)
        assert result == {"ok": list(range(200)), "failed": {}}
        starts, ends = _runs(log)
        assert set(ends) == {str(i) for i in range(200)}
        assert {job for job, n in starts.items() if n > 1} <= started
    finally:
        _stop(script)
        d.stop()


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_a_call_that_gives_up_on_the_daemon_never_runs_later(tmp_path: Path) -> None:
    d = Daemon(tmp_path / ".flash")
    log = tmp_path / "runs.log"
    script = _start_script(tmp_path, log, 200, 0.02, FLASH_LOCAL_RECONNECT_S="2")
    try:
        _wait_started(log, 20, script)
        assert d.record is not None
        url = d.record.url
        processes = descendants(d.pid)
        os.kill(d.pid, signal.SIGKILL)
        assert wait_gone([d.pid, *processes], 10) == []
        result = _result(script)  # the daemon stays down past the 2 s bound
        assert result["failed"], result
        assert len(result["ok"]) + len(result["failed"]) == 200
        for error in result["failed"].values():
            assert re.match(
                rf"the flash local daemon at {url} \(pid {d.pid}\) could "
                r"not be reached for 2 s \(FLASH_LOCAL_RECONNECT_S\); gave up on job ",
                error,
            ), error
        runs_then = _runs(log)
        d.up()
        with d.client() as client:
            counts = client.get("/v2/gw-state/health").json()["jobs"]
        assert counts["inQueue"] == counts["inProgress"] == 0, counts
        assert _runs(log) == runs_then  # none of the abandoned jobs ran afterwards
    finally:
        _stop(script)
        d.stop()


def test_reconnect_window_is_checked(tmp_path: Path) -> None:
    env = {**os.environ, "FLASH_LOCAL_RECONNECT_S": "soon"}
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from flash_actors.providers.local.daemon_client import reconnect_window as r; r()",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 1
    assert re.search(
        r"ConfigurationError: FLASH_LOCAL_RECONNECT_S must be a number of seconds from 0 "
        r"to 86400, got 'soon'$",
        done.stderr.strip(),
    ), done.stderr
