"""``flash run``: the real command in subprocesses on 127.0.0.1 (issue 12, item 2)."""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests._daemon import flash, wait_gone
from tests._devserver import DevServer, free_port

QUEUE = '''\
from flash_actors import CpuLiveServerless, remote

config = CpuLiveServerless(name="dev-foo", workersMax=1)


@remote(resource_config=config)
async def add(a: int, b: int = 10) -> dict:
    """Add two numbers on a worker."""
    return {"sum": a + b}
'''

MULTI = """\
from flash_actors import CpuLiveServerless, remote

config = CpuLiveServerless(name="dev-bar", workersMax=1)


@remote(resource_config=config)
async def pong() -> str:
    return "pong"


@remote(resource_config=config)
def shout(text: str) -> str:
    return text.upper()
"""

LB = """\
from flash_actors import CpuLiveLoadBalancer, remote

api = CpuLiveLoadBalancer(name="dev-api", workersMax=1)


@remote(resource_config=api, method="POST", path="/scale")
async def scale(values: list, factor: int = 2):
    return [v * factor for v in values]


@remote(resource_config=api, method="GET", path="/echo/{word}")
async def echo(word: str, times: str = "1"):
    return word * int(times)
"""

MAIN = """\
import os

from fastapi import FastAPI

app = FastAPI(title="dev-test")


@app.get("/greeting")
async def greeting():
    return {"greeting": os.environ.get("DEV_GREETING"), "version": "one"}
"""


def _project(root: Path, **files: str) -> Path:
    folder = root / "proj"
    folder.mkdir()
    for name, text in files.items():
        path = folder / name.replace("__", "/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return folder


def _one_line_error(done: subprocess.CompletedProcess[str], pattern: str) -> None:
    assert done.returncode == 1, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("flash: error: "), lines
    assert pattern in lines[0], lines


def test_help_lists_every_option_with_its_default(tmp_path: Path) -> None:
    done = flash("run", "--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    for option, default in (
        ("--host HOST", "(default: $FLASH_HOST, else localhost)"),
        ("--port PORT", "(default: $FLASH_PORT, else 8888)"),
        ("--reload, --no-reload", "(default: on)"),
        ("--auto-provision", "(default: off;"),
        ("--verbose, -v", "(default: off)"),
    ):
        assert option in text, text
        assert default in text, (option, text)
    top = flash("--help", cwd=tmp_path)
    assert "run" in top.stdout
    assert "init" in top.stdout


def test_serves_queue_lb_and_main_routes_with_dotenv(tmp_path: Path) -> None:
    port = free_port()
    folder = _project(
        tmp_path,
        **{"main.py": MAIN, "foo.py": QUEUE, "api.py": LB, "bar.py": MULTI},
        **{".env": f"FLASH_PORT={port}\nDEV_GREETING=from-dotenv\n"},
    )
    with DevServer(folder, "--no-reload") as server:
        server.wait_up(port)
        base = f"http://127.0.0.1:{port}"
        # the project's own app, with a variable from .env
        got = httpx.get(f"{base}/greeting", timeout=10).json()
        assert got == {"greeting": "from-dotenv", "version": "one"}
        # a queue function: POST /foo/runsync, keyword arguments by name
        answer = httpx.post(
            f"{base}/foo/runsync", json={"input": {"a": 1, "b": 2}}, timeout=30
        )
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["status"] == "COMPLETED"
        assert body["output"] == {"sum": 3}
        assert body["id"]
        default = httpx.post(
            f"{base}/foo/runsync", json={"input": {"a": 5}}, timeout=30
        )
        assert default.json()["output"] == {"sum": 15}
        bad = httpx.post(f"{base}/foo/runsync", json={"input": {"c": 1}}, timeout=30)
        assert bad.status_code == 422, bad.text
        # two queue functions in one file: one route each; no parameters: no body needed
        pong = httpx.post(f"{base}/bar/pong/runsync", timeout=30)
        assert pong.json()["output"] == "pong", pong.text
        shout = httpx.post(
            f"{base}/bar/shout/runsync", json={"input": {"text": "hi"}}, timeout=30
        )
        assert shout.json()["output"] == "HI", shout.text
        # load-balancer routes under their module's prefix
        scaled = httpx.post(
            f"{base}/api/scale", json={"values": [1, 2], "factor": 3}, timeout=30
        )
        assert scaled.status_code == 200, scaled.text
        assert scaled.json() == [3, 6]
        echoed = httpx.get(f"{base}/api/echo/ab", params={"times": "2"}, timeout=30)
        assert echoed.json() == "abab"
        schema = httpx.get(f"{base}/openapi.json", timeout=10).json()
        assert {"/greeting", "/foo/runsync", "/api/scale", "/api/echo/{word}"} <= set(
            schema["paths"]
        )
        assert "loaded .env" in server.output()
        assert server.remember(), "no worker process was started"


def _taken_port_with_a_free_next() -> socket.socket:
    """A listening socket on 127.0.0.1 whose port + 1 is free now."""
    for _ in range(50):
        taken = socket.create_server(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                taken.close()
                continue
        return taken
    pytest.fail("no free pair of ports on 127.0.0.1")


def test_port_taken_moves_to_the_next_free_one(tmp_path: Path) -> None:
    folder = _project(tmp_path, **{"main.py": MAIN})
    with _taken_port_with_a_free_next() as taken:
        port = taken.getsockname()[1]
        with DevServer(
            folder, "--no-reload", "--host", "127.0.0.1", "--port", str(port)
        ) as server:
            # the next free one: port + 1 unless a test running beside this one took it
            pattern = rf"flash: port {port} is in use on 127.0.0.1; serving on port (\d+) instead"
            deadline = time.monotonic() + 30
            while (moved := re.search(pattern, server.output())) is None:
                assert time.monotonic() < deadline, server.output()
                assert server.proc.poll() is None, server.output()
                time.sleep(0.05)
            assert int(moved[1]) > port
            server.wait_up(int(moved[1]))


def test_errors_are_one_line_with_exit_code_1(tmp_path: Path) -> None:
    _one_line_error(
        flash("run", "--port", "abc", cwd=tmp_path),
        "--port 'abc' is not a port: give a number from 1 to 65535",
    )
    broken = _project(tmp_path, **{"bad.py": "def broken(:\n"})
    _one_line_error(flash("run", "--no-reload", cwd=broken), "bad.py:1: syntax error")
    failing = tmp_path / "failing"
    failing.mkdir()
    (failing / "main.py").write_text("raise RuntimeError('main.py is broken')\n")
    done = flash("run", "--no-reload", "--port", str(free_port()), cwd=failing)
    _one_line_error(done, "cannot import the project: RuntimeError: main.py is broken")
    verbose = flash("run", "--no-reload", "-v", "--port", str(free_port()), cwd=failing)
    assert verbose.returncode == 1
    assert "Traceback (most recent call last)" in verbose.stderr


def test_auto_provision_starts_workers_before_any_call(tmp_path: Path) -> None:
    port = free_port()
    folder = _project(tmp_path, **{"foo.py": QUEUE})
    with DevServer(
        folder, "--no-reload", "--auto-provision", "--port", str(port)
    ) as server:
        server.wait_up(port)
        deadline = time.monotonic() + 30
        workers: list[int] = []
        while time.monotonic() < deadline and not workers:
            workers = [
                pid
                for pid in server.remember()
                if b"flash_actors.worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
                or b"dev-foo" in _environ(pid)
            ]
            time.sleep(0.05)
        assert workers, f"no worker started before the first call:\n{server.output()}"
        answer = httpx.post(
            f"http://127.0.0.1:{port}/foo/runsync", json={"input": {"a": 1}}, timeout=30
        )
        assert answer.json()["output"] == {"sum": 11}


def _environ(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


def test_reload_restarts_on_change_and_stops_the_old_workers(tmp_path: Path) -> None:
    port = free_port()
    folder = _project(tmp_path, **{"main.py": MAIN, "foo.py": QUEUE})
    with DevServer(folder, "--port", str(port)) as server:
        server.wait_up(port)
        base = f"http://127.0.0.1:{port}"
        first = httpx.post(f"{base}/foo/runsync", json={"input": {"a": 1}}, timeout=30)
        assert first.json()["output"] == {"sum": 11}
        before = server.remember()
        (folder / "main.py").write_text(MAIN.replace('"one"', '"two"'))
        deadline = time.monotonic() + 30
        version = None
        while time.monotonic() < deadline and version != "two":
            with contextlib.suppress(httpx.HTTPError, ValueError):
                version = httpx.get(f"{base}/greeting", timeout=2).json()["version"]
            time.sleep(0.1)
        assert version == "two", server.output()
        # the old server process and its workers are gone, the supervisor stays
        assert wait_gone([pid for pid in before if pid not in server.remember()]) == []
        again = httpx.post(f"{base}/foo/runsync", json={"input": {"a": 2}}, timeout=30)
        assert again.json()["output"] == {"sum": 12}


def test_a_killed_flash_run_leaves_no_server_or_worker_running(tmp_path: Path) -> None:
    # SIGKILL gives the command no chance to stop anything: the server process uvicorn's
    # reloader started stops by itself when the reloader is gone, and its workers with it.
    port = free_port()
    folder = _project(tmp_path, **{"main.py": MAIN, "foo.py": QUEUE})
    with DevServer(folder, "--port", str(port)) as server:
        server.wait_up(port)
        done = httpx.post(
            f"http://127.0.0.1:{port}/foo/runsync", json={"input": {"a": 1}}, timeout=30
        )
        assert done.json()["output"] == {"sum": 11}
        below = server.remember()
        assert below, "the server process and its workers"
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(10)
        assert wait_gone(below, seconds=30) == [], server.output()


class _Recorder:
    """A proxy that answers nothing and records every connection made to it."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.requests: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    self.requests.append(conn.recv(4096))
                except OSError:
                    self.requests.append(b"")

    def close(self) -> None:
        self.sock.close()
        self.thread.join(5)


def _host(request: bytes) -> str:
    """The host of a proxied request: ``CONNECT host:443`` or ``GET http://host/...``."""
    words = request.split(b"\r\n", 1)[0].decode("latin-1").split()
    if len(words) < 2:
        return ""
    target = words[1].removeprefix("http://").removeprefix("https://")
    return target.split("/", 1)[0].rsplit(":", 1)[0]


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip(
            "Debian's chromium is not installed (make test installs it where it can: "
            "apt-get install -y --no-install-recommends chromium)"
        )
    return found


def test_docs_render_in_headless_chromium_with_no_request_off_loopback(
    tmp_path: Path,
) -> None:
    browser = _chromium()
    port = free_port()
    folder = _project(tmp_path, **{"main.py": MAIN, "foo.py": QUEUE, "api.py": LB})
    page = httpx.Client(base_url=f"http://127.0.0.1:{port}")
    recorder = _Recorder()
    try:
        with DevServer(folder, "--no-reload", "--port", str(port)):
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    if page.get("/ping").is_success:
                        break
                except httpx.HTTPError:
                    time.sleep(0.05)
            html = page.get("/docs").text
            assert "http://" not in html
            assert "https://" not in html
            assert "cdn" not in html.lower()
            # every request that is not to loopback goes to the recorder (Chromium never
            # sends loopback through a proxy)
            done = subprocess.run(
                [
                    browser,
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-component-update",
                    "--disable-background-networking",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    f"--proxy-server=http://127.0.0.1:{recorder.port}",
                    f"--user-data-dir={tmp_path / 'chromium'}",
                    "--virtual-time-budget=20000",
                    "--dump-dom",
                    f"http://127.0.0.1:{port}/docs",
                ],
                capture_output=True,
                text=True,
                timeout=90,
                check=False,
            )
        assert done.returncode == 0, done.stderr[-2000:]
        dom = done.stdout
        for path in ("/greeting", "/foo/runsync", "/api/scale", "/api/echo/{word}"):
            assert f'data-path="{path}"' in dom, dom[-3000:]
        assert "swagger-ui" in dom
        # Chromium's own services (time, sign-in, search preconnect, its component
        # updater) call *.google.com and update.googleapis.com whatever the page; any other
        # host (a CDN such as fonts.googleapis.com included) is the page reaching off
        hosts = {_host(request) for request in recorder.requests} - {""}
        off = {
            host
            for host in hosts
            if not host.endswith(".google.com") and host != "update.googleapis.com"
        }
        assert off == set(), recorder.requests
    finally:
        page.close()
        recorder.close()
