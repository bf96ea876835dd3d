"""Shared fixtures: every async test runs on asyncio and on trio."""

from __future__ import annotations

from pathlib import Path

import pytest

BACKENDS = [
    pytest.param(("asyncio", {"debug": True}), id="asyncio"),
    pytest.param(("trio", {}), id="trio"),
]


@pytest.fixture(params=BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, object]]:
    param: tuple[str, dict[str, object]] = request.param
    return param


@pytest.fixture(autouse=True)
def _run_in_tmp_path(
    tmp_path: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every test runs in its own directory, so `.flash/` state never lands in the repo."""
    monkeypatch.chdir(tmp_path)  # type: ignore[arg-type]
    # GPU endpoints run on the CPU (this machine has none); tests/test_gpus.py declares GPUs
    monkeypatch.setenv("FLASH_LOCAL_GPU", "cpu")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """An empty project folder (the daemon serves it; its state goes in ``.flash/``)."""
    folder = tmp_path / "project"
    folder.mkdir()
    return folder
