"""The build's import check (issue 11, item 9: "Verify all imports in your worker modules are
available"): a module-level import the archive cannot satisfy fails the build, naming the
file, the line and the package, before anything is deployed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flash_actors.build.imports import MissingImport, check_imports, missing_imports
from flash_actors.errors import BuildError

MODULE = """\
from __future__ import annotations

import json
import os.path
from typing import TYPE_CHECKING

import helpers
from pkg import tools
from . import sibling

import notthere_top

if TYPE_CHECKING:
    import notthere_typing

try:
    import notthere_optional
except ImportError:
    notthere_optional = None

try:
    import notthere_unguarded
finally:
    pass

if os.environ.get("X"):
    import notthere_branch
else:
    import torch


class Model:
    import notthere_class


def work():
    import notthere_lazy  # runs on a call, with the function's dependencies

    return notthere_lazy
"""


def layout(root: Path) -> Path:
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text("")
    (root / "pkg" / "tools.py").write_text("")
    (root / "helpers.py").write_text("")
    (root / "app.py").write_text(MODULE)
    return root


def test_only_eager_imports_nothing_satisfies_are_reported(tmp_path: Path) -> None:
    root = layout(tmp_path / "build")
    found = missing_imports(root, ["app.py", "helpers.py", "pkg/tools.py"])
    assert [(m.file, m.line, m.name) for m in found] == [
        ("app.py", 11, "notthere_top"),
        ("app.py", 22, "notthere_unguarded"),
        ("app.py", 27, "notthere_branch"),
        ("app.py", 29, "torch"),
        ("app.py", 33, "notthere_class"),
    ]
    # a package the base image has (what --exclude and the GPU defaults leave out)
    found = missing_imports(root, ["app.py"], base_image={"torch"})
    assert MissingImport("app.py", 29, "torch") not in found
    # an installed distribution's package, a compiled module
    for name in ("notthere_top", "notthere_unguarded", "notthere_class"):
        (root / name).mkdir()
    (root / "notthere_branch.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    assert missing_imports(root, ["app.py"], base_image={"torch"}) == []


def test_the_first_missing_import_is_one_line_with_the_fix(tmp_path: Path) -> None:
    root = layout(tmp_path / "build")
    with pytest.raises(BuildError) as caught:
        check_imports(root, ["app.py"])
    assert str(caught.value) == (
        "app.py:11: imports 'notthere_top' when the module loads, but the archive does not "
        "have it (and 4 more): add it to requirements.txt or the resource's "
        "dependencies=[...], or import it inside the function that uses it"
    )


@pytest.mark.network
def test_flash_build_fails_on_a_module_level_import_it_cannot_ship(
    tmp_path: Path,
) -> None:
    project = tmp_path / "app"
    project.mkdir()
    (project / "main.py").write_text(
        "import humanize\n\n"
        "from flash_actors import CpuLiveServerless, remote\n\n"
        "cpu = CpuLiveServerless(name='cpu')\n\n\n"
        "@remote(cpu)\nasync def words(n):\n    return humanize.intword(n)\n"
    )
    environ = {k: v for k, v in os.environ.items() if not k.startswith("FLASH_")}

    def build() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "flash_actors_cli.main", "build"],
            cwd=project,
            env=environ,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )

    done = build()
    assert done.returncode == 1, done.stdout
    assert re.search(
        r"^flash: error: main\.py:1: imports 'humanize' when the module loads, but the "
        r"archive does not have it: add it to requirements\.txt",
        done.stderr,
        re.M,
    ), done.stderr
    assert not (project / ".flash" / "artifact.tar.gz").exists()
    (project / "requirements.txt").write_text("humanize==4.12.3\n")
    done = build()
    assert done.returncode == 0, done.stderr
    assert (project / ".flash" / "artifact.tar.gz").is_file()
