"""Deployed load balancers on ``flash local``: the daemon runs their app and proxies to it.

A deployed build's load-balancer resource is reached at the daemon's address with
``Host: {endpoint_id}.{daemon host:port}``, for any method and path of its app (issue 12).
The first tests register a small stdlib HTTP app as a deployed load balancer (fast, no
build) to check the proxy itself; the last builds a real project with ``flash build`` and
deploys it with ``flash deploy send``. Real processes by PID, real HTTP on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from flash_actors.providers.local.daemon.catalog import deployed_config
from flash_actors.providers.local.daemon.lb_routes import _endpoint_label
from flash_actors.providers.local.daemon.record import pid_alive
from flash_actors.resources import CpuLiveLoadBalancer
from tests._daemon import Daemon, descendants, wait_gone
from tests.test_cli_deploy import as_json, flash, ok

if TYPE_CHECKING:
    from collections.abc import Iterator

ECHO_APP = """
import json
import os
import re
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HERE = Path(__file__).resolve().parent


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def answer(self):
        if self.path == "/hold":  # until the proxy closes the connection
            (HERE / "held").write_text("waiting")
            self.connection.settimeout(60)
            got = self.connection.recv(1)
            (HERE / "held").write_text("closed" if not got else "data")
            return
        if self.path == "/stream":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"one,", b"two,", b"three"):
                self.wfile.write(b"%x\\r\\n%s\\r\\n" % (len(part), part))
                self.wfile.flush()
            self.wfile.write(b"0\\r\\n\\r\\n")
            return
        body = self.body()
        out = json.dumps(
            {
                "method": self.command,
                "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "size": len(body),
                "head": body[:20].decode(errors="replace"),
            }
        ).encode()
        self.send_response(200 if self.path == "/ping" else 201)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Upstream", "yes")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = answer


if os.environ.get("ECHO_FAIL"):
    sys.exit("boom: this app cannot start")
ThreadingHTTPServer((os.environ["FLASH_HOST"], int(os.environ["PORT"])), Handler).serve_forever()
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    folder = tmp_path / "myapp"
    folder.mkdir()
    return folder


@pytest.fixture
def daemon(project: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Daemon]:
    # failing apps are started again after 0.5 s, then 1 s (the test needs not wait 30 s)
    monkeypatch.setenv("FLASH_LOCAL_START_BACKOFF_MAX_S", "1")
    running = Daemon(project / ".flash")
    try:
        yield running
    finally:
        running.stop()


def register_echo(daemon: Daemon, project: Path, name: str, **env: str) -> None:
    """Register the echo app as the deployed load balancer ``name`` (a build's layout)."""
    folder = project / "builds" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "flash_manifest.json").write_text("{}")
    (folder / f"handler_{name}.py").write_text(textwrap.dedent(ECHO_APP))
    config = deployed_config(
        CpuLiveLoadBalancer(name=name, env=env or None), folder, f"handler_{name}.py"
    )
    with daemon.client() as client:
        answer = client.put(f"/flash/v1/endpoints/{name}", json=config)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"name": name, "kind": "deployed"}


def status_of(daemon: Daemon, name: str) -> dict[str, Any]:
    with daemon.client() as client:
        table = client.get("/flash/v1/status").json()
    found: dict[str, Any] = next(e for e in table["endpoints"] if e["name"] == name)
    return found


def lb_client(daemon: Daemon, endpoint: str, **headers: str) -> httpx.Client:
    """A client of the load balancer ``endpoint``: the daemon's address, its Host."""
    record = daemon.record
    assert record is not None
    netloc = record.url.removeprefix("http://")
    return httpx.Client(
        base_url=record.url,
        headers={
            "Host": f"{endpoint}.{netloc}",
            "Authorization": f"Bearer {record.api_key}",
            **headers,
        },
        timeout=60,
    )


def wait_answer(
    client: httpx.Client, method: str, path: str, **kwargs: Any
) -> httpx.Response:
    """The first answer that is not the 503 of an app still starting (90 s at most)."""
    deadline = time.monotonic() + 90
    while True:
        answer = client.request(method, path, **kwargs)
        if answer.status_code != 503 or time.monotonic() > deadline:
            return answer
        assert "is starting its app" in answer.text, answer.text
        time.sleep(0.05)


def app_pid(daemon: Daemon, name: str) -> int:
    app = status_of(daemon, name)["app"]
    assert app["pid"] is not None, app
    pid: int = app["pid"]
    return pid


@pytest.mark.parametrize(
    ("host", "endpoint"),
    [
        ("abc.127.0.0.1:8000", "abc"),
        ("env-1a2b-api.127.0.0.1:8000", "env-1a2b-api"),
        ("abc.localhost:8000", "abc"),
        ("abc.[::1]:8000", "abc"),
        ("abc.127.0.0.1", "abc"),
        ("127.0.0.1:8000", None),  # the daemon itself
        ("localhost:8000", None),
        ("abc.example.com", None),  # not the daemon's address: its own routes
        (".127.0.0.1:8000", None),
    ],
)
def test_the_endpoint_is_the_first_label_of_host(
    host: str, endpoint: str | None
) -> None:
    assert _endpoint_label(host) == endpoint


def test_any_method_and_path_is_proxied_with_headers_and_bodies(
    daemon: Daemon, project: Path
) -> None:
    register_echo(daemon, project, "echo")
    with lb_client(daemon, "echo") as client:
        first = wait_answer(client, "GET", "/health?x=1")
        assert first.status_code == 201, first.text
        seen = first.json()
        assert (seen["method"], seen["path"]) == ("GET", "/health?x=1")
        assert first.headers["x-upstream"] == "yes"  # the app's headers come back
        # the app is told who asked; the daemon's key passes through, as on RunPod
        assert seen["headers"]["x-forwarded-host"] == client.headers["host"]
        assert seen["headers"]["x-forwarded-proto"] == "http"

        answer = client.post(
            "/v1/predict",
            content=b'{"a": 1}',
            headers={
                "Content-Type": "application/json",
                "Connection": "keep-alive, X-Secret-Hop",
                "X-Secret-Hop": "dropped",
                "Keep-Alive": "timeout=5",
                "X-Kept": "kept",
            },
        )
        assert answer.status_code == 201, answer.text
        seen = answer.json()
        assert (seen["method"], seen["path"], seen["head"]) == (
            "POST",
            "/v1/predict",
            '{"a": 1}',
        )
        headers = seen["headers"]
        assert headers["x-kept"] == "kept"
        assert headers["content-type"] == "application/json"
        assert "x-secret-hop" not in headers  # named by Connection: hop-by-hop
        assert "keep-alive" not in headers
        for method in ("PUT", "PATCH", "DELETE"):
            done = client.request(method, "/items/7")
            assert done.json()["method"] == method

        # a body of unknown length is streamed through (chunked)
        parts = [b"x" * 65536] * 40
        streamed = client.post("/upload", content=iter(parts))
        assert streamed.status_code == 201, streamed.text
        assert streamed.json()["size"] == 40 * 65536
        # and so is a chunked answer
        assert client.get("/stream").text == "one,two,three"

        # the daemon's body limit: from Content-Length, or once that much has come
        big = client.post("/upload", content=b"x" * (20 * 1024 * 1024 + 1))
        assert big.status_code == 413, big.text
        assert big.json()["error"].startswith("payload too large: the request body")
        endless = client.post("/upload", content=iter([b"x" * 1024 * 1024] * 21))
        assert endless.status_code == 413, endless.text

    # a load balancer takes no queued jobs
    with daemon.client() as client:
        refused = client.post("/v2/echo/run", json={"input": {}})
        assert refused.status_code == 400
        assert "is a load balancer: it takes no jobs" in refused.json()["error"]


def test_unknown_hosts_and_bad_keys_are_refused(daemon: Daemon, project: Path) -> None:
    register_echo(daemon, project, "echo")
    with lb_client(daemon, "nope") as client:
        answer = client.get("/health")
        assert answer.status_code == 404
        assert answer.json()["error"].startswith(
            f"no endpoint 'nope' here (Host: {client.headers['host']})"
        )
    with lb_client(daemon, "echo", Authorization="Bearer wrong") as client:
        answer = client.get("/health")
        assert answer.status_code == 401
        assert "x-upstream" not in answer.headers
    with daemon.client() as client:  # the daemon's own routes on its own address
        assert client.get("/flash/v1/status").status_code == 200


def raw_request(
    daemon: Daemon, endpoint: str, head: str, body: bytes = b""
) -> socket.socket:
    """Send one request for ``endpoint`` on a socket of its own, left open (no answer read)."""
    record = daemon.record
    assert record is not None
    netloc = record.url.removeprefix("http://")
    sock = socket.create_connection(("127.0.0.1", int(netloc.rsplit(":", 1)[1])))
    sock.sendall(
        f"{head}\r\nHost: {endpoint}.{netloc}\r\nAuthorization: Bearer "
        f"{record.api_key}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    return sock


def wait_text(path: Path, text: str) -> str:
    """The file's text once it is ``text``, or whatever it holds after 30 s."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if path.is_file() and path.read_text() == text:
            break
        time.sleep(0.02)
    return path.read_text() if path.is_file() else ""


def test_the_client_going_away_closes_the_upstream_request(
    daemon: Daemon, project: Path
) -> None:
    register_echo(daemon, project, "echo")
    marker = project / "builds" / "echo" / "held"
    with lb_client(daemon, "echo") as client:
        assert wait_answer(client, "GET", "/ready").status_code == 201
    sock = raw_request(daemon, "echo", "GET /hold HTTP/1.1")
    assert wait_text(marker, "waiting") == "waiting"  # the app holds the request
    sock.close()  # the client goes away
    assert wait_text(marker, "closed") == "closed"


@pytest.mark.timeout(120)
def test_the_app_is_restarted_replaced_and_stopped_by_pid(
    daemon: Daemon, project: Path
) -> None:
    register_echo(daemon, project, "echo")
    with lb_client(daemon, "echo") as client:
        assert wait_answer(client, "GET", "/a").status_code == 201
        launcher = app_pid(daemon, "echo")
        (app,) = descendants(launcher)  # the handler under its launcher
        os.kill(app, signal.SIGKILL)  # the app dies
        assert wait_gone([launcher, app]) == []  # its group ends with it
        assert wait_answer(client, "GET", "/b").status_code == 201  # started again
        launcher = app_pid(daemon, "echo")
        old = [launcher, *descendants(launcher)]

        register_echo(daemon, project, "echo", VERSION="2")  # replaced: a new config
        assert wait_gone(old) == []
        answer = wait_answer(client, "GET", "/c")
        assert answer.status_code == 201
        launcher = app_pid(daemon, "echo")
        assert launcher not in old
        running = [launcher, *descendants(launcher)]

    daemon.down()  # the daemon stops: its apps with it
    assert wait_gone(running) == []


@pytest.mark.timeout(120)
def test_an_app_that_cannot_start_is_reported_with_its_log(
    daemon: Daemon, project: Path
) -> None:
    register_echo(daemon, project, "broken", ECHO_FAIL="1")
    deadline = time.monotonic() + 60
    while status_of(daemon, "broken")["start_error"] is None:
        assert time.monotonic() < deadline, status_of(daemon, "broken")
        time.sleep(0.05)
    log = project / ".flash" / "logs" / "broken" / "app.log"
    pattern = (
        r"(\d+) failed starts in a row; the last: its process exited with code -?\d+ "
        rf"before it answered GET /ping \(log: {re.escape(str(log))}\): boom: this app "
        "cannot start"
    )
    found = re.fullmatch(pattern, status_of(daemon, "broken")["start_error"])
    assert found is not None, status_of(daemon, "broken")
    assert int(found[1]) >= 3
    with lb_client(daemon, "broken") as client:
        answer = client.get("/anything")
        assert answer.status_code == 503
        error = answer.json()["error"]
        assert re.fullmatch(
            f"endpoint 'broken' cannot start its app: {pattern}", error
        ), error
    # it keeps trying, spaced out: each start is in its log
    assert log.read_text().count("flash local: starting handler_broken.py") >= 3


MAIN = """\
from flash_actors import CpuLiveLoadBalancer, CpuLiveServerless, remote

cpu = CpuLiveServerless(name="cpu")
api = CpuLiveLoadBalancer(name="api")
front = CpuLiveServerless(name="front")


@remote(cpu)
async def add(a, b):
    return a + b


@remote(api, method="POST", path="/v1/predict")
async def predict(a, b):
    import os

    job = await add(a, b)  # a queue resource of the app: through the daemon
    if job.error:
        raise RuntimeError(job.error)
    return {"sum": job.output, "pid": os.getpid()}


@remote(api, method="GET", path="/health")
async def health():
    return {"ok": True}


@remote(api, method="POST", path="/slow")
async def slow(marker):
    import asyncio
    from pathlib import Path

    Path(marker).write_text("started")
    try:
        await asyncio.sleep(120)
    except asyncio.CancelledError:
        Path(marker).write_text("cancelled")
        raise
    return "done"


@remote(front)
async def ask_api(a, b):
    answer = await predict(a, b)  # the load balancer's function: POST /execute on its host
    return answer["sum"] * 10
"""


@pytest.mark.network  # flash build downloads wheels (uv's cache makes it fast)
@pytest.mark.timeout(300)
def test_a_deployed_build_serves_its_load_balancer(
    daemon: Daemon, project: Path
) -> None:
    (project / "main.py").write_text(MAIN)
    built = flash("build", cwd=project, timeout=240)
    assert built.returncode == 0, built.stderr
    done = flash("deploy", "send", "production", cwd=project)
    assert done.returncode == 0, done.stderr
    info = as_json("deploy", "info", "production", cwd=project)
    assert info["state"] == "DEPLOYED", info
    endpoints = {e["name"]: e["id"] for e in info["endpoints"]}
    assert sorted(endpoints) == ["api", "cpu", "front"]
    api = endpoints["api"]

    with lb_client(daemon, api) as client:
        answer = wait_answer(client, "POST", "/v1/predict", json={"a": 2, "b": 3})
        assert answer.status_code == 200, answer.text
        assert answer.json()["sum"] == 5  # the route called the queue resource
        health = client.get("/health")
        assert (health.status_code, health.json()) == (200, {"ok": True})
        missing = client.get("/nope")
        assert missing.status_code == 404  # the app's own 404

    # the client going away cancels the route's function in the app
    marker = project / "slow.txt"
    sock = raw_request(
        daemon,
        api,
        "POST /slow HTTP/1.1\r\nContent-Type: application/json",
        json.dumps({"marker": str(marker)}).encode(),
    )
    assert wait_text(marker, "started") == "started"
    sock.close()
    assert wait_text(marker, "cancelled") == "cancelled"

    with daemon.client() as client:
        # a queue resource calls the load balancer's function (deployed code, through
        # the daemon: a signed POST /execute on the endpoint's host)
        job = client.post(
            f"/v2/{endpoints['front']}/runsync?wait=60000",
            json={"input": {"function_name": "ask_api", "a": 4, "b": 1}},
        ).json()
        assert job["status"] == "COMPLETED", job.get("error")
        assert job["output"] == 50

    # its app dies: it is started again and answers
    launcher = app_pid(daemon, api)
    killed = descendants(launcher)
    assert killed  # the handler under its launcher
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    assert wait_gone([launcher, *killed]) == []
    with lb_client(daemon, api) as client:
        again = wait_answer(client, "POST", "/v1/predict", json={"a": 1, "b": 1})
        assert again.status_code == 200, again.text
        assert again.json()["sum"] == 2
    launcher = app_pid(daemon, api)
    processes = [launcher, *descendants(launcher)]

    # deleting the environment stops it by PID: nothing is left running
    out = ok("deploy", "delete", "production", "--yes", cwd=project)
    assert "deleted environment 'production'" in out
    assert wait_gone(processes) == []
    assert not any(pid_alive(p) for p in processes)
    with lb_client(daemon, api) as client:
        assert client.get("/health").status_code == 404
    with daemon.client() as client:
        table = client.get("/flash/v1/status").json()
    assert [e["name"] for e in table["endpoints"]] == []
