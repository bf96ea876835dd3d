"""Seeing what happened: log lines that carry their data, the daemon's log, worker logs.

Everything runs for real: an application's ``logging.basicConfig``, worker processes, a
``flash local`` daemon; the checks read what a user would read (stderr, the log files).
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import anyio
import httpx
import pytest

from flash_actors import CpuLiveLoadBalancer, CpuLiveServerless, remote, runtime
from flash_actors._logging import get_logger
from flash_actors.providers.local import LocalProvider
from flash_actors.providers.local.daemon.catalog import config_of
from flash_actors.providers.local.daemon.gateway import Gateway
from flash_actors.providers.local.daemon.store import JobRecord, JobStore
from tests._daemon import (
    ECHO,
    Daemon,
    kill_all,
    run_job,
    wait_for,
    wait_gone,
    workers_of,
)

APP = """
import json, logging, os, signal, sys
from pathlib import Path

import anyio

from flash_actors import CpuLiveServerless, RetryPolicy, remote, runtime
from flash_actors.actors import Actor, ActorSystem, RestartPolicy
from flash_actors.providers.local import LocalProvider

logging.basicConfig(level=logging.INFO)  # all an application does

cfg = CpuLiveServerless(
    name="log-app", retryPolicy=RetryPolicy(attempts=2, backoff_s=0.01)
)


@remote(cfg)
def die_once(mark):
    import os, signal
    from pathlib import Path

    if not Path(mark).exists():
        Path(mark).write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    return [os.environ["FLASH_WORKER_ID"], os.getpid()]


class Fragile(Actor):
    async def receive(self, message):
        raise RuntimeError("fragile-actor-bug")


async def main():
    mark = Path("mark")
    async with runtime(provider=LocalProvider(state_dir=Path(".flash"))):
        job = await die_once(str(mark.resolve()))
    policy = RestartPolicy(max_restarts=1, backoff_s=0.001)
    async with ActorSystem() as system:
        ref = system.spawn(Fragile, name="fragile", restart=policy)
        await ref.tell("crash")
        while ref.statistics().restarts == 0:
            await anyio.sleep(0.01)
    print(json.dumps({
        "id": job.id, "output": job.output, "worker_id": job.worker_id,
        "killed": int(mark.read_text()),
    }))


anyio.run(main)
"""


def test_events_carry_their_data_and_traceback_under_basic_config(
    tmp_path: Path,
) -> None:
    (tmp_path / "app.py").write_text(APP)
    done = subprocess.run(
        [sys.executable, "app.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    log = done.stderr
    # the retry names the job, the worker and its pid, and why it was retried
    retry = re.search(r"^WARNING:flash_actors\.endpoint:job\.retry (.*)$", log, re.M)
    assert retry is not None, log
    assert f"job_id={out['id']}" in retry.group(1)
    assert "attempt=1" in retry.group(1)
    assert f"(pid {out['killed']})" in retry.group(1)
    exited = re.search(r"^WARNING:[\w.]+:worker\.exited (.*)$", log, re.M)
    assert exited is not None, log
    assert f"pid={out['killed']}" in exited.group(1)
    assert "returncode=" in exited.group(1)
    # an error comes with its traceback, printed by the stdlib handler
    restart = log.index("flash_actors.actors.actor:actor.restart actor=fragile")
    traceback = log[restart:]
    assert "\nTraceback (most recent call last):\n" in traceback
    assert "\nRuntimeError: fragile-actor-bug\n" in traceback
    # the job says which worker ran it: the worker's own FLASH_WORKER_ID, with its log file
    assert out["worker_id"]
    assert out["worker_id"] == out["output"][0]
    assert wait_gone([out["output"][1]]) == []  # the worker left with the application
    assert (
        tmp_path / ".flash" / "logs" / "log-app" / f"{out['worker_id']}.log"
    ).exists()


def _logs_saying(folder: Path, text: str, seconds: float = 20) -> list[Path]:
    """The log files in ``folder`` that contain ``text``, polled until one does."""
    deadline = time.monotonic() + seconds
    while True:
        found = [
            path
            for path in folder.glob("*.log")
            if text in path.read_text(errors="replace")
        ]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


BROKEN = CpuLiveServerless(
    name="log-broken", env={"FLASH_DEPLOYED_MODULES": "flash_no_such_module_here"}
)


@remote(BROKEN)
async def never_runs() -> None:
    return None


async def test_a_forked_workers_start_up_error_is_in_its_log(tmp_path: Path) -> None:
    provider = LocalProvider(state_dir=tmp_path / ".flash")
    assert provider.template is not None  # the workers are forked from the template
    folder = tmp_path / ".flash" / "logs" / "log-broken"
    async with runtime(provider=provider), anyio.create_task_group() as tg:

        async def call() -> None:
            try:
                await never_runs()
            except Exception:  # noqa: BLE001 (how the call ends is not what is tested)
                return

        tg.start_soon(call)
        found = await anyio.to_thread.run_sync(
            _logs_saying,
            folder,
            "ModuleNotFoundError: No module named 'flash_no_such_module_here'",
        )
        tg.cancel_scope.cancel()
    assert found, [p.read_text() for p in folder.glob("*.log")]
    text = found[0].read_text()
    assert text.startswith("Traceback (most recent call last):\n")
    assert "in load_deployed" in text


LB = CpuLiveLoadBalancer(name="log-lb")


@remote(LB, method="POST", path="/shout")
async def shout(word: str) -> dict[str, str]:
    print("lb-marker", word)
    return {"word": word}


async def test_what_a_load_balancer_function_prints_is_in_the_workers_log(
    tmp_path: Path,
) -> None:
    provider = LocalProvider(state_dir=tmp_path / ".flash")
    async with runtime(provider=provider):
        assert await shout("through-remote") == {"word": "through-remote"}
        worker = next(iter(provider.pools["log-lb"].workers.values()))
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{worker.port}"
        ) as client:
            answer = await client.post(
                "/shout",
                json={"word": "over-http"},
                headers={"Authorization": f"Bearer {worker.token}"},
            )
            assert answer.json() == {"word": "over-http"}
        log = tmp_path / ".flash" / "logs" / "log-lb" / f"{worker.id}.log"
        lines = log.read_text().splitlines()
    assert wait_gone([worker.pid]) == []
    assert "lb-marker through-remote" in lines
    assert "lb-marker over-http" in lines


SCRIPT = """
import json, sys

import anyio

from flash_actors import CpuLiveServerless, remote

cfg = CpuLiveServerless(name="log-gw")


@remote(cfg)
async def who():
    import os

    return {"worker": os.environ["FLASH_WORKER_ID"], "pid": os.getpid()}


@remote(cfg)
async def boom():
    raise KeyError("log-gw-marker")


async def main():
    job = await who()
    failed = await boom()
    print(json.dumps({
        "id": job.id, "output": job.output, "worker_id": job.worker_id,
        "failed": failed.id, "failed_worker_id": failed.worker_id,
    }))


anyio.run(main, backend=sys.argv[1])
"""


def _log_line(path: Path, event: str, job_id: str, seconds: float = 20) -> str:
    """The daemon log's line for ``event`` of job ``job_id`` (polled: it is written async)."""
    pattern = re.compile(
        rf"^\S+ \S+ \w+ flash_actors\.providers\.local\.daemon\.\w+: {re.escape(event)} "
        rf"job_id={re.escape(job_id)} .*$",
        re.M,
    )
    deadline = time.monotonic() + seconds
    while True:
        found = pattern.search(path.read_text(errors="replace"))
        if found or time.monotonic() > deadline:
            assert found is not None, path.read_text()[-3000:]
            return found.group(0)
        time.sleep(0.05)


@pytest.mark.slow  # a stock RunPod worker takes seconds to start, twice
@pytest.mark.timeout(120)
def test_the_daemon_log_records_every_job_that_fails_times_out_or_is_requeued(
    tmp_path: Path,
) -> None:
    d = Daemon(tmp_path / ".flash", f"echo={ECHO}:1")
    log = tmp_path / ".flash" / "logs" / "gateway.log"
    # a Flash function that raises, through the daemon (run meanwhile: it takes a while)
    (tmp_path / "script.py").write_text(SCRIPT)
    script = subprocess.Popen(
        [sys.executable, "script.py", "asyncio"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert d.record is not None
        with d.client() as client:
            failing = run_job(client, "echo", {"op": "fail", "message": "fail-marker"})
            assert wait_for(client, "echo", failing, {"FAILED"})["status"] == "FAILED"
            slow = run_job(
                client,
                "echo",
                {"op": "sleep", "seconds": 30},
                policy={"executionTimeout": 1000},
            )
            assert (
                wait_for(client, "echo", slow, {"TIMED_OUT"})["status"] == "TIMED_OUT"
            )
            running = run_job(client, "echo", {"op": "sleep", "seconds": 1})
            assert wait_for(client, "echo", running, {"IN_PROGRESS"})["retries"] == 0
            workers = workers_of(d.record.url)
            kill_all(workers)  # the worker dies mid-job: its job goes back to the queue
            assert wait_gone(workers) == []
        line = _log_line(log, "job.failed", failing)
        assert " status=FAILED worker=echo-" in line
        assert "fail-marker" in line
        line = _log_line(log, "job.failed", slow)
        assert " status=TIMED_OUT " in line
        assert "ran past its execution timeout of 1000 ms" in line
        line = _log_line(log, "job.requeued", running)
        assert re.search(r"reason='worker echo-\w+ exited with code -9'", line), line
        stdout, stderr = script.communicate(timeout=60)
        assert script.returncode == 0, stderr[-3000:]
        out = json.loads(stdout)
        line = _log_line(log, "job.raised", out["failed"])
        assert " error_type=builtins.KeyError error=\"'log-gw-marker'\"" in line
        # the worker that ran a Flash job on the daemon is named, and it is a real one
        assert out["worker_id"] == out["output"]["worker"]
        assert out["failed_worker_id"] == out["worker_id"]
        worker_log = tmp_path / ".flash" / "logs" / "log-gw" / f"{out['worker_id']}.log"
        assert worker_log.exists()
    finally:
        if script.poll() is None:
            script.kill()
        script.communicate()
        d.stop()


class _Lines(logging.Handler):
    """A real stdlib handler that keeps the formatted lines."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.lines.append(self.format(record))


def test_event_data_is_in_the_message_and_on_the_record() -> None:
    handler = _Lines()
    logger = logging.getLogger("flash_actors.tests_logging")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    log = get_logger("flash_actors.tests_logging").bind(endpoint="e1")
    try:
        log.debug("test.hidden", job_id="j0")  # below the level: nothing
        log.info("test.event", job_id="j1", name="clash", error="two words", n=3)
        try:
            raise ValueError("render-marker")
        except ValueError:
            log.exception("test.failed", job_id="j2")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    assert handler.lines[0] == (
        "test.event endpoint=e1 job_id=j1 name=clash error='two words' n=3"
    )
    assert handler.records[0].job_id == "j1"  # type: ignore[attr-defined]
    assert handler.records[0].name == "flash_actors.tests_logging"  # not overwritten
    assert handler.lines[1].startswith(
        "test.failed endpoint=e1 job_id=j2\nTraceback (most recent call last):\n"
    )
    assert handler.lines[1].endswith("\nValueError: render-marker")
    assert len(handler.lines) == 2


async def test_jobs_left_running_by_a_dead_daemon_are_logged_as_requeued(
    tmp_path: Path,
) -> None:
    store = JobStore(tmp_path / "gateway.sqlite3")
    store.open()
    store.put_endpoint(
        "log-gone", json.dumps(config_of(CpuLiveServerless(name="log-gone")))
    )
    record = JobRecord(
        id="job-left-running",
        endpoint="log-gone",
        status="IN_PROGRESS",
        options="{}",
        created=time.time(),
    )
    store.insert(record, b"{}")
    store.commit()  # as the daemon does before it reports the job
    store.db.close()  # as if the daemon died: no checkpoint, no close()
    reopened = JobStore(tmp_path / "gateway.sqlite3")
    handler = _Lines()
    logger = logging.getLogger("flash_actors.providers.local.daemon.gateway")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        gateway = Gateway(
            reopened,
            LocalProvider(state_dir=tmp_path),
            state_dir=tmp_path,
            api_key="",
        )
        gateway.load()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
        reopened.close()
    assert (
        "job.requeued job_id=job-left-running endpoint=log-gone "
        "reason='it was running when the daemon stopped'"
    ) in handler.lines
