"""`flash build` end to end: the real command in a subprocess on a small project.

Each build installs flash-actors' own runtime dependencies from PyPI as Linux x86_64 wheels
(uv's cache makes a rebuild a copy, ~1 s).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from flash_actors.build.archive import write_archive
from flash_actors.errors import BuildError

pytestmark = pytest.mark.network

MAIN = """\
from flash_actors import CpuLiveServerless, remote

from pkg.helpers import double

cpu = CpuLiveServerless(name="cpu")


@remote(cpu)
async def work(x):
    return double(x)
"""


def write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return write(
        tmp_path / "app",
        {
            "main.py": MAIN,
            "pkg/__init__.py": "",
            "pkg/helpers.py": "def double(x):\n    return 2 * x\n",
            "scratch.py": "raise SystemExit('ignored by .gitignore')\n",
            "notes/draft.py": "raise SystemExit('ignored by .flashignore')\n",
            "pkg/local_only.py": "x = 1\n",
            "pkg/prompt.txt": "a data file the code opens\n",
            "data/big.csv": "ignored,by,flashignore\n",
            ".gitignore": "scratch.py\n",
            ".flashignore": "notes/\npkg/local_only.py\ndata/\n",
        },
    )


def flash_build(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    return subprocess.run(
        [sys.executable, "-m", "flash_actors_cli.main", "build", *args],
        cwd=cwd,
        env={**environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def members(archive: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(archive, "r:gz") as tar:
        return {info.name: info for info in tar.getmembers()}


def read_member(archive: Path, name: str) -> bytes:
    with tarfile.open(archive, "r:gz") as tar:
        data = tar.extractfile(name)
        assert data is not None
        return data.read()


def test_build_writes_the_archive(project: Path) -> None:
    done = flash_build(cwd=project)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert re.search(
        r"^Built app for Python 3\.\d+ on Linux x86_64: 1 resource, 1 function$",
        out,
        re.M,
    )
    assert re.search(r"^  cpu \(CpuLiveServerless\): main:work$", out, re.M)
    assert re.search(r"^  sources: 4 file\(s\)$", out, re.M)
    assert re.search(
        r"^  archive: \.flash/artifact\.tar\.gz \([\d.]+ MiB, \d+ files", out, re.M
    )
    assert "flash: installing dependencies for Linux x86_64" in done.stderr
    archive = project / ".flash" / "artifact.tar.gz"
    found = members(archive)
    names = set(found)
    # the project's files (data too), the manifest, and the runtime; nothing the ignore
    # files name, no hidden file (.env holds secrets)
    assert {"main.py", "pkg/__init__.py", "pkg/helpers.py", "pkg/prompt.txt"} <= names
    assert {
        "scratch.py",
        "notes/draft.py",
        "pkg/local_only.py",
        "data/big.csv",
        ".lock",
        ".gitignore",
        ".flashignore",
    }.isdisjoint(names)
    assert not any(name.startswith(("notes", ".flash")) for name in names)
    assert "flash_actors/__init__.py" in names
    assert "flash_actors/build/builder.py" in names
    assert not any("__pycache__" in name for name in names)
    assert any(name.startswith("msgspec/_core.cpython-") for name in names)
    assert not any(name.startswith("uv/") for name in names)  # a build tool
    # console scripts name this machine's interpreter: useless on a worker
    assert not any(name.startswith("bin/") for name in names)
    manifest = read_member(archive, "flash_manifest.json")
    assert manifest == (project / ".flash" / "flash_manifest.json").read_bytes()
    assert json.loads(manifest)["function_registry"] == {"main:work": "cpu"}
    assert (
        read_member(archive, "pkg/helpers.py")
        == (project / "pkg" / "helpers.py").read_bytes()
    )
    # reproducible: sorted, fixed times, owners and modes, no names; gzip time 0, no name
    assert list(found) == sorted(found, key=lambda n: n.split("/"))
    for info in found.values():
        assert (info.mtime, info.uid, info.gid, info.uname, info.gname) == (
            0,
            0,
            0,
            "",
            "",
        )
        assert info.mode in ({0o755} if info.isdir() else {0o644, 0o755}), info.name
    header = archive.read_bytes()[:10]
    assert header[3] == 0  # FLG: no file name, no comment
    assert header[4:8] == b"\0\0\0\0"  # MTIME
    assert not (project / ".flash" / ".build").exists()
    assert sorted(p.name for p in (project / ".flash").iterdir()) == [
        "artifact.tar.gz",
        "build.lock",  # one build at a time (kept, as daemon.lock is)
        "flash_manifest.json",
    ]


def test_two_builds_give_the_same_bytes(project: Path, tmp_path: Path) -> None:
    first = flash_build(
        "--output", str(tmp_path / "a.tgz"), "--keep-build", cwd=project
    )
    assert first.returncode == 0, first.stderr
    kept = project / ".flash" / ".build"
    assert (kept / "flash_manifest.json").is_file()
    assert (kept / "pkg" / "helpers.py").is_file()
    assert re.search(r"^  build folder kept: \.flash/\.build$", first.stdout, re.M)
    assert not (project / ".flash" / "artifact.tar.gz").exists()
    # the project folder as an argument, from elsewhere; --keep-build not given
    second = flash_build(str(project), "--output", "b.tgz", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert not kept.exists()
    assert (tmp_path / "a.tgz").read_bytes() == (tmp_path / "b.tgz").read_bytes()


def test_source_date_epoch_and_exclude(project: Path) -> None:
    done = flash_build(
        "--exclude",
        "Sniffio,structlog",
        cwd=project,
        env={"SOURCE_DATE_EPOCH": "1700000000"},
    )
    assert done.returncode == 0, done.stderr
    assert re.search(
        r"^  left out: sniffio \(--exclude\), structlog \(--exclude\)$",
        done.stdout,
        re.M,
    )
    archive = project / ".flash" / "artifact.tar.gz"
    tops = {name.split("/")[0] for name in members(archive)}
    assert "anyio" in tops
    assert not any(top.startswith(("sniffio", "structlog")) for top in tops)
    assert {info.mtime for info in members(archive).values()} == {1700000000}
    assert archive.read_bytes()[4:8] == b"\0\0\0\0"  # the gzip header stays at 0
    manifest = json.loads(read_member(archive, "flash_manifest.json"))
    assert manifest["generated_at"] == "2023-11-14T22:13:20Z"
    with gzip.open(archive) as raw:
        tarfile.open(fileobj=io.BytesIO(raw.read())).close()


def test_syntax_error_is_one_line_with_file_and_line(project: Path) -> None:
    write(project, {"pkg/broken.py": "x = 1\n\ndef f(:\n    pass\n"})
    done = flash_build(cwd=project)
    assert done.returncode == 1
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert lines[-1].startswith("flash: error: pkg/broken.py:3: syntax error: ")
    assert lines[-1].endswith(": fix it (or add the file to .flashignore)")
    assert not any(line.startswith("Traceback") for line in lines)
    assert not (project / ".flash" / "artifact.tar.gz").exists()
    verbose = flash_build("-v", cwd=project)
    assert verbose.returncode == 1
    assert "Traceback (most recent call last)" in verbose.stderr
    assert verbose.stderr.splitlines()[-1] == lines[-1]


def test_no_remote_functions_gives_the_guidance(tmp_path: Path) -> None:
    write(tmp_path, {"plain.py": "def f():\n    return 1\n"})
    done = flash_build(cwd=tmp_path)
    assert done.returncode == 1
    last = done.stderr.splitlines()[-1]
    assert re.fullmatch(
        r"flash: error: No @remote functions found in \S+ \(scanned 1 Python file\(s\): "
        r"plain\.py\): ensure your functions are decorated with @remote\(resource_config\), "
        r"check that the Python files are not excluded by \.gitignore or \.flashignore, "
        r"and verify the decorators have valid syntax",
        last,
    )
    assert not (tmp_path / ".flash" / "artifact.tar.gz").exists()


def test_unsupported_python_version(project: Path) -> None:
    done = flash_build("--python-version", "3.10", cwd=project)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "flash: error: Python 3.10 is not a build target: choose --python-version from "
        "3.11, 3.12, 3.13, 3.14"
    ]


def test_a_failed_archive_leaves_the_old_one(tmp_path: Path) -> None:
    build = write(tmp_path / "build", {"a.py": "x = 1\n", "z.py": "y = 2\n"})
    os.mkfifo(build / "m.fifo")
    output = tmp_path / "out" / "artifact.tar.gz"
    output.parent.mkdir()
    output.write_bytes(b"the previous archive")
    with pytest.raises(
        BuildError,
        match=r"^\S+/m\.fifo: not a file, folder or link, so it cannot go into the "
        r"archive: remove it$",
    ):
        write_archive(build, output)
    assert output.read_bytes() == b"the previous archive"
    assert [p.name for p in output.parent.iterdir()] == ["artifact.tar.gz"]


def test_ctrl_c_while_packing_leaves_no_archive(project: Path) -> None:
    old = project / ".flash" / "artifact.tar.gz"
    old.parent.mkdir()
    old.write_bytes(b"the previous archive")
    environ = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    with subprocess.Popen(
        [sys.executable, "-m", "flash_actors_cli.main", "build"],
        cwd=project,
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stderr is not None
            for line in proc.stderr:
                if line.startswith("flash: packing "):
                    proc.send_signal(signal.SIGINT)
                    break
            rest = proc.stderr.read()
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if code == 0:  # pragma: no cover (the archive was finished before the signal came)
        pytest.skip("the build finished before SIGINT arrived")
    assert code == 130
    assert rest.splitlines()[-1] == "flash: error: interrupted: no archive was written"
    assert old.read_bytes() == b"the previous archive"
    assert sorted(p.name for p in old.parent.iterdir()) == [
        "artifact.tar.gz",
        "build.lock",
        "flash_manifest.json",
    ]


def test_a_second_build_of_the_project_is_refused_while_one_runs(project: Path) -> None:
    from flash_actors.build._lock import project_lock

    with project_lock(project, "build"):  # this test's process is the running build
        done = flash_build(cwd=project)
    assert done.returncode == 1
    assert re.match(
        rf"^flash: error: another flash build of {re.escape(str(project))} is running "
        rf"\(pid {os.getpid()}\): wait for it or stop it first$",
        done.stderr.strip(),
    ), done.stderr
    assert flash_build(cwd=project).returncode == 0  # released: the next one runs
