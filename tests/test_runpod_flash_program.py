"""An unmodified runpod-flash 1.21 program, in its own virtual environment, on ``flash local``.

``tests/gateway_files/runpod_flash_program.py`` imports ``runpod_flash`` (not us) and runs with
``FLASH_IS_LIVE_PROVISIONING=true`` and its URL variables pointed at the daemon: it provisions
its endpoint through the daemon's GraphQL, sends unsigned ``FunctionRequest`` jobs (the daemon
signs them for its workers), polls their status, and gets results from a queue function,
from ``asyncio.gather`` and a remote error.

The environment (runpod-flash 1.21.0 from PyPI, ~1.5 min to build on 2 cores) is cached in
``~/.cache/flash-actors/test-envs`` (``FLASH_TEST_ENVS`` elsewhere), built aside and renamed
into place so an interrupted build is never reused.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest

from tests._daemon import Daemon

pytestmark = pytest.mark.slow

RUNPOD_FLASH = "runpod-flash==1.21.0"
PROGRAM = Path(__file__).parent / "gateway_files" / "runpod_flash_program.py"
DEPLOYED_CALLER = (
    Path(__file__).parent / "gateway_files" / "runpod_flash_deployed_caller.py"
)
APP = """\
from flash_actors import CpuLiveServerless, remote

cpu = CpuLiveServerless(name="cpu")
twice_config = CpuLiveServerless(name="twice")


@remote(cpu)
async def add(a, b):
    return a + b


@remote(twice_config)
async def twice(a, b):
    return 2 * (await add(a, b)).output
"""


def runpod_flash_env() -> Path:
    """A virtual environment with runpod-flash 1.21.0 and nothing of ours."""
    root = Path(
        os.environ.get("FLASH_TEST_ENVS")
        or Path.home() / ".cache" / "flash-actors" / "test-envs"
    )
    env = root / "runpod-flash-1.21.0"
    python = env / "bin" / "python"
    if python.exists():
        return python
    root.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix="building-", dir=root))
    try:
        subprocess.run([sys.executable, "-m", "venv", str(building)], check=True)
        subprocess.run(
            [
                str(building / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "-q",
                RUNPOD_FLASH,
            ],
            check=True,
            timeout=900,
        )
        try:
            building.rename(env)
        except OSError:  # another run finished first: use its environment
            shutil.rmtree(building, ignore_errors=True)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return python


@pytest.mark.timeout(1200)  # the first run builds the environment
def test_an_unmodified_runpod_flash_program_runs_on_flash_local(tmp_path: Path) -> None:
    python = runpod_flash_env()
    project = tmp_path / "app"
    project.mkdir()
    daemon = Daemon(project / ".flash")
    try:
        record = daemon.record
        assert record is not None
        home = tmp_path / "home"
        home.mkdir()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "FLASH_IS_LIVE_PROVISIONING": "true",
            "RUNPOD_API_KEY": record.api_key,
            "RUNPOD_API_BASE_URL": record.url,
            "RUNPOD_ENDPOINT_BASE_URL": f"{record.url}/v2",
            "RUNPOD_HAPI_URL": record.url,  # its log fetches stay here too
            "RUNPOD_URL_MIXED_OK": "1",
        }
        done = subprocess.run(
            [str(python), str(PROGRAM)],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        out = done.stdout + done.stderr
        assert done.returncode == 0, out[-4000:]
        lines = {line.split(" ", 1)[0]: line for line in out.splitlines() if line}
        assert lines["ADD"] == "ADD 5", out[-4000:]
        assert lines["GATHER"] == f"GATHER {[i + i for i in range(20)]}", out[-4000:]
        assert lines["ERROR"].startswith("ERROR "), out[-4000:]
        assert "ValueError: boom: x" in out
        # It provisioned through the daemon's GraphQL: the endpoint is there, by its name.
        query = "query { myself { endpoints { id name } } }"
        answer = httpx.post(
            f"{record.url}/graphql",
            json={"query": query},
            headers={"Authorization": f"Bearer {record.api_key}"},
            timeout=30,
        ).json()
        names = [e["name"] for e in answer["data"]["myself"]["endpoints"]]
        assert any(name.startswith("live-cap-worker") for name in names), names
    finally:
        daemon.stop()


@pytest.mark.network  # flash build downloads wheels
@pytest.mark.timeout(1200)  # the first run builds the environment
def test_a_runpod_flash_program_calls_an_app_deployed_on_flash_local(
    tmp_path: Path,
) -> None:
    """Deployed mode: `flash build` + `flash deploy send` here, runpod-flash's sentinel call."""
    python = runpod_flash_env()
    project = (
        tmp_path / "myapp"
    )  # runpod-flash's app name: the folder's (FLASH_APP unset)
    project.mkdir()
    (project / "main.py").write_text(APP)
    daemon = Daemon(project / ".flash")
    try:
        record = daemon.record
        assert record is not None
        ours = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_")}
        for command in (["build"], ["deploy", "send", "production"]):
            done = subprocess.run(
                [sys.executable, "-m", "flash_actors_cli.main", *command],
                cwd=project,
                env=ours,
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
            assert done.returncode == 0, done.stderr
        home = tmp_path / "home"
        home.mkdir()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "RUNPOD_API_KEY": record.api_key,
            "RUNPOD_API_BASE_URL": record.url,
            "RUNPOD_ENDPOINT_BASE_URL": f"{record.url}/v2",
            "RUNPOD_URL_MIXED_OK": "1",
        }
        caller = tmp_path / "caller" / "myapp"
        caller.mkdir(parents=True)
        ran = subprocess.run(
            [str(python), str(DEPLOYED_CALLER)],
            cwd=caller,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        out = ran.stdout + ran.stderr
        assert ran.returncode == 0, out[-4000:]
        lines = {line.split(" ", 1)[0]: line for line in out.splitlines() if line}
        assert lines["TWICE"] == "TWICE 10", out[-4000:]
        assert lines["GATHER"] == f"GATHER {[2 * i for i in range(5)]}", out[-4000:]
    finally:
        daemon.stop()
