"""GPUs on this machine: the inventory, matching, and the devices real workers receive.

No GPU is needed: ``FLASH_LOCAL_GPUS`` declares the inventory the local provider uses, and
the workers (real processes) report the ``CUDA_VISIBLE_DEVICES`` they were given.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from flash_actors import (
    CpuLiveServerless,
    GpuGroup,
    JobStatus,
    LiveLoadBalancer,
    LiveServerless,
    remote,
    runtime,
)
from flash_actors.errors import ConfigurationError
from flash_actors.providers.local import LocalProvider
from flash_actors.providers.local.gpus import (
    Gpu,
    declared_gpus,
    parse_nvidia_smi,
    serves,
)

H200 = "0:NVIDIA H200:141,1:NVIDIA H200:141,2:NVIDIA A100-SXM4-80GB:80"


@pytest.fixture
def gpus(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Give GPU endpoints devices (the suite runs them on the CPU by default)."""
    monkeypatch.delenv("FLASH_LOCAL_GPU", raising=False)
    # the workers get their own value; this one must not leak through
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    return monkeypatch


def pids_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        alive.append(pid)
    return alive


# --- the inventory ---------------------------------------------------------------------------


def test_nvidia_smi_output_is_parsed_and_garbage_skipped() -> None:
    text = (
        "0, GPU-5a1b2c3d-0000-1111-2222-333344445555, NVIDIA H200, 143771\n"
        "1, GPU-6a1b2c3d-0000-1111-2222-333344445555, NVIDIA A100-SXM4-80GB, 81920\n"
        "\n"
        "garbage line\n"
        "2, GPU-7a, NVIDIA H200\n"  # three fields
        "x, GPU-8a, NVIDIA H200, 143771\n"  # index not a number
        "-3, GPU-9a, NVIDIA H200, 143771\n"  # negative index
        "4, not-a-uuid, NVIDIA H200, 143771\n"
        "5, GPU-aa, NVIDIA H200, [N/A]\n"  # no memory
        "6, GPU-bb, NVIDIA H200, nan\n"
        "7, GPU-cc, NVIDIA H200, -1\n"
        "8, GPU-dd, , 1000\n"  # no name
        "9, GPU-ee, NVIDIA\x1b[31m H200, 1000\n"  # control characters
        "0, GPU-ff, NVIDIA H200, 143771\n"  # index seen already
        "10, GPU-5a1b2c3d-0000-1111-2222-333344445555, NVIDIA H200, 143771\n"  # uuid seen
        "11, GPU-a, b, c, d, e\n"
        "12, MIG-0a1b, NVIDIA H200 NVL, 143771\n"
    )
    gpus = parse_nvidia_smi(text)
    assert [(g.index, g.name, round(g.memory_gb)) for g in gpus] == [
        (0, "NVIDIA H200", 140),
        (1, "NVIDIA A100-SXM4-80GB", 80),
        (12, "NVIDIA H200 NVL", 140),
    ]
    assert gpus[0].device == "GPU-5a1b2c3d-0000-1111-2222-333344445555"
    assert parse_nvidia_smi("") == []
    assert parse_nvidia_smi("\x00\xff" * 1000) == []


def test_a_declared_inventory_parses_and_bad_ones_say_why() -> None:
    gpus = declared_gpus(H200)
    assert [(g.index, g.name, g.memory_gb, g.uuid) for g in gpus] == [
        (0, "NVIDIA H200", 141, None),
        (1, "NVIDIA H200", 141, None),
        (2, "NVIDIA A100-SXM4-80GB", 80, None),
    ]
    assert gpus[2].device == "2"
    assert declared_gpus("none") == declared_gpus(" ") == []
    for bad, why in [
        ("0:NVIDIA H200", "it does not have three ':'-separated parts"),
        ("a:NVIDIA H200:141", "the index is not a non-negative integer"),
        ("0::141", "the model is empty"),
        ("0:NVIDIA H200:lots", "the memory is not a positive number of GB"),
        ("0:NVIDIA H200:0", "the memory is not a positive number of GB"),
        ("0:NVIDIA H200:141,0:NVIDIA H200:141", "the index appears twice"),
    ]:
        with pytest.raises(ConfigurationError) as caught:
            declared_gpus(bad)
        assert re.match(
            rf"^FLASH_LOCAL_GPUS: entry '[^']*': {re.escape(why)}; FLASH_LOCAL_GPUS is a "
            r"comma-separated list of index:model:memory_gb entries",
            str(caught.value),
        ), str(caught.value)


def test_gpus_serve_groups_by_model_or_memory_class() -> None:
    def gpu(name: str, memory_gb: float) -> Gpu:
        return Gpu(index=0, name=name, memory_gb=memory_gb)

    h200 = gpu("NVIDIA H200", 140.4)
    assert [g for g in GpuGroup if serves(h200, g)] == [
        GpuGroup.ANY,
        GpuGroup.HOPPER_141,
    ]
    a100 = gpu("NVIDIA A100-SXM4-80GB", 80)  # by model (words) and memory
    assert serves(a100, GpuGroup.AMPERE_80)
    assert not serves(a100, GpuGroup.HOPPER_141)
    h100 = gpu("NVIDIA H100 80GB HBM3", 79.6)  # the 80 GB class, either pool
    assert serves(h100, GpuGroup.ADA_80_PRO)
    assert serves(h100, GpuGroup.AMPERE_80)
    a40 = gpu("NVIDIA A40", 44.99)  # ECC takes a little: still the 48 GB class
    assert serves(a40, GpuGroup.AMPERE_48)
    assert not serves(a40, GpuGroup.AMPERE_80)
    small = gpu("NVIDIA A100-PCIE-40GB", 40)
    assert [g for g in GpuGroup if serves(small, g)] == [GpuGroup.ANY]
    assert serves(gpu("NVIDIA GeForce RTX 4090", 23.99), GpuGroup.ADA_24)


# --- what real workers receive -----------------------------------------------------------------

HOPPER = LiveServerless(name="gpu-hopper", gpus=[GpuGroup.HOPPER_141], workersMax=4)
PAIR = LiveServerless(name="gpu-pair", gpus=[GpuGroup.ANY], gpuCount=2, workersMax=3)
PLAIN = CpuLiveServerless(name="gpu-cpu-side")


@remote(HOPPER)
def hopper_devices(folder: str) -> str:
    import os
    import pathlib
    import time

    mark = pathlib.Path(folder)
    (mark / str(os.getpid())).touch()
    deadline = time.monotonic() + 30
    while len(list(mark.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    return os.environ["CUDA_VISIBLE_DEVICES"]


@remote(PAIR)
def pair_devices() -> str:
    import os

    return os.environ["CUDA_VISIBLE_DEVICES"]


@remote(PLAIN)
def cpu_devices() -> str | None:
    import os

    return os.environ.get("CUDA_VISIBLE_DEVICES")


async def test_each_worker_gets_its_own_matching_devices_and_cpu_workers_none(
    tmp_path: Path, gpus: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    gpus.setenv("FLASH_LOCAL_GPUS", H200)
    caplog.set_level(logging.INFO, logger="flash_actors")
    folder = tmp_path / "marks"
    folder.mkdir()
    provider = LocalProvider(state_dir=tmp_path / ".flash")
    async with runtime(provider=provider):
        seen: list[str] = []

        async def one() -> None:
            seen.append((await hopper_devices(str(folder))).output)

        with anyio.fail_after(40):
            async with anyio.create_task_group() as tg:
                tg.start_soon(one)
                tg.start_soon(one)
        # two workers at once, one H200 each (the A100 serves no HOPPER_141)
        assert sorted(seen) == ["0", "1"]
        pool = provider.pools["gpu-hopper"]
        assert pool.resource.workersMax == 2  # capped from 4 by the two H200s
        assert pool.started_total == 2
        pids = [w.pid for w in pool.workers.values()]
        # gpuCount=2 with ANY: only the A100 is free now, so its worker waits for a
        # release; the H200 workers exit (killed) and give theirs back
        async with anyio.create_task_group() as tg:
            results: list[str] = []

            async def pair() -> None:
                results.append((await pair_devices()).output)

            tg.start_soon(pair)
            pair_pool = None
            with anyio.fail_after(20):
                while pair_pool is None or pair_pool.statistics()["queued"] < 1:
                    await anyio.sleep(0.01)
                    pair_pool = provider.pools.get("gpu-pair")
            assert pair_pool.resource.workersMax == 1  # three devices, two per worker
            assert pair_pool.starting == 0
            assert not pair_pool.workers  # its devices are held by the other endpoint
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
        assert len(results) == 1
        devices = results[0].split(",")  # two of its own, whichever were freed first
        assert len(set(devices)) == 2
        assert set(devices) <= {"0", "1", "2"}
        assert (await cpu_devices()).output == ""  # CPU endpoints never see a GPU
    assert pids_alive(pids) == []
    capped = [r.getMessage() for r in caplog.records if "gpu.workers_capped" in r.msg]
    assert len(capped) == 2
    assert "endpoint=gpu-hopper workers_max=4 capped_to=2" in capped[0]


NO_MATCH = LiveServerless(name="gpu-no-match", gpus=[GpuGroup.HOPPER_141])
LB = LiveLoadBalancer(name="gpu-lb", gpus=[GpuGroup.HOPPER_141])
ANY_GPU = LiveServerless(name="gpu-any")


@remote(NO_MATCH)
async def needs_h200() -> int:
    return 1


@remote(LB, method="POST", path="/h200")
async def lb_needs_h200() -> int:
    return 1


@remote(ANY_GPU)
async def any_devices() -> str | None:
    import os

    return os.environ.get("CUDA_VISIBLE_DEVICES")


async def test_an_endpoint_no_local_gpu_serves_fails_its_calls_saying_why(
    tmp_path: Path, gpus: pytest.MonkeyPatch
) -> None:
    gpus.setenv("FLASH_LOCAL_GPUS", "0:NVIDIA A100-SXM4-80GB:80")
    expected = (
        r"^endpoint 'gpu-no-match' asks for 1 GPU\(s\) per worker of "
        r"\[GpuGroup.HOPPER_141\], and this machine has 0: NVIDIA A100-SXM4-80GB, 80 GB\. "
        r"To run it: allow any local GPU \(gpus=\[GpuGroup.ANY\]\), or run it on RunPod "
        r"\(FLASH_PROVIDER=runpod\), or run GPU endpoints on the CPU here "
        r"\(FLASH_LOCAL_GPU=cpu\)$"
    )
    provider = LocalProvider(state_dir=tmp_path / ".flash")
    async with runtime(provider=provider):
        with anyio.fail_after(20):
            for _ in range(2):  # every call, at once, not retried: a failed job
                job = await needs_h200()
                assert job.status == JobStatus.FAILED
                assert re.match(expected, job.error or ""), job.error
                with pytest.raises(ConfigurationError, match=expected):
                    job.raise_for_error()
            with pytest.raises(
                ConfigurationError, match=r"^endpoint 'gpu-lb' asks for 1 GPU"
            ):
                await lb_needs_h200()
        assert not provider.pools["gpu-no-match"].workers
        assert provider.pools["gpu-no-match"].started_total == 0
        assert (await any_devices()).output == "0"  # ANY takes the A100


async def test_a_machine_without_gpus_says_so_and_the_cpu_setting_runs_them(
    tmp_path: Path, gpus: pytest.MonkeyPatch
) -> None:
    gpus.setenv("FLASH_LOCAL_GPUS", "none")
    provider = LocalProvider(state_dir=tmp_path / ".flash")
    async with runtime(provider=provider):
        with pytest.raises(
            ConfigurationError,
            match=(
                r"^endpoint 'gpu-any' asks for 1 GPU\(s\) per worker of \[GpuGroup.ANY\], "
                r"and this machine has no NVIDIA GPU\. To run it: run it on RunPod "
                r"\(FLASH_PROVIDER=runpod\), or run GPU endpoints on the CPU here "
                r"\(FLASH_LOCAL_GPU=cpu\)$"
            ),
        ):
            (await any_devices()).raise_for_error()
    gpus.setenv("FLASH_LOCAL_GPU", "cpu")
    provider = LocalProvider(state_dir=tmp_path / ".flash")
    async with runtime(provider=provider):
        assert (await needs_h200()).output == 1
        assert (await any_devices()).output == ""  # on the CPU: no GPU visible
    gpus.setenv("FLASH_LOCAL_GPU", "gpu-please")
    provider = LocalProvider(state_dir=tmp_path / ".flash")
    async with runtime(provider=provider):
        with pytest.raises(
            ConfigurationError,
            match=r"^FLASH_LOCAL_GPU='gpu-please': expected 'cpu' \(run GPU endpoints on",
        ):
            (await any_devices()).raise_for_error()
        assert (await cpu_devices()).output == ""  # CPU endpoints are not affected
    gpus.delenv("FLASH_LOCAL_GPU")
    gpus.setenv("FLASH_LOCAL_GPUS", "0:H200")
    provider = LocalProvider(state_dir=tmp_path / ".flash")
    async with runtime(provider=provider):
        with pytest.raises(
            ConfigurationError, match=r"^FLASH_LOCAL_GPUS: entry '0:H200'"
        ):
            (await any_devices()).raise_for_error()


DAEMON_SCRIPT = """
import json, sys
import anyio
from flash_actors import CpuLiveServerless, GpuGroup, LiveServerless, remote

@remote(LiveServerless(name="d-hopper", gpus=[GpuGroup.HOPPER_141]))
def hopper():
    import os
    return os.environ.get("CUDA_VISIBLE_DEVICES")

@remote(CpuLiveServerless(name="d-cpu"))
def cpu():
    import os
    return os.environ.get("CUDA_VISIBLE_DEVICES")

@remote(LiveServerless(name="d-ampere", gpus=[GpuGroup.AMPERE_80], gpuCount=2))
def ampere():
    return 1

async def main():
    failed = await ampere()
    print(json.dumps({
        "hopper": (await hopper()).output,
        "cpu": (await cpu()).output,
        "ampere": [str(failed.status), failed.error],
    }))

anyio.run(main, backend=sys.argv[1])
"""


def test_the_flash_local_daemon_assigns_gpus_the_same_way(
    tmp_path: Path, gpus: pytest.MonkeyPatch
) -> None:
    """The daemon runs the same local provider: it reads the inventory where it starts."""
    from tests._daemon import Daemon

    gpus.setenv("FLASH_LOCAL_GPUS", "3:NVIDIA H200:141,5:NVIDIA A100 80GB PCIe:80")
    script = tmp_path / "gpu_script.py"
    script.write_text(DAEMON_SCRIPT)
    d = Daemon(tmp_path / ".flash")
    try:
        done = subprocess.run(
            [sys.executable, str(script), "asyncio"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        out = json.loads(done.stdout)
        assert out["hopper"] == "3"
        assert out["cpu"] == ""
        assert out["ampere"][0] == "FAILED"
        assert re.match(
            r"^endpoint 'd-ampere' asks for 2 GPU\(s\) per worker of "
            r"\[GpuGroup.AMPERE_80\], and this machine has 3: NVIDIA H200, 141 GB; "
            r"5: NVIDIA A100 80GB PCIe, 80 GB \(1 of them match\)\. To run it: allow any "
            r"local GPU \(gpus=\[GpuGroup.ANY\]\), or run it on RunPod",
            out["ampere"][1],
        ), out["ampere"][1]
    finally:
        d.stop()
