"""Deployed code: generated handlers, the stock runpod worker, our worker's deployed mode.

A small project is built by hand in ``tmp_path`` (sources, `write_manifest`, a build folder
with the sources, the manifest and `write_handlers`' files); its handlers then run as real
processes on 127.0.0.1: under the stock ``runpod.serverless.start`` (local test mode), under
our worker (deployed mode), and as a load balancer's app. Module names carry a ``dpl_``
prefix, and the in-process tests drop them from ``sys.modules`` afterwards.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from flash_actors.build.handlers import write_handlers
from flash_actors.build.manifest import encode_manifest, write_manifest
from flash_actors.deployed.handler import DeployedHandler, load_resource
from flash_actors.errors import ManifestError
from flash_actors.messages import FunctionRequest
from flash_actors.serialization import sign_request
from tests._daemon import Daemon, descendants, kill_all, wait_gone

PROJECT = {
    "dpl_cfg.py": "from flash_actors import CpuLiveServerless, CpuLiveLoadBalancer\n"
    "cpu = CpuLiveServerless(name='cpu')\n"
    "multi = CpuLiveServerless(name='multi')\n"
    "api = CpuLiveLoadBalancer(name='api')\n"
    "svc = CpuLiveServerless(name='svc')\n",
    "dpl_math.py": "from flash_actors import remote\nfrom dpl_cfg import cpu\n"
    "@remote(cpu)\nasync def add(a, b):\n    return a + b\n",
    "dpl_a.py": "from flash_actors import remote\nfrom dpl_cfg import multi\n"
    "@remote(multi)\ndef process(x):\n    return f'a:{x}'\n",
    "dpl_b.py": "from flash_actors import remote\nfrom dpl_cfg import multi\n"
    "@remote(multi)\ndef process(x):\n    return f'b:{x}'\n"
    "@remote(multi)\nasync def boom(x):\n    raise ValueError(f'bad {x}')\n",
    "dpl_svc.py": "from flash_actors import remote\nfrom dpl_cfg import svc\n"
    "@remote(svc)\nclass Counter:\n    def __init__(self):\n        self.n = 0\n"
    "    def bump(self, by):\n        self.n += by\n        return self.n\n"
    "    def reset(self):\n        self.n = 0\n",
    "dpl_api.py": "from flash_actors import remote\nfrom dpl_cfg import api\n"
    "@remote(api, method='POST', path='/double')\nasync def double(x):\n    return 2 * x\n",
}
KEY = bytes(range(32))
TOKEN = "t0ken"  # noqa: S105 (a test token)
OFFLINE = {"RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true", "RUNPOD_SKIP_GPU_CHECK": "true"}


def build(root: Path) -> Path:
    """Write the project under ``root/src`` and its build folder ``root/build``."""
    src = root / "src"
    out = root / "build"
    src.mkdir(parents=True)
    out.mkdir()
    for rel, text in PROJECT.items():
        (src / rel).write_text(text, encoding="utf-8")
    manifest = write_manifest(src, python_version="3.12", project_name="dpl")
    for rel in PROJECT:
        shutil.copy(src / rel, out / rel)
    (out / "flash_manifest.json").write_bytes(encode_manifest(manifest))
    write_handlers(manifest, out)
    return out


@pytest.fixture
def built(tmp_path: Path) -> Iterator[Path]:
    """The build folder; its modules are forgotten afterwards (in-process tests import them)."""
    out = build(tmp_path)
    path = list(sys.path)
    try:
        yield out
    finally:
        sys.path[:] = path
        for name in [m for m in sys.modules if m.startswith("dpl_")]:
            del sys.modules[name]


def env(**extra: str) -> dict[str, str]:
    base = {
        k: v for k, v in os.environ.items() if not k.startswith(("FLASH_", "RUNPOD_"))
    }
    return {**base, **OFFLINE, "PYTHONUNBUFFERED": "1", **extra}


def signed(**fields: Any) -> dict[str, Any]:
    request = FunctionRequest(serialization_format="json", **fields)
    out: dict[str, Any] = msgspec.to_builtins(sign_request(request, KEY))
    return out


# ---- the factory ------------------------------------------------------------------------


def test_handlers_are_small_generated_and_deterministic(tmp_path: Path) -> None:
    first = build(tmp_path / "one")
    second = build(tmp_path / "two")
    names = sorted(p.name for p in first.glob("handler_*.py"))
    assert names == [
        "handler_api.py",
        "handler_cpu.py",
        "handler_multi.py",
        "handler_svc.py",
    ]
    for name in names:
        text = (first / name).read_text()
        assert text == (second / name).read_text()
        ast.parse(text)
        assert len(text.splitlines()) < 15  # all logic is in the library
        assert "from flash_actors.deployed.serve import main" in text


# ---- (a) the stock runpod worker, local test mode --------------------------------------


def run_stock(build_dir: Path, name: str, job: dict[str, Any]) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, name, "--test_input", json.dumps(job)],
        cwd=build_dir,
        env=env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr


def test_stock_runpod_worker_runs_deployed_json_input(built: Path) -> None:
    code, out = run_stock(built, "handler_cpu.py", {"input": {"a": 2, "b": 3}})
    assert code == 0, out
    result = re.search(r"^INFO +\| Job result: (.*)$", out, re.MULTILINE)
    assert result is not None, out
    assert ast.literal_eval(result.group(1)) == {"output": 5}


def test_stock_runpod_worker_refuses_function_code(built: Path) -> None:
    job = {"input": {"function_name": "add", "function_code": "def add(a, b): 0"}}
    code, out = run_stock(built, "handler_cpu.py", job)
    assert code == 1, out
    assert re.search(
        r"^ERROR +\| Job local_test failed with error: ManifestError: refusing "
        r"function_code for 'add': a deployed worker of resource 'cpu' runs only the "
        r"functions built into it",
        out,
        re.MULTILINE,
    ), out


def test_stock_runpod_worker_without_manifest_says_rebuild(built: Path) -> None:
    (built / "flash_manifest.json").unlink()
    code, out = run_stock(built, "handler_cpu.py", {"input": {"a": 1, "b": 1}})
    assert code == 1
    assert re.search(
        r"^ManifestError: no manifest at .*flash_manifest.json: run `flash build` first",
        out,
        re.MULTILINE,
    ), out


@pytest.mark.slow  # a daemon and a stock worker start: ~11 s here
def test_generated_handler_as_a_flash_local_handler_endpoint(built: Path) -> None:
    """The stock worker's real job loop, against `flash local` standing in for RunPod."""
    daemon = Daemon(built.parent / ".flash", f"cpu={built / 'handler_cpu.py'}:1")
    try:
        with daemon.client() as client:
            done = client.post(
                "/v2/cpu/runsync?wait=60000", json={"input": {"a": 2, "b": 3}}
            ).json()
            assert done["status"] == "COMPLETED", done
            assert done["output"] == 5
            code = {"function_name": "add", "function_code": "def add(a, b): 0"}
            refused = client.post(
                "/v2/cpu/runsync?wait=60000", json={"input": code}
            ).json()
            assert refused["status"] == "FAILED", refused
            assert refused["error"].startswith(
                "ManifestError: refusing function_code for 'add'"
            )
    finally:
        daemon.stop()


# ---- the handler in process: selection, arguments, refusals ----------------------------


@pytest.mark.anyio
async def test_same_named_functions_of_two_modules_stay_distinct(built: Path) -> None:
    resource = load_resource("multi", build_dir=built)
    assert sorted(resource.functions) == [
        "dpl_a:process",
        "dpl_b:boom",
        "dpl_b:process",
    ]
    handler = DeployedHandler(resource, KEY)
    assert await handler.run({"function_name": "dpl_a:process", "x": 1}) == "a:1"
    assert await handler.run({"function_name": "dpl_b:process", "x": 1}) == "b:1"
    ambiguous = await handler.run({"function_name": "process", "x": 1})
    assert ambiguous["success"] is False
    assert ambiguous["error"] == (
        "ManifestError: function name 'process' is ambiguous on resource 'multi': give "
        'module:qualname as "function_name" (one of: dpl_a:process, dpl_b:process)'
    )
    # the signed FunctionRequest path (the Executor's deployed map) keeps them apart too
    for module in ("dpl_a", "dpl_b"):
        request = signed(function_name=f"{module}:process", args=["x"])
        response = await handler.run(request)
        assert response == {"success": True, "json_result": f"{module[-1]}:x"}
    # a bare name that only one module has still works
    response = await handler.run(signed(function_name="boom", args=[1]))
    assert response["success"] is False
    assert response["error_message"] == "bad 1"


@pytest.mark.anyio
async def test_deployed_input_errors_name_the_problem(built: Path) -> None:
    handler = DeployedHandler(load_resource("multi", build_dir=built), KEY)
    several = await handler.run({"x": 1})
    assert several["error"] == (
        "ManifestError: resource 'multi' has several functions: say which with \"function_name\" "
        "in the input (one of: dpl_a:process, dpl_b:boom, dpl_b:process)"
    )
    unknown = await handler.run({"function_name": "nope", "x": 1})
    assert unknown["error"].startswith(
        "ManifestError: unknown function 'nope': resource 'multi' has dpl_a:process, "
        "dpl_b:boom, dpl_b:process (per "
    )
    assert unknown["error"].endswith(
        "if it is new, rebuild with `flash build` and redeploy"
    )
    missing = await handler.run({"function_name": "dpl_a:process"})
    assert missing["error"].startswith(
        "ArgumentError: process(): missing a required argument: 'x' (deployed input"
    )
    raised = await handler.run({"function_name": "boom", "x": 7})
    assert raised["error"] == "ValueError: bad 7"
    assert "raise ValueError" in raised["traceback"]
    code = await handler.run(
        signed(function_name="process", function_code="def process(x): 0")
    )
    assert code["error"].startswith(
        "ManifestError: refusing function_code for 'process': "
    )
    forged = await handler.run({**signed(function_name="dpl_a:process"), "args": [2]})
    assert forged["error_type"] == "PayloadSignatureError"
    no_key = DeployedHandler(handler.resource, None)
    unkeyed = await no_key.run(signed(function_name="dpl_a:process", args=[1]))
    assert unkeyed["error"].startswith(
        "PayloadSignatureError: this worker has no endpoint key"
    )


@pytest.mark.anyio
async def test_a_class_is_instantiated_once_and_method_picks(built: Path) -> None:
    handler = DeployedHandler(load_resource("svc", build_dir=built), KEY)
    assert await handler.run({"method": "bump", "by": 2}) == 2
    assert await handler.run({"method": "bump", "by": 3}) == 5
    unnamed = await handler.run({"by": 1})
    assert unnamed["error"] == (
        'ArgumentError: Counter: say which method with "method" in the input '
        "(one of: bump, reset)"
    )
    unknown = await handler.run({"method": "nope"})
    assert unknown["error"] == (
        "ArgumentError: Counter has no method 'nope' (it has: bump, reset)"
    )


def test_missing_manifest_or_resource_is_a_manifest_error(built: Path) -> None:
    with pytest.raises(
        ManifestError,
        match=r"^resource 'gpu' is not in the manifest .* \(it has: api, cpu, multi, svc\): check FLASH_RESOURCE_NAME, or rebuild with `flash build`$",
    ):
        load_resource("gpu", build_dir=built)
    with pytest.raises(
        ManifestError,
        match=r"^no manifest at .*: run `flash build` first \(a deployed worker reads flash_manifest.json from its build folder",
    ):
        load_resource("cpu", build_dir=built / "nowhere")


# ---- (b) our worker in deployed mode ----------------------------------------------------


class Worker:
    """A worker process on an inherited 127.0.0.1 socket, stopped by PID."""

    def __init__(self, argv: list[str], cwd: Path, **extra: str) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        fd = self.sock.fileno()
        self.process = subprocess.Popen(
            [sys.executable, *argv, "--fd", str(fd)],
            cwd=cwd,
            env=env(FLASH_ENDPOINT_KEY=KEY.hex(), FLASH_WORKER_TOKEN=TOKEN, **extra),
            pass_fds=[fd],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        port = self.sock.getsockname()[1]
        self.client = httpx.Client(
            base_url=f"http://127.0.0.1:{port}",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=30,
        )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.output()
            try:
                if self.client.get("/ping").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(self.output())

    def output(self) -> str:
        if self.process.poll() is None:
            return ""
        assert self.process.stdout is not None
        return self.process.stdout.read().decode()

    def execute(self, request: dict[str, Any]) -> dict[str, Any]:
        reply = self.client.post(
            "/execute", json={"jobs": [{"id": "j1", "request": request}]}
        )
        assert reply.status_code == 200, reply.text
        line: dict[str, Any] = json.loads(reply.text.splitlines()[0])
        return line

    def stop(self) -> None:
        self.client.close()
        self.sock.close()
        if self.process.poll() is None:
            self.process.terminate()
            if wait_gone([self.process.pid], 10):
                kill_all([self.process.pid])
        self.process.wait(10)
        if self.process.stdout is not None:
            self.process.stdout.close()
        assert self.process.pid not in descendants(os.getpid())


def test_generated_handler_under_our_worker(built: Path) -> None:
    worker = Worker(["handler_cpu.py"], built)
    try:
        worker.wait_ready()
        reply = worker.client.post("/runsync", json={"input": {"a": 2, "b": 3}})
        assert reply.status_code == 200
        body = reply.json()
        assert body["status"] == "COMPLETED"
        assert body["output"] == 5
        failed = worker.client.post("/runsync", json={"input": {"a": 2}}).json()
        assert failed["status"] == "FAILED"
        assert failed["error"].startswith(
            "ArgumentError: add(): missing a required argument: 'b'"
        )
        answer = worker.execute(signed(function_name="add", args=[2, 3]))
        assert answer["response"]["success"] is True
        assert answer["response"]["json_result"] == 5
        code = signed(function_name="add", function_code="def add(a, b): return 0")
        refused = worker.execute(code)
        assert refused["refused"].startswith(
            "ManifestError: refusing function_code for 'add': a deployed worker of "
            "resource 'cpu' runs only the functions built into it"
        )
        assert "response" not in refused
    finally:
        worker.stop()


def test_worker_deployed_mode_keeps_same_named_functions_apart(built: Path) -> None:
    worker = Worker(
        ["-m", "flash_actors.worker"],
        built,
        FLASH_RESOURCE_NAME="multi",
        FLASH_MANIFEST_PATH=str(built / "flash_manifest.json"),
    )
    try:
        worker.wait_ready()
        for module in ("dpl_a", "dpl_b"):
            answer = worker.execute(signed(function_name=f"{module}:process", args=[1]))
            assert answer["response"]["json_result"] == f"{module[-1]}:1"
            reply = worker.client.post(
                "/runsync",
                json={"input": {"function_name": f"{module}:process", "x": 2}},
            )
            assert reply.json()["output"] == f"{module[-1]}:2"
        unknown = worker.client.post(
            "/runsync", json={"input": {"function_name": "nope", "x": 2}}
        ).json()
        assert unknown["status"] == "FAILED"
        assert unknown["error"].startswith("ManifestError: unknown function 'nope'")
    finally:
        worker.stop()


def test_worker_deployed_mode_without_manifest_fails_to_start(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "flash_actors.worker", "--port", "0"],
        cwd=tmp_path,
        env=env(
            FLASH_ENDPOINT_KEY=KEY.hex(),
            FLASH_WORKER_TOKEN=TOKEN,
            FLASH_RESOURCE_NAME="cpu",
        ),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert done.stderr.startswith(
        f"ManifestError: no manifest at {tmp_path / 'flash_manifest.json'}: run "
        "`flash build` first"
    ), done.stderr


# ---- the load balancer's app ------------------------------------------------------------


def test_load_balancer_handler_serves_its_routes_and_no_code(built: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "handler_api.py", "--port", str(port)],
        cwd=built,
        env=env(FLASH_ENDPOINT_KEY=KEY.hex()),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            deadline = time.monotonic() + 30
            ping: httpx.Response | None = None
            while ping is None:
                assert process.poll() is None
                try:
                    ping = client.get("/ping")
                except httpx.TransportError:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
            assert ping.json() == {"status": "healthy"}
            assert client.post("/double", json={"x": 21}).json() == 42
            bad = client.post("/double", json={"y": 1})
            assert bad.status_code == 422
            code = signed(function_name="double", function_code="def double(x): 0")
            refused = client.post("/execute", json=code).json()
            assert refused["error"].startswith("ManifestError: refusing function_code")
            answer = client.post(
                "/execute", json=signed(function_name="double", args=[4])
            ).json()
            assert answer == {"success": True, "json_result": 8}
            plain = client.post("/execute", json={"x": 1})
            assert plain.status_code == 400
    finally:
        process.terminate()
        if wait_gone([process.pid], 10):
            kill_all([process.pid])
        process.wait(10)
    assert process.pid not in descendants(os.getpid())
