"""Deployed load balancers: the app process the daemon runs for each one, and its life.

A deployed endpoint whose resource is a load balancer (`Endpoint.serves_app`) has no queue
and no worker pool: its generated ``handler_<resource>.py`` serves the resource's HTTP app
(its routes, ``GET /ping``, ``POST /execute``; `flash_actors.deployed.app`), and the daemon
runs that app as one process, which `flash_actors.providers.local.daemon.lb_routes` proxies
requests to. `BalancerApp.run` owns the process:

- started under the launcher (``python -m flash_actors.providers.local.daemon.launch``, in a
  session and process group of its own, ended with the daemon even when the daemon is
  SIGKILLed) on a free loopback port, its output appended to
  ``<state>/logs/<endpoint>/app.log``;
- called ready once its ``GET /ping`` answers 200 (`START_TIMEOUT_S` at most: its first
  start imports the whole build);
- started again when it exits. A run counts as failed when the process exits (or does not
  answer) within `STABLE_S` of its start; failed runs in a row make the next start wait
  (0.5 s, doubled each time, at most ``FLASH_LOCAL_START_BACKOFF_MAX_S``, 30 s by default),
  so a crash loop never spins, and from `START_TRIES` of them on the endpoint reports
  that it cannot start (`BalancerApp.error`, shown by ``flash local status`` and answered
  by the proxy), until a process answers again;
- stopped by PID (the launcher, then its group) when the endpoint is removed or replaced,
  and when the daemon stops (`BalancerApp.stop`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import anyio

from flash_actors._logging import get_logger
from flash_actors._private import open_private, private_dir
from flash_actors.errors import DeliveryError
from flash_actors.providers.local._http import LoopbackTransport
from flash_actors.providers.local.daemon.workers import stop_launched
from flash_actors.providers.local.pool import default_start_backoff_max_s, log_tail
from flash_actors.providers.local.volumes import apply_volume
from flash_actors.serialization import master_secret

if TYPE_CHECKING:
    from pathlib import Path

    from anyio.abc import Process

    from flash_actors.providers.local.daemon.catalog import Endpoint

__all__ = ["STABLE_S", "START_TIMEOUT_S", "START_TRIES", "BalancerApp"]

log = get_logger(__name__)

START_TIMEOUT_S = 120.0
"""How long a started app may take to answer ``/ping`` before it counts as failed."""
START_TRIES = 3
"""Failed runs in a row from which the endpoint reports that its app cannot start."""
STABLE_S = 5.0
"""A process that served at least this long ends the streak of failed runs when it exits."""
START_BACKOFF_S = 0.5
PING_EVERY_S = 0.05


def _free_port() -> int:
    """A port free on 127.0.0.1 now (the app binds it itself; a lost race is a failed run)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _last_line(path: Path) -> str:
    lines = [line for line in (log_tail(path) or "").splitlines() if line.strip()]
    return f": {lines[-1].strip()}" if lines else ""


class BalancerApp:
    """The app process of one deployed load-balancer endpoint (see the module docstring).

    Args:
        endpoint: the endpoint (``serves_app``): its resource and handler file.
        log_dir: the endpoint's log folder (``<state>/logs/<endpoint>/``).
        daemon_url: where the app's calls to the other resources go (``FLASH_LOCAL_URL``).
        api_key: the daemon's key, for those calls (``FLASH_LOCAL_API_KEY``).

    Attributes:
        port: the loopback port of the process that answers now (0 while none does).
        pid: that process's id (the launcher's, the leader of its group), else None.
        error: why it cannot start, after `START_TRIES` failed runs in a row, else None.
    """

    def __init__(
        self, endpoint: Endpoint, *, log_dir: Path, daemon_url: str, api_key: str
    ) -> None:
        assert endpoint.entry is not None  # noqa: S101 (a deployed endpoint)
        self.name = endpoint.name
        self.resource = endpoint.resource
        self.entry = endpoint.entry
        self.log_dir = log_dir
        self.log_path = log_dir / "app.log"
        self.daemon_url = daemon_url
        self.api_key = api_key
        self.port = 0
        self.pid: int | None = None
        self.error: str | None = None
        self.failures = 0
        self.starting = False
        self._process: Process | None = None
        self._scope = anyio.CancelScope()
        self._exited: anyio.Event | None = None
        self._stopped = False

    @property
    def ready(self) -> bool:
        """A process answers on `port`."""
        return self.port != 0

    def status(self) -> str:
        """Why a request cannot be proxied now (starting, or failing to start)."""
        if self.error is not None:
            return f"endpoint {self.name!r} cannot start its app: {self.error}"
        if self._stopped:
            return f"endpoint {self.name!r} is stopping"
        return (
            f"endpoint {self.name!r} is starting its app (log: {self.log_path}); retry "
            "shortly"
        )

    def env(self, port: int) -> dict[str, str]:
        """The app's environment: the daemon's, the resource's, where to listen and call."""
        env = dict(os.environ)
        env.update(self.resource.worker_env())
        for name in ("PYTHONPATH", "PYTHONSAFEPATH", "FLASH_WORKER_TOKEN"):
            env.pop(name, None)  # the build's packages; its HTTP app, not our worker
        env.update(
            FLASH_HOST="127.0.0.1",
            PORT=str(port),
            FLASH_SECRET=master_secret().hex(),  # signs its calls to the app's others
            FLASH_LOCAL_URL=self.daemon_url,
            FLASH_LOCAL_API_KEY=self.api_key,
            FLASH_PARENT_PID=str(os.getpid()),
            PYTHONUNBUFFERED="1",
        )
        apply_volume(self.resource, env)  # its network volume, if it has one
        return env

    async def run(self) -> None:
        """Keep the app running until `stop` (or the caller's cancellation); never raises."""
        if self._stopped:  # stopped before it ran
            return
        self._exited = anyio.Event()
        try:
            with self._scope:
                while True:
                    try:
                        await self._run_once()
                    except Exception:  # the daemon outlives one app that fails oddly
                        log.exception("balancer.failed", endpoint=self.name)
                        self._failed("could not be started; see the daemon's log")
                    await anyio.sleep(self._backoff())
        finally:
            with anyio.CancelScope(shield=True):
                await self._kill()
                self._exited.set()

    async def stop(self) -> None:
        """Stop the app by PID (its group too) and start no other; shielded, idempotent."""
        self._stopped = True
        self._scope.cancel()
        with anyio.CancelScope(shield=True):
            if self._exited is not None:
                await self._exited.wait()
            else:  # never ran
                await self._kill()

    def _backoff(self) -> float:
        if not self.failures:
            return 0.0
        return min(
            default_start_backoff_max_s(),
            START_BACKOFF_S * 2.0 ** min(self.failures - 1, 30),
        )

    async def _spawn(self, port: int) -> Process:
        private_dir(self.log_dir)
        with os.fdopen(open_private(self.log_path), "ab") as out:
            out.write(
                f"flash local: starting {self.entry.name} on 127.0.0.1:{port}\n".encode()
            )
            out.flush()
            return await anyio.open_process(
                [
                    sys.executable,
                    "-m",
                    "flash_actors.providers.local.daemon.launch",
                    str(self.entry),
                ],
                env=self.env(port),
                cwd=self.entry.parent,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: see launch.py
            )

    async def _run_once(self) -> None:
        """One process: start it, wait until it answers, then until it exits."""
        port = _free_port()
        self.starting = True
        try:
            with anyio.CancelScope(shield=True):  # a started process is always known
                process = self._process = await self._spawn(port)
            log.info("balancer.started", endpoint=self.name, pid=process.pid, port=port)
            started = time.monotonic()
            answered = await self._wait_ready(process, port)
        finally:
            self.starting = False
        if not answered:
            what = (
                f"exited with code {process.returncode} before it answered GET /ping"
                if process.returncode is not None
                else f"did not answer GET /ping within {START_TIMEOUT_S:g} s"
            )
            await self._kill()
            self._failed(
                f"its process {what} (log: {self.log_path}){_last_line(self.log_path)}"
            )
            return
        self.port, self.pid, self.error = port, process.pid, None
        log.info("balancer.ready", endpoint=self.name, pid=process.pid, port=port)
        try:
            code = await process.wait()
        finally:
            self.port, self.pid = 0, None
        log.warning("balancer.exited", endpoint=self.name, pid=process.pid, code=code)
        await self._kill()
        if time.monotonic() - started >= STABLE_S:
            self.failures = 0  # it served: a new streak starts with this exit
        self._failed(
            f"its process exited with code {code} (log: {self.log_path})"
            f"{_last_line(self.log_path)}"
        )

    async def _wait_ready(self, process: Process, port: int) -> bool:
        ping = LoopbackTransport(port, "")
        try:
            with anyio.move_on_after(START_TIMEOUT_S):
                while process.returncode is None:
                    with contextlib.suppress(DeliveryError):
                        answer = await ping.request(
                            "GET", f"http://127.0.0.1:{port}/ping"
                        )
                        if answer.status == 200:
                            return True
                    await anyio.sleep(PING_EVERY_S)
        finally:
            await ping.aclose()
        return False

    def _failed(self, why: str) -> None:
        self.failures += 1
        if self.failures >= START_TRIES:
            self.error = f"{self.failures} failed starts in a row; the last: {why}"
        log.warning(
            "balancer.restarting",
            endpoint=self.name,
            failures_in_a_row=self.failures,
            retry_in_s=round(self._backoff(), 3),
            error=why,
        )

    async def _kill(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            await stop_launched(process)
