"""The build scanner: ``@remote`` found by reading sources (no user code runs), configs resolved."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from flash_actors import resources
from flash_actors.build.scanner import MAX_SOURCE_BYTES, RESOURCE_CLASSES, scan_project
from flash_actors.errors import BuildError, ManifestError


def write(root: Path, files: dict[str, str | bytes]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text, encoding="utf-8")
    return root


# A module that would fail loudly if anything imported or executed it.
BOOM = "raise SystemExit('user code ran')\n"


def test_resource_classes_are_the_libraries() -> None:
    assert {
        name for name in RESOURCE_CLASSES if isinstance(getattr(resources, name), type)
    } == RESOURCE_CLASSES


def test_same_module_config_and_no_code_runs(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "main.py": BOOM
            + "from flash_actors import remote, LiveServerless, GpuGroup\n"
            + "gpu = LiveServerless(name='gpu', gpus=[GpuGroup.ADA_24], workersMax=3, env={'A': '1'}, idleTimeout=-1)\n"
            + "@remote(gpu, dependencies=['torch'])\n"
            + "async def infer(x):\n    return x\n"
            + "@remote(resource_config=gpu)\n"
            + "class Model:\n    pass\n",
        },
    )
    result = scan_project(tmp_path)
    assert result.files == ["main.py"]
    assert [(f.module, f.qualname, f.kind, f.is_async) for f in result.functions] == [
        ("main", "Model", "class", False),
        ("main", "infer", "function", True),
    ]
    assert result.functions[1].dependencies == ["torch"]
    config = result.resources["gpu"]
    assert config.resource_type == "LiveServerless"
    assert config.config == {
        "gpus": ["GpuGroup.ADA_24"],
        "workersMax": 3,
        "env": {"A": "1"},
        "idleTimeout": -1,
    }
    assert config.variable == "gpu"
    assert config.where == "main.py:3"


def test_aliases_module_import_and_runpod_flash(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "a.py": "from flash_actors import remote as r, CpuLiveServerless as C\n"
            "@r(C(name='a', workersMax=1))\ndef fa(): ...\n",
            "b.py": "import flash_actors as fl\n@fl.remote(fl.LiveServerless(name='b'))\nasync def fb(): ...\n",
            "c.py": "from runpod_flash import remote, LiveLoadBalancer\n"
            "lb = LiveLoadBalancer(name='lb')\n"
            "@remote(lb, method='post', path='/go')\nasync def fc(): ...\n",
            "d.py": "def remote(x):\n    return x\n@remote(1)\ndef not_ours(): ...\n",
        },
    )
    result = scan_project(tmp_path)
    assert [(f.module, f.resource) for f in result.functions] == [
        ("a", "a"),
        ("b", "b"),
        ("c", "lb"),
    ]
    assert result.resources["a"].resource_type == "CpuLiveServerless"
    assert (result.functions[2].http_method, result.functions[2].http_path) == (
        "POST",
        "/go",
    )


@pytest.mark.parametrize(
    "imports",
    [
        "from .config import gpu_cfg",
        "from app.config import gpu_cfg",
        "from . import config\n",
        "import app.config",
    ],
)
def test_config_from_another_module(tmp_path: Path, imports: str) -> None:
    use = "config.gpu_cfg" if "import config" in imports else "gpu_cfg"
    if imports == "import app.config":
        use = "app.config.gpu_cfg"
    write(
        tmp_path,
        {
            "app/__init__.py": "",
            "app/config.py": BOOM
            + "from flash_actors import LiveServerless\ngpu_cfg = LiveServerless(name='g', workersMin=0)\n",
            "app/workers.py": f"from flash_actors import remote\n{imports}\n@remote({use})\nasync def work(): ...\n",
        },
    )
    result = scan_project(tmp_path)
    assert [f.key for f in result.functions] == ["app.workers:work"]
    assert result.resources["g"].where == "app/config.py:3"
    assert result.resources["g"].module == "app.config"


def test_script_style_sibling_import(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "svc/config.py": "from flash_actors import CpuLiveServerless\ncfg = CpuLiveServerless(name='c')\n",
            "svc/main.py": "from flash_actors import remote\nfrom config import cfg\n@remote(cfg)\ndef f(): ...\n",
        },
    )
    assert scan_project(tmp_path).functions[0].resource == "c"


def test_cross_endpoint_edges(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "cfg.py": "from flash_actors import LiveServerless, CpuLiveServerless\n"
            "gpu = LiveServerless(name='gpu')\ncpu = CpuLiveServerless(name='cpu')\n",
            "gpu_worker.py": "from flash_actors import remote\nfrom cfg import gpu\n"
            "@remote(gpu)\nasync def infer(x): return x\n"
            "@remote(gpu)\nasync def helper(x): return await infer(x)\n",
            "cpu_worker.py": "from flash_actors import remote\nfrom cfg import cpu\n"
            "from gpu_worker import infer\nimport gpu_worker as g\n"
            "@remote(cpu)\nasync def pre(x): return await infer(x)\n"
            "@remote(cpu)\nasync def pre2(x): return await g.helper(x)\n"
            "@remote(cpu)\nasync def alone(x): return x\n",
        },
    )
    result = scan_project(tmp_path)
    calls = {f.key: f.calls for f in result.functions}
    assert calls == {
        "cpu_worker:alone": [],
        "cpu_worker:pre": ["gpu_worker:infer"],
        "cpu_worker:pre2": ["gpu_worker:helper"],
        "gpu_worker:helper": ["gpu_worker:infer"],
        "gpu_worker:infer": [],
    }
    assert result.endpoint_calls == {"cpu": ["gpu"]}


def test_ignore_files_and_skipped_folders(tmp_path: Path) -> None:
    ok = "from flash_actors import remote, LiveServerless\n@remote(LiveServerless(name='x'))\ndef f(): ...\n"
    bad = "def broken(:\n"
    write(
        tmp_path,
        {
            "main.py": ok,
            ".gitignore": "build/\n*.gen.py\n!keep.gen.py\n",
            ".flashignore": "scratch.py\n",
            "build/x.py": bad,
            "a.gen.py": bad,
            "keep.gen.py": "x = 1\n",
            "scratch.py": bad,
            ".venv/lib/x.py": bad,
            ".flash/.build/x.py": bad,
            "__pycache__/x.py": bad,
            ".hidden/x.py": bad,
            "sub/.gitignore": "local.py\n",
            "sub/local.py": bad,
            "sub/ok.py": "y = 2\n",
        },
    )
    assert scan_project(tmp_path).files == ["keep.gen.py", "main.py", "sub/ok.py"]


def test_nothing_found_names_the_files(tmp_path: Path) -> None:
    write(tmp_path, {"a.py": "x = 1\n", "pkg/b.py": "def f(): ...\n"})
    with pytest.raises(
        BuildError,
        match=r"^No @remote functions found in .* \(scanned 2 Python file\(s\): a\.py, pkg/b\.py\): ensure your functions are decorated with @remote\(resource_config\).*\.gitignore or \.flashignore",
    ):
        scan_project(tmp_path)
    assert issubclass(BuildError, ManifestError)


def test_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    write(tmp_path, {"ok.py": "x = 1\n", "pkg/bad.py": "x = 1\n\ndef f(:\n    pass\n"})
    with pytest.raises(BuildError, match=r"^pkg/bad\.py:3: syntax error: .+"):
        scan_project(tmp_path)


def test_config_used_before_defined(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "main.py": "from flash_actors import remote, LiveServerless\n"
            "@remote(gpu)\ndef f(): ...\n"
            "gpu = LiveServerless(name='gpu')\n",
        },
    )
    with pytest.raises(
        BuildError,
        match=r"^main\.py:2: resource config 'gpu' is used before it is defined \(main\.py:4\)",
    ):
        scan_project(tmp_path)


def test_config_not_found(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "main.py": "from flash_actors import remote\n\n@remote(nowhere)\ndef f(): ...\n"
        },
    )
    with pytest.raises(
        BuildError,
        match=r"^main\.py:3: resource config 'nowhere' is not defined in main\.py",
    ):
        scan_project(tmp_path)
    write(
        tmp_path,
        {
            "main.py": "from flash_actors import remote\nfrom cfgs import gpu\n@remote(gpu)\ndef f(): ...\n"
        },
    )
    with pytest.raises(
        BuildError,
        match=r"^main\.py:3: resource config 'gpu' comes from 'cfgs', which is not a module of the project",
    ):
        scan_project(tmp_path)
    write(
        tmp_path,
        {
            "cfgs.py": "x = 1\n",
            "main.py": "from flash_actors import remote\nfrom cfgs import gpu\n@remote(gpu)\ndef f(): ...\n",
        },
    )
    with pytest.raises(
        BuildError,
        match=r"^main\.py:3: resource config 'gpu' is not defined in cfgs\.py",
    ):
        scan_project(tmp_path)


def test_bad_configs(tmp_path: Path) -> None:
    cases = {
        "from flash_actors import remote\n@remote\ndef f(): ...\n": r"^main\.py:2: @remote needs a resource config",
        "from flash_actors import remote, LiveServerless\nn = 'x'\n@remote(LiveServerless(name=n))\ndef f(): ...\n": r"^main\.py:3: LiveServerless's name must be a non-empty string literal",
        "from flash_actors import remote\nc = dict(name='x')\n@remote(c)\ndef f(): ...\n": r"^main\.py:2: the resource config is not a call of a resource class",
        "from flash_actors import remote\na = b\nb = a\n@remote(a)\ndef f(): ...\n": r"^main\.py:4: resource config 'b' is used before it is defined",
    }
    for source, pattern in cases.items():
        write(tmp_path, {"main.py": source})
        with pytest.raises(BuildError, match=pattern):
            scan_project(tmp_path)


def test_unresolved_values_kept_as_text(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "main.py": "import os\nfrom flash_actors import remote, LiveServerless\n"
            "gpu = LiveServerless(name='g', workersMax=int(os.environ['N']), env={'K': os.environ['K']})\n"
            "@remote(gpu)\ndef f(): ...\n",
        },
    )
    config = scan_project(tmp_path).resources["g"]
    assert config.config == {}
    assert config.unresolved == {
        "workersMax": "int(os.environ['N'])",
        "env": "{'K': os.environ['K']}",
    }


def test_same_name_different_settings_names_both_places(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "a.py": "from flash_actors import remote, LiveServerless\n@remote(LiveServerless(name='g', workersMax=1))\ndef f(): ...\n",
            "b.py": "from flash_actors import remote, LiveServerless\n\n@remote(LiveServerless(name='g', workersMax=2))\ndef h(): ...\n",
            "c.py": "from flash_actors import remote, LiveServerless\n@remote(LiveServerless(name='g', workersMax=1))\ndef k(): ...\n",
        },
    )
    with pytest.raises(
        BuildError,
        match=r"^two resource configs are named 'g' with different settings: a\.py:2 and b\.py:3",
    ):
        scan_project(tmp_path)
    (tmp_path / "b.py").unlink()
    assert [f.key for f in scan_project(tmp_path).functions] == ["a:f", "c:k"]


def test_same_named_functions_in_two_modules(tmp_path: Path) -> None:
    source = "from flash_actors import remote, LiveServerless\n@remote(LiveServerless(name='{n}'))\nasync def process(): ...\n"
    write(
        tmp_path,
        {"one.py": source.format(n="a"), "two/__init__.py": source.format(n="b")},
    )
    assert [(f.key, f.resource) for f in scan_project(tmp_path).functions] == [
        ("one:process", "a"),
        ("two:process", "b"),
    ]


# ---------------------------------------------------------------- hostile trees


def test_huge_file_fails_clearly_without_reading_it(tmp_path: Path) -> None:
    write(tmp_path, {"main.py": "x = 1\n"})
    with (tmp_path / "data.py").open("wb") as f:
        f.truncate(MAX_SOURCE_BYTES + 1)  # sparse: costs no disk
    with pytest.raises(
        BuildError,
        match=r"^data\.py: \d+ bytes, over the scanner's \d+-byte limit .*\.flashignore",
    ):
        scan_project(tmp_path)


def test_large_file_under_the_limit_scans(tmp_path: Path) -> None:
    body = "".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(5_000))
    write(
        tmp_path,
        {
            "big.py": body,
            "main.py": "from flash_actors import remote, LiveServerless\n@remote(LiveServerless(name='x'))\ndef f(): ...\n",
        },
    )
    assert len(scan_project(tmp_path).functions) == 1


def test_deeply_nested_expression(tmp_path: Path) -> None:
    write(tmp_path, {"deep.py": "x = " + "(" * 5000 + "1" + ")" * 5000 + "\n"})
    with pytest.raises(
        BuildError, match=r"^deep\.py(:\d+)?: (syntax error|cannot parse): "
    ):
        scan_project(tmp_path)
    # nesting the parser accepts but a recursive evaluator would choke on stays unresolved text
    value = "[" * 90 + "]" * 90
    write(
        tmp_path,
        {
            "deep.py": "from flash_actors import remote, LiveServerless\n"
            f"@remote(LiveServerless(name='x', env={value}))\ndef f(): ...\n",
        },
    )
    assert "env" in scan_project(tmp_path).resources["x"].unresolved


def test_symlink_loop_is_skipped(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "main.py": "from flash_actors import remote, LiveServerless\n@remote(LiveServerless(name='x'))\ndef f(): ...\n"
        },
    )
    (tmp_path / "pkg").mkdir()
    os.symlink(tmp_path, tmp_path / "pkg" / "loop")
    os.symlink(tmp_path / "main.py", tmp_path / "alias.py")
    os.symlink(tmp_path / "missing.py", tmp_path / "dangling.py")
    assert scan_project(tmp_path).files == ["main.py"]


def test_non_utf8_bytes(tmp_path: Path) -> None:
    ok = b"from flash_actors import remote, LiveServerless\n@remote(LiveServerless(name='x'))\ndef f(): ...\n"
    write(tmp_path, {"main.py": ok, "bad.py": b"x = '\xff\xfe'\n"})
    with pytest.raises(BuildError, match=r"^bad\.py:1: syntax error: .*utf-8"):
        scan_project(tmp_path)
    # a declared encoding is honoured, as Python does
    write(tmp_path, {"bad.py": b"# -*- coding: latin-1 -*-\nx = '\xe9'\n"})
    assert scan_project(tmp_path).files == ["bad.py", "main.py"]


def test_not_a_folder(tmp_path: Path) -> None:
    with pytest.raises(
        BuildError, match=re.escape(f"{tmp_path / 'nope'}: not a project folder")
    ):
        scan_project(tmp_path / "nope")


def test_fingerprint_tracks_paths_and_bytes(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "main.py": "from flash_actors import remote, LiveServerless\n@remote(LiveServerless(name='x'))\ndef f(): ...\n"
        },
    )
    first = scan_project(tmp_path).fingerprint
    assert first.startswith("sha256:")
    assert scan_project(tmp_path).fingerprint == first
    write(tmp_path, {"other.py": "y = 1\n"})
    second = scan_project(tmp_path).fingerprint
    assert second != first
    (tmp_path / "other.py").rename(tmp_path / "renamed.py")
    assert scan_project(tmp_path).fingerprint not in {first, second}


def test_import_inside_the_function_is_an_edge(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "gpu.py": "from flash_actors import remote, LiveServerless\n@remote(LiveServerless(name='gpu'))\nasync def infer(x): return x\n",
            "cpu.py": "from flash_actors import remote, CpuLiveServerless\n"
            "@remote(CpuLiveServerless(name='cpu'))\nasync def pre(x):\n"
            "    from gpu import infer\n    import gpu as g\n    return await infer(x), await g.infer(x)\n",
        },
    )
    result = scan_project(tmp_path)
    assert [f.calls for f in result.functions] == [["gpu:infer"], []]
    assert result.endpoint_calls == {"cpu": ["gpu"]}


def test_main_guard_and_redefinition(tmp_path: Path) -> None:
    head = "from flash_actors import remote, LiveServerless\ncfg = LiveServerless(name='x')\n"
    write(
        tmp_path,
        {
            "main.py": head
            + "@remote(cfg)\ndef f(): ...\nif __name__ == '__main__':\n    @remote(cfg)\n    def g(): ...\n"
        },
    )
    assert [f.qualname for f in scan_project(tmp_path).functions] == ["f"]
    write(
        tmp_path,
        {"main.py": head + "@remote(cfg)\ndef f(): ...\n@remote(cfg)\ndef f(): ...\n"},
    )
    with pytest.raises(
        BuildError,
        match=r"^main\.py:6: @remote f is defined twice \(also at line 4\): rename one",
    ):
        scan_project(tmp_path)


def test_config_import_cycle(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "a.py": "from b import cfg\n",
            "b.py": "from a import cfg\n",
            "main.py": "from flash_actors import remote\nfrom a import cfg\n@remote(cfg)\ndef f(): ...\n",
        },
    )
    with pytest.raises(
        BuildError, match=r"^main\.py:3: resource config 'cfg' is imported in a cycle"
    ):
        scan_project(tmp_path)


def test_fifo_and_unreadable_folder(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "main.py": "from flash_actors import remote, LiveServerless\n@remote(LiveServerless(name='x'))\ndef f(): ...\n"
        },
    )
    os.mkfifo(tmp_path / "pipe.py")  # reading it would block forever
    assert scan_project(tmp_path).files == ["main.py"]
    if os.geteuid() == 0:
        return  # root reads every folder
    locked = tmp_path / "locked"
    locked.mkdir(mode=0)
    try:
        with pytest.raises(
            BuildError, match=r"^locked: cannot list the folder: .*\.flashignore"
        ):
            scan_project(tmp_path)
        (tmp_path / ".flashignore").write_text("locked/\n")
        assert scan_project(tmp_path).files == ["main.py"]
    finally:
        locked.chmod(0o700)
