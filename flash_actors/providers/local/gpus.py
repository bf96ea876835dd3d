"""GPUs on this machine for the local provider: which there are, who may use them, who holds them.

The inventory is, in this order:

1. ``FLASH_LOCAL_GPUS``, a declared inventory (for tests, or to hand the provider a subset):
   comma-separated ``index:model:memory_gb`` entries, e.g.
   ``0:NVIDIA H200:141,1:NVIDIA A100-SXM4-80GB:80``; ``none`` (or an empty value) declares a
   machine without GPUs. Indices are distinct non-negative integers (what the workers get in
   ``CUDA_VISIBLE_DEVICES``), memory is in GB; a model may not contain ``,`` or ``:``.
2. NVML (only when ``pynvml`` from ``nvidia-ml-py`` happens to be importable: no dependency).
3. ``nvidia-smi --query-gpu=index,uuid,name,memory.total --format=csv,noheader,nounits``,
   parsed line by line; a line that does not parse is skipped. No ``nvidia-smi`` (or one that
   fails) means no GPUs, logged once.

A detected inventory keeps only the devices the provider's own ``CUDA_VISIBLE_DEVICES``
lists, when that is set. Detected devices are handed out by UUID (CUDA's enumeration order
need not be ``nvidia-smi``'s), declared ones by index.

A GPU serves a `GpuGroup` when its model is one of the group's models (every word of the
group's model name is in the GPU's name: ``NVIDIA A100-SXM4-80GB`` is an ``NVIDIA A100 80GB``)
or its memory is in the group's class (90% to 105% of the group's GB: an H100 80GB serves
``AMPERE_80``); every GPU serves `GpuGroup.ANY`. Each worker of a GPU endpoint holds
``gpuCount`` matching devices of its own, preferring the endpoint's first groups, until its
process has exited; no two workers (of any endpoints of one provider) share a device. An
endpoint runs at most as many workers as the matching devices allow (``workersMax`` is capped,
logged once); a worker that would need a device another endpoint holds waits until one is
released (by a worker that exits: died, idle-stopped or recycled).

``FLASH_LOCAL_GPU=cpu`` runs GPU endpoints on the CPU instead (no device, no cap). CPU
endpoints, and GPU endpoints in that mode, get ``CUDA_VISIBLE_DEVICES=""``: they never see
a GPU.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread
import msgspec

from flash_actors._logging import get_logger
from flash_actors.errors import ConfigurationError
from flash_actors.resources import GpuGroup

if TYPE_CHECKING:
    from collections.abc import Callable

    from flash_actors.resources import ServerlessResource

__all__ = [
    "DECLARED_VAR",
    "MODE_VAR",
    "EndpointGpus",
    "Gpu",
    "GpuAllocator",
    "GpuLease",
    "declared_gpus",
    "detect_gpus",
    "gpu_mode",
    "parse_nvidia_smi",
    "serves",
]

log = get_logger(__name__)

DECLARED_VAR = "FLASH_LOCAL_GPUS"
"""The declared inventory (see the module docstring)."""
MODE_VAR = "FLASH_LOCAL_GPU"
"""``cpu`` runs GPU endpoints on the CPU; ``auto`` (the default) gives them devices."""
NVIDIA_SMI_QUERY = [
    "--query-gpu=index,uuid,name,memory.total",
    "--format=csv,noheader,nounits",
]
_SMI_TIMEOUT_S = 10.0
_MAX_GPUS = 1024  # more lines than this is not an inventory
_MAX_NAME = 200
_MEMORY_CLASS = (0.9, 1.05)
"""A GPU is in a group's memory class when its memory is within these fractions of it."""
_UUID = re.compile(r"^(GPU|MIG)-[0-9A-Za-z-]{1,120}$")


class Gpu(msgspec.Struct, frozen=True, kw_only=True):
    """One GPU of the inventory.

    Attributes:
        index: its index (``nvidia-smi``'s, or the declared one).
        name: its model, as ``nvidia-smi`` names it (``NVIDIA H200``).
        memory_gb: its memory in GB (GiB when detected).
        uuid: ``GPU-...`` when detected, else ``None``.
    """

    index: int
    name: str
    memory_gb: float
    uuid: str | None = None

    @property
    def device(self) -> str:
        """How ``CUDA_VISIBLE_DEVICES`` names it: the UUID when known, else the index."""
        return self.uuid or str(self.index)

    def describe(self) -> str:
        """``0: NVIDIA H200, 141 GB``."""
        return f"{self.index}: {self.name}, {self.memory_gb:.0f} GB"


def _words(name: str) -> set[str]:
    return set(re.findall(r"[0-9a-z]+", name.lower()))


def serves(gpu: Gpu, group: GpuGroup) -> bool:
    """Whether ``gpu`` serves ``group``: by model, or by memory class (see the module doc)."""
    if group is GpuGroup.ANY:
        return True
    words = _words(gpu.name)
    if any(_words(model) <= words for model in group.models):
        return True
    memory = group.memory_gb
    low, high = _MEMORY_CLASS
    return memory is not None and low * memory <= gpu.memory_gb <= high * memory


def parse_nvidia_smi(text: str) -> list[Gpu]:
    """The GPUs in ``nvidia-smi``'s CSV answer (``NVIDIA_SMI_QUERY``), memory in MiB.

    Untrusted text: a line that is not ``index, uuid, name, memory`` with a non-negative
    index, a ``GPU-``/``MIG-`` UUID, a printable name and a positive memory is skipped, as is
    a second line for an index or UUID already seen.
    """
    gpus: list[Gpu] = []
    seen: set[object] = set()
    for line in text.splitlines()[:_MAX_GPUS]:
        parts = [part.strip() for part in line.split(",")]
        if len(parts) != 4:
            continue
        index_text, uuid, name, memory_text = parts
        if not index_text.isdigit() or len(index_text) > 6:
            continue
        if not _UUID.match(uuid):
            continue
        if not name or len(name) > _MAX_NAME or not name.isprintable():
            continue
        try:
            memory_mib = float(memory_text)
        except ValueError:
            continue
        if not 0 < memory_mib < 1 << 30:  # also rejects nan and inf
            continue
        index = int(index_text)
        if index in seen or uuid in seen:
            continue
        seen.update((index, uuid))
        gpus.append(Gpu(index=index, name=name, memory_gb=memory_mib / 1024, uuid=uuid))
    return gpus


def declared_gpus(text: str) -> list[Gpu]:
    """The inventory ``FLASH_LOCAL_GPUS`` declares (see the module docstring).

    Raises:
        ConfigurationError: naming the entry that does not parse and the expected form.
    """
    form = (
        f"{DECLARED_VAR} is a comma-separated list of index:model:memory_gb entries, "
        "e.g. '0:NVIDIA H200:141,1:NVIDIA A100-SXM4-80GB:80', or 'none'"
    )
    text = text.strip()
    if text.lower() in ("", "none"):
        return []
    gpus: list[Gpu] = []
    for entry in text.split(","):
        parts = [part.strip() for part in entry.split(":")]
        problem = None
        memory = 0.0
        if len(parts) != 3:
            problem = "it does not have three ':'-separated parts"
        elif not parts[0].isdigit():
            problem = "the index is not a non-negative integer"
        elif not parts[1] or not parts[1].isprintable():
            problem = "the model is empty"
        elif any(g.index == int(parts[0]) for g in gpus):
            problem = "the index appears twice"
        else:
            try:
                memory = float(parts[2])
            except ValueError:
                memory = 0.0
            if not 0 < memory < 1 << 20:
                problem = "the memory is not a positive number of GB"
        if problem is not None:
            msg = f"{DECLARED_VAR}: entry {entry.strip()!r}: {problem}; {form}"
            raise ConfigurationError(msg)
        gpus.append(Gpu(index=int(parts[0]), name=parts[1], memory_gb=memory))
    return gpus


def gpu_mode() -> str:
    """``"auto"`` or ``"cpu"``, from ``FLASH_LOCAL_GPU``.

    Raises:
        ConfigurationError: another value.
    """
    mode = os.environ.get(MODE_VAR, "auto").strip().lower() or "auto"
    if mode not in ("auto", "cpu"):
        msg = (
            f"{MODE_VAR}={os.environ[MODE_VAR]!r}: expected 'cpu' (run GPU endpoints on "
            "the CPU) or 'auto' (give them this machine's GPUs, the default)"
        )
        raise ConfigurationError(msg)
    return mode


def _nvml() -> list[Gpu] | None:
    """The GPUs NVML reports; ``None`` when ``pynvml`` is missing or NVML fails."""
    try:
        import pynvml  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 (no driver: fall back to nvidia-smi)
        log.debug("gpu.nvml_unavailable", error=repr(exc))
        return None
    try:
        lines = []
        for index in range(int(pynvml.nvmlDeviceGetCount())):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle).total
            uuid = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
            name = name.decode() if isinstance(name, bytes) else str(name)
            lines.append(
                f"{index}, {uuid}, {name.replace(',', ' ')}, {int(memory) / 2**20}"
            )
    except Exception as exc:  # noqa: BLE001 (a broken NVML: fall back to nvidia-smi)
        log.warning("gpu.nvml_failed", error=repr(exc))
        return None
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
    return parse_nvidia_smi("\n".join(lines))


def _nvidia_smi() -> list[Gpu]:
    """The GPUs ``nvidia-smi`` reports; none (logged) when it is missing or fails."""
    path = shutil.which("nvidia-smi")
    if path is None:
        log.info("gpu.none", reason="nvidia-smi not found")
        return []
    try:
        result = subprocess.run(  # noqa: S603 (a fixed command)
            [path, *NVIDIA_SMI_QUERY],
            capture_output=True,
            timeout=_SMI_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("gpu.none", reason=f"nvidia-smi failed: {exc!r}")
        return []
    if result.returncode != 0:
        error = result.stderr.decode(errors="replace").strip()[-300:]
        log.warning(
            "gpu.none",
            reason=f"nvidia-smi exited with {result.returncode}",
            error=error,
        )
        return []
    return parse_nvidia_smi(result.stdout.decode(errors="replace"))


def _visible(gpus: list[Gpu], visible: str | None) -> list[Gpu]:
    """The GPUs the provider's own ``CUDA_VISIBLE_DEVICES`` lets it use (all when unset)."""
    if visible is None:
        return gpus
    names = {part.strip() for part in visible.split(",") if part.strip()}
    return [g for g in gpus if str(g.index) in names or g.uuid in names]


def detect_gpus() -> list[Gpu]:
    """This machine's GPUs: declared (``FLASH_LOCAL_GPUS``), else NVML, else ``nvidia-smi``.

    Blocking (it may run ``nvidia-smi``); the allocator runs it in a thread, once.

    Raises:
        ConfigurationError: the declared inventory does not parse.
    """
    declared = os.environ.get(DECLARED_VAR)
    if declared is not None:
        return declared_gpus(declared)
    gpus = _nvml()
    if gpus is None:
        gpus = _nvidia_smi()
    gpus = _visible(gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
    log.info("gpu.detected", gpus=[g.describe() for g in gpus])
    return gpus


class GpuLease:
    """The devices one worker holds; `release` (idempotent) gives them back."""

    def __init__(self, allocator: GpuAllocator | None, devices: list[Gpu]) -> None:
        self._allocator = allocator
        self.devices = devices

    @property
    def env(self) -> dict[str, str]:
        """The worker's ``CUDA_VISIBLE_DEVICES`` (empty: it sees no GPU)."""
        return {"CUDA_VISIBLE_DEVICES": ",".join(g.device for g in self.devices)}

    def release(self) -> None:
        """Give the devices back (once the worker's process has exited)."""
        allocator, self._allocator = self._allocator, None
        if allocator is not None:
            allocator.release(self.devices)


class EndpointGpus:
    """One endpoint's view of the provider's GPUs (made by `GpuAllocator.for_endpoint`).

    Attributes:
        workers_max: the endpoint's ``workersMax``, capped by its matching devices.
        error: why the endpoint cannot run here (every call fails with it), else ``None``.
    """

    def __init__(
        self,
        allocator: GpuAllocator,
        resource: ServerlessResource,
        *,
        candidates: list[Gpu] | None,
        error: str | None = None,
    ) -> None:
        self._allocator = allocator
        self.resource = resource
        self._candidates = candidates  # None: no device (CPU endpoint, or the CPU mode)
        self.error = error
        self.workers_max = resource.workersMax
        if candidates is not None:
            self.workers_max = min(
                resource.workersMax, len(candidates) // resource.gpuCount
            )

    def take(self) -> GpuLease | None:
        """Devices for one more worker now; ``None`` while every matching one is held."""
        if self._candidates is None:
            return GpuLease(None, [])
        devices = self._allocator.take(self._candidates, self.resource.gpuCount)
        if devices is None:
            return None
        log.info(
            "gpu.assign",
            endpoint=self.resource.name,
            devices=[g.device for g in devices],
        )
        return GpuLease(self._allocator, devices)

    def on_release(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` whenever a device is given back (a waiting worker may start)."""
        self._allocator.waiters[self.resource.name] = wake

    def check(self) -> None:
        """Raise the endpoint's placement error, if it has one.

        Raises:
            ConfigurationError: no local GPU can serve the endpoint (see `error`).
        """
        if self.error is not None:
            raise ConfigurationError(self.error)


class GpuAllocator:
    """The provider's GPUs, and which are held (one per provider, for all its endpoints).

    The inventory is read on the first GPU endpoint, once (see `detect_gpus`).
    """

    def __init__(self) -> None:
        self._inventory: list[Gpu] | None = None
        self._inventory_error: str | None = None
        self._lock = anyio.Lock()
        self.held: set[int] = set()
        self.waiters: dict[str, Callable[[], None]] = {}

    async def inventory(self) -> list[Gpu]:
        """The GPUs (detected or declared once).

        Raises:
            ConfigurationError: the declared inventory does not parse.
        """
        async with self._lock:
            if self._inventory is None and self._inventory_error is None:
                try:
                    self._inventory = await anyio.to_thread.run_sync(detect_gpus)
                except ConfigurationError as exc:
                    self._inventory_error = str(exc)
        if self._inventory_error is not None:
            raise ConfigurationError(self._inventory_error)
        assert self._inventory is not None  # noqa: S101
        return self._inventory

    async def for_endpoint(self, resource: ServerlessResource) -> EndpointGpus:
        """What ``resource``'s workers get: devices, a cap, or the reason it cannot run here."""
        if resource.is_cpu:
            return EndpointGpus(self, resource, candidates=None)
        try:
            if gpu_mode() == "cpu":
                return EndpointGpus(self, resource, candidates=None)
            gpus = await self.inventory()
        except ConfigurationError as exc:
            return EndpointGpus(self, resource, candidates=[], error=str(exc))
        groups = resource.gpus or [GpuGroup.ANY]
        rank = {
            g.index: min(i for i, group in enumerate(groups) if serves(g, group))
            for g in gpus
            if any(serves(g, group) for group in groups)
        }
        candidates = sorted(
            (g for g in gpus if g.index in rank), key=lambda g: (rank[g.index], g.index)
        )
        count = resource.gpuCount
        if len(candidates) < count:
            return EndpointGpus(
                self,
                resource,
                candidates=[],
                error=_no_match(resource, groups, gpus, len(candidates)),
            )
        endpoints = EndpointGpus(self, resource, candidates=candidates)
        if endpoints.workers_max < resource.workersMax:
            log.warning(
                "gpu.workers_capped",
                endpoint=resource.name,
                workers_max=resource.workersMax,
                capped_to=endpoints.workers_max,
                matching_gpus=len(candidates),
                gpu_count=count,
            )
        return endpoints

    def take(self, candidates: list[Gpu], count: int) -> list[Gpu] | None:
        """``count`` free devices among ``candidates`` (in order), now held; else ``None``."""
        free = [g for g in candidates if g.index not in self.held]
        if len(free) < count:
            return None
        devices = free[:count]
        self.held.update(g.index for g in devices)
        return devices

    def release(self, devices: list[Gpu]) -> None:
        """Give ``devices`` back and wake the endpoints that may be waiting for them."""
        self.held.difference_update(g.index for g in devices)
        for wake in list(self.waiters.values()):
            wake()


def _no_match(
    resource: ServerlessResource,
    groups: list[GpuGroup],
    gpus: list[Gpu],
    matching: int,
) -> str:
    asked = ", ".join(f"GpuGroup.{g.name}" for g in groups)
    have = "; ".join(g.describe() for g in gpus) if gpus else "no NVIDIA GPU"
    if matching:
        have += f" ({matching} of them match)"
    ways = []
    if len(gpus) >= resource.gpuCount and GpuGroup.ANY not in groups:
        ways.append("allow any local GPU (gpus=[GpuGroup.ANY])")
    ways.append("run it on RunPod (FLASH_PROVIDER=runpod)")
    ways.append(f"run GPU endpoints on the CPU here ({MODE_VAR}=cpu)")
    return (
        f"endpoint {resource.name!r} asks for {resource.gpuCount} GPU(s) per worker "
        f"of [{asked}], and this machine has {have}. To run it: {', or '.join(ways)}"
    )
