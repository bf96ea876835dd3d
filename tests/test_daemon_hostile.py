"""A `flash local` daemon used as a hostile or clumsy user would (issue 9 review).

Each test is a defect found by trying: the daemon must go on serving, answer a clear 4xx,
run nothing it must refuse, lose no job and run none twice, and leave no process behind.
Real daemons (the ``flash`` CLI) and real workers on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from flash_actors.providers.local.daemon.catalog import config_of
from flash_actors.providers.local.daemon.record import (
    DaemonRecord,
    read_record,
    write_record,
)
from flash_actors.resources import ServerlessEndpoint
from tests._daemon import ECHO, Daemon, flash, run_job, wait_for, workers_of


def children(pid: int) -> set[int]:
    """The processes ``pid`` started itself (from /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, IndexError, ValueError):
            if entry.name.isdigit():
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.add(int(entry.name))
    return found


if TYPE_CHECKING:
    from collections.abc import Iterator

    import httpx

MB = 1024 * 1024


@pytest.fixture
def daemon(project: Path) -> Iterator[Daemon]:
    d = Daemon(project / ".flash", f"manual={ECHO}:0")
    yield d
    d.stop()


def _take(client: httpx.Client, endpoint: str, worker: str) -> str:
    answer = client.get(f"/v2/{endpoint}/job-take/{worker}")
    assert answer.status_code == 200, answer.text
    job_id: str = answer.json()["id"]
    return job_id


def test_a_worker_cannot_end_a_job_it_does_not_hold(daemon: Daemon) -> None:
    """A stray or late job-done (or job-stream) for a job another worker runs is a 409."""
    with daemon.client() as client:
        job_id = run_job(client, "manual", {"n": 1})
        assert _take(client, "manual", "w1") == job_id
        for body in (
            {"output": {"forged": True}},
            {"status": "IN_PROGRESS", "output": 1},
        ):
            stray = client.post(f"/v2/manual/job-done/w2/{job_id}", json=body)
            assert stray.status_code == 409, stray.text
            assert stray.json()["error"].startswith(f"job {job_id} is not held by")
        chunk = client.post(f"/v2/manual/job-stream/w2/{job_id}", json={"output": 1})
        assert chunk.status_code == 409, chunk.text
        status = client.get(f"/v2/manual/status/{job_id}").json()
        assert status["status"] == "IN_PROGRESS"
        assert "output" not in status
        # a job still queued cannot be ended by anyone either
        queued = run_job(client, "manual", {"n": 2})
        early = client.post(f"/v2/manual/job-done/w1/{queued}", json={"output": 0})
        assert early.status_code == 409, early.text
        # the worker that holds it ends it
        done = client.post(f"/v2/manual/job-done/w1/{job_id}", json={"output": "ok"})
        assert done.status_code == 200, done.text
        assert wait_for(client, "manual", job_id, {"COMPLETED"})["output"] == "ok"
        assert _take(client, "manual", "w1") == queued


PURGE_SCRIPT = """
import json, sys
import anyio
from flash_actors import CpuLiveServerless, remote

@remote(resource_config=CpuLiveServerless(name="gw-purge"))
async def double(x):
    return 2 * x

async def main():
    with anyio.fail_after(float(sys.argv[2])):
        job = await double(int(sys.argv[1]))
    print(json.dumps(job.output))

anyio.run(main)
"""


def test_purging_an_idle_flash_endpoint_keeps_it_serving(
    daemon: Daemon, project: Path
) -> None:
    """purge-queue on an idle Flash endpoint used to strand its dispatcher: no job ran again."""
    script = project / "purge_script.py"
    script.write_text(textwrap.dedent(PURGE_SCRIPT))

    def call(x: int, within_s: float) -> Any:
        done = subprocess.run(
            [sys.executable, str(script), str(x), str(within_s)],
            cwd=project,
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout)

    assert call(1, 60) == 2
    with daemon.client() as client:
        purged = client.post("/v2/gw-purge/purge-queue")
        assert purged.json() == {"removed": 0, "status": "completed"}
    assert call(21, 20) == 42  # it waited forever


@pytest.mark.slow  # a worker started, stopped and started again: ~10 s
def test_concurrent_config_changes_leave_one_set_of_workers(
    daemon: Daemon, project: Path
) -> None:
    """Two registrations replacing one endpoint at once: the loser's workers do not linger."""
    handler = project / "echo_handler.py"
    shutil.copy(ECHO, handler)

    def config(tag: str) -> dict[str, Any]:
        resource = ServerlessEndpoint(
            name="churn", handler=str(handler), workersMin=1, env={"TAG": tag}
        )
        return config_of(resource)

    assert daemon.record is not None
    url = daemon.record.url
    with daemon.client() as client:

        def put(tag: str) -> int:
            answer = client.put("/flash/v1/endpoints/churn", json=config(tag))
            return answer.status_code

        assert put("a") == 200
        job_id = run_job(client, "churn", {"n": 1})
        assert wait_for(client, "churn", job_id, {"COMPLETED"})["status"] == "COMPLETED"
        with ThreadPoolExecutor(2) as pool:
            assert list(pool.map(put, ["b", "c"])) == [200] * 2
        job_id = run_job(client, "churn", {"n": 2})
        assert wait_for(client, "churn", job_id, {"COMPLETED"})["status"] == "COMPLETED"
        # every replaced config's worker was started at once; only the last one's runs
        started = children(daemon.pid)
        launched = [p for p in workers_of(url) if p in started]
        assert len(launched) == 1
        health = client.get("/v2/churn/health").json()["workers"]
        assert health["idle"] + health["running"] + health["initializing"] == 1


def test_a_stale_record_naming_another_process_is_not_a_daemon(project: Path) -> None:
    """After a crash (or a reboot) the record's pid may be another program's: `down` must
    not signal it, and `up` must start a daemon rather than say one runs."""
    state_dir = project / ".flash"
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    d: Daemon | None = None
    try:
        state_dir.mkdir(mode=0o700)
        write_record(
            state_dir,
            DaemonRecord(
                url="http://127.0.0.1:9", pid=bystander.pid, api_key="k", secret=""
            ),
        )
        down = flash("local", "down", cwd=project, timeout=90)
        assert down.returncode == 0, down.stderr
        assert down.stdout == "flash local is not running\n"
        assert bystander.poll() is None  # not signalled
        write_record(
            state_dir,
            DaemonRecord(
                url="http://127.0.0.1:9", pid=bystander.pid, api_key="k", secret=""
            ),
        )
        d = Daemon(state_dir)  # asserts that it started and prints its own URL
        assert d.pid != bystander.pid
        assert bystander.poll() is None
    finally:
        if d is not None:
            d.stop()
        bystander.kill()
        bystander.wait()


@pytest.mark.parametrize("damage", ["logs-file", "lock-folder", "store-garbage"])
def test_a_damaged_state_folder_gets_a_clear_error(project: Path, damage: str) -> None:
    """`up` in a state folder with odd contents says what is wrong, not a traceback."""
    state_dir = project / ".flash"
    state_dir.mkdir(mode=0o700)
    if damage == "logs-file":
        (state_dir / "logs").write_text("")
        where = "logs"
    elif damage == "lock-folder":
        (state_dir / "daemon.lock").mkdir(mode=0o700)
        where = "daemon.lock"
    else:
        (state_dir / "gateway.sqlite3").write_text("not a database\n")
        where = "gateway.sqlite3"
    done = flash("local", "up", cwd=project)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr + done.stdout
    assert f"{state_dir / where}" in done.stderr
    assert read_record(state_dir) is None
    assert flash("local", "status", cwd=project).returncode == 1


def test_down_answers_the_requests_waiting_on_a_job(daemon: Daemon) -> None:
    """`down` while clients wait (runsync, status?wait): they get the job's state, not a
    dropped connection, and the job is still there after `up`."""
    answers: dict[str, Any] = {}
    with daemon.client() as client:
        job_id = run_job(client, "manual", {"n": 1})

        def runsync() -> None:
            answers["runsync"] = client.post(
                "/v2/manual/runsync", json={"input": {"n": 2}}
            )

        def status() -> None:
            answers["status"] = client.get(f"/v2/manual/status/{job_id}?wait=60000")

        with ThreadPoolExecutor(2) as pool:
            waits = [pool.submit(runsync), pool.submit(status)]
            deadline = time.monotonic() + 20
            while client.get("/v2/manual/health").json()["jobs"]["inQueue"] < 2:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            daemon.down()
            for wait in waits:
                wait.result()
    for name in ("runsync", "status"):
        assert answers[name].status_code == 200, answers[name].text
        assert answers[name].json()["status"] == "IN_QUEUE"
    daemon.up()
    with daemon.client() as client:
        assert client.get(f"/v2/manual/status/{job_id}").json()["status"] == "IN_QUEUE"


def test_a_webhook_that_answers_without_end_is_not_read(daemon: Daemon) -> None:
    """A webhook server answering with an endless body must not fill the daemon's memory:
    the daemon reads the status line and hangs up."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(30)
    limit = 256 * MB
    sent: list[int] = []

    def flood() -> None:
        with contextlib.suppress(OSError):
            conn, _ = server.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                    b"Content-Length: 100000000000\r\n\r\n"
                )
                chunk = b"x" * MB
                total = 0
                with contextlib.suppress(OSError):
                    while total < limit:
                        conn.sendall(chunk)
                        total += len(chunk)
                sent.append(total)

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    try:
        with daemon.client() as client:
            hook = f"http://127.0.0.1:{server.getsockname()[1]}/hook"
            job_id = run_job(client, "manual", {"n": 1}, webhook=hook)
            assert _take(client, "manual", "w1") == job_id
            done = client.post(f"/v2/manual/job-done/w1/{job_id}", json={"output": 1})
            assert done.status_code == 200, done.text
            thread.join(60)
            assert not thread.is_alive()
            assert sent, "the daemon never called its webhook"
            assert sent[0] < limit  # it hung up instead of reading on
            assert client.get("/v2/manual/health").status_code == 200
    finally:
        server.close()


def test_head_requests_take_no_job(daemon: Daemon) -> None:
    """A HEAD (a probe, `curl -I`) on job-take would hand out a job nobody receives."""
    with daemon.client() as client:
        job_id = run_job(client, "manual", {"n": 1})
        for route in ("job-take/w1", "job-take-batch/w1?batch_size=5", "job-stop/w1"):
            assert client.head(f"/v2/manual/{route}").status_code == 405, route
        assert client.get(f"/v2/manual/status/{job_id}").json()["status"] == "IN_QUEUE"
        assert client.head("/v2/manual/health").status_code == 200
        assert _take(client, "manual", "w1") == job_id


def test_env_no_process_can_have_is_refused(daemon: Daemon, project: Path) -> None:
    """An env name with '=' or a NUL in a name or value cannot start any worker: it used to
    be accepted, and then its pool failed every second with a traceback, its jobs queued."""
    handler = project / "echo_handler.py"
    shutil.copy(ECHO, handler)
    with daemon.client() as client:
        for env in ({"A=B": "1"}, {"A": "x\x00y"}, {"A\x00": "1"}, {"": "1"}):
            resource = ServerlessEndpoint(name="envx", handler=str(handler), env=env)
            answer = client.put("/flash/v1/endpoints/envx", json=config_of(resource))
            assert answer.status_code == 400, env
            assert answer.json()["error"].startswith("endpoint 'envx': env "), env
        good = ServerlessEndpoint(name="envx", handler=str(handler), env={"A": "1"})
        assert client.put("/flash/v1/endpoints/envx", json=config_of(good)).is_success
        job_id = run_job(client, "envx", {"n": 1})
        assert wait_for(client, "envx", job_id, {"COMPLETED"})["status"] == "COMPLETED"


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        ("a/b=h.py", "endpoint name may hold only"),
        ("x=h.py:abc", "invalid literal for int()"),
        ("x=h.py:-3", "workersMax must be a non-negative integer"),
    ],
)
def test_up_checks_endpoint_specs_before_starting(
    project: Path, spec: str, error: str
) -> None:
    """A bad --endpoint name or worker count: one clear line, no daemon, no traceback."""
    shutil.copy(ECHO, project / "h.py")
    done = flash("local", "up", "--endpoint", spec, cwd=project)
    assert done.returncode == 2
    assert done.stderr.startswith(f"flash: error: --endpoint {spec!r}: ")
    assert error in done.stderr
    assert "Traceback" not in done.stderr
    assert read_record(project / ".flash") is None
