"""`flash build --preview` runs the built archive here, with no Docker (issue 11, item 8).

An app whose CPU endpoint calls a second endpoint, and whose load balancer calls the first,
is built and previewed as a real subprocess; it is called over HTTP with Flash's
deployed-mode JSON, and Ctrl-C (SIGINT) stops every process it started.
"""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from flash_actors.build.preview import _ports
from tests._daemon import wait_gone
from tests._preview import Preview, clean_env, cleanup, write_app

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = pytest.mark.network  # the build installs wheels from PyPI (uv caches them)

APP = {
    "app_config.py": """
        from flash_actors import CpuLiveLoadBalancer, CpuLiveServerless

        front = CpuLiveServerless(name="front")
        back = CpuLiveServerless(name="back")
        api = CpuLiveLoadBalancer(name="api")
    """,
    "back_work.py": """
        import os

        from flash_actors import remote

        from app_config import back


        @remote(back)
        async def double(x):
            import flash_actors

            return {"value": 2 * x, "pid": os.getpid(), "runtime": flash_actors.__file__}
    """,
    "front_work.py": """
        import os

        from flash_actors import remote

        from app_config import front
        from back_work import double


        @remote(front)
        async def add_then_double(a, b):
            job = await double(a + b)
            if job.error:
                raise RuntimeError(job.error)
            return {"front_pid": os.getpid(), **job.output}
    """,
    "api_work.py": """
        from flash_actors import remote

        from app_config import api
        from front_work import add_then_double


        @remote(api, method="POST", path="/compute")
        async def compute(a, b):
            job = await add_then_double(a, b)
            if job.error:
                raise RuntimeError(job.error)
            return {"result": job.output["value"]}
    """,
}


@pytest.fixture(scope="module")
def preview(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Preview]:
    project = write_app(tmp_path_factory.mktemp("preview") / "app", APP)
    running = Preview(project)
    try:
        running.wait_ready()
        yield running
    finally:
        cleanup(running)


@pytest.mark.timeout(180)
def test_a_cpu_endpoint_calls_a_second_endpoint_from_the_archive(
    preview: Preview,
) -> None:
    answer = preview.runsync("front", {"a": 1, "b": 2})
    assert answer.status_code == 200, answer.text
    envelope = answer.json()
    assert envelope["status"] == "COMPLETED", envelope
    output = envelope["output"]
    assert output["value"] == 6
    assert output["pid"] != output["front_pid"]  # two endpoints, two workers
    unpacked = Path(preview.info["app_dir"])
    assert unpacked == preview.project / ".flash" / ".preview" / "app"
    # the archive's own runtime, not this environment's
    assert output["runtime"] == str(unpacked / "flash_actors" / "__init__.py")
    shown = preview.output()
    assert f"front: POST {preview.info['daemon_url']}/v2/front/runsync" in shown
    assert re.search(r"^  curl -s http://127\.0\.0\.1:\d+/v2/\w+/runsync ", shown, re.M)


def test_a_load_balancer_route_on_the_preview_port_calls_a_queue_resource(
    preview: Preview,
) -> None:
    url = f"http://127.0.0.1:{preview.port}"
    assert preview.info["load_balancers"] == {"api": url}
    answer = httpx.post(f"{url}/compute", json={"a": 2, "b": 5}, timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"result": 14}
    assert f"api: {url} (POST /compute)" in preview.output()


def test_a_previewed_endpoint_runs_no_code_it_is_sent(preview: Preview) -> None:
    code = "async def double(x):\n    return 'mine'\n"
    answer = preview.runsync(
        "back", {"function_name": "double", "function_code": code, "x": 1}
    )
    assert answer.status_code == 400, answer.text
    assert re.match(
        r"refusing function_code for 'double': a deployed worker of resource 'back' "
        r"runs only the functions built into it",
        answer.json()["error"],
    )
    unknown = preview.runsync("back", {"function_name": "nope", "x": 1}).json()
    assert unknown["status"] == "FAILED"
    assert re.match(r"ManifestError: unknown function 'nope'", unknown["error"])


def test_ctrl_c_stops_every_process_it_started(preview: Preview) -> None:
    pids = preview.pids
    assert len(pids) >= 4  # the daemon, a worker per queue resource, the load balancer
    assert preview.stop(signal.SIGINT) == 0
    assert wait_gone(pids) == []
    assert "preview stopped" in preview.output()
    folder = preview.project / ".flash" / ".preview"
    assert not (folder / "state").exists()  # the daemon's state folder is removed
    assert not (folder / "preview.json").exists()


BROKEN = {
    **APP,
    "back_work.py": """
        import os

        from flash_actors import remote

        from app_config import back

        if os.environ.get("FLASH_RESOURCE_NAME") == "back":
            raise RuntimeError("back cannot start here")


        @remote(back)
        async def double(x):
            return 2 * x
    """,
}


@pytest.mark.timeout(180)
def test_a_resource_that_cannot_start_stops_the_others(tmp_path: Path) -> None:
    project = write_app(tmp_path / "broken", BROKEN)
    done = subprocess.run(
        [sys.executable, "-m", "flash_actors_cli.main", "build", "--preview"],
        cwd=project,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, done.stderr
    assert re.match(
        r"flash: error: resource 'back' cannot start: worker back-\w+ exited ",
        errors[0],
    ), errors[0]
    assert "back cannot start here" in errors[0]
    assert not (project / ".flash" / ".preview" / "state").exists()
    left = [
        p
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and str(project).encode() in _cmdline(p)
    ]
    assert left == []


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


def test_a_taken_port_moves_to_the_next_free_one_and_says_so() -> None:
    said: list[str] = []
    with socket.socket() as taken:
        with contextlib.suppress(OSError):  # something else holds it: the same case
            taken.bind(("127.0.0.1", 8000))
        ports = _ports(2, None, said.append)
    assert ports[0] > 8000
    assert ports[1] > ports[0]
    assert said[0] == "port 8000 is taken: trying 8001"
