"""``flash init``: the real command in subprocesses (issue 12, item 1)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from flash_actors.build.scanner import scan_project
from tests._daemon import flash
from tests._devserver import DevServer, free_port

FILES = [
    ".env",
    ".flashignore",
    ".gitignore",
    "README.md",
    "main.py",
    "requirements.txt",
    "workers/__init__.py",
    "workers/cpu/__init__.py",
    "workers/cpu/endpoint.py",
    "workers/gpu/__init__.py",
    "workers/gpu/endpoint.py",
]


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_init_writes_the_template_and_prints_next_steps(tmp_path: Path) -> None:
    done = flash("init", "my_project", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "my_project"
    assert _files(folder) == FILES
    assert (
        "from flash_actors import" in (folder / "workers/gpu/endpoint.py").read_text()
    )
    assert "app = FastAPI(" in (folder / "main.py").read_text()
    assert "flash-actors[dev]" in (folder / "requirements.txt").read_text()
    assert "FLASH_PROVIDER=local" in (folder / ".env").read_text()
    assert ".env" in (folder / ".gitignore").read_text().splitlines()
    # the endpoints are real @remote functions, one GPU and one CPU resource
    scan = scan_project(folder)
    assert [fn.key for fn in scan.functions] == [
        "workers.cpu.endpoint:cpu_hello",
        "workers.gpu.endpoint:gpu_hello",
    ]
    assert {r.resource_type for r in scan.resources.values()} == {
        "CpuLiveServerless",
        "LiveServerless",
    }
    for step in ("cd my_project", "pip install -r requirements.txt", "flash run"):
        assert step in done.stdout, done.stdout
    assert "main.py" in done.stdout


def test_init_dot_uses_the_current_folder(tmp_path: Path) -> None:
    folder = tmp_path / "here"
    folder.mkdir()
    done = flash("init", ".", cwd=folder)
    assert done.returncode == 0, done.stderr
    assert _files(folder) == FILES
    assert "cd " not in done.stdout
    assert "# here" in (folder / "README.md").read_text()


def test_init_refuses_a_non_empty_folder_unless_force(tmp_path: Path) -> None:
    folder = tmp_path / "busy"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    (folder / "main.py").write_text("print('mine')\n")
    done = flash("init", "busy", cwd=tmp_path)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines == [
        "flash: error: busy is not empty (main.py, notes.txt): pick a new folder name, "
        "or add --force to write the template's files into it (overwriting them)"
    ]
    assert (folder / "main.py").read_text() == "print('mine')\n"
    forced = flash("init", "busy", "--force", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert "app = FastAPI(" in (folder / "main.py").read_text()
    assert (folder / "notes.txt").read_text() == "mine"
    assert "Overwritten (--force): main.py" in forced.stdout


def test_init_help_lists_every_option_with_its_default(tmp_path: Path) -> None:
    done = flash("init", "--help", cwd=tmp_path)
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert "(default: .)" in text
    assert "--force, -f" in text
    assert "(default: off: a non-empty folder is refused)" in text
    assert "--verbose, -v" in text


@pytest.mark.slow
@pytest.mark.network
def test_generated_project_works_in_a_fresh_venv(tmp_path: Path) -> None:
    """init -> fresh venv -> this checkout + the project's requirements -> flash run -> HTTP."""
    done = flash("init", "fresh", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    project = tmp_path / "fresh"
    venv = tmp_path / "venv"
    checkout = Path(__file__).resolve().parents[1]
    uv = [sys.executable, "-m", "uv"]
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("VIRTUAL_ENV", "FLASH_LOCAL_GPU")
    }
    made = subprocess.run(
        [*uv, "venv", "-q", str(venv), "--python", sys.executable],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    assert made.returncode == 0, made.stderr
    python = str(venv / "bin" / "python")
    installed = subprocess.run(
        [
            *uv,
            "pip",
            "install",
            "-q",
            "--python",
            python,
            str(checkout),
            "-r",
            str(project / "requirements.txt"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env=env,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    port = free_port()
    # the project as generated: its .env decides where GPU endpoints run
    with DevServer(
        project, "--no-reload", "--port", str(port), python=python, env=env
    ) as server:
        server.wait_up(port, seconds=60)
        base = f"http://127.0.0.1:{port}"
        for kind in ("gpu", "cpu"):
            answer = httpx.post(
                f"{base}/{kind}/hello", json={"message": kind}, timeout=60
            )
            assert answer.status_code == 200, (answer.text, server.output())
            assert answer.json()["message"] == kind
            assert answer.json()["worker"] == kind
        dev = httpx.post(
            f"{base}/workers/cpu/endpoint/runsync",
            json={"input": {"input_data": {"message": "dev"}}},
            timeout=60,
        )
        assert dev.json()["output"]["message"] == "dev"


def test_init_refuses_a_name_no_app_can_have(tmp_path: Path) -> None:
    for bad in ("bad\nname", "x" * 192):
        done = flash("init", bad, cwd=tmp_path)
        assert done.returncode == 1
        assert re.match(r"^flash: error: .* cannot name a Flash project", done.stderr)
    assert list(tmp_path.iterdir()) == []  # nothing written
