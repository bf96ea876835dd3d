"""The HTTP surfaces of ``flash local`` and of workers under hostile and clumsy input (issue 9).

Registration over HTTP cannot run files outside the served folder (item 3); webhooks are
checked and can never stop the daemon (item 4); bad headers and deep JSON are 401/400, never
500 (item 7); bodies, results and the daemon's memory are bounded (item 13); idle and excess
connections are closed and the open-file limit does not flood the log (item 14).

Real daemons (started with the ``flash`` CLI), real workers and raw sockets on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import httpx
import msgspec
import pytest

from flash_actors import CpuLiveServerless, ServerlessEndpoint, runtime
from flash_actors.providers.local import LocalProvider
from flash_actors.providers.local.daemon.catalog import config_of
from flash_actors.providers.local.daemon.record import read_record
from flash_actors.providers.local.daemon_client import GatewayProvider
from tests._daemon import (
    ECHO,
    FILES,
    Daemon,
    descendants,
    kill_all,
    run_job,
    wait_for,
    wait_gone,
    workers_of,
)
from tests._worker import worker_process

if TYPE_CHECKING:
    from collections.abc import Iterator

DEEP = b"[" * 100_000 + b"]" * 100_000
MB = 1024 * 1024


@pytest.fixture
def daemon(project: Path) -> Iterator[Daemon]:
    d = Daemon(project / ".flash", f"echo={ECHO}:1", f"manual={ECHO}:0")
    yield d
    d.stop()


def _port(d: Daemon) -> int:
    assert d.record is not None
    return d.record.port


def raw(
    port: int, head: bytes, body: bytes = b"", timeout: float = 20
) -> tuple[int, bytes]:
    """One request on its own connection (``Connection: close``): status and body."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head + body)
        data = b""
        while b"\r\n\r\n" not in data and (chunk := sock.recv(65536)):
            data += chunk
        top, _, answer = data.partition(b"\r\n\r\n")
        lines = top.decode("latin-1").split("\r\n")
        length = next(
            int(line.split(":", 1)[1])
            for line in lines
            if line.lower().startswith("content-length:")
        )
        while len(answer) < length and (chunk := sock.recv(65536)):
            answer += chunk
    return int(lines[0].split()[1]), answer


def post(path: str, key: str, body: bytes, extra: bytes = b"") -> bytes:
    return (
        (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n"
        ).encode()
        + extra
        + b"\r\n"
    )


def register(
    client: httpx.Client,
    name: str,
    handler: str | None,
    workers: int = 1,
    env: dict[str, str] | None = None,
) -> httpx.Response:
    if handler is None:
        resource: Any = CpuLiveServerless(name=name, env=env)
    else:
        resource = ServerlessEndpoint(
            name=name, handler=handler, workersMax=workers, env=env
        )
    config = config_of(resource)
    return client.put(
        f"/flash/v1/endpoints/{name}", content=msgspec.json.encode(config)
    )


# -- item 3: registering a handler over HTTP -------------------------------------------------


def test_http_registration_runs_only_handlers_inside_the_served_folder(
    daemon: Daemon, project: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    marker = outside / "ran"
    evil = outside / "evil.py"
    evil.write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
    )
    (project / "link.py").symlink_to(evil)
    inside = project / "handler.py"
    shutil.copy(ECHO, inside)
    (project / "notes.txt").write_text("x")
    with daemon.client() as client:
        for path in (
            str(evil),
            str(project / ".." / "outside" / "evil.py"),
            str(project / "link.py"),
        ):
            refused = register(client, "evil", path)
            assert refused.status_code == 403, refused.text
            assert refused.json()["error"].startswith("endpoint 'evil': handler file ")
            assert "outside the folder this gateway serves" in refused.json()["error"]
            assert "flash local up --endpoint" in refused.json()["error"]
        missing = register(client, "evil", str(project / "missing.py"))
        assert missing.status_code == 400
        assert "does not exist" in missing.json()["error"]
        # the CLI's own endpoint may be registered again as it is, not changed
        same = register(client, "echo", str(ECHO), workers=1)
        assert same.status_code == 200, same.text
        changed = register(client, "echo", str(ECHO), workers=2)
        assert changed.status_code == 403
        # a handler inside the project folder (relative paths are inside it too) works
        assert register(client, "inside", "handler.py").status_code == 200
        job = run_job(client, "inside", {"x": 1})
        assert wait_for(client, "inside", job, {"COMPLETED"})["output"]["echo"] == {
            "x": 1
        }
        assert client.get("/v2/evil/health").status_code == 404
        # nor may the config's env make its workers load code from elsewhere
        for env in (
            {"PYTHONPATH": str(outside)},
            {"LD_PRELOAD": str(evil)},
            {"HOME": str(outside)},
        ):
            for handler in ("handler.py", None):
                refused = register(client, "env", handler, env=env)
                assert refused.status_code == 403, refused.text
                assert refused.json()["error"].startswith(
                    f"endpoint 'env': env {next(iter(env))} "
                )
        assert (
            register(
                client, "env", "handler.py", env={"MODEL": "x", "PATHS": "y"}
            ).status_code
            == 200
        )
    assert not marker.exists()


@pytest.mark.slow
async def test_the_embedded_runtime_registers_handlers_anywhere_on_its_private_gateway(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, anyio_backend: tuple[str, object]
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    handler = elsewhere / "h.py"
    shutil.copy(ECHO, handler)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # the script's folder does not hold the handler
    echo = ServerlessEndpoint(name=f"anywhere-{anyio_backend[0]}", handler=str(handler))
    provider = LocalProvider(state_dir=tmp_path / "cwd" / ".flash")
    async with runtime(provider=provider):
        job = await echo.run({"input": {"y": 2}})
        assert job.status.value == "COMPLETED"
        assert job.output["echo"] == {"y": 2}
        gateway = provider._gateway
        assert gateway is not None
        assert gateway.process is not None
        running = [gateway.process.pid, *descendants(gateway.process.pid)]
        # the owner token stays with the gateway: its workers never see it
        for pid in workers_of(gateway.record.url):
            with contextlib.suppress(OSError):
                assert (
                    b"FLASH_LOCAL_OWNER_TOKEN"
                    not in Path(f"/proc/{pid}/environ").read_bytes()
                )
    assert wait_gone(running) == []


# -- item 4: webhooks ----------------------------------------------------------------------------


def test_webhooks_are_checked_and_never_stop_the_daemon(daemon: Daemon) -> None:
    with daemon.client() as client:
        for hook in (
            "file:///etc/passwd",
            "http://127.0.0.1:99999/x",
            "ftp://h/x",
            "http:///x",
        ):
            refused = client.post("/v2/echo/run", json={"input": {}, "webhook": hook})
            assert refused.status_code == 400, hook
            assert refused.json()["error"].startswith(f"webhook {hook!r} ")
        # a webhook that fails in every way: refused, hung up on, not HTTP at all
        hangup = socket.socket()
        hangup.bind(("127.0.0.1", 0))
        hangup.listen(8)
        free = socket.socket()
        free.bind(("127.0.0.1", 0))
        closed_port = free.getsockname()[1]
        free.close()
        try:
            hooks = [
                f"http://127.0.0.1:{closed_port}/x",
                f"http://127.0.0.1:{hangup.getsockname()[1]}/x",
                "https://127.0.0.1:1/x",
            ]
            jobs = [
                run_job(client, "echo", {"i": i}, webhook=h)
                for i, h in enumerate(hooks)
            ]
            for job in jobs:
                assert (
                    wait_for(client, "echo", job, {"COMPLETED"})["status"]
                    == "COMPLETED"
                )
            for _ in range(3):
                with contextlib.suppress(OSError):
                    conn, _ = hangup.accept()
                    conn.close()
            # the daemon is still there and serving
            assert client.get("/v2/echo/health").status_code == 200
            done = client.post("/v2/echo/runsync", json={"input": {"after": 1}}).json()
            assert done["status"] == "COMPLETED"
        finally:
            hangup.close()


# -- item 7: bad headers and deep JSON ---------------------------------------------------------


def test_daemon_answers_non_ascii_keys_401_and_deep_json_400(daemon: Daemon) -> None:
    assert daemon.record is not None
    port, key = _port(daemon), daemon.record.api_key
    for value in (b"Bearer \xc3\xa9t\xc3\xa9", b"\xff\xfe", "Bearer ключ".encode()):
        head = b"GET /v2/echo/health HTTP/1.1\r\nHost: x\r\nAuthorization: " + value
        status, body = raw(port, head + b"\r\nConnection: close\r\n\r\n")
        assert status == 401, body
    deep_run = b'{"input":' + DEEP + b"}"
    for path in ("/v2/echo/run", "/v2/echo/runsync"):
        status, body = raw(port, post(path, key, deep_run), deep_run)
        assert status == 400, body
        assert b"nested too deeply" in body
    put = post("/flash/v1/endpoints/deep", key, DEEP).replace(b"POST", b"PUT", 1)
    status, body = raw(port, put, DEEP)
    assert status == 400, body
    # as a worker: take a job of the worker-less endpoint, answer it with deep JSON
    with daemon.client() as client:
        job = run_job(client, "manual", {"x": 1})
        taken = client.get("/v2/manual/job-take/w1")
        assert taken.json()["id"] == job
    for route in ("job-done", "job-stream"):
        status, body = raw(port, post(f"/v2/manual/{route}/w1/{job}", key, DEEP), DEEP)
        assert status == 400, body
    with daemon.client() as client:
        assert client.get("/v2/manual/health").status_code == 200


@pytest.fixture
def worker() -> Iterator[tuple[int, str]]:
    """A worker process (``python -m flash_actors.worker``) on an inherited socket."""
    with worker_process({"FLASH_ENDPOINT_KEY": "ab" * 32}) as (port, token, process):
        yield port, token
    assert wait_gone([process.pid]) == []


def test_worker_answers_non_ascii_tokens_401_and_deep_json_400(
    worker: tuple[int, str],
) -> None:
    port, token = worker
    head = b"POST /cancel HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xc3\xa9\xff\r\n"
    status, body = raw(port, head + b"Content-Length: 0\r\nConnection: close\r\n\r\n")
    assert status == 401, body
    deep_batch = b'{"jobs":' + DEEP + b"}"
    for path, payload in (
        ("/execute", deep_batch),
        ("/cancel", b'{"ids":' + DEEP + b"}"),
    ):
        status, body = raw(port, post(path, token, payload), payload)
        assert status == 400, body
    status, body = raw(port, post("/cancel", token, b'{"ids": []}'), b'{"ids": []}')
    assert status == 200, body


# -- item 13: bounded bodies, results and memory -----------------------------------------------


def test_bodies_over_the_limit_are_refused_before_they_are_read(daemon: Daemon) -> None:
    assert daemon.record is not None
    port, key = _port(daemon), daemon.record.api_key
    for path, size in (("/v2/echo/run", 11 * MB), ("/v2/echo/runsync", 21 * MB)):
        head = post(path, key, b"").replace(
            b"Content-Length: 0", f"Content-Length: {size}".encode()
        )
        status, body = raw(
            port, head, timeout=10
        )  # no body sent: answered from the header
        assert status == 413, body
        assert body.startswith(b'{"error":"payload too large: the ')
    # a chunked body is cut off once it passes the limit
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(
            f"POST /v2/echo/run HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n".encode()
        )
        chunk = b"%x\r\n" % MB + b"x" * MB + b"\r\n"
        with contextlib.suppress(OSError):
            for _ in range(12):
                sock.sendall(chunk)
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


@pytest.mark.slow
def test_results_over_20_mb_fail_the_job_with_the_reason(tmp_path: Path) -> None:
    d = Daemon(tmp_path / ".flash", f"big={FILES / 'big_handler.py'}:1")
    try:
        with d.client() as client:
            fine = run_job(client, "big", {"size": 1000})
            assert wait_for(client, "big", fine, {"COMPLETED"})["output"] == "x" * 1000
            for size in (int(20.5 * MB), 60 * MB):  # read then refused; refused unread
                job = run_job(client, "big", {"size": size})
                body = wait_for(client, "big", job, {"COMPLETED", "FAILED"})
                assert body["status"] == "FAILED"
                assert body["error"].startswith("result of ")
                assert "exceeds the 20 MB limit" in body["error"]
                assert "return a smaller value" in body["error"]
            again = run_job(client, "big", {"size": 10})
            assert wait_for(client, "big", again, {"COMPLETED"})["output"] == "x" * 10
    finally:
        d.stop()


BIG_REMOTE = """
import json

import anyio

from flash_actors import CpuLiveServerless, remote

cfg = CpuLiveServerless(name="gw-big")


@remote(resource_config=cfg)
async def big(n):
    return "x" * n


async def main():
    small = await big(10)
    try:
        large = await big(21 * 1024 * 1024)
        error = large.error
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    print(json.dumps({"small": small.output, "error": error}))


anyio.run(main)
"""


@pytest.mark.timeout(120)
def test_a_flash_result_over_20_mb_fails_the_call_with_the_reason(
    daemon: Daemon, project: Path
) -> None:
    (project / "big.py").write_text(BIG_REMOTE)
    done = subprocess.run(
        [sys.executable, "big.py"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = msgspec.json.decode(done.stdout)
    assert out["small"] == "x" * 10
    assert "result of " in out["error"]
    assert "exceeds the 20 MB limit" in out["error"]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


RSS_BOUND_MB = 200  # 100 queued 9 MB jobs are 900 MB of input


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_queued_inputs_live_in_the_store_not_in_memory(daemon: Daemon) -> None:
    body = msgspec.json.encode({"input": {"blob": "y" * (9 * MB)}})
    peak = 0.0
    with daemon.client() as client:
        jobs = []
        for _ in range(100):
            answer = client.post("/v2/manual/run", content=body)
            assert answer.status_code == 200, answer.text
            jobs.append(answer.json()["id"])
            peak = max(peak, _rss_mb(daemon.pid))
        assert client.get("/v2/manual/health").json()["jobs"]["inQueue"] == 100
        # the input is still there, read from the store when a worker takes the job
        taken = client.get("/v2/manual/job-take/w1")
        assert taken.json()["id"] == jobs[0]
        assert len(taken.json()["input"]["blob"]) == 9 * MB
        peak = max(peak, _rss_mb(daemon.pid))
    print(f"peak RSS {peak:.0f} MB")
    assert peak < RSS_BOUND_MB, f"the daemon's RSS reached {peak:.0f} MB"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_concurrent_large_bodies_share_a_memory_budget(project: Path) -> None:
    d = _up(project, {"FLASH_LOCAL_LARGE_BUDGET_MB": "64"}, endpoint=f"manual={ECHO}:0")
    body = msgspec.json.encode({"input": {"blob": "z" * (19 * MB)}})
    answers: list[int] = []
    peak = 0.0

    def send() -> None:
        with d.client() as client:
            answer = client.post("/v2/manual/runsync?wait=1000", content=body)
            answers.append(answer.status_code)

    try:
        threads = [threading.Thread(target=send) for _ in range(16)]
        for thread in threads:
            thread.start()
        while any(thread.is_alive() for thread in threads):
            peak = max(peak, _rss_mb(d.pid))
            time.sleep(0.01)
        assert answers == [200] * 16
        print(f"peak RSS {peak:.0f} MB")
        # 16 bodies of 19 MB at once would be 300 MB, three times over while parsed
        assert peak < 64 * 3 + 100, f"the daemon's RSS reached {peak:.0f} MB"
    finally:
        d.stop()


# -- item 14: connections ----------------------------------------------------------------------


def _up(
    project: Path,
    env: dict[str, str],
    nofile: int | None = None,
    endpoint: str = f"echo={ECHO}:1",
) -> Daemon:
    """`flash local up` with extra environment (and a lower open-file limit)."""

    def limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    state = project / ".flash"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "flash_actors_cli.main",
            "local",
            "--state-dir",
            str(state),
            "up",
            "--endpoint",
            endpoint,
        ],
        cwd=project,
        env={**os.environ, **env},
        preexec_fn=limit,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    d = Daemon.__new__(Daemon)
    d.state_dir, d.endpoints, d.record = state, (), read_record(state)
    assert d.record is not None
    return d


def test_idle_connections_are_closed_and_do_not_block_others(project: Path) -> None:
    d = _up(project, {"FLASH_LOCAL_IDLE_TIMEOUT_S": "2"})
    idle: list[socket.socket] = []
    try:
        for i in range(600):
            sock = socket.create_connection(("127.0.0.1", _port(d)), timeout=30)
            if i % 2:  # half of them start a request and never finish its head
                sock.sendall(b"GET /v2/echo/health HTTP/1.1\r\nHost: x\r\n")
            idle.append(sock)
        with d.client() as client:
            assert client.get("/v2/echo/health").status_code == 200
        for sock in idle:  # each is closed by the daemon (EOF) after the idle timeout
            assert sock.recv(1024) == b""
    finally:
        for sock in idle:
            sock.close()
        d.stop()


async def test_a_client_outlives_the_idle_timeout_of_its_pooled_connections(
    project: Path,
) -> None:
    d = _up(project, {"FLASH_LOCAL_IDLE_TIMEOUT_S": "1"})
    try:
        assert d.record is not None
        async with GatewayProvider(d.record) as provider:
            status, _ = await provider.request("GET", "/v2/echo/health")
            assert status == 200
            await anyio.sleep(2)  # the scenario: the pooled connection idles past 1 s
            status, _ = await provider.request("GET", "/v2/echo/health")
            assert status == 200
    finally:
        d.stop()


@pytest.mark.slow
@pytest.mark.parametrize("cap", ["", "1000"], ids=["capped", "at-the-file-limit"])
def test_the_open_file_limit_does_not_flood_the_log(project: Path, cap: str) -> None:
    # "capped": the cap (from the file limit) closes extra connections at once;
    # "at-the-file-limit": a cap above the limit, so accept() itself fails
    env = {"FLASH_LOCAL_MAX_CONNECTIONS": cap} if cap else {}
    d = _up(project, env, nofile=256)
    log = project / ".flash" / "logs" / "gateway.log"
    held: list[socket.socket] = []
    try:
        for _ in range(400):  # more than the daemon may open: some wait in the backlog
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", _port(d)))
            held.append(sock)
        time.sleep(2)  # what a flood would write meanwhile: several MB
        assert log.stat().st_size < 50_000, log.read_text()[-2000:]
        for sock in held:
            sock.close()
        held = []
        deadline = time.monotonic() + 20
        with d.client() as client:
            while True:
                try:
                    if client.get("/v2/echo/health", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "the daemon did not serve again"
                time.sleep(0.1)
            done = client.post("/v2/echo/runsync", json={"input": {"z": 1}}).json()
            assert done["status"] == "COMPLETED"
        assert log.stat().st_size < 50_000
        assert "Traceback" not in log.read_text()
    finally:
        for sock in held:
            sock.close()
        assert d.record is not None
        leftovers = [d.pid, *descendants(d.pid)]
        d.stop()
        kill_all(wait_gone(leftovers, 5))


def test_execute_without_an_endpoint_label_says_how_to_address_one(
    project: Path,
) -> None:
    daemon = Daemon(project / ".flash")
    try:
        with daemon.client() as client:
            answer = client.post("/execute", json={})
        assert answer.status_code == 404
        assert answer.json()["error"].startswith(
            "POST /execute is a load-balancer endpoint's route"
        )
    finally:
        daemon.stop()
