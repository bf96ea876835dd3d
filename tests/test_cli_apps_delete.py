"""The real ``flash app create`` and ``flash app delete`` against ``flash local``.

``delete`` asks twice (yes, then the app's name) unless ``--yes``, removes the endpoints of
every environment, then the app with its environments and builds (``deleteFlashApp``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests._daemon import Daemon

if TYPE_CHECKING:
    from collections.abc import Iterator

SCRIPT = Path(sys.executable).parent / "flash"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    folder = tmp_path / "myapp"
    folder.mkdir()
    return folder


@pytest.fixture
def daemon(project: Path) -> Iterator[Daemon]:
    running = Daemon(project / ".flash")
    try:
        yield running
    finally:
        running.stop()


def flash(*args: str, cwd: Path, stdin: str = "") -> subprocess.CompletedProcess[str]:
    command = (
        [str(SCRIPT)]
        if SCRIPT.is_file()
        else [sys.executable, "-m", "flash_actors_cli.main"]
    )
    return subprocess.run(
        [*command, *args],
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200"},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def ok(*args: str, cwd: Path, stdin: str = "") -> str:
    done = flash(*args, cwd=cwd, stdin=stdin)
    assert done.returncode == 0, done.stderr + done.stdout
    return done.stdout


def as_json(*args: str, cwd: Path) -> Any:
    return json.loads(ok(*args, "--json", cwd=cwd))


def errors(*args: str, cwd: Path, stdin: str = "") -> list[str]:
    """The error and hint lines of a command that must fail with exit code 1."""
    done = flash(*args, cwd=cwd, stdin=stdin)
    assert done.returncode == 1, done.stderr + done.stdout
    return [
        line
        for line in done.stderr.splitlines()
        if line.startswith(("flash: error:", "  hint:"))
    ]


@pytest.mark.slow  # ~16 commands at ~1-3 s of interpreter start each
@pytest.mark.timeout(300)
def test_app_delete_asks_twice_and_deletes_the_app_and_its_environments(
    daemon: Daemon, project: Path
) -> None:
    ok("deploy", "new", "production", cwd=project)
    ok("env", "create", "staging", cwd=project)
    other = as_json("app", "create", "other", cwd=project)
    assert other["name"] == "other"
    assert ok("app", "create", "third", cwd=project).startswith(
        "created app 'third' on flash local (http://127.0.0.1:"
    )
    assert sorted(a["name"] for a in as_json("app", "list", cwd=project)) == [
        "myapp",
        "other",
        "third",
    ]

    refused = [
        "flash: error: not deleted: not confirmed",
        "  hint: --yes deletes without asking",
    ]
    assert errors("app", "delete", "myapp", cwd=project) == refused  # no answer
    assert errors("app", "delete", "myapp", cwd=project, stdin="n\n") == refused
    assert errors("app", "delete", "myapp", cwd=project, stdin="y\nother\n") == refused
    done = flash("app", "delete", "myapp", cwd=project, stdin="n\n")
    assert "Delete app 'myapp' on flash local (http://127.0.0.1:" in done.stderr
    assert "its 2 environment(s), 0 build(s) and 0 endpoint(s)? [y/N]" in done.stderr
    assert len(as_json("deploy", "list", cwd=project)) == 2  # nothing was deleted

    out = ok("app", "delete", "myapp", cwd=project, stdin="y\nmyapp\n")
    assert out == "deleted app 'myapp' (2 environment(s), 0 build(s))\n"
    assert sorted(a["name"] for a in as_json("app", "list", cwd=project)) == [
        "other",
        "third",
    ]
    # its environments went with it: the folder's app is unknown now
    assert errors("deploy", "list", cwd=project)[0].endswith(
        "has no Flash app named 'myapp'"
    )
    unknown = errors("app", "delete", "myapp", "--yes", cwd=project)
    assert unknown[0].startswith("flash: error: flash local (http://127.0.0.1:")
    assert unknown[0].endswith(") has no Flash app named 'myapp'")
    assert unknown[1] == "  hint: known: other, third"

    assert as_json("app", "delete", "other", "--yes", cwd=project) == {
        "builds": 0,
        "deleted": "other",
        "endpoints": [],
        "environments": [],
    }
    ok("app", "delete", "third", "-y", cwd=project)
    assert as_json("app", "list", cwd=project) == []
    assert errors("app", "delete", "third", "-y", cwd=project)[1] == (
        "  hint: there are no apps"
    )
