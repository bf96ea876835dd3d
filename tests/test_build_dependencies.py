"""A build's dependencies: manylinux x86_64 wheels for the target Python, exclusions, the limit.

Installs real (small) packages from PyPI with uv; uv's cache makes reruns fast.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from flash_actors.build.builder import BuildOptions, build_project
from flash_actors.build.dependencies import (
    DependencyPlan,
    install_dependencies,
    plan_dependencies,
    runtime_requirements,
)
from flash_actors.build.manifest import Manifest, build_manifest
from flash_actors.build.scanner import scan_project
from flash_actors.errors import BuildError


def manifest_of(root: Path, files: dict[str, str]) -> Manifest:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return build_manifest(scan_project(root), python_version="3.12")


def endpoint(cls: str, name: str, deps: list[str]) -> str:
    return (
        f"from flash_actors import remote, {cls}\n"
        f"{name} = {cls}(name={name!r})\n"
        f"@remote({name}, dependencies={deps!r})\n"
        f"async def {name}_fn(x):\n    return x\n"
    )


def plan(
    manifest: Manifest, root: Path, exclude: tuple[str, ...] = ()
) -> DependencyPlan:
    """The plan without flash-actors' runtime: only what the test is about is installed."""
    full = plan_dependencies(manifest, root, exclude=exclude)
    return DependencyPlan(
        requirements=full.requirements,
        by_resource=full.by_resource,
        requirements_file=full.requirements_file,
        runtime=[],
        excluded=full.excluded,
    )


def test_runtime_requirements_come_from_the_metadata() -> None:
    names = {
        re.split(r"[\s<>=!;\[]", spec, maxsplit=1)[0] for spec in runtime_requirements()
    }
    assert {"anyio", "msgspec", "cloudpickle", "aiohttp", "pathspec"} <= names
    assert "uv" not in names  # a build tool
    assert not {"trio", "pytest", "fastapi"} & names  # extras only


def test_gpu_resources_leave_out_the_base_image_packages(tmp_path: Path) -> None:
    gpu_only = manifest_of(
        tmp_path / "a", {"main.py": endpoint("LiveServerless", "gpu", ["torch"])}
    )
    assert plan_dependencies(gpu_only, tmp_path / "a").excluded == {
        "torch": "in the GPU base image",
        "torchaudio": "in the GPU base image",
        "torchvision": "in the GPU base image",
    }
    # a CPU worker's slim image has no torch: a CPU resource that lists it gets it
    mixed = manifest_of(
        tmp_path / "b",
        {
            "gpu.py": endpoint("LiveServerless", "gpu", ["torch"]),
            "cpu.py": endpoint("CpuLiveServerless", "cpu", ["torch==2.5.1"]),
        },
    )
    assert plan_dependencies(mixed, tmp_path / "b").excluded == {
        "torchaudio": "in the GPU base image",
        "torchvision": "in the GPU base image",
    }
    cpu_only = manifest_of(
        tmp_path / "c", {"main.py": endpoint("CpuLiveServerless", "cpu", ["six"])}
    )
    assert plan_dependencies(cpu_only, tmp_path / "c", exclude=("Six",)).excluded == {
        "six": "--exclude"
    }
    with pytest.raises(BuildError, match=r"^--exclude 'six>=1' is not a package name"):
        plan_dependencies(cpu_only, tmp_path / "c", exclude=("six>=1",))


def test_bad_dependency_names_its_function(tmp_path: Path) -> None:
    manifest = manifest_of(
        tmp_path, {"main.py": endpoint("CpuLiveServerless", "cpu", ["./local/dir"])}
    )
    with pytest.raises(
        BuildError, match=r"^main:cpu_fn on 'cpu': dependency './local/dir'"
    ):
        plan_dependencies(manifest, tmp_path)


@pytest.mark.network
def test_installs_the_cp312_manylinux_wheel(tmp_path: Path) -> None:
    root = tmp_path / "app"
    manifest = manifest_of(
        root, {"main.py": endpoint("CpuLiveServerless", "cpu", ["msgspec"])}
    )
    (root / "requirements.txt").write_text("six\n")
    target = tmp_path / "build"
    result = install_dependencies(plan(manifest, root), target, python_version="3.12")
    assert sorted(name.split("==")[0] for name in result.installed) == [
        "msgspec",
        "six",
    ]
    so = sorted(p.name for p in (target / "msgspec").glob("_core*.so"))
    assert so == ["_core.cpython-312-x86_64-linux-gnu.so"]  # whatever this machine runs
    (dist,) = target.glob("msgspec-*.dist-info")
    tags = re.findall(r"^Tag: (\S+)$", (dist / "WHEEL").read_text(), re.M)
    assert tags
    assert all(re.fullmatch(r"cp312-cp312-manylinux\w*_x86_64", tag) for tag in tags)
    assert (target / "six.py").is_file()  # from requirements.txt
    assert not (target / ".lock").exists()


@pytest.mark.network
def test_a_package_without_a_wheel_fails_naming_it(tmp_path: Path) -> None:
    # pycrypto was only ever published as a source distribution
    manifest = manifest_of(
        tmp_path / "app",
        {"main.py": endpoint("CpuLiveServerless", "cpu", ["six", "pycrypto==2.6.1"])},
    )
    with pytest.raises(BuildError) as caught:
        install_dependencies(
            plan(manifest, tmp_path / "app"), tmp_path / "build", python_version="3.12"
        )
    first, *rest = str(caught.value).splitlines()
    assert rest[0] == "uv's output:"
    assert any("pycrypto" in line for line in rest[1:])
    assert first == (
        "pycrypto (a dependency of 'cpu') has no manylinux x86_64 wheel for Python 3.12 "
        "(only a source distribution, or wheels for other platforms or Pythons): pick a "
        "version with a manylinux wheel or remove it"
    )


@pytest.mark.network
def test_an_unknown_package_fails_naming_it(tmp_path: Path) -> None:
    manifest = manifest_of(
        tmp_path / "app",
        {
            "main.py": endpoint(
                "CpuLiveServerless", "cpu", ["flash-actors-no-such-pkg-x"]
            )
        },
    )
    with pytest.raises(
        BuildError,
        match=r"^flash-actors-no-such-pkg-x \(a dependency of 'cpu'\) is not on the package index: ",
    ):
        install_dependencies(
            plan(manifest, tmp_path / "app"), tmp_path / "build", python_version="3.12"
        )


@pytest.mark.network
def test_excluded_packages_and_what_only_they_need_stay_out(tmp_path: Path) -> None:
    root = tmp_path / "app"
    manifest = manifest_of(
        root,
        {
            # python-dateutil needs six: --exclude six leaves six out, dateutil in
            "cpu.py": endpoint("CpuLiveServerless", "cpu", ["python-dateutil"]),
            # torchvision (excluded on GPU) would pull in torch, numpy, pillow...
            "gpu.py": endpoint("LiveServerless", "gpu", ["torchvision", "idna"]),
        },
    )
    target = tmp_path / "build"
    result = install_dependencies(
        plan(manifest, root, exclude=("six",)), target, python_version="3.12"
    )
    installed = {name.split("==")[0] for name in result.installed}
    assert {"idna", "python-dateutil"} <= installed
    assert not {"six", "torch", "torchvision", "numpy", "pillow"} & installed
    assert (target / "dateutil").is_dir()
    assert not (target / "six.py").exists()
    assert not {"torch", "torchvision", "numpy", "PIL"} & {
        p.name for p in target.iterdir()
    }


@pytest.mark.network
def test_over_the_limit_fails_listing_the_largest_and_keeps_the_old_archive(
    tmp_path: Path,
) -> None:
    root = tmp_path / "app"
    manifest_of(root, {"main.py": endpoint("CpuLiveServerless", "cpu", [])})
    output = root / ".flash" / "artifact.tar.gz"
    output.parent.mkdir(parents=True)
    output.write_bytes(b"the previous archive")
    with pytest.raises(BuildError) as caught:
        build_project(root, BuildOptions(max_archive_bytes=200_000))
    message = str(caught.value)
    assert message.startswith(
        "the archive is over RunPod's 195.3 KiB limit (compressed); the largest parts of "
        "the build (uncompressed): "
    )
    assert message.endswith(
        ": --exclude the packages the base image has (e.g. --exclude torch,torchvision) "
        "or drop dependencies"
    )
    largest = re.findall(r"(\S+) [\d.]+ (?:KiB|MiB)", message.split(": ")[1])
    assert "aiohttp" in largest
    assert output.read_bytes() == b"the previous archive"
    assert sorted(p.name for p in output.parent.iterdir()) == [
        "artifact.tar.gz",
        "build.lock",
        "flash_manifest.json",
    ]  # no temporary file left, the build folder removed
