"""Network volumes on this machine, and ``accelerate_downloads``: real workers, real folders."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from flash_actors import (
    ConfigurationError,
    CpuLiveServerless,
    JobStatus,
    NetworkVolume,
    remote,
    runtime,
    volume_path,
    volumes as flash_volumes,
)
from flash_actors.providers.local import LocalProvider, volumes as local_volumes
from flash_actors.providers.local.controlplane.schema import ControlPlane
from flash_actors.providers.runpod.provider import RunPodProvider
from flash_actors.providers.runpod.transport import HttpsTransport
from flash_actors.volumes import apply_downloads
from tests._daemon import Daemon

if TYPE_CHECKING:
    from collections.abc import Iterator

WRITER = CpuLiveServerless(name="vol-writer", networkVolumeId="vol-shared")
READER = CpuLiveServerless(
    name="vol-reader", networkVolume=NetworkVolume(name="models", id="vol-shared")
)
OTHER = CpuLiveServerless(name="vol-other", networkVolumeId="vol-other")
NONE = CpuLiveServerless(name="vol-none")
CACHES = ["HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "TORCH_HOME"]


@pytest.fixture
def volumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Volumes and the ``/runpod-volume`` link under ``tmp_path`` (workers inherit this)."""
    root = tmp_path / "volumes"
    link = tmp_path / "runpod-volume"
    monkeypatch.setenv("FLASH_VOLUMES_DIR", str(root))
    monkeypatch.setenv("FLASH_RUNPOD_VOLUME_LINK", str(link))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "users-hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("TORCH_HOME", raising=False)
    try:
        yield root
    finally:  # this process's hold on the test's link ends with the test
        held = local_volumes._claims.pop(str(link), None)
        if held is not None:
            os.close(held[1])


@remote(WRITER)
async def write_note(text: str) -> dict[str, Any]:
    import os

    from flash_actors import volume_path

    folder = volume_path()
    (folder / "note.txt").write_text(text)
    return {"path": str(folder), "id": os.environ.get("FLASH_VOLUME_ID")}


@remote(READER)
async def read_shared(link: str) -> dict[str, Any]:
    import os

    from flash_actors import volume_path

    note = volume_path() / "note.txt"
    return {
        "path": str(volume_path()),
        "note": note.read_text() if note.exists() else None,
        "link": os.path.realpath(link),
    }


@remote(OTHER)
async def read_other(link: str) -> dict[str, Any]:
    import os

    from flash_actors import volume_path

    note = volume_path() / "note.txt"
    return {
        "path": str(volume_path()),
        "note": note.read_text() if note.exists() else None,
        "link": os.path.realpath(link),
    }


@remote(NONE)
async def no_volume() -> str:
    from flash_actors import volume_path

    return str(volume_path())


def output(job: Any) -> Any:
    assert job.status is JobStatus.COMPLETED, job.error
    return job.output


async def test_endpoints_naming_one_volume_share_its_folder_and_no_other(
    tmp_path: Path, volumes: Path
) -> None:
    link = str(tmp_path / "runpod-volume")
    async with runtime(provider=LocalProvider(state_dir=tmp_path / ".flash")):
        written = output(await write_note("hello from the writer"))
        shared = output(await read_shared(link))
        other = output(await read_other(link))
        none = await no_volume()
    assert written == {"path": str(volumes / "vol-shared"), "id": "vol-shared"}
    # another endpoint naming the volume (by a NetworkVolume's id) reads the file
    assert shared["path"] == str(volumes / "vol-shared")
    assert shared["note"] == "hello from the writer"
    assert shared["link"] == str(volumes / "vol-shared")  # /runpod-volume, here
    # a different volume does not see it; the machine's one link stays with the first
    assert other["path"] == str(volumes / "vol-other")
    assert other["note"] is None
    assert other["link"] == str(volumes / "vol-shared")
    assert (volumes / "vol-shared" / "note.txt").read_text() == "hello from the writer"
    for folder in (volumes, volumes / "vol-shared", volumes / "vol-other"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    if not os.path.isdir("/runpod-volume"):  # a machine that has one: it is found
        assert none.status is JobStatus.FAILED
        with pytest.raises(ConfigurationError, match=r"^no network volume here: "):
            none.raise_for_error()


async def test_a_volume_outlives_its_runtimes(tmp_path: Path, volumes: Path) -> None:
    async with runtime(provider=LocalProvider(state_dir=tmp_path / "first")):
        output(await write_note("kept across runs"))
    async with runtime(provider=LocalProvider(state_dir=tmp_path / "second")):
        shared = output(await read_shared(str(tmp_path / "runpod-volume")))
    assert shared["note"] == "kept across runs"


@pytest.mark.parametrize(
    "volume_id",
    ["../escape", "a/b", "/etc", ".hidden", "vol.1", "", "x" * 65, "vol\x00", "völ", 7],
)
def test_hostile_volume_ids_are_refused(volume_id: Any) -> None:
    with pytest.raises(
        ConfigurationError,
        match=r"^CpuLiveServerless\(name='hostile'\): network volume id .* is not a plain "
        r"id: it may hold only 1 to 64 letters, digits, '-' and '_'",
    ):
        CpuLiveServerless(name="hostile", networkVolumeId=volume_id)
    with pytest.raises(ConfigurationError, match=r"^network volume: network volume id"):
        local_volumes.volume_dir(volume_id)


def test_a_name_only_volume_is_kept_by_name_and_two_ids_must_agree() -> None:
    named = CpuLiveServerless(name="n", networkVolume=NetworkVolume(name="models"))
    assert named.volume_id == "models"
    with pytest.raises(
        ConfigurationError, match=r"^CpuLiveServerless\(name='n'\): network"
    ):
        CpuLiveServerless(name="n", networkVolume=NetworkVolume(name="my models"))
    with pytest.raises(
        ConfigurationError,
        match=r"^CpuLiveServerless\(name='n'\): networkVolumeId 'a' and networkVolume's "
        r"id 'b' differ: give one of them$",
    ):
        CpuLiveServerless(
            name="n", networkVolumeId="a", networkVolume=NetworkVolume(name="v", id="b")
        )


def test_volume_path_outside_a_worker_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FLASH_VOLUME_PATH", str(tmp_path))
    assert volume_path() == tmp_path
    monkeypatch.delenv("FLASH_VOLUME_PATH")
    if os.path.isdir("/runpod-volume"):
        assert volume_path() == Path("/runpod-volume")  # on RunPod
    else:
        with pytest.raises(ConfigurationError, match=r"^no network volume here"):
            volume_path()


_HOLD = """
import sys
from pathlib import Path
from flash_actors.providers.local.volumes import claim_link
print(claim_link(Path(sys.argv[1])), flush=True)
sys.stdin.read()
"""


def test_the_link_is_never_clobbered_and_moves_only_when_free(
    tmp_path: Path, volumes: Path
) -> None:
    link = tmp_path / "runpod-volume"
    first = local_volumes.volume_dir("vol-a")
    second = local_volumes.volume_dir("vol-b")
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(first)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "True\n"
        assert os.readlink(link) == str(first)
        # another process uses vol-a there: vol-b's workers go without the link
        assert local_volumes.claim_link(second) is False
        assert os.readlink(link) == str(first)
    finally:
        holder.communicate("", timeout=30)
    assert holder.returncode == 0
    # nobody holds it now: it moves to the volume that asks
    assert local_volumes.claim_link(second) is True
    assert os.readlink(link) == str(second)
    assert local_volumes.claim_link(first) is False  # this process holds it for vol-b
    # never clobbered: what is not our own link stays as it is
    os.close(local_volumes._claims.pop(str(link))[1])  # this process lets go
    os.unlink(link)
    link.write_text("someone's file")
    assert local_volumes.claim_link(first) is False
    assert link.read_text() == "someone's file"
    link.unlink()
    os.symlink(tmp_path, link)  # a link of ours, but not into the volumes folder
    assert local_volumes.claim_link(first) is False
    assert os.readlink(link) == str(tmp_path)


DOWNLOADS = CpuLiveServerless(
    name="vol-downloads",
    networkVolumeId="vol-models",
    env={"TORCH_HOME": "/endpoint/own/torch"},
)
PLAIN = CpuLiveServerless(name="vol-plain-downloads")


@remote(DOWNLOADS)
async def accelerated(names: list[str]) -> dict[str, str | None]:
    import os

    return {name: os.environ.get(name) for name in names}


@remote(DOWNLOADS, accelerate_downloads=False)
async def standard(names: list[str]) -> dict[str, str | None]:
    import os

    return {name: os.environ.get(name) for name in names}


@remote(PLAIN)
async def accelerated_without_volume(names: list[str]) -> dict[str, str | None]:
    import os

    return {name: os.environ.get(name) for name in names}


async def test_accelerate_downloads_puts_model_caches_in_the_volume_and_off_restores(
    tmp_path: Path, volumes: Path
) -> None:
    models = volumes / "vol-models"
    users = str(tmp_path / "users-hf-home")
    async with runtime(provider=LocalProvider(state_dir=tmp_path / ".flash")):
        on = output(await accelerated(CACHES))
        off = output(await standard(CACHES))  # the same worker (workersMax=1), after
        again = output(await accelerated(CACHES))
        plain = output(await accelerated_without_volume(CACHES))
    assert on == {
        "HF_HOME": str(models / ".hf-cache"),
        "HF_HUB_CACHE": str(models / ".hf-cache" / "hub"),
        "HF_DATASETS_CACHE": str(models / ".hf-cache" / "datasets"),
        "TORCH_HOME": "/endpoint/own/torch",  # the endpoint's own env wins
    }
    assert off == {
        "HF_HOME": users,  # inherited, as it was
        "HF_HUB_CACHE": None,
        "HF_DATASETS_CACHE": None,
        "TORCH_HOME": "/endpoint/own/torch",
    }
    assert again == on
    # no volume: the user's own caches, shared and kept already
    assert plain == dict(off, TORCH_HOME=None)


def test_fast_transfers_are_enabled_only_when_importable_and_not_set_by_the_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("HF_HUB_ENABLE_HF_TRANSFER", "HF_XET_HIGH_PERFORMANCE", "HF_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FLASH_DOWNLOAD_ENV", json.dumps({"HF_HOME": "/vol/.hf-cache"}))
    monkeypatch.setattr(flash_volumes, "_base", {})  # a fresh worker's state
    monkeypatch.setattr(flash_volumes, "_transfers_found", set())
    monkeypatch.setattr(flash_volumes, "_transfers_missing", {})
    apply_downloads(True)
    if "hf_transfer" not in sys.modules and not _importable("hf_transfer"):
        assert "HF_HUB_ENABLE_HF_TRANSFER" not in os.environ
    assert os.environ["HF_HOME"] == "/vol/.hf-cache"
    # a job's dependencies bring hf_transfer (a stand-in package on the path)
    package = tmp_path / "deps" / "hf_transfer"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "deps"))
    monkeypatch.setenv("HF_XET_HIGH_PERFORMANCE", "0")  # the user's choice stands
    apply_downloads(True)
    assert os.environ["HF_HUB_ENABLE_HF_TRANSFER"] == "1"
    assert os.environ["HF_XET_HIGH_PERFORMANCE"] == "0"
    apply_downloads(False)
    assert "HF_HUB_ENABLE_HF_TRANSFER" not in os.environ
    assert "HF_HOME" not in os.environ
    assert os.environ["HF_XET_HIGH_PERFORMANCE"] == "0"


def test_each_job_finds_the_download_settings_even_if_the_last_job_changed_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.setenv("FLASH_DOWNLOAD_ENV", json.dumps({"HF_HOME": "/vol/.hf-cache"}))
    monkeypatch.setattr(flash_volumes, "_base", {})
    apply_downloads(True)
    apply_downloads(True)  # unchanged: nothing to write
    assert os.environ["HF_HOME"] == "/vol/.hf-cache"
    os.environ["HF_HOME"] = "/elsewhere"  # a job's code moved it
    apply_downloads(True)
    assert os.environ["HF_HOME"] == "/vol/.hf-cache"
    apply_downloads(False)
    assert "HF_HOME" not in os.environ
    apply_downloads(False)
    assert "HF_HOME" not in os.environ


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


class _Registered:
    """The daemon's registration, recorded (the control plane's only collaborator)."""

    def __init__(self) -> None:
        self.configs: dict[str, dict[str, Any]] = {}

    async def __call__(self, endpoint_id: str, config: dict[str, Any] | None) -> None:
        if config is not None:
            self.configs[endpoint_id] = config


def _save(name: str, volume: dict[str, Any]) -> dict[str, Any]:
    return {
        "query": "mutation S($input: EndpointInput!) { saveEndpoint(input: $input) { id } }",
        "variables": {
            "input": {
                "name": name,
                "instanceIds": ["cpu3g-2-8"],
                "workersMax": 1,
                "template": {
                    "name": "t",
                    "imageName": "runpod/flash-cpu:py3.12-latest",
                },
                **volume,
            }
        },
    }


async def test_flash_local_takes_the_volume_from_graphql_and_refuses_hostile_ids(
    tmp_path: Path,
) -> None:
    registered = _Registered()
    plane = ControlPlane(tmp_path, registered)

    async def ask(body: dict[str, Any]) -> dict[str, Any]:
        status, answer = await plane.handle(json.dumps(body).encode())
        assert status == 200, answer
        decoded: dict[str, Any] = json.loads(answer)
        return decoded

    saved = await ask(_save("live-vol-one", {"networkVolumeId": "agv6w2qcg7"}))
    endpoint_id = saved["data"]["saveEndpoint"]["id"]
    assert (
        registered.configs[endpoint_id]["resource"]["networkVolumeId"] == "agv6w2qcg7"
    )
    many = await ask(
        _save(
            "live-vol-many",
            {
                "networkVolumeIds": [
                    {"networkVolumeId": "vol-eu", "dataCenterId": "EU-RO-1"}
                ]
            },
        )
    )
    endpoint_id = many["data"]["saveEndpoint"]["id"]
    assert registered.configs[endpoint_id]["resource"]["networkVolumeId"] == "vol-eu"
    refused = await ask(_save("live-vol-bad", {"networkVolumeId": "../../etc"}))
    assert refused["data"] is None
    (error,) = refused["errors"]
    assert error["message"].startswith(
        "endpoint 'live-vol-bad': CpuLiveServerless(name="
    ), error
    assert "network volume id '../../etc' is not a plain id" in error["message"]


DAEMON_WRITER = CpuLiveServerless(
    name="vol-daemon-writer", networkVolumeId="vol-daemon"
)
DAEMON_READER = CpuLiveServerless(
    name="vol-daemon-reader", networkVolumeId="vol-daemon"
)


@remote(DAEMON_WRITER)
async def daemon_write(text: str) -> str:
    from flash_actors import volume_path

    (volume_path() / "from-daemon.txt").write_text(text)
    return str(volume_path())


@remote(DAEMON_READER)
async def daemon_read(link: str) -> dict[str, Any]:
    import os

    from flash_actors import volume_path

    return {
        "note": (volume_path() / "from-daemon.txt").read_text(),
        "link": os.path.realpath(link),
    }


@pytest.fixture(scope="module")
def volume_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A ``flash local`` daemon (as RunPod) keeping its volumes in a temporary folder."""
    project = tmp_path_factory.mktemp("volume-daemon")
    with (
        pytest.MonkeyPatch.context() as patch
    ):  # the daemon (and its workers) inherit it
        patch.setenv("FLASH_VOLUMES_DIR", str(project / "volumes"))
        patch.setenv("FLASH_RUNPOD_VOLUME_LINK", str(project / "runpod-volume"))
        started = Daemon(project / ".flash", runpod_only=True)
    try:
        yield started
    finally:
        started.stop()


@pytest.mark.slow
async def test_flash_local_workers_share_a_volume_named_through_graphql(
    volume_daemon: Daemon,
) -> None:
    record = volume_daemon.record
    assert record is not None
    project = volume_daemon.state_dir.parent
    provider = RunPodProvider(
        api_key=record.api_key,
        api_url=record.url,
        endpoint_url=f"{record.url}/v2",
        transport=HttpsTransport(),
    )
    async with runtime(provider=provider):  # saveEndpoint carries networkVolumeId
        written = output(await daemon_write("through flash local"))
        read = output(await daemon_read(str(project / "runpod-volume")))
    folder = project / "volumes" / "vol-daemon"
    assert written == str(folder)
    assert read == {"note": "through flash local", "link": str(folder)}
