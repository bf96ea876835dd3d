"""Workers import what RunPod's image would have, and results that cannot come home say so.

Real worker processes of the local provider. ``iniconfig`` stands for a package the caller's
environment has (pytest needs it) that is neither a runtime dependency nor declared.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import secrets
import sys
from pathlib import Path

import pytest

from flash_actors import (
    CpuLiveLoadBalancer,
    CpuLiveServerless,
    GpuGroup,
    JobStatus,
    LiveLoadBalancer,
    LiveServerless,
    RemoteExecutionError,
    ResultTypeUnavailableError,
    ServerlessEndpoint,
    remote,
    runtime,
)
from flash_actors.providers.local import LocalProvider
from flash_actors.serialization import decode_result, encode_result, endpoint_key
from flash_actors.worker import isolation

STRICT = CpuLiveServerless(name="iso-strict")
LOOSE = CpuLiveServerless(name="iso-loose", env={"FLASH_STRICT_IMPORTS": "0"})
DECLARED = CpuLiveServerless(name="iso-declared")
LB = CpuLiveLoadBalancer(name="iso-lb")


@remote(STRICT)
async def import_undeclared() -> str:
    import iniconfig

    return iniconfig.__file__


@remote(STRICT)
async def probe(folder: str) -> dict[str, object]:
    import importlib.util
    import json
    import sys
    from pathlib import Path

    import httpx  # a runtime dependency

    out: dict[str, object] = {
        "json": json.dumps([1]),
        "httpx": httpx.__name__,
        "find_spec": importlib.util.find_spec("iniconfig"),
    }
    try:
        import cwd_helper  # type: ignore[import-not-found]  # noqa: F401 (in the caller's directory, never shipped)
    except ModuleNotFoundError as exc:
        out["cwd_helper"] = str(exc)
    # a directory the function adds itself (a volume, a checkout) is its own to use
    Path(folder, "made_here.py").write_text("VALUE = 42\n")
    sys.path.insert(0, folder)
    import made_here  # type: ignore[import-not-found]

    out["made_here"] = made_here.VALUE
    return out


@remote(LOOSE)
async def import_loose() -> str:
    import iniconfig

    return iniconfig.__file__


@remote(DECLARED, dependencies=["iniconfig"])
async def import_declared() -> str:
    import iniconfig

    return iniconfig.__file__


@remote(STRICT)
async def make_thing(folder: str, module: str) -> object:
    import importlib
    import sys
    from pathlib import Path

    Path(folder, f"{module}.py").write_text(
        "class Thing:\n    def __init__(self):\n        self.x = 1\n"
    )
    sys.path.insert(0, folder)
    return importlib.import_module(module).Thing()


@remote(LB, method="POST", path="/thing")
async def lb_thing(folder: str, module: str) -> object:
    import importlib
    import sys
    from pathlib import Path

    Path(folder, f"{module}.py").write_text("class Thing:\n    pass\n")
    sys.path.insert(0, folder)
    return importlib.import_module(module).Thing()


@remote(LiveServerless(name="iso-gpu-torch", gpus=[GpuGroup.ANY]))
async def torch_on_gpu() -> str:
    import importlib

    return str(importlib.import_module("torch").__file__)


@remote(CpuLiveServerless(name="iso-cpu-torch"))
async def torch_on_cpu() -> str:
    import importlib

    return str(importlib.import_module("torch").__file__)


def _module_name() -> str:
    return f"only_on_worker_{secrets.token_hex(4)}"


async def test_undeclared_package_fails_as_on_runpod_with_the_hint(
    tmp_path: Path,
) -> None:
    assert importlib.util.find_spec("iniconfig") is not None  # the caller has it
    (tmp_path / "cwd_helper.py").write_text("X = 1\n")  # the workers' cwd
    folder = tmp_path / "added"
    folder.mkdir()
    provider = LocalProvider(state_dir=tmp_path / ".flash")
    async with runtime(provider=provider):
        failed = await import_undeclared()
        probed = await probe(str(folder))
    assert failed.status == JobStatus.FAILED
    assert isinstance(failed.exception, RemoteExecutionError)
    assert isinstance(failed.exception, ModuleNotFoundError)
    assert failed.exception.remote_type == "builtins.ModuleNotFoundError"
    assert str(failed.exception).startswith(
        "No module named 'iniconfig': this endpoint does not declare it and Flash's CPU "
        "worker image does not have it, so it would fail on RunPod (the caller's "
        "environment has it from the distribution 'iniconfig'). Declare it: "
        "@remote(..., dependencies=['iniconfig']); FLASH_STRICT_IMPORTS=0 lets local "
        "workers import the caller's packages.\n"
    )
    assert probed.status == JobStatus.COMPLETED, probed.error
    out = probed.output
    assert out["json"] == "[1]"
    assert out["httpx"] == "httpx"
    assert out["find_spec"] is None  # a probe says "not installed", as on RunPod
    helper = (tmp_path / "cwd_helper.py").resolve()
    assert str(out["cwd_helper"]) == (
        f"No module named 'cwd_helper': it is the caller's own code ({helper}), which a "
        "live endpoint is not sent, so it would fail on RunPod. Define what the function "
        "needs inside it, or pass plain values as arguments; FLASH_STRICT_IMPORTS=0 lets "
        "local workers import the caller's packages."
    )
    assert out["made_here"] == 42


async def test_a_fresh_interpreter_worker_is_strict_too(tmp_path: Path) -> None:
    """``python -m flash_actors.worker`` (no fork template) installs the same guards."""
    provider = LocalProvider(state_dir=tmp_path / ".flash", fast_start=False)
    async with runtime(provider=provider):
        failed = await import_undeclared()
    assert failed.status == JobStatus.FAILED
    assert str(failed.exception).startswith(
        "No module named 'iniconfig': this endpoint "
    )


async def test_declared_dependency_and_the_switch_make_it_importable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLASH_CACHE_DIR", str(tmp_path / "envs"))
    provider = LocalProvider(state_dir=tmp_path / ".flash")
    async with runtime(provider=provider):
        declared = await import_declared()
        loose = await import_loose()
    assert declared.status == JobStatus.COMPLETED, declared.error
    assert Path(declared.output).is_relative_to(tmp_path / "envs")  # its own env
    assert loose.status == JobStatus.COMPLETED, loose.error
    assert loose.output == importlib.util.find_spec("iniconfig").origin  # type: ignore[union-attr]


@pytest.mark.skipif(
    importlib.util.find_spec("torch") is None, reason="torch is not installed here"
)
async def test_a_gpu_image_has_torch_and_a_cpu_image_does_not(tmp_path: Path) -> None:
    provider = LocalProvider(state_dir=tmp_path / ".flash")
    async with runtime(provider=provider):
        gpu_job = await torch_on_gpu()
        cpu_job = await torch_on_cpu()
    assert gpu_job.status == JobStatus.COMPLETED, gpu_job.error
    assert cpu_job.status == JobStatus.FAILED
    assert str(cpu_job.exception).startswith("No module named 'torch': ")


def test_image_kinds_follow_the_runpod_provider() -> None:
    assert isolation.image_kind(LiveServerless(name="k1")) == "gpu"
    assert isolation.image_kind(LiveLoadBalancer(name="k2")) == "gpu"
    assert isolation.image_kind(CpuLiveServerless(name="k3")) == "cpu"
    assert isolation.image_kind(CpuLiveLoadBalancer(name="k4")) == "cpu"
    assert isolation.image_kind(ServerlessEndpoint(name="k5", imageName="me/x:1")) == (
        "custom"
    )
    flash_gpu = LiveServerless(name="k7", imageName="runpod/flash:py3.12-latest")
    assert isolation.image_kind(flash_gpu) == "gpu"  # as flash local's GraphQL saves it
    flash_cpu = LiveServerless(name="k8", imageName="runpod/flash-lb-cpu:py3.12-1.0")
    assert isolation.image_kind(flash_cpu) == "cpu"
    assert isolation.endpoint_env(CpuLiveServerless(name="k6")) == {
        "FLASH_WORKER_IMAGE": "cpu"
    }
    assert isolation.strict_enabled({"FLASH_WORKER_IMAGE": "gpu"})
    assert not isolation.strict_enabled({"FLASH_STRICT_IMPORTS": "0"})
    assert not isolation.strict_enabled({"FLASH_WORKER_IMAGE": "custom"})


def test_allow_lists_come_from_package_metadata() -> None:
    runtime_dists = isolation.runtime_distributions()
    assert {"flash-actors", "anyio", "msgspec", "aiohttp", "httpx", "idna"} <= (
        runtime_dists
    )  # idna: required by httpx, found through the closure
    assert not {"pytest", "iniconfig", "trio", "runpod"} & runtime_dists
    assert isolation.image_distributions("cpu") == frozenset()
    assert isolation.GPU_IMAGE_PACKAGES == ("torch", "torchvision", "torchaudio")
    gpu = isolation.image_distributions("gpu")
    assert ("torch" in gpu) == (importlib.util.find_spec("torch") is not None)
    assert isolation.requirement_closure(["pytest"]) >= {
        "pytest",
        "iniconfig",
        "pluggy",
        "packaging",
    }
    assert isolation.requirement_closure(["flash-actors-no-such-dist"]) == frozenset()
    assert {"anyio", "msgspec", "aiohttp"} <= isolation.top_level_modules(runtime_dists)


def test_the_policy_refuses_the_callers_packages_only(tmp_path: Path) -> None:
    """The decision itself, without installing the guards in this process."""
    gpu_modules = isolation.top_level_modules(isolation.image_distributions("gpu"))
    policy = isolation.StrictImports(
        {"anyio", *gpu_modules}, list(sys.path), image="gpu"
    )
    finder = policy.wrap(importlib.machinery.PathFinder)
    assert finder.find_spec("anyio") is not None  # allowed by name
    assert finder.find_spec("iniconfig") is None  # a probe: "not installed"
    assert policy.refused == {"iniconfig"}
    assert finder.find_spec("flash_actors_no_such_module") is None
    assert policy.refused == {"iniconfig"}  # absent everywhere: the usual error
    assert finder.find_spec("json") is not None  # the standard library is allowed
    (tmp_path / "late_entry.py").write_text("")
    sys.path.append(str(tmp_path))  # a directory added after the start is allowed
    try:
        assert finder.find_spec("late_entry") is not None
    finally:
        sys.path.remove(str(tmp_path))
    if gpu_modules:
        assert "torch" in gpu_modules
    message = policy.message("iniconfig")
    assert message.startswith("No module named 'iniconfig': ")
    assert "Flash's GPU worker image" in message
    assert "dependencies=['iniconfig']" in message


def test_an_unloadable_result_names_its_type_unit(tmp_path: Path) -> None:
    name = _module_name()
    (tmp_path / f"{name}.py").write_text("class Thing:\n    pass\n")
    sys.path.insert(0, str(tmp_path))
    try:
        module = importlib.import_module(name)
        key = endpoint_key("iso-unit")
        text, signature = encode_result([module.Thing(), 1], key)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(name, None)
    with pytest.raises(ResultTypeUnavailableError) as info:
        decode_result(text, signature, key, source="f() on endpoint 'iso-unit'")
    assert str(info.value) == (
        f"f() on endpoint 'iso-unit' succeeded remotely, but its result cannot be "
        f"loaded here: it holds {name}.Thing, and this process cannot import them "
        f"(ModuleNotFoundError: No module named '{name}'). Return plain Python values "
        "(dicts, lists, str, int, float, bytes; e.g. .tolist() or .item()) from the "
        f"function, or install '{name}' in the caller's environment too."
    )
    assert info.value.missing_module == name
    assert info.value.names == (f"{name}.Thing",)


async def test_a_result_the_caller_cannot_load_says_the_call_succeeded(
    tmp_path: Path,
) -> None:
    queue_module, lb_module = _module_name(), _module_name()
    folder = tmp_path / "worker_only"  # never on this process's path
    folder.mkdir()
    provider = LocalProvider(state_dir=tmp_path / ".flash")
    async with runtime(provider=provider):
        job = await make_thing(str(folder), queue_module)
        with pytest.raises(ResultTypeUnavailableError) as info:
            await lb_thing(str(folder), lb_module)
    assert job.status == JobStatus.FAILED
    assert isinstance(job.exception, ResultTypeUnavailableError)
    assert job.error == str(job.exception)
    assert job.error.startswith(
        "make_thing() on endpoint 'iso-strict' succeeded remotely, but its result "
        f"cannot be loaded here: it holds {queue_module}.Thing, and this process cannot "
        f"import them (ModuleNotFoundError: No module named '{queue_module}'). Return "
        "plain Python values"
    )
    assert str(info.value).startswith(
        "lb_thing() on endpoint 'iso-lb' succeeded remotely, but its result cannot be "
        f"loaded here: it holds {lb_module}.Thing, "
    )
