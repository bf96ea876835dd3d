"""Dependency environments made with uv: shared cached files, pip fallback, progress, failures.

Real installs from PyPI of small packages (six, idna), each test in its own cache root.
"""

from __future__ import annotations

import logging
import os
import pty
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import flash_actors.worker.installer as installer_module
from flash_actors.errors import ConfigurationError, DependencyInstallError
from flash_actors.worker.installer import (
    dependency_key,
    ensure_environment,
    site_packages,
)

pytestmark = pytest.mark.timeout(120)


def messages(caplog: pytest.LogCaptureFixture, event: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.getMessage() == event or r.getMessage().startswith(event + " ")
    ]


def archives(root: Path) -> set[Path]:
    """uv's unpacked wheels in the cache (one folder per package version)."""
    folder = root / "uv" / "archive-v0"
    return set(folder.iterdir()) if folder.exists() else set()


def imports(env: Path, *modules: str) -> None:
    """The environment's own interpreter imports ``modules`` (a real process)."""
    code = "; ".join(f"import {m}" for m in modules)
    subprocess.run([str(env / "bin" / "python"), "-c", code], check=True, timeout=30)


async def test_two_dependency_sets_share_a_package_fetched_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="flash_actors")
    monkeypatch.setenv("FLASH_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FLASH_INSTALLER", raising=False)
    first = await ensure_environment(["six"], endpoint="one")
    assert first is not None
    assert first.parent == tmp_path / "envs"
    before = archives(tmp_path)
    assert [(a / "six.py").is_file() for a in before] == [True]
    second = await ensure_environment(["idna", "six"], endpoint="two")
    assert second is not None
    assert second != first
    # the second install unpacked idna only: six came from uv's cache...
    added = archives(tmp_path) - before
    assert len(added) == 1
    assert (added.pop() / "idna").is_dir()
    installed = messages(caplog, "deps.installed")
    assert len(installed) == 2
    assert (
        "endpoint=one packages=['six'] installer=uv installed=1 fetched=1"
        in (installed[0])
    )
    assert (
        "endpoint=two packages=['idna', 'six'] installer=uv installed=2 fetched=1"
        in (installed[1])
    )
    # ...and both environments hard-link its one copy there: the same inode, no second copy
    one, two = (site_packages(env) / "six.py" for env in (first, second))
    assert one.stat().st_ino == two.stat().st_ino
    assert one.stat().st_nlink >= 3  # the cache and the two environments
    assert (first / ".complete").read_text() == "six\n"
    assert (second / ".complete").read_text() == "idna\nsix\n"
    imports(second, "six", "idna")


async def test_pip_is_the_fallback_when_forced_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="flash_actors")
    monkeypatch.setenv("FLASH_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FLASH_INSTALLER", "pip")
    env = await ensure_environment(["six"], endpoint="forced")
    assert env is not None
    [install] = messages(caplog, "deps.install")
    assert install.endswith("installer=pip reason='FLASH_INSTALLER=pip'")
    [done] = messages(caplog, "progress.done")
    assert "summary='pip: 1 installed" in done
    assert not (tmp_path / "uv").exists()  # uv never ran
    assert (site_packages(env) / "six.py").is_file()
    imports(env, "six")


async def test_an_unknown_installer_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLASH_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FLASH_INSTALLER", "conda")
    with pytest.raises(
        ConfigurationError,
        match=r"^FLASH_INSTALLER='conda' is not an installer: use 'uv' or 'pip'",
    ):
        await ensure_environment(["six"])
    assert not tmp_path.joinpath("envs").exists()


async def test_a_failed_install_says_failed_and_names_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="flash_actors")
    monkeypatch.setenv("FLASH_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FLASH_INSTALLER", raising=False)
    missing = "flash-actors-no-such-package-zzz"
    with pytest.raises(DependencyInstallError) as caught:
        await ensure_environment([missing, "six"], endpoint="broken")
    text = str(caught.value)
    assert text.startswith(
        f"could not install dependencies {missing}, six (uv exited with 1):\n"
    )
    reason = " ".join(text.split("\n", 1)[1].split())  # uv wraps its lines
    assert missing in reason  # the installer's own reason names it too
    [failed] = messages(caplog, "progress.failed")
    assert failed.startswith(
        f"progress.failed task='installing {missing}, six for broken'"
    )
    assert messages(caplog, "progress.done") == []
    assert messages(caplog, "deps.installed") == []
    [deps_failed] = messages(caplog, "deps.failed")
    assert f"packages=['{missing}', 'six']" in deps_failed
    # nothing half-made is left to be used
    assert [p for p in (tmp_path / "envs").iterdir() if p.is_dir()] == []


async def test_an_interrupted_install_is_redone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLASH_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FLASH_INSTALLER", raising=False)
    half = tmp_path / "envs" / dependency_key(["six"])
    (half / "lib").mkdir(parents=True)  # an install killed before its .complete marker
    (half / "lib" / "junk").write_text("half")
    env = await ensure_environment(["six"])
    assert env == half
    assert not (half / "lib" / "junk").exists()
    assert (half / ".complete").read_text() == "six\n"
    imports(env, "six")


async def test_uv_copies_where_hard_links_fail_and_says_so_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    shm = Path("/dev/shm")  # noqa: S108 (another filesystem, not a temporary file)
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the test's folder")
    caplog.set_level(logging.INFO, logger="flash_actors")
    monkeypatch.setattr(installer_module, "_link_copy_said", False)
    monkeypatch.setenv("FLASH_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FLASH_INSTALLER", raising=False)
    elsewhere = shm / f"flash-test-envs-{os.getpid()}-{tmp_path.name}"
    elsewhere.mkdir()
    try:
        (tmp_path / "envs").symlink_to(elsewhere)  # environments on another filesystem
        first = await ensure_environment(["six"])
        second = await ensure_environment(["idna", "six"])
        assert first is not None
        assert second is not None
        one, two = (site_packages(env) / "six.py" for env in (first, second))
        assert one.stat().st_ino != two.stat().st_ino  # copies
        [said] = messages(caplog, "deps.link_copy")
        assert "uv copied the files" in said
        imports(second, "six", "idna")
    finally:
        shutil.rmtree(elsewhere)


INSTALL = """
import sys, anyio
from flash_actors._logging import log_to_stderr
from flash_actors.worker.installer import ensure_environment
log_to_stderr()
anyio.run(ensure_environment, sys.argv[1:])
"""


def test_progress_is_log_lines_off_a_terminal_and_a_live_line_on_one(
    tmp_path: Path,
) -> None:
    env = {**os.environ, "FLASH_CACHE_DIR": str(tmp_path)}
    env.pop("FLASH_INSTALLER", None)
    env.pop("FLASH_NO_PROGRESS", None)
    # off a terminal: plain log lines, with the step, the elapsed time and the end
    piped = subprocess.run(
        [sys.executable, "-c", INSTALL, "six"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == ""
    lines = piped.stderr.splitlines()
    task = "task='installing six for an endpoint'"
    assert any(f"progress.start {task}" in line for line in lines), lines
    steps = [line for line in lines if f"progress.step {task}" in line]
    assert any("step='installed 1 package'" in line for line in steps), lines
    assert all(" seconds=" in line for line in steps)
    assert any(
        f"progress.done {task}" in line and "summary='uv: 1 installed" in line
        for line in lines
    ), lines
    assert not any("failed" in line for line in lines)
    # on a terminal: one live line, redrawn, ending with "done in"
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", INSTALL, "idna"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=follower,
            env=env,
        )
    finally:
        os.close(follower)
    shown = b""
    try:
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the process closed the terminal
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(leader)
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == 0, shown
    text = shown.decode()
    assert "\rflash: installing idna for an endpoint | " in text
    assert "\rflash: installing idna for an endpoint: done in " in text
    assert "progress." not in text  # no log lines on the terminal


WITHOUT_UV = """
import sys
sys.modules["uv"] = None  # as on a platform uv publishes no binary for: the import fails
import anyio
from flash_actors._logging import log_to_stderr
from flash_actors.worker.installer import ensure_environment
log_to_stderr()
env = anyio.run(ensure_environment, ["six"])
print(env)
"""


def test_pip_is_the_fallback_where_uv_cannot_run_and_says_why(tmp_path: Path) -> None:
    env = {**os.environ, "FLASH_CACHE_DIR": str(tmp_path)}
    env.pop("FLASH_INSTALLER", None)
    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT_UV],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert (
        "WARNING flash_actors.worker.installer: deps.installer installer=pip "
        "reason='uv is not available for this platform (" in proc.stderr
    )
    made = Path(proc.stdout.strip())
    assert made.parent == tmp_path / "envs"
    assert not (tmp_path / "uv").exists()
    imports(made, "six")
