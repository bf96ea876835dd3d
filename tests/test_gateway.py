"""The local gateway (issue 4): ``flash local``, RunPod's data plane and worker protocol.

Everything here runs real processes on 127.0.0.1: the daemon (started with the ``flash`` CLI),
stock ``runpod`` workers running the handler files in ``gateway_files/``, the stock ``runpod``
client, and Flash scripts. Every process is stopped by PID at the end of its test.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import anyio
import httpx
import pytest

from flash_actors import (
    CpuServerlessEndpoint,
    LiveServerless,
    RemoteExecutionError,
    ServerlessEndpoint,
    remote,
    runtime,
)
from flash_actors.errors import ConfigurationError
from flash_actors.providers.local import LocalProvider
from flash_actors.providers.local.daemon.record import (
    DaemonRecord,
    find_daemon,
    pid_alive,
    read_record,
    write_record,
)
from flash_actors.providers.local.daemon.store import JobRecord, JobStore

if TYPE_CHECKING:
    from collections.abc import Iterator

from tests._daemon import (
    ECHO,
    FILES,
    GEN,
    Daemon,
    descendants,
    flash,
    run_job,
    run_script,
    wait_for,
    wait_gone,
    workers_of,
)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path / ".flash", f"echo={ECHO}:1", f"gen={GEN}:1")
    yield d
    d.stop()


# -- flash local up / status / down ----------------------------------------------------------


def test_up_status_down_leave_nothing_running(tmp_path: Path) -> None:
    d = Daemon(tmp_path / ".flash", f"echo={ECHO}:1")
    try:
        again = flash("local", "--state-dir", str(d.state_dir), "up", cwd=tmp_path)
        assert again.returncode == 0
        assert "already running" in again.stdout
        with d.client() as client:
            body = client.post("/v2/echo/runsync", json={"input": {"x": 1}}).json()
        assert body["status"] == "COMPLETED"
        assert body["output"]["echo"] == {"x": 1}
        worker_pid = body["output"]["pid"]
        status = flash("local", "--state-dir", str(d.state_dir), "status", cwd=tmp_path)
        assert status.returncode == 0
        header, row = status.stdout.splitlines()[1:3]
        assert header.split()[:3] == ["ENDPOINT", "KIND", "WORKERS"]
        assert row.split()[:4] == ["echo", "handler", "echo_handler.py", "1/1"]
        assert row.split()[-2:] == ["1", "0"]  # one completed, none failed
        running = [d.pid, *descendants(d.pid)]
        assert worker_pid in running
        d.down()
        assert wait_gone(running) == []
        assert read_record(d.state_dir) is None
        after = flash("local", "--state-dir", str(d.state_dir), "status", cwd=tmp_path)
        assert after.returncode == 1
        assert "not running" in after.stderr
    finally:
        d.stop()


def test_up_says_when_its_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = flash("local", "up", "--port", str(port), cwd=tmp_path)
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in done.stderr
    assert "Traceback" not in done.stderr
    assert read_record(tmp_path / ".flash") is None


def test_up_refuses_a_missing_handler_file(tmp_path: Path) -> None:
    done = flash("local", "up", "--endpoint", "x=nope.py", cwd=tmp_path)
    assert done.returncode == 2
    assert "nope.py" in done.stderr
    assert read_record(tmp_path / ".flash") is None


# -- the data plane, with the stock runpod client ---------------------------------------------


@pytest.mark.timeout(180)
def test_stock_runpod_client_sync_and_asyncio(daemon: Daemon) -> None:
    assert daemon.record is not None
    env = dict(os.environ)
    env["RUNPOD_ENDPOINT_BASE_URL"] = f"{daemon.record.url}/v2"
    env["RUNPOD_API_KEY"] = daemon.record.api_key
    out = run_script("runpod_client.py", env=env)
    assert out["run_sync"]["echo"] == {"x": 1}
    assert out["run_output"]["echo"] == {"x": 2}
    assert out["run_status"] == "COMPLETED"
    assert set(out["health"]) == {"jobs", "workers"}
    assert out["health"]["jobs"]["completed"] >= 2
    assert set(out["health"]["workers"]) == {
        "idle",
        "running",
        "initializing",
        "ready",
        "throttled",
        "unhealthy",
    }
    assert out["slow_started"] == "IN_PROGRESS"
    assert out["purge"] == {"removed": 2, "status": "completed"}
    assert out["purged_status"] == ["CANCELLED", "CANCELLED"]
    assert out["cancel"]["status"] == "CANCELLED"
    # the one worker was told to stop the cancelled 30 s job, so the next job ran at once
    assert out["after_cancel"]["echo"] == {"x": 3}
    failed = out["failed"]
    assert failed["status"] == "FAILED"
    error = json.loads(failed["error"])
    assert error["error_message"] == "no such thing"
    assert "ValueError" in error["error_type"]
    assert out["stream"] == [{"chunk": 0}, {"chunk": 1}, {"chunk": 2}]
    assert out["stream_output"] == [{"chunk": 0}, {"chunk": 1}, {"chunk": 2}]
    assert out["async_output"]["echo"] == {"x": 4}
    assert out["async_status"] == "COMPLETED"
    assert out["async_health"]["jobs"]["completed"] >= 4
    assert out["async_cancel"]["status"] == "CANCELLED"
    assert out["async_purge"]["status"] == "completed"
    assert out["async_stream"] == [{"chunk": 0}, {"chunk": 1}]


def test_protocol_errors_and_codes(daemon: Daemon) -> None:
    with daemon.client() as client:
        assert (
            client.get(
                "/v2/echo/health", headers={"Authorization": "wrong"}
            ).status_code
            == 401
        )
        assert httpx.get(f"{client.base_url}/v2/echo/health").status_code == 401
        missing = client.post("/v2/nope/run", json={"input": {}})
        assert missing.status_code == 404
        assert "nope" in missing.json()["error"]
        no_input = client.post("/v2/echo/run", json={"webhook": None})
        assert no_input.status_code == 400
        assert "input" in no_input.json()["error"]
        bad_policy = client.post(
            "/v2/echo/run", json={"input": {}, "policy": {"ttl": -1}}
        )
        assert bad_policy.status_code == 400
        assert "ttl" in bad_policy.json()["error"]
        assert client.get("/v2/echo/status/nope").status_code == 404
        done = client.post("/v2/echo/runsync", json={"input": {"x": 1}}).json()
        assert done["status"] == "COMPLETED"
        assert isinstance(done["delayTime"], int)
        assert isinstance(done["executionTime"], int)
        refused = client.post(f"/v2/echo/retry/{done['id']}")
        assert refused.status_code == 400
        assert "COMPLETED" in refused.json()["error"]
        # a failed job is retried under the same id, and fails again
        failing = client.post("/v2/echo/runsync", json={"input": {"op": "fail"}}).json()
        assert failing["status"] == "FAILED"
        retried = client.post(f"/v2/echo/retry/{failing['id']}").json()
        assert retried == {"id": failing["id"], "status": "IN_QUEUE"}
        again = wait_for(client, "echo", failing["id"], {"FAILED"})
        assert again["status"] == "FAILED"
        assert again["retries"] == 1
        # a progress update shows in the status of the running job
        job = run_job(client, "echo", {"op": "progress", "seconds": 2})
        deadline = time.monotonic() + 30
        seen = None
        while time.monotonic() < deadline and seen is None:
            body = client.get(f"/v2/echo/status/{job}").json()
            if body["status"] == "IN_PROGRESS" and body.get("output") == "half way":
                seen = body
            time.sleep(0.05)
        assert seen is not None
        assert wait_for(client, "echo", job, {"COMPLETED"})["output"] == {"done": True}


def test_execution_timeout_and_ttl_end_jobs_timed_out(daemon: Daemon) -> None:
    with daemon.client() as client:
        slow = run_job(
            client,
            "echo",
            {"op": "sleep", "seconds": 30},
            policy={"executionTimeout": 1500},
        )
        expiring = run_job(client, "echo", {"x": 1}, policy={"ttl": 500})
        timed_out = wait_for(client, "echo", slow, {"TIMED_OUT", "COMPLETED", "FAILED"})
        assert timed_out["status"] == "TIMED_OUT"
        assert "execution timeout" in timed_out["error"]
        expired = wait_for(client, "echo", expiring, {"TIMED_OUT", "COMPLETED"})
        assert expired["status"] == "TIMED_OUT"
        assert "ttl" in expired["error"]
        # the worker was told to stop the timed-out job and takes the next one at once
        body = client.post(
            "/v2/echo/runsync?wait=20000", json={"input": {"x": 2}}
        ).json()
        assert body["status"] == "COMPLETED"


def test_stop_pod_recycles_the_worker(daemon: Daemon) -> None:
    with daemon.client() as client:
        first = client.post(
            "/v2/echo/runsync", json={"input": {"op": "recycle"}}
        ).json()
        assert first["status"] == "COMPLETED"
        second = client.post("/v2/echo/runsync", json={"input": {"x": 1}}).json()
        assert second["status"] == "COMPLETED"
        assert second["output"]["pid"] != first["output"]["pid"]
        assert not pid_alive(first["output"]["pid"])


# -- durability -------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_queue_survives_sigkill_and_down_up(tmp_path: Path) -> None:
    d = Daemon(tmp_path / ".flash", f"echo={ECHO}:1")
    try:
        with d.client() as client:
            finished = client.post("/v2/echo/runsync", json={"input": {"x": 0}}).json()
            assert finished["status"] == "COMPLETED"
            running = run_job(client, "echo", {"op": "sleep", "seconds": 3})
            assert (
                wait_for(client, "echo", running, {"IN_PROGRESS"})["status"]
                == "IN_PROGRESS"
            )
            queued = [run_job(client, "echo", {"x": i}) for i in range(1, 4)]
        processes = [d.pid, *descendants(d.pid)]
        assert d.record is not None
        workers = workers_of(d.record.url)
        assert len(workers) >= 2  # the launcher, the handler (and runpod's own helpers)
        os.kill(d.pid, signal.SIGKILL)
        assert (
            wait_gone([*processes, *workers]) == []
        )  # every worker died with the daemon
        d.up()  # the stale record is noticed and replaced
        with d.client() as client:
            again = client.get(f"/v2/echo/status/{finished['id']}").json()
            assert again["status"] == "COMPLETED"
            assert again["output"] == finished["output"]
            for job_id in [running, *queued]:
                body = wait_for(client, "echo", job_id, {"COMPLETED", "FAILED"})
                assert body["status"] == "COMPLETED", body
            assert client.get(f"/v2/echo/status/{running}").json()["retries"] == 1
            health = client.get("/v2/echo/health").json()
            assert health["jobs"]["retried"] == 1
            waiting = run_job(client, "echo", {"op": "sleep", "seconds": 2})
            later = [run_job(client, "echo", {"x": i}) for i in range(10, 12)]
        d.down()
        d.up()
        with d.client() as client:
            for job_id in [waiting, *later]:
                assert (
                    wait_for(client, "echo", job_id, {"COMPLETED"})["status"]
                    == "COMPLETED"
                )
            assert client.get(f"/v2/echo/status/{queued[0]}").json()["output"][
                "echo"
            ] == {"x": 1}
    finally:
        d.stop()


def test_store_requeues_jobs_left_running(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "g.sqlite3")
    assert store.open() == []
    for i, status in enumerate(["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]):
        record = JobRecord(
            id=f"j{i}",
            endpoint="e",
            status="IN_QUEUE",
            options="{}",
            created=time.time(),
        )
        store.insert(record, b"{}")
        record.status = status
        record.finished = time.time() if status == "COMPLETED" else None
        store.update(record, output=b'{"ok": 1}' if status == "COMPLETED" else None)
    store.commit()  # as the daemon does before it reports them
    store.db.close()  # as if the process died: no checkpoint, no close()
    reopened = JobStore(tmp_path / "g.sqlite3")
    recovered = reopened.open()
    assert [job.id for job in recovered] == ["j1"]
    jobs = {job.id: job for job in reopened.jobs()}
    assert jobs["j1"].status == "IN_QUEUE"
    assert jobs["j1"].retries == 1
    assert reopened.output("j2") == b'{"ok": 1}'
    assert reopened.input("j2") == b"{}"
    assert [job.id for job in reopened.jobs()] == ["j0", "j1", "j2"]  # order kept
    reopened.close()


def _stored(state_dir: Path, job_id: str) -> tuple[str, Any]:
    """A job's status and output in the daemon's file, read as a restarted daemon would."""
    other = sqlite3.connect(state_dir / "gateway.sqlite3")
    try:
        status, output = other.execute(
            "SELECT status, output FROM jobs WHERE id = ?", (job_id,)
        ).fetchone()
    finally:
        other.close()
    return status, None if output is None else json.loads(output)


def test_what_an_answer_reports_is_already_in_the_file(daemon: Daemon) -> None:
    with daemon.client() as client:
        done = client.post("/v2/echo/runsync", json={"input": {"x": 1}}).json()
        assert done["status"] == "COMPLETED"
        assert _stored(daemon.state_dir, done["id"]) == ("COMPLETED", done["output"])
        running = run_job(client, "echo", {"op": "sleep", "seconds": 5})
        assert _stored(daemon.state_dir, running)[0] in {"IN_QUEUE", "IN_PROGRESS"}
        assert wait_for(client, "echo", running, {"IN_PROGRESS"})["status"] == (
            "IN_PROGRESS"
        )
        assert _stored(daemon.state_dir, running)[0] in {"IN_PROGRESS", "COMPLETED"}
        cancelled = client.post(f"/v2/echo/cancel/{running}").json()
        assert cancelled["status"] == "CANCELLED"
        assert _stored(daemon.state_dir, running)[0] == "CANCELLED"


# -- Flash scripts and the daemon -------------------------------------------------------------


@pytest.mark.timeout(120)
def test_remote_calls_go_to_the_daemon_and_workers_stay_warm(tmp_path: Path) -> None:
    d = Daemon(tmp_path / ".flash")
    try:
        pids = []
        for backend in ("asyncio", "trio"):
            out = run_script("remote_script.py", backend, cwd=tmp_path)
            assert out["x"] == 1
            assert out["stream"] == [0, 1, 2]
            assert out["error"] == "KeyError"
            pids.append(out["pid"])
        assert pids[0] == pids[1]  # the second script found the first one's worker warm
        assert pids[0] in descendants(d.pid)
        status = flash("local", "--state-dir", str(d.state_dir), "status", cwd=tmp_path)
        row = next(
            line for line in status.stdout.splitlines() if line.startswith("gw-remote")
        )
        assert row.split()[1] == "flash"
        assert row.split()[-2:] == ["6", "0"]  # three jobs per script, all completed
    finally:
        d.stop()


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_cancelled_and_timed_out_remote_calls_stop_on_the_daemon(
    tmp_path: Path, backend: str
) -> None:
    d = Daemon(tmp_path / ".flash")
    try:
        folder = tmp_path / "marks"
        (folder / "t").mkdir(parents=True)
        out = run_script("cancel_script.py", backend, str(folder), cwd=tmp_path)
        assert out["hung"] is False
        assert out["status"] == "TIMED_OUT"
        assert (
            "3.0 s" in out["error"]
            or "3000" in out["error"]
            or "timeout" in out["error"]
        )
        (folder / "finished").unlink()  # written by the first, uncancelled call
        time.sleep(1.5)  # the cancelled call would have finished by now
        assert not (folder / "finished").exists()
        assert (folder / "t" / "started").exists()
        assert not (folder / "t" / "finished").exists()
    finally:
        d.stop()


@pytest.mark.timeout(120)
def test_a_changed_config_restarts_the_endpoint_and_keeps_its_running_job(
    tmp_path: Path,
) -> None:
    d = Daemon(tmp_path / ".flash")
    try:
        first = subprocess.Popen(
            [sys.executable, str(FILES / "replace_script.py"), "1", "2"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            with d.client() as client:
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    answer = client.get("/v2/gw-replace/health")
                    if (
                        answer.status_code == 200
                        and answer.json()["jobs"]["inProgress"]
                    ):
                        break
                    time.sleep(0.05)
            # a second script names the same endpoint with another config: it replaces it
            assert run_script("replace_script.py", "2", "0", cwd=tmp_path) == {
                "status": "COMPLETED",
                "output": 0.0,
            }
            out, err = first.communicate(timeout=60)
            assert first.returncode == 0, err[-3000:]
            # the first job was put back in the queue and ran again on the new workers
            assert json.loads(out) == {"status": "COMPLETED", "output": 2.0}
        finally:
            if first.poll() is None:
                first.kill()
                first.wait()
    finally:
        d.stop()


def test_job_ids_are_checked(daemon: Daemon) -> None:
    with daemon.client() as client:
        bad = client.post("/v2/echo/run", json={"input": {}, "id": "../x"})
        assert bad.status_code == 400
        assert "job id" in bad.json()["error"]
        first = client.post(
            "/v2/echo/run", json={"input": {"x": 1}, "id": "mine-1"}
        ).json()
        again = client.post(
            "/v2/echo/run", json={"input": {"x": 1}, "id": "mine-1"}
        ).json()
        assert first["id"] == again["id"] == "mine-1"  # a retried submission is one job


# -- handler endpoints without a daemon (the embedded provider's private gateway) ------------


async def test_handler_endpoint_runs_on_a_private_gateway(tmp_path: Path) -> None:
    echo = ServerlessEndpoint(name="private-echo", handler=str(ECHO), workersMax=2)
    provider = LocalProvider(state_dir=tmp_path / ".flash")
    async with runtime(provider=provider):
        results: list[Any] = [None] * 3

        async def one(i: int) -> None:
            results[i] = await echo.run({"input": {"i": i}})

        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(one, i)
        assert [job.status for job in results] == ["COMPLETED"] * 3
        assert [job.output["echo"] for job in results] == [{"i": 0}, {"i": 1}, {"i": 2}]
        failed = await echo.runsync({"op": "fail", "message": "bad thing"})
        assert failed.status == "FAILED"
        with pytest.raises(ValueError, match="bad thing") as caught:
            failed.raise_for_error()
        assert isinstance(caught.value, RemoteExecutionError)
        gateway = provider._gateway
        assert gateway is not None
        assert gateway.process is not None
        gateway_pid = gateway.process.pid
        running = [
            gateway_pid,
            *descendants(gateway_pid),
            *workers_of(gateway.record.url),
        ]
        assert len(running) >= 3
    assert wait_gone(running) == []
    assert not any(
        p.name.startswith("flash-gateway-")
        for p in Path(gateway.state_dir or "/").parent.iterdir()
        if p == gateway.state_dir
    )


def test_handler_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="handler= is for ServerlessEndpoint"):
        LiveServerless(name="x", handler="h.py")
    with pytest.raises(ConfigurationError, match=r"path of a \.py file"):
        CpuServerlessEndpoint(name="x", handler="h.txt")
    handled = ServerlessEndpoint(name="handled", handler="h.py")
    with pytest.raises(ConfigurationError, match="handler file"):

        @remote(resource_config=handled)
        async def f() -> None: ...


async def test_run_needs_a_handler_and_an_existing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="has no handler file"):
        await LiveServerless(name="live-run").run({"input": {}})
    missing = ServerlessEndpoint(name="missing-file", handler="missing.py")
    with pytest.raises(ConfigurationError, match="does not exist"):
        await missing.run({"input": {}})
    async with runtime(provider="inprocess"):
        echo = ServerlessEndpoint(name="inprocess-echo", handler=str(ECHO))
        with pytest.raises(ConfigurationError, match="needs the local provider"):
            await echo.run({"input": {}})


def test_concurrent_worker_takes_jobs_in_batches(tmp_path: Path) -> None:
    d = Daemon(tmp_path / ".flash", f"batch={FILES / 'batch_handler.py'}:1")
    try:
        with d.client() as client:
            jobs = [run_job(client, "batch", {"seconds": 1}) for _ in range(8)]
            outputs = [
                wait_for(client, "batch", j, {"COMPLETED", "FAILED"}) for j in jobs
            ]
        assert [o["status"] for o in outputs] == ["COMPLETED"] * 8
        assert len({o["output"]["pid"] for o in outputs}) == 1  # one worker ...
        assert (
            max(o["output"]["most_at_once"] for o in outputs) > 1
        )  # ... ran several at once
        log = next((d.state_dir / "logs" / "batch").glob("*.log")).read_text()
        assert "/job-take-batch/" in log
    finally:
        d.stop()


class _Hook(BaseHTTPRequestHandler):
    received: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        size = int(self.headers["Content-Length"])
        self.received.append(json.loads(self.rfile.read(size)))
        self.send_response(200)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


def test_webhook_and_result_retention(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLASH_LOCAL_RETENTION_S", "2")
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    d = Daemon(tmp_path / ".flash", f"echo={ECHO}:1")
    try:
        hook = f"http://127.0.0.1:{server.server_address[1]}/done"
        with d.client() as client:
            job = run_job(client, "echo", {"x": 5}, webhook=hook)
            body = wait_for(client, "echo", job, {"COMPLETED"})
            assert body["status"] == "COMPLETED"
            deadline = time.monotonic() + 10
            while not _Hook.received and time.monotonic() < deadline:
                time.sleep(0.05)
            sent = _Hook.received[0]
            assert sent["id"] == job
            assert sent["status"] == "COMPLETED"
            assert sent["output"]["echo"] == {"x": 5}
            assert (
                "input" not in sent
            )  # RunPod's status envelope, never the job's input
            deadline = time.monotonic() + 10
            while client.get(f"/v2/echo/status/{job}").status_code == 200:
                assert time.monotonic() < deadline, "the result outlived its retention"
                time.sleep(0.1)
            assert client.get(f"/v2/echo/status/{job}").status_code == 404
    finally:
        d.stop()
        server.shutdown()
        server.server_close()


def test_a_full_queue_answers_429(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLASH_LOCAL_MAX_QUEUE", "2")
    d = Daemon(tmp_path / ".flash", f"manual={ECHO}:0")  # no workers: jobs stay queued
    try:
        with d.client() as client:
            first = run_job(client, "manual", {"x": 1})
            run_job(client, "manual", {"x": 2})
            refused = client.post("/v2/manual/run", json={"input": {"x": 3}})
            assert refused.status_code == 429
            assert "2 queued jobs" in refused.json()["error"]
            client.post(f"/v2/manual/cancel/{first}")
            run_job(client, "manual", {"x": 4})  # room again
    finally:
        d.stop()


def test_flash_local_url_points_scripts_at_a_daemon(tmp_path: Path) -> None:
    d = Daemon(tmp_path / "state" / ".flash")
    try:
        assert d.record is not None
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        env = dict(os.environ)
        env.update(
            FLASH_LOCAL_URL=f"{d.record.url}/v2",
            FLASH_LOCAL_API_KEY=d.record.api_key,
            FLASH_SECRET=d.record.secret,
        )
        out = run_script("remote_script.py", "asyncio", cwd=elsewhere, env=env)
        assert out["pid"] in descendants(d.pid)
        assert not (
            elsewhere / ".flash" / "logs" / "gw-remote"
        ).exists()  # nothing embedded
    finally:
        d.stop()


def test_a_worker_that_hangs_up_while_waiting_loses_no_job(tmp_path: Path) -> None:
    # workersMax=0: the daemon starts no worker; this test plays the (external) worker
    d = Daemon(tmp_path / ".flash", f"manual={ECHO}:0")
    try:
        assert d.record is not None
        with socket.create_connection(("127.0.0.1", d.record.port)) as sock:
            sock.sendall(
                f"GET /v2/manual/job-take/w1?x=1 HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: {d.record.api_key}\r\n\r\n".encode()
            )
            time.sleep(0.3)  # the take is now waiting for a job
        with d.client() as client:
            job = run_job(client, "manual", {"x": 1})
            time.sleep(1.5)
            assert client.get(f"/v2/manual/status/{job}").json()["status"] == "IN_QUEUE"
            taken = client.get(
                "/v2/manual/job-take/w2?x=1&job_in_progress=0",
                headers={"Authorization": d.record.api_key},
            )
            assert taken.status_code == 200
            assert taken.json() == {"id": job, "input": {"x": 1}}
            done = client.post(
                f"/v2/manual/job-done/w2/{job}?x=1&isStream=false",
                content=b'{"output": {"ok": true}}',
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
            assert done.status_code == 200
            body = client.get(f"/v2/manual/status/{job}").json()
            assert body["status"] == "COMPLETED"
            assert body["output"] == {"ok": True}
            assert body["workerId"] == "w2"
    finally:
        d.stop()


def test_a_stale_record_is_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / ".flash"
    # a record whose PID is alive but is not a gateway (this test process)
    write_record(
        state, DaemonRecord(url="http://127.0.0.1:9", pid=os.getpid(), api_key="k")
    )
    assert find_daemon(state) is None
    monkeypatch.setenv("FLASH_LOCAL_URL", "http://127.0.0.1:10/v2")
    monkeypatch.setenv("FLASH_LOCAL_API_KEY", "key")
    named = find_daemon(state)
    assert named == DaemonRecord(url="http://127.0.0.1:10", pid=0, api_key="key")
    monkeypatch.setenv("FLASH_LOCAL_URL", "http://127.0.0.1:9")  # the record's: its key
    assert find_daemon(state) == read_record(state)
    monkeypatch.setenv("FLASH_LOCAL", "0")
    assert find_daemon(state) is None
