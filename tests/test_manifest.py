"""``.flash/flash_manifest.json``: schema, round trip, determinism, validation on load."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from flash_actors import manifest as old_api
from flash_actors.build.manifest import (
    MANIFEST_PATH,
    MANIFEST_VERSION,
    Manifest,
    encode_manifest,
    load_manifest,
    write_manifest,
)
from flash_actors.errors import BuildError, ManifestError
from flash_actors.registry import Registry
from flash_actors.resources import GpuGroup, LiveServerless

PROJECT = {
    "cfg.py": "from flash_actors import LiveServerless, CpuLiveServerless, CpuLiveLoadBalancer, GpuGroup\n"
    "gpu = LiveServerless(name='gpu', gpus=[GpuGroup.ADA_24], workersMax=2)\n"
    "cpu = CpuLiveServerless(name='cpu')\n"
    "api = CpuLiveLoadBalancer(name='api')\n",
    "gpu_worker.py": "from flash_actors import remote\nfrom cfg import gpu\n"
    "@remote(gpu, dependencies=['numpy'])\nasync def process(x): return x\n",
    "cpu_worker.py": "from flash_actors import remote\nfrom cfg import cpu\nfrom gpu_worker import process as gpu_process\n"
    "@remote(cpu)\nasync def process(x): return await gpu_process(x)\n",
    "api.py": "from flash_actors import remote\nfrom cfg import api\nimport cpu_worker\n"
    "@remote(api, method='POST', path='/run')\nasync def run(x): return await cpu_worker.process(x)\n",
}


def make_project(root: Path) -> Path:
    for rel, text in PROJECT.items():
        (root / rel).write_text(text, encoding="utf-8")
    return root


def test_write_and_load_round_trip(tmp_path: Path) -> None:
    make_project(tmp_path)
    written = write_manifest(tmp_path, python_version="3.12")
    path = tmp_path / MANIFEST_PATH
    loaded = load_manifest(path)
    assert loaded == written
    assert loaded.version == MANIFEST_VERSION
    assert loaded.python_version == "3.12"
    assert loaded.generated_at is None
    assert loaded.project_name == tmp_path.name
    assert loaded.source_fingerprint is not None
    assert loaded.source_fingerprint.startswith("sha256:")
    # keyed by module and qualified name: the two `process` functions do not collide
    assert loaded.function_registry == {
        "api:run": "api",
        "cpu_worker:process": "cpu",
        "gpu_worker:process": "gpu",
    }
    assert loaded.routes == {"api": {"POST /run": "api:run"}}
    assert loaded.endpoint_calls == {"api": ["cpu"], "cpu": ["gpu"]}
    gpu = loaded.resources["gpu"]
    assert (gpu.resource_type, gpu.is_load_balanced, gpu.makes_remote_calls) == (
        "LiveServerless",
        False,
        False,
    )
    assert gpu.config == {"gpus": [GpuGroup.ADA_24.value], "workersMax": 2}
    assert (gpu.file_path, gpu.module_path, gpu.config_variable) == (
        "cfg.py",
        "cfg",
        "gpu",
    )
    assert gpu.target_python_version == "3.12"
    assert [(f.module, f.qualname, f.dependencies) for f in gpu.functions] == [
        ("gpu_worker", "process", ["numpy"])
    ]
    assert loaded.resources["cpu"].functions[0].calls == ["gpu_worker:process"]
    assert loaded.resources["api"].is_load_balanced
    # runpod-flash 1.21's top-level keys are all there
    raw = json.loads(path.read_bytes())
    assert {
        "version",
        "python_version",
        "project_name",
        "resources",
        "function_registry",
        "routes",
    } <= raw.keys()
    # the Registry rebuilds the endpoints from the manifest alone
    registry = Registry()
    registry.load(path)
    resource = registry.resource("gpu")
    assert isinstance(resource, LiveServerless)
    assert resource.workersMax == 2
    assert registry.endpoint_of("cpu_worker:process") == "cpu"
    # the old import path still works
    assert old_api.load_manifest is load_manifest
    assert old_api.Manifest is Manifest


def test_default_python_version_is_the_running_one(tmp_path: Path) -> None:
    make_project(tmp_path)
    manifest = write_manifest(tmp_path, tmp_path / "out" / "m.json")
    assert (
        manifest.python_version == f"{sys.version_info.major}.{sys.version_info.minor}"
    )
    assert (tmp_path / "out" / "m.json").is_file()
    with pytest.raises(
        BuildError, match=r"^python version '312' is not of the form 3\.X"
    ):
        write_manifest(tmp_path, python_version="312")


def test_deterministic_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    (tmp_path / "a").mkdir()
    make_project(tmp_path / "a")
    first = tmp_path / "first.json"
    second = tmp_path / "second.json"
    write_manifest(tmp_path / "a", first, python_version="3.11")
    write_manifest(tmp_path / "a", second, python_version="3.11")
    assert first.read_bytes() == second.read_bytes()
    # a copy of the tree (files written in another order, other mtimes) gives the same bytes
    copy = tmp_path / "b" / "a"
    copy.mkdir(parents=True)
    for rel in reversed(PROJECT):
        shutil.copyfile(tmp_path / "a" / rel, copy / rel)
    third = tmp_path / "third.json"
    write_manifest(copy, third, python_version="3.11")
    assert third.read_bytes() == first.read_bytes()
    text = first.read_text()
    assert text.endswith("}\n")
    assert list(json.loads(text)) == sorted(json.loads(text))
    # a change to the sources changes the fingerprint
    (tmp_path / "a" / "cfg.py").write_text(PROJECT["cfg.py"] + "# edit\n")
    write_manifest(tmp_path / "a", second, python_version="3.11")
    assert (
        load_manifest(second).source_fingerprint
        != load_manifest(first).source_fingerprint
    )


def test_source_date_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_project(tmp_path)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    assert write_manifest(tmp_path).generated_at == "2023-11-14T22:13:20Z"
    before = (tmp_path / MANIFEST_PATH).read_bytes()
    assert write_manifest(tmp_path).generated_at == "2023-11-14T22:13:20Z"
    assert (tmp_path / MANIFEST_PATH).read_bytes() == before
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(
        BuildError, match=r"^SOURCE_DATE_EPOCH='yesterday' is not a Unix time"
    ):
        write_manifest(tmp_path)


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (
            lambda m: m["resources"]["gpu"].__setitem__("resource_type", 7),
            r'\$\.resources\["gpu"\]\.resource_type`',
        ),
        (
            lambda m: m.__setitem__("function_registry", {"a:b": 1}),
            r'\$\.function_registry\["a:b"\]`',
        ),
        (lambda m: m["routes"].__setitem__("api", []), r'\$\.routes\["api"\]`'),
        (lambda m: m.__setitem__("version", "9.0"), r"\$\.version"),
        (
            lambda m: m["function_registry"].__setitem__("x:y", "nowhere"),
            r"\$\.function_registry",
        ),
    ],
)
def test_corrupted_manifest_names_the_field_and_file(
    tmp_path: Path, edit: object, field: str
) -> None:
    make_project(tmp_path)
    write_manifest(tmp_path)
    path = tmp_path / MANIFEST_PATH
    data = json.loads(path.read_bytes())
    assert callable(edit)
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=rf"^invalid manifest {path}: .*{field}"):
        load_manifest(path)


def test_unreadable_manifests(tmp_path: Path) -> None:
    with pytest.raises(
        ManifestError, match=r"^no manifest at .*: run `flash build` first"
    ):
        load_manifest(tmp_path / "missing.json")
    (tmp_path / "m.json").write_bytes(b"{not json")
    with pytest.raises(
        ManifestError,
        match=rf"^invalid manifest {tmp_path / 'm.json'}: JSON is malformed",
    ):
        load_manifest(tmp_path / "m.json")


def test_unknown_keys_are_ignored(tmp_path: Path) -> None:
    make_project(tmp_path)
    write_manifest(tmp_path)
    path = tmp_path / MANIFEST_PATH
    data = json.loads(path.read_bytes())
    data["extra"] = {"from": "a newer build"}
    path.write_text(json.dumps(data))
    assert load_manifest(path).function_registry["api:run"] == "api"


def test_load_balancer_routes_are_checked(tmp_path: Path) -> None:
    head = "from flash_actors import remote, LiveLoadBalancer\nlb = LiveLoadBalancer(name='lb')\n"
    cases = {
        "@remote(lb)\nasync def f(): ...\n": r"^main\.py:4: f is on the load balancer 'lb': give @remote method= and path=",
        "@remote(lb, method='GET', path='/ping')\nasync def f(): ...\n": r"^main\.py:4: f's path /ping is reserved",
        "@remote(lb, method='GET', path='/a')\nasync def f(): ...\n@remote(lb, method='get', path='/a')\nasync def g(): ...\n": r"^main\.py:6: route 'GET /a' of 'lb' is taken by main:f",
    }
    for body, pattern in cases.items():
        (tmp_path / "main.py").write_text(head + body)
        with pytest.raises(BuildError, match=pattern):
            write_manifest(tmp_path)


def test_encode_is_stable_across_dict_order() -> None:
    one = Manifest(function_registry={"b:f": "x", "a:f": "y"})
    two = Manifest(function_registry={"a:f": "y", "b:f": "x"})
    assert encode_manifest(one) == encode_manifest(two)
