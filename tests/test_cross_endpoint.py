"""Remote functions that await other remote functions (issue 11, items 5 and 6).

On the local provider the worker's nested call comes back to the runtime through the loopback
channel (`flash_actors.providers.local.nested`); on ``flash local`` it goes to the daemon's
data plane. Real worker processes and sockets throughout.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import msgspec
import pytest

from flash_actors import (
    CpuLiveLoadBalancer,
    CpuLiveServerless,
    JobStatus,
    remote,
    runtime,
)
from flash_actors._scoping import ScopeWarning
from flash_actors.build.manifest import write_manifest
from flash_actors.errors import (
    CallCycleError,
    DeliveryError,
    ManifestError,
    PayloadSignatureError,
)
from flash_actors.providers.local import LocalProvider
from flash_actors.providers.local.nested import call_owner
from flash_actors.registry import Registry
from flash_actors.serialization import RequestSigner, endpoint_key
from flash_actors.worker.executor import Executor

INNER = CpuLiveServerless(name="xe-inner", workersMax=1)
OUTER = CpuLiveServerless(name="xe-outer", workersMax=1)


@remote(INNER)
async def inner(x: int) -> int:
    return x * 10


@remote(INNER)
async def inner_fails(x: int) -> int:
    raise ValueError(f"bad {x}")


@remote(INNER)
async def inner_slow(folder: str) -> str:
    import asyncio
    import pathlib

    (pathlib.Path(folder) / "started").write_text("")
    try:
        await asyncio.sleep(60)
    except BaseException:
        (pathlib.Path(folder) / "cancelled").write_text("")
        raise
    return "finished"


API = CpuLiveLoadBalancer(name="xe-api")


@remote(API, method="POST", path="/double")
async def double(x: int) -> int:
    return 2 * x


@remote(OUTER)
async def outer_api(x: int) -> int:
    return await double(x) + 1  # a load balancer answers with the value


@remote(OUTER)
async def outer(x: int) -> int:
    job = await inner(x)
    value: int = job.result()
    return value + 1


@remote(OUTER)
async def outer_catches(x: int) -> str:
    try:
        (await inner_fails(x)).result()
    except ValueError as exc:  # the inner error, typed as the remote exception
        return "caught ValueError: " + str(exc).partition("\n")[0]
    return "no error"


@remote(OUTER)
async def outer_waits(folder: str) -> str:
    job = await inner_slow(folder)
    return str(job.output)


def local(tmp_path: Path) -> LocalProvider:
    return LocalProvider(state_dir=tmp_path / ".flash")


def pids_of(provider: LocalProvider) -> list[int]:
    return [w.pid for pool in provider.pools.values() for w in pool.workers.values()]


def alive(pids: list[int]) -> list[int]:
    left = []
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        left.append(pid)
    return left


async def test_outer_calls_inner_on_another_endpoint(tmp_path: Path) -> None:
    provider = local(tmp_path)
    async with runtime(provider=provider):
        job = await outer(4)
        via_api = await outer_api(4)
        pids = pids_of(provider)
    assert job.error == ""
    assert job.output == 41
    assert via_api.output == 9
    assert sorted(provider.pools) == ["xe-api", "xe-inner", "xe-outer"]
    assert alive(pids) == []


def test_functions_that_call_none_send_their_code_unchanged() -> None:
    """No stub, and no first-call step: the call path is the one it always was."""
    assert "_call" not in vars(inner)
    assert inner.function_request_template.function_code == inner._code
    assert "flash_actors.worker.nested" not in (
        inner.function_request_template.function_code or ""
    )
    outer.bind_calls()
    assert "_call" not in vars(outer)  # bound at its first call (or here), once


async def test_outer_calls_inner_on_a_flash_local_daemon(tmp_path: Path) -> None:
    from flash_actors.providers.local.daemon_client import GatewayProvider
    from tests._daemon import Daemon

    d = Daemon(tmp_path / ".flash")
    try:
        assert d.record is not None
        async with runtime(provider=GatewayProvider(d.record)):
            job = await outer(5)
            caught = await outer_catches(2)
        assert job.error == ""
        assert job.output == 51
        assert caught.output == "caught ValueError: bad 2"
    finally:
        d.stop()


async def test_inner_error_reaches_outer_typed(tmp_path: Path) -> None:
    async with runtime(provider=local(tmp_path)):
        job = await outer_catches(3)
    assert job.output == "caught ValueError: bad 3"


# -- the same endpoint: in the worker's own process -----------------------------------------

SELF = CpuLiveServerless(name="xe-self", workersMax=1)


@remote(SELF)
async def leaf(x: int) -> int:
    import os

    return os.getpid() + 0 * x


@remote(SELF)
async def trunk(x: int) -> list[int]:
    import os

    job = await leaf(x)
    return [os.getpid(), job.result()]


@remote(SELF)
async def countdown(n: int) -> int:
    if n == 0:
        return 0
    job = await countdown(n - 1)  # itself: a JobOutput, as from the caller's process
    value: int = job.result()
    return value + 1


async def test_same_endpoint_calls_run_in_the_worker_with_one_worker(
    tmp_path: Path,
) -> None:
    provider = local(tmp_path)
    async with runtime(provider=provider):
        with anyio.fail_after(30):
            job = await trunk(1)
            counted = await countdown(3)
        assert len(provider.pools["xe-self"].workers) == 1
    here, there = job.output
    assert here == there  # the inner call ran in the same process
    assert counted.output == 3


# -- cycles ---------------------------------------------------------------------------------

CYC_A = CpuLiveServerless(name="xe-cyc-a", workersMax=1)
CYC_B = CpuLiveServerless(name="xe-cyc-b", workersMax=1)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", ScopeWarning)  # ping_b is defined below ping_a

    @remote(CYC_A)
    async def ping_a(n: int) -> str:
        if n == 0:
            return "a-done"
        job = await ping_b(n - 1)
        return f"a<{job.result()}>"

    @remote(CYC_B)
    async def ping_b(n: int) -> str:
        if n == 0:
            return "b-done"
        job = await ping_a(n - 1)
        return f"b<{job.result()}>"


async def test_a_b_a_cycle_fails_clearly_and_workers_stay_usable(
    tmp_path: Path,
) -> None:
    async with runtime(provider=local(tmp_path)):
        with anyio.fail_after(30):
            assert (await ping_a(1)).output == "a<b-done>"  # no cycle: fine
            job = await ping_a(2)  # a -> b -> a, one worker each
            assert job.status is JobStatus.FAILED
            assert isinstance(job.exception, CallCycleError)
            assert "call cycle xe-cyc-a -> xe-cyc-b -> xe-cyc-a:" in job.error
            assert (await ping_a(0)).output == "a-done"
            assert (await ping_b(1)).output == "b<a-done>"


# -- cancellation ---------------------------------------------------------------------------


async def test_cancelling_the_outer_call_cancels_the_inner_job(tmp_path: Path) -> None:
    folder = tmp_path / "marks"
    folder.mkdir()
    async with runtime(provider=local(tmp_path)):
        with anyio.move_on_after(30) as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(outer_waits, str(folder))
                while not (folder / "started").exists():
                    await anyio.sleep(0.02)
                tg.cancel_scope.cancel()
        assert not scope.cancelled_caught
        with anyio.fail_after(15):
            while not (folder / "cancelled").exists():
                await anyio.sleep(0.02)


# -- signatures and the channel's token -----------------------------------------------------


def test_a_tampered_stub_is_refused() -> None:
    key = endpoint_key(OUTER.name)
    template = outer.function_request_template
    code = template.function_code or ""
    assert '"endpoint":"xe-inner"' in code  # the stub is part of the signed code
    request = RequestSigner(key, template).sign((1,), {})
    tampered = msgspec.structs.replace(
        request, function_code=code.replace('"xe-inner"', '"xe-other"')
    )

    async def run() -> None:
        with pytest.raises(PayloadSignatureError):
            await Executor(key).execute(tampered)

    anyio.run(run)


async def test_the_channel_refuses_an_unknown_token(tmp_path: Path) -> None:
    provider = local(tmp_path)
    async with runtime(provider=provider):
        assert (await outer(1)).output == 11  # the channel is listening now
        assert provider._nested is not None
        address = provider._nested._address
        assert address is not None
        with pytest.raises(DeliveryError, match=r"^the process that owns this worker"):
            await call_owner((address, "0" * 32), inner.key, INNER.name, (1,), {}, [])


# -- the scope check ------------------------------------------------------------------------


def load_module(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_scope_check_does_not_warn_about_remote_functions(tmp_path: Path) -> None:
    source = tmp_path / "xe_scope_mod.py"
    source.write_text(
        textwrap.dedent(
            """
            import json

            from flash_actors import CpuLiveServerless, remote

            R = CpuLiveServerless(name="xe-scope")


            @remote(R)
            async def helper(x):
                return x


            @remote(R)
            async def user(x):
                return json.dumps((await helper(x)).output)
            """
        )
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = load_module(source, "xe_scope_mod")
    messages = [str(w.message) for w in caught if w.category is ScopeWarning]
    assert len(messages) == 1
    assert messages[0].startswith("@remote function 'user' uses 'json'")
    assert module.user.key == "xe_scope_mod:user"


# -- deployed code and the manifest-backed Registry -----------------------------------------


def write_app(root: Path) -> None:
    (root / "xe_one.py").write_text(
        textwrap.dedent(
            """
            from flash_actors import CpuLiveServerless, remote

            ONE = CpuLiveServerless(name="xe-one")


            @remote(ONE)
            async def process(x):
                import os

                return [x, os.getpid()]
            """
        )
    )
    (root / "xe_two.py").write_text(
        textwrap.dedent(
            """
            from flash_actors import CpuLiveServerless, remote

            TWO = CpuLiveServerless(name="xe-two")


            @remote(TWO)
            async def process(x):
                return x * 2
            """
        )
    )


def test_registry_keys_functions_by_module_and_qualname(tmp_path: Path) -> None:
    write_app(tmp_path)
    registry = Registry()
    registry.load(write_manifest(tmp_path))
    assert registry.endpoint_of("xe_one:process") == "xe-one"
    assert registry.endpoint_of("xe_two:process") == "xe-two"
    with pytest.raises(ManifestError, match=r"^function name 'process' is ambiguous"):
        registry.endpoint_of("process")
    with pytest.raises(ManifestError, match=r"^function 'xe_one:nothing' is not in"):
        registry.endpoint_of("xe_one:nothing")


DEPLOYED = """
import asyncio, json, os, sys

sys.path.insert(0, sys.argv[1])
from flash_actors import runtime
from flash_actors.errors import ManifestError
from flash_actors.registry import Registry
from flash_actors.runtime import current_runtime
import xe_one, xe_two


async def main():
    here = await xe_one.process(3)  # this resource's own function: in this process
    out = {"here": here.output, "pid": os.getpid(), "runtime": current_runtime() is not None}
    registry = Registry()
    async with runtime(provider="inprocess", registry=registry):
        try:
            await xe_two.process(1)
        except ManifestError as exc:
            out["missing"] = str(exc)
        registry.load(sys.argv[2])
        out["there"] = (await xe_two.process(4)).output
    print(json.dumps(out))


asyncio.run(main())
"""


def test_deployed_worker_runs_its_own_functions_here_and_routes_the_others(
    tmp_path: Path,
) -> None:
    app = tmp_path / "app"
    app.mkdir()
    write_app(app)
    manifest = tmp_path / "manifest.json"
    write_manifest(app, manifest)
    script = tmp_path / "deployed.py"
    script.write_text(DEPLOYED)
    env = {**os.environ, "FLASH_RESOURCE_NAME": "xe-one", "FLASH_LOCAL": "0"}
    done = subprocess.run(
        [sys.executable, str(script), str(app), str(manifest)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out: dict[str, Any] = json.loads(done.stdout)
    assert out["here"] == [3, out["pid"]]
    assert out["runtime"] is False  # no runtime, no worker: it ran in the process
    assert re.match(
        r"no manifest at /\S+/flash_manifest\.json: run `flash build` first$",
        out["missing"],
    ), out["missing"]
    assert out["there"] == 8


async def test_outer_calls_inner_on_the_in_process_provider() -> None:
    async with runtime(provider="inprocess"):
        job = await outer(2)
        counted = await countdown(2)
    assert job.output == 21
    assert counted.output == 2
