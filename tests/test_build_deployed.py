"""The archive `flash build` writes runs on its own: unpacked, a generated handler serves its
resource under the stock RunPod worker with the archive's runtime and dependencies, not this
environment's (issue 11, items 3 and 4 together).
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.network

CONFIG = """\
from flash_actors import CpuLiveServerless

cpu = CpuLiveServerless(name="cpu")
"""

WORK = """\
from flash_actors import remote

from app_config import cpu


@remote(cpu, dependencies=["humanize==4.12.3"])
async def where(n):
    import flash_actors
    import humanize

    here = open(__file__.replace("work.py", "prompt.txt")).read().strip()
    return {
        "runtime": flash_actors.__file__,
        "humanize": humanize.__file__,
        "words": humanize.intword(n),
        "prompt": here,
    }
"""


def test_the_unpacked_archive_serves_under_the_stock_runpod_worker(
    tmp_path: Path,
) -> None:
    project = tmp_path / "app"
    project.mkdir()
    (project / "app_config.py").write_text(CONFIG)
    (project / "work.py").write_text(WORK)
    (project / "prompt.txt").write_text("shipped with the code\n")
    environ = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FLASH_", "RUNPOD_", "PYTHON"))
    }
    done = subprocess.run(
        [sys.executable, "-m", "flash_actors_cli.main", "build"],
        cwd=project,
        env=environ,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    unpacked = tmp_path / "unpacked"
    with tarfile.open(project / ".flash" / "artifact.tar.gz", "r:gz") as tar:
        tar.extractall(unpacked, filter="data")
    assert (unpacked / "handler_cpu.py").is_file()

    job = {"input": {"n": 1_200_000}}
    ran = subprocess.run(
        [sys.executable, "handler_cpu.py", "--test_input", json.dumps(job)],
        cwd=unpacked,
        env={
            **environ,
            "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
            "RUNPOD_SKIP_GPU_CHECK": "true",
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    out = ran.stdout + ran.stderr
    assert ran.returncode == 0, out
    found = re.search(r"^INFO +\| Job result: (.*)$", out, re.MULTILINE)
    assert found is not None, out
    output = ast.literal_eval(found.group(1))["output"]
    assert output["words"] == "1.2 million"
    assert output["prompt"] == "shipped with the code"
    # the archive's own runtime and dependency, not this environment's
    assert output["runtime"] == str(unpacked / "flash_actors" / "__init__.py")
    assert output["humanize"].startswith(str(unpacked / "humanize"))
