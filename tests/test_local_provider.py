"""The local provider: real worker processes, real HTTP on 127.0.0.1, real faults."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import anyio
import httpx
import msgspec
import pytest

from flash_actors import (
    CpuLiveLoadBalancer,
    CpuLiveServerless,
    JobOutput,
    JobStatus,
    PodTemplate,
    RetryPolicy,
    remote,
    runtime,
)
from flash_actors.errors import ConfigurationError
from flash_actors.providers.local import LocalProvider
from flash_actors.serialization import endpoint_key


def pids_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        alive.append(pid)
    return alive


def worker_pids(provider: LocalProvider, endpoint: str) -> list[int]:
    return [w.pid for w in provider.pools[endpoint].workers.values()]


ENV = CpuLiveServerless(
    name="local-env",
    env={"FLASH_TEST_A": "from-env"},
    template=PodTemplate(env=[{"key": "FLASH_TEST_B", "value": "from-template"}]),
)


@remote(ENV)
async def read_env(names: list[str]) -> dict[str, str | None]:
    import os

    print("reading", len(names), "variables")
    return {name: os.environ.get(name) for name in names}


async def test_jobs_run_in_a_worker_process_with_env_and_stdout(tmp_path: Path) -> None:
    provider = LocalProvider(state_dir=tmp_path / ".flash")
    async with runtime(provider=provider):
        job = await read_env(["FLASH_TEST_A", "FLASH_TEST_B", "FLASH_SECRET"])
        pids = worker_pids(provider, "local-env")
    assert job.output == {
        "FLASH_TEST_A": "from-env",
        "FLASH_TEST_B": "from-template",
        "FLASH_SECRET": None,
    }
    assert job.stdout == "reading 3 variables\n"
    assert pids
    assert os.getpid() not in pids
    logs = list((tmp_path / ".flash" / "logs" / "local-env").glob("*.log"))
    assert len(logs) == 1
    assert pids_alive(pids) == []  # leaving the runtime stopped the worker


KILL = CpuLiveServerless(
    name="local-kill", workersMax=2, retryPolicy=RetryPolicy(attempts=3, backoff_s=0.01)
)


@remote(KILL)
async def first_attempt_dies(marker: str) -> int:
    import os
    import pathlib
    import signal

    path = pathlib.Path(marker)
    if not path.exists():
        path.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)  # the worker dies mid-job
    return os.getpid()


async def test_worker_killed_mid_job_loses_nothing(tmp_path: Path) -> None:
    provider = LocalProvider(state_dir=tmp_path / ".flash")
    marker = tmp_path / "killed"
    async with runtime(provider=provider):
        job = await first_attempt_dies(str(marker))
    assert job.status == JobStatus.COMPLETED
    killed_pid = int(marker.read_text())
    assert job.output != killed_pid  # retried on another (replacement) worker
    assert pids_alive([killed_pid, job.output]) == []


SLOW = CpuLiveServerless(name="local-slow")


@remote(SLOW)
async def sleep_then_mark(folder: str) -> None:
    import pathlib

    import anyio

    (pathlib.Path(folder) / "started").touch()
    try:
        await anyio.sleep(60)
    finally:
        (pathlib.Path(folder) / "stopped").touch()


async def test_cancelled_caller_stops_job_on_worker(tmp_path: Path) -> None:
    provider = LocalProvider(state_dir=tmp_path / ".flash")
    async with runtime(provider=provider):
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(sleep_then_mark, str(tmp_path))
                while not (tmp_path / "started").exists():
                    await anyio.sleep(0.01)
                tg.cancel_scope.cancel()
            while not (tmp_path / "stopped").exists():
                await anyio.sleep(0.01)
            pool = provider.pools["local-slow"]
            while pool.statistics()["busy_slots"]:  # the worker's answer frees the slot
                await anyio.sleep(0.01)


async def test_leaving_runtime_with_error_stops_every_worker(tmp_path: Path) -> None:
    provider = LocalProvider(state_dir=tmp_path / ".flash")
    pids: list[int] = []
    with pytest.raises(RuntimeError, match=r"^user code failed$"):
        async with runtime(provider=provider):
            await read_env([])
            pids = worker_pids(provider, "local-env")
            raise RuntimeError("user code failed")
    assert pids
    assert pids_alive(pids) == []


WARM = CpuLiveServerless(name="local-warm", workersMin=2, workersMax=3, idleTimeout=1)


@remote(WARM)
async def pid() -> int:
    import os

    return os.getpid()


async def test_workers_min_stay_warm_and_scale_up_on_queue_depth(
    tmp_path: Path,
) -> None:
    provider = LocalProvider(state_dir=tmp_path / ".flash", batch_size=1)
    async with runtime(provider=provider):
        await pid()
        pool = provider.pools["local-warm"]
        with anyio.fail_after(20):
            while pool.statistics()["ready"] < 2:
                await anyio.sleep(0.02)
        results: list[int] = []

        async def one() -> None:
            results.append((await pid()).output)

        async with anyio.create_task_group() as tg:
            for _ in range(30):
                tg.start_soon(one)
        assert len(results) == 30
        assert pool.started_total >= 3  # scaled past workersMin while jobs waited
        assert len(pool.workers) <= 3
        with anyio.fail_after(20):  # idle workers beyond workersMin are stopped
            while len(pool.workers) > 2:
                await anyio.sleep(0.05)


async def test_worker_refuses_missing_token_and_unsigned_payloads(
    tmp_path: Path,
) -> None:
    provider = LocalProvider(state_dir=tmp_path / ".flash")
    async with runtime(provider=provider):
        await read_env([])
        worker = next(iter(provider.pools["local-env"].workers.values()))
        template = read_env.function_request_template
        forged = msgspec.structs.replace(template, args=[], signature="v2:" + "00" * 32)
        body = msgspec.json.encode({"jobs": [{"id": "j1", "request": forged}]})
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{worker.port}"
        ) as client:
            no_token = await client.post("/execute", content=body)
            assert no_token.status_code == 401
            wrong = await client.post(
                "/execute", content=body, headers={"Authorization": "Bearer wrong"}
            )
            assert wrong.status_code == 401
            refused = await client.post(
                "/execute",
                content=body,
                headers={"Authorization": f"Bearer {worker.token}"},
            )
            assert refused.status_code == 200
            line = msgspec.json.decode(refused.content.splitlines()[0])
            assert line["id"] == "j1"
            assert "signature does not match" in line["refused"]
            ping = await client.get("/ping")
            assert ping.status_code == 200


API = CpuLiveLoadBalancer(name="local-api")


@remote(API, method="POST", path="/api/process")
async def process(x: int, y: int) -> dict[str, int]:
    return {"result": x + y}


@remote(API, method="GET", path="/api/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


async def test_load_balancer_calls_go_to_a_worker_and_return_the_dict(
    tmp_path: Path,
) -> None:
    provider = LocalProvider(state_dir=tmp_path / ".flash")
    async with runtime(provider=provider):
        assert await process(2, 3) == {"result": 5}
        assert await health() == {"status": "ok"}
        assert worker_pids(provider, "local-api")


async def test_endpoint_key_is_per_endpoint() -> None:
    assert endpoint_key("a") != endpoint_key("b")


def test_no_worker_outlives_a_killed_parent(tmp_path: Path) -> None:
    """A worker whose parent dies (SIGKILL: no cleanup ran) exits by itself."""
    import subprocess
    import sys

    script = tmp_path / "parent.py"
    script.write_text(
        "import asyncio, os, sys\n"
        "from flash_actors import CpuLiveServerless, remote\n"
        "cfg = CpuLiveServerless(name='orphan-check')\n"
        "@remote(cfg)\n"
        "async def pid():\n"
        "    import os\n"
        "    return os.getpid()\n"
        "async def main():\n"
        "    job = await pid()\n"
        "    print(job.output, flush=True)\n"
        "    os.kill(os.getpid(), 9)\n"
        "asyncio.run(main())\n"
    )
    proc = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL
    worker = int(proc.stdout.strip())
    deadline = 100
    while pids_alive([worker]) and deadline:
        import time

        time.sleep(0.1)
        deadline -= 1
    assert pids_alive([worker]) == []


STUCK = CpuLiveServerless(name="local-stuck", executionTimeoutMs=2000, ttlMs=1000)


@remote(STUCK)
def stuck(seconds: float) -> int:
    import os
    import time

    time.sleep(
        seconds
    )  # a sync function in a thread: only recycling the worker stops it
    return os.getpid()


async def test_execution_timeout_recycles_the_worker_and_ttl_expires_queued_jobs(
    tmp_path: Path,
) -> None:
    provider = LocalProvider(state_dir=tmp_path / ".flash", batch_size=1)
    async with runtime(provider=provider):
        await stuck(
            0
        )  # may expire: the ttl counts the first worker's cold start, as on RunPod
        pool = provider.pools["local-stuck"]
        with anyio.fail_after(20):
            while pool.statistics()["ready"] < 1:
                await anyio.sleep(0.02)
        first = await stuck(0)
        assert first.status == JobStatus.COMPLETED, first.error
        first_pid = first.output
        outcomes: dict[str, object] = {}

        async def run(label: str, seconds: float) -> None:
            outcomes[label] = await stuck(seconds)

        async with anyio.create_task_group() as tg:
            tg.start_soon(run, "slow", 30)
            await anyio.sleep(0.05)
            tg.start_soon(
                run, "queued", 0
            )  # waits behind "slow" (one slot) past its ttl
        slow, queued = outcomes["slow"], outcomes["queued"]
        assert isinstance(slow, JobOutput)
        assert isinstance(queued, JobOutput)
        assert slow.status == JobStatus.TIMED_OUT
        assert "ran longer than its execution timeout of 2 s" in slow.error
        assert queued.status == JobStatus.TIMED_OUT
        assert "expired after waiting 1 s in the queue" in queued.error
        assert pids_alive([first_pid]) == []  # the stuck worker was recycled
        assert (await stuck(0)).output != first_pid


DEPS = CpuLiveServerless(name="local-deps", workersMax=2)


@remote(DEPS, dependencies=["humanize"])
async def natural_size(n: int) -> str:
    import humanize  # not a dependency of flash-actors: installed for this function

    return str(humanize.naturalsize(n))


@remote(DEPS, dependencies=["flash-actors-no-such-package-zzz"])
async def needs_missing() -> None:
    return None


async def test_dependencies_are_installed_once_into_a_cached_venv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLASH_CACHE_DIR", str(tmp_path))  # environments in envs/
    with pytest.raises(ImportError):
        import humanize  # noqa: F401  (the test process itself does not have it)
    provider = LocalProvider(state_dir=tmp_path / ".flash")
    async with runtime(provider=provider):
        jobs = []

        async def one() -> None:
            jobs.append(await natural_size(3_000_000))

        async with (
            anyio.create_task_group() as tg
        ):  # concurrent first calls install once
            for _ in range(4):
                tg.start_soon(one)
        assert [job.output for job in jobs] == ["3.0 MB"] * 4
        envs = [p for p in (tmp_path / "envs").iterdir() if p.is_dir()]
        assert len(envs) == 1
        assert (envs[0] / ".complete").read_text() == "humanize\n"
        failed = await needs_missing()
    assert failed.status == JobStatus.FAILED
    assert (
        "could not install dependencies flash-actors-no-such-package-zzz"
        in failed.error
    )
    assert (
        len([p for p in (tmp_path / "envs").iterdir() if p.is_dir()]) == 1
    )  # nothing half-made


async def test_load_balancer_workers_serve_the_users_routes_over_http(
    tmp_path: Path,
) -> None:
    provider = LocalProvider(state_dir=tmp_path / ".flash")
    async with runtime(provider=provider):
        assert await health() == {"status": "ok"}  # starts the endpoint's worker
        worker = next(iter(provider.pools["local-api"].workers.values()))
        auth = {"Authorization": f"Bearer {worker.token}"}
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{worker.port}"
        ) as client:
            posted = await client.post(
                "/api/process", json={"x": 2, "y": 40}, headers=auth
            )
            assert posted.status_code == 200
            assert posted.json() == {"result": 42}
            got = await client.get("/api/health", headers=auth)
            assert got.json() == {"status": "ok"}
            bad = await client.post("/api/process", json={"x": 1}, headers=auth)
            assert bad.status_code == 422
            assert "missing 1 required positional argument: 'y'" in bad.json()["error"]
            assert (await client.get("/api/health")).status_code == 401


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_ctrl_c_stops_every_worker(tmp_path: Path, backend: str) -> None:
    """Ctrl-C (SIGINT) in the middle of a call: the script exits, no worker is left."""
    import subprocess
    import sys
    import time

    script = tmp_path / "interrupted.py"
    runner = "asyncio.run(main())" if backend == "asyncio" else "trio.run(main)"
    script.write_text(
        "import asyncio, faulthandler, signal, trio\n"
        "from flash_actors import CpuLiveServerless, remote\n"
        "faulthandler.register(signal.SIGUSR1, all_threads=True)\n"
        "cfg = CpuLiveServerless(name='ctrl-c', workersMax=2)\n"
        "@remote(cfg)\n"
        "async def pid():\n"
        "    import os\n"
        "    return os.getpid()\n"
        "@remote(cfg)\n"
        "async def forever():\n"
        "    import anyio\n"
        "    await anyio.sleep(600)\n"
        "async def main():\n"
        "    print((await pid()).output, flush=True)\n"
        "    await forever()\n"
        f"{runner}\n"
    )
    errors = tmp_path / "stderr.txt"
    with (
        errors.open("wb") as stderr,
        subprocess.Popen(
            [sys.executable, str(script)],
            stdout=subprocess.PIPE,
            stderr=stderr,
            cwd=tmp_path,
            # Ctrl-C as on a terminal: a test run started in the background of a shell
            # inherits SIGINT ignored, and Python then leaves it ignored in the script.
            preexec_fn=_default_sigint,
        ) as proc,
    ):
        try:
            assert proc.stdout is not None
            worker = int(proc.stdout.readline())
            time.sleep(0.3)  # the long call is on its way
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGUSR1)  # its stacks, for the report
                time.sleep(1)
                pytest.fail(f"Ctrl-C did not stop the script:\n{errors.read_text()}")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode != 0  # KeyboardInterrupt
    assert pids_alive([worker]) == []


async def test_worker_runs_deployed_code_by_name(tmp_path: Path) -> None:
    """A request without source runs the function of the code deployed on the worker."""
    from flash_actors.messages import FunctionRequest
    from flash_actors.serialization import RequestSigner, decode_result

    (tmp_path / "deployed_app.py").write_text(
        "from flash_actors import CpuLiveServerless, remote\n"
        "app = CpuLiveServerless(name='local-deployed-app')\n"
        "@remote(app)\n"
        "async def triple(x):\n"
        "    return 3 * x\n"
    )
    name = f"local-deployed-{tmp_path.name[-6:].strip('_')}"
    cfg = CpuLiveServerless(
        name=name,
        env={"FLASH_DEPLOYED_MODULES": "deployed_app", "PYTHONPATH": str(tmp_path)},
    )

    @remote(cfg)
    async def ping() -> str:
        return "pong"

    provider = LocalProvider(state_dir=tmp_path / ".flash")
    async with runtime(provider=provider):
        assert (await ping()).output == "pong"
        worker = next(iter(provider.pools[name].workers.values()))
        key = endpoint_key(name)
        request = RequestSigner(key, FunctionRequest(function_name="triple")).sign(
            (14,), {}
        )
        body = msgspec.json.encode({"jobs": [{"id": "d1", "request": request}]})
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{worker.port}"
        ) as client:
            answer = await client.post(
                "/execute",
                content=body,
                headers={"Authorization": f"Bearer {worker.token}"},
            )
        done = msgspec.json.decode(answer.content.splitlines()[0])
        response = done["response"]
        assert response["success"], response
        assert decode_result(response["result"], response["signature"], key) == 42


SYSDEPS = CpuLiveServerless(name="local-sysdeps")


@remote(SYSDEPS, system_dependencies=["flash-actors-no-such-deb-package"])
async def needs_system_package() -> None:
    return None


async def test_missing_system_dependency_fails_naming_the_package(
    tmp_path: Path,
) -> None:
    provider = LocalProvider(state_dir=tmp_path / ".flash")
    async with runtime(provider=provider):
        job = await needs_system_package()
    assert job.status == JobStatus.FAILED
    assert "flash-actors-no-such-deb-package" in job.error
    assert job.error.startswith(("system_dependencies", "apt-get could not install"))


QUEUED = CpuLiveServerless(name="local-queued-cancel")


@remote(QUEUED)
def block_until(path: str) -> str:
    import os
    import time

    while not os.path.exists(path):
        time.sleep(0.01)
    return "released"


async def test_cancelling_a_queued_job_removes_it_from_the_queue(
    tmp_path: Path,
) -> None:
    provider = LocalProvider(state_dir=tmp_path / ".flash", batch_size=1)
    release = tmp_path / "release"
    async with runtime(provider=provider):
        async with anyio.create_task_group() as tg:
            tg.start_soon(block_until, str(release))  # occupies the only slot
            pool = None
            with anyio.fail_after(20):
                while pool is None or pool.statistics()["busy_slots"] < 1:
                    await anyio.sleep(0.01)
                    pool = provider.pools.get("local-queued-cancel")
            with anyio.move_on_after(0.2):
                await block_until(str(release))  # waits in the queue, then is cancelled
            with anyio.fail_after(
                5
            ):  # it leaves the queue (the cancel reaches the pool)
                while pool.statistics()["queued"]:
                    await anyio.sleep(0.01)
            release.touch()
        assert (await block_until(str(release))).output == "released"


async def test_a_dead_worker_is_replaced_to_keep_workers_min(tmp_path: Path) -> None:
    provider = LocalProvider(state_dir=tmp_path / ".flash")
    async with runtime(provider=provider):
        first = (await pid()).output  # local-warm keeps workersMin=2
        pool = provider.pools["local-warm"]
        with anyio.fail_after(20):
            while pool.statistics()["ready"] < 2:
                await anyio.sleep(0.02)
        os.kill(first, signal.SIGKILL)
        with anyio.fail_after(20):
            while (
                first in worker_pids(provider, "local-warm")
                or pool.statistics()["ready"] < 2
            ):
                await anyio.sleep(0.02)
        assert pool.started_total >= 3
        assert first not in worker_pids(provider, "local-warm")


many = CpuLiveServerless(name="lp-many", workersMax=100_000)


@remote(resource_config=many)
async def one() -> int:
    return 1


async def test_an_endpoint_asking_for_huge_workers_gets_the_machines_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLASH_LOCAL_MAX_WORKERS", "3")
    provider = LocalProvider(state_dir=tmp_path / ".flash")
    async with runtime(provider=provider):
        job = await one()
        assert job.output == 1
        assert provider.pools["lp-many"].resource.workersMax == 3
    monkeypatch.setenv("FLASH_LOCAL_MAX_WORKERS", "0")
    with pytest.raises(ConfigurationError, match=r"^FLASH_LOCAL_MAX_WORKERS must be"):
        from flash_actors.providers.local.provider import max_workers

        max_workers()
