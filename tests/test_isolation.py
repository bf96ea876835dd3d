"""Poison pills (issue 9, items 3, 5 and 6): one endpoint's failure stays with that endpoint.

Bad endpoint names are refused before anything is named after them; a worker that cannot
start fails its own endpoint's jobs with the cause after a backoff, and the endpoint recovers
when the cause goes away; SIGKILLed workers and fork templates come back and the calls in
flight are retried. Real processes, real signals, real files: nothing here is mocked.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from flash_actors import (
    CpuLiveServerless,
    JobStatus,
    LiveLoadBalancer,
    RetryPolicy,
    remote,
    runtime,
)
from flash_actors.errors import ConfigurationError
from flash_actors.providers.local import LocalProvider
from flash_actors.providers.local.daemon.catalog import config_of
from flash_actors.providers.local.daemon.record import pid_alive
from flash_actors.providers.local.daemon_client import GatewayProvider
from flash_actors.resources import ENDPOINT_NAME_MAX
from flash_actors.serialization import master_secret
from tests._daemon import (
    ECHO,
    Daemon,
    descendants,
    kill_all,
    run_job,
    wait_for,
    wait_gone,
)

MISSING = (
    "isolation_deployed_module"  # created by the recovery tests, in their own folder
)

BROKEN = CpuLiveServerless(
    name="iso-broken",
    env={"FLASH_DEPLOYED_MODULES": MISSING},
    retryPolicy=RetryPolicy(attempts=2, backoff_s=0.05),
)
HEALTHY = CpuLiveServerless(name="iso-healthy")
KILLED = CpuLiveServerless(
    name="iso-killed", workersMax=4, retryPolicy=RetryPolicy(attempts=3, backoff_s=0.1)
)


@remote(BROKEN)
async def on_broken(x: int) -> int:
    return x


@remote(HEALTHY)
async def on_healthy(x: int) -> int:
    return x + 1


@remote(KILLED)
async def slow_double(x: int) -> int:
    import asyncio

    await asyncio.sleep(0.5)
    return 2 * x


def worker_processes(root: int) -> list[int]:
    """Worker processes (fork template included) below ``root``, from /proc."""
    found = []
    for pid in descendants(root):
        with contextlib.suppress(OSError):
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"flash_actors.worker" in command:
                found.append(pid)
    return found


def template_of(root: int) -> list[int]:
    found = []
    for pid in worker_processes(root):
        with contextlib.suppress(OSError):
            if (
                b"flash_actors.worker.template"
                in Path(f"/proc/{pid}/cmdline").read_bytes()
            ):
                found.append(pid)
    return found


def parent_of(pid: int) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[1])
    return None


# -- names ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "pattern"),
    [
        ("x" * 300, r"is 300 characters long; the limit is 183"),
        ("gateway.log", r"may hold only letters, digits, '-' and '_'"),
        ("../up", r"may hold only letters, digits, '-' and '_'"),
        ("x" * (ENDPOINT_NAME_MAX + 1), r"is 184 characters long"),
    ],
)
def test_bad_endpoint_names_are_refused_when_the_config_is_made(
    name: str, pattern: str
) -> None:
    for cls in (CpuLiveServerless, LiveLoadBalancer):
        with pytest.raises(
            ConfigurationError, match=rf"^{cls.__name__}\(name=.*{pattern}"
        ):
            cls(name=name)
    with pytest.raises(ConfigurationError, match=pattern):

        @remote(CpuLiveServerless(name=name))
        async def never(x: int) -> int:  # pragma: no cover - never defined
            return x


def test_the_longest_allowed_name_works_as_a_folder_name(tmp_path: Path) -> None:
    longest = CpuLiveServerless(name="n" * ENDPOINT_NAME_MAX)
    folder = tmp_path / "logs" / longest.name
    folder.mkdir(parents=True)
    (folder / f"{longest.name}-abcdef.routes.json").write_text("[]")  # no ENAMETOOLONG


def test_bad_names_are_refused_on_the_http_api(tmp_path: Path) -> None:
    d = Daemon(tmp_path / ".flash", f"echo={ECHO}:1")
    try:
        with d.client() as client:
            for name in ("x" * 300, "gateway.log"):
                config = {"class": "CpuLiveServerless", "resource": {"name": name}}
                answer = client.put(f"/flash/v1/endpoints/{name}", json=config)
                assert answer.status_code == 400, answer.text
                assert "the endpoint name" in answer.json()["error"]
                answer = client.post(f"/v2/{name}/run", json={"input": {}})
                assert answer.status_code == 400, answer.text
                assert "the endpoint name" in answer.json()["error"]
            unknown = client.post("/v2/no-such-endpoint/run", json={"input": {}})
            assert unknown.status_code == 404
            assert pid_alive(d.pid)
            assert client.get("/v2/echo/health").status_code == 200  # still serving
        assert (
            d.state_dir / "logs" / "gateway.log"
        ).is_file()  # still the daemon's own
    finally:
        d.stop()


# -- workers that cannot start: the embedded provider --------------------------------------


async def call_until_completed(seconds: float) -> Any:
    """Call ``on_broken`` until it completes (it recovers after a backoff)."""
    with anyio.fail_after(seconds):
        while True:
            job = await on_broken(7)
            if job.status == JobStatus.COMPLETED:
                return job.output
            await anyio.sleep(0.1)


@pytest.mark.timeout(90)
async def test_an_endpoint_whose_workers_cannot_start_fails_alone_and_recovers(
    tmp_path: Path,
) -> None:
    provider = LocalProvider(state_dir=tmp_path / ".flash", start_backoff_max_s=1.0)
    async with runtime(provider=provider):
        assert (await on_healthy(1)).output == 2
        failed = await on_broken(1)
        assert failed.status == JobStatus.FAILED
        assert failed.error is not None
        assert failed.error.startswith("endpoint 'iso-broken' cannot start its workers")
        assert "exited before it answered" in failed.error
        assert str(tmp_path / ".flash" / "logs" / "iso-broken") in failed.error
        # the runtime, the Router and the other endpoint are untouched
        assert (await on_healthy(2)).output == 3
        pool = provider.pools["iso-broken"]
        assert pool.start_failures >= 3
        # one log file for the whole chain of failed starts
        assert (
            len(list((tmp_path / ".flash" / "logs" / "iso-broken").glob("*.log"))) == 1
        )
        (tmp_path / f"{MISSING}.py").write_text("VALUE = 1\n")  # the cause goes away
        assert await call_until_completed(30) == 7
        assert pool.start_failures == 0
        assert (await on_healthy(3)).output == 4


# -- SIGKILL of the fork template and the workers ----------------------------------------


@pytest.mark.timeout(90)
async def test_sigkill_of_template_and_workers_loses_no_call(tmp_path: Path) -> None:
    provider = LocalProvider(state_dir=tmp_path / ".flash")
    results: dict[int, Any] = {}
    async with runtime(provider=provider):
        assert (await slow_double(0)).output == 0  # the template and one worker run

        async def one(i: int) -> None:
            results[i] = await slow_double(i)

        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(one, i)
            pool = provider.pools["iso-killed"]
            with anyio.fail_after(30):
                while pool.statistics()["busy_slots"] < 1:
                    await anyio.sleep(0.01)
            victims = worker_processes(os.getpid())
            assert template_of(os.getpid()), victims
            kill_all(victims)
        assert sorted(results) == list(range(20))
        for i, job in results.items():
            assert job.status == JobStatus.COMPLETED, job.error
            assert job.output == 2 * i
        assert (await slow_double(21)).output == 42  # and the next call works
        assert wait_gone(victims, 5) == []
        fresh = template_of(os.getpid())
        assert fresh, "the template came back"
        assert not set(fresh) & set(victims)
    assert wait_gone(worker_processes(os.getpid()), 10) == []


WARM = CpuLiveServerless(name="iso-warm", workersMin=3, workersMax=3)


@remote(WARM)
async def warm_double(x: int) -> int:
    return 2 * x


@pytest.mark.timeout(90)
async def test_workers_that_die_with_their_template_are_not_failed_starts(
    tmp_path: Path,
) -> None:
    # Idle workers that die right after they answered count as failed starts (a module
    # that ends the process); workers that die because their template was killed do not:
    # killing the template four times over never blocks the endpoint.
    provider = LocalProvider(state_dir=tmp_path / ".flash", start_backoff_max_s=5.0)
    async with runtime(provider=provider):
        assert (await warm_double(1)).output == 2
        pool = provider.pools["iso-warm"]
        for _ in range(4):
            with anyio.fail_after(30):
                while sum(w.ready for w in pool.workers.values()) < 3:
                    await anyio.sleep(0.01)
            templates = [  # its forks share its command line; it is our child
                pid for pid in template_of(os.getpid()) if parent_of(pid) == os.getpid()
            ]
            assert len(templates) == 1, templates
            doomed = set(pool.workers)
            kill_all(templates)
            assert wait_gone(templates, 5) == []
            with anyio.fail_after(30):  # its forks died with it, and the pool saw it
                while doomed & set(pool.workers):
                    await anyio.sleep(0.01)
        assert pool.start_failures == 0, pool.start_error
        with anyio.fail_after(30):
            assert (await warm_double(21)).output == 42


# -- the daemon ----------------------------------------------------------------------------


PILL = CpuLiveServerless(
    name="iso-pill",
    env={"FLASH_DEPLOYED_MODULES": MISSING},
    retryPolicy=RetryPolicy(attempts=1),
)


@remote(PILL)
async def on_pill(x: int) -> int:
    return x


@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.parametrize("anyio_backend", [pytest.param(("asyncio", {}), id="asyncio")])
async def test_the_daemon_outlives_an_endpoint_whose_workers_exit_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLASH_LOCAL_START_BACKOFF_MAX_S", "1")
    monkeypatch.setenv(
        "FLASH_SECRET", master_secret().hex()
    )  # this process calls it too
    # The poison (FLASH_DEPLOYED_MODULES in the config's env) may only be registered by
    # the daemon's owner: this test starts the daemon with an owner token, as the embedded
    # runtime does for its private gateway.
    monkeypatch.setenv("FLASH_LOCAL_OWNER_TOKEN", "iso-owner")
    d = Daemon(tmp_path / ".flash")
    try:
        request = {"function_name": "f", "function_code": "def f():\n    return 1\n"}
        with d.client() as client:
            answer = client.put(
                "/flash/v1/endpoints/iso-pill?owner=iso-owner", json=config_of(PILL)
            )
            assert answer.status_code == 200, answer.text
            pending = run_job(client, "iso-pill", request)
        # SIGKILL while the job waits for a worker that cannot start (then `down` with one
        # queued): at each `up` after, a job is back in the queue; it fails, the daemon lives
        os.kill(d.pid, signal.SIGKILL)
        assert wait_gone([d.pid]) == []
        for _ in range(2):
            d.up()
            with d.client() as client:
                body = wait_for(client, "iso-pill", pending, {"FAILED", "COMPLETED"})
                assert body["status"] == "FAILED", body
                assert "endpoint 'iso-pill' cannot start its workers" in body["error"]
                assert "exited before it answered" in body["error"]
                assert pid_alive(d.pid)
                pending = run_job(client, "iso-pill", request)
            d.down()
        d.up()
        assert d.record is not None
        async with runtime(provider=GatewayProvider(d.record)):
            failed = await on_pill(1)
            assert failed.status == JobStatus.FAILED
            assert failed.error is not None
            assert "cannot start its workers" in failed.error
            # another endpoint of the same daemon works meanwhile
            assert (await on_healthy(1)).output == 2
            (tmp_path / f"{MISSING}.py").write_text(
                "VALUE = 1\n"
            )  # the cause goes away
            with anyio.fail_after(40):
                while (result := await on_pill(5)).status != JobStatus.COMPLETED:
                    await anyio.sleep(0.2)
            assert result.output == 5
        assert pid_alive(d.pid)
    finally:
        d.stop()


CRASH = "raise RuntimeError('the handler breaks at import')\n"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_crashing_handler_backs_off_and_fails_its_jobs_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLASH_LOCAL_START_BACKOFF_MAX_S", "2")
    handler = tmp_path / "crash_handler.py"
    handler.write_text(CRASH)
    d = Daemon(tmp_path / ".flash", f"crash={handler}:1", f"echo={ECHO}:1")
    try:
        with d.client() as client:
            job = run_job(client, "crash", {"x": 1})
            body = wait_for(client, "crash", job, {"FAILED", "COMPLETED"})
            assert body["status"] == "FAILED", body
            assert body["error"].startswith(
                "endpoint 'crash' cannot start its handler workers"
            )
            assert "exited with code" in body["error"]
            assert "the handler breaks at import" in body["error"]
            began = time.monotonic()
            time.sleep(3)
            logs = list((d.state_dir / "logs" / "crash").glob("*.log"))
            assert len(logs) == 1, logs  # one log file for the whole chain
            starts = logs[0].read_text().count("RuntimeError: the handler breaks")
            # spaced out: 0.5, 1, 2, 2 ... s apart (today: about 3 a second, 10+ files)
            assert starts <= 3 + (time.monotonic() - began) / 2 + 1, starts
            echo = run_job(client, "echo", {"x": 1})
            assert (
                wait_for(client, "echo", echo, {"COMPLETED"})["status"] == "COMPLETED"
            )
            handler.write_text(ECHO.read_text())  # the cause goes away
            deadline = time.monotonic() + 30
            while True:
                job = run_job(client, "crash", {"x": 3})
                body = wait_for(client, "crash", job, {"FAILED", "COMPLETED"})
                if body["status"] == "COMPLETED" or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert body["status"] == "COMPLETED", body
    finally:
        d.stop()


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("anyio_backend", [pytest.param(("asyncio", {}), id="asyncio")])
async def test_sigkill_of_the_daemons_template_and_workers_loses_no_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "FLASH_SECRET", master_secret().hex()
    )  # this process calls it too
    d = Daemon(tmp_path / ".flash")
    try:
        assert d.record is not None
        results: dict[int, Any] = {}
        async with runtime(provider=GatewayProvider(d.record)):
            first = await slow_double(0)
            assert first.output == 0, first.error

            async def one(i: int) -> None:
                results[i] = await slow_double(i)

            async with anyio.create_task_group() as tg:
                for i in range(20):
                    tg.start_soon(one, i)
                headers = {"Authorization": f"Bearer {d.record.api_key}"}
                async with httpx.AsyncClient(
                    base_url=d.record.url, headers=headers
                ) as http:
                    with anyio.fail_after(30):
                        while True:
                            health = await http.get("/v2/iso-killed/health")
                            if health.json()["jobs"]["inProgress"]:
                                break
                            await anyio.sleep(0.02)
                victims = worker_processes(d.pid)
                assert template_of(d.pid), victims
                kill_all(victims)
            for i in range(20):
                assert results[i].status == JobStatus.COMPLETED, results[i].error
                assert results[i].output == 2 * i
            assert (await slow_double(21)).output == 42
        assert pid_alive(d.pid)
        assert template_of(d.pid)
    finally:
        d.stop()


if sys.platform != "linux":  # pragma: no cover
    pytestmark = pytest.mark.skip("the fault tests read /proc")
