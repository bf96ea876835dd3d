"""``flash build --preview``: run the built archive on this machine, with no Docker.

`run_preview` unpacks the archive (``tarfile``'s ``"data"`` filter: no links out, no device
files, no absolute paths) into a fresh ``.flash/.preview/app/`` and runs the app from there,
as RunPod would run it, from the archive's own runtime and dependencies (not the source
tree's), with this interpreter (so the archive must target its Python version):

- every queue resource is an endpoint of a private ``flash local`` daemon (state folder
  ``.flash/.preview/state/``), registered as a deployed endpoint of the unpacked build
  (`flash_actors.providers.local.daemon.catalog.deployed_config`): its workers are ``python
  handler_<resource>.py`` in that folder, our worker in deployed mode. Each starts one worker
  at once, so that a resource that cannot start is found now; more start on demand. Jobs
  take Flash's deployed-mode JSON at ``{daemon}/v2/<resource>/runsync`` (or ``/run``) with
  the daemon's API key;
- every load-balancer resource is its app, ``python handler_<resource>.py`` in that folder
  (under the daemon's launcher, which ends it if this process dies) on 127.0.0.1:8000 (the
  next free port if it is taken, or ``port``), the next ones on the ports after it;
- calls between resources go through the daemon, which resolves each resource's endpoint
  (`flash_actors.providers.deployed`).

It prints what runs where and how to call it, then stays in the foreground until SIGINT or
SIGTERM (or until one of its processes exits), and stops every process it started by PID:
the load balancers, then the daemon, which stops its workers; the daemon's state folder is
removed. A resource that cannot start stops the others, and `run_preview` raises
`PreviewError` with one line saying which and where its log is.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import msgspec

from flash_actors._private import open_private, write_private
from flash_actors.build._lock import project_lock
from flash_actors.build.handlers import handler_name
from flash_actors.build.manifest import MANIFEST_FILE, load_manifest
from flash_actors.errors import ConfigurationError, DeliveryError, FlashRuntimeError

if TYPE_CHECKING:
    from collections.abc import Callable

    from anyio.abc import Process

    from flash_actors.build.manifest import Manifest, ManifestResource
    from flash_actors.providers.local._http import LoopbackTransport
    from flash_actors.resources import ServerlessResource

__all__ = [
    "DEFAULT_PORT",
    "PREVIEW_DIR",
    "PreviewError",
    "PreviewInfo",
    "run_preview",
    "unpack_archive",
]

PREVIEW_DIR = Path(".flash") / ".preview"
"""The preview's folder, relative to the project (made afresh by every preview)."""
DEFAULT_PORT = 8000
START_TIMEOUT_S = 120.0
"""How long a resource may take to answer (its first worker imports the whole build)."""
STOP_GRACE_S = 10.0


class PreviewError(FlashRuntimeError):
    """The preview could not start: the message says which part and where its log is."""


class PreviewInfo(msgspec.Struct, kw_only=True, frozen=True):
    """What runs where (also written to ``.flash/.preview/preview.json``, mode 0600)."""

    app_dir: str
    daemon_url: str
    api_key: str
    #: queue resource -> its ``/runsync`` URL
    endpoints: dict[str, str]
    #: load-balancer resource -> its base URL
    load_balancers: dict[str, str]
    #: load-balancer resource -> its routes (``"POST /path"``)
    routes: dict[str, list[str]]
    pids: list[int]


def unpack_archive(archive: Path, dest: Path) -> None:
    """Unpack ``archive`` into the folder ``dest`` (created; must not exist).

    Raises:
        PreviewError: the archive cannot be read, or holds an entry the ``"data"`` filter
            refuses (a link out of the folder, an absolute path, a device file).
    """
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(dest, filter="data")
    except (OSError, tarfile.TarError) as exc:
        msg = f"cannot unpack {archive} into {dest}: {exc}: build it again"
        raise PreviewError(msg) from exc


def _fresh(folder: Path) -> None:
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        msg = f"{folder} is not a folder (a link or a file): remove it and try again"
        raise PreviewError(msg)
    shutil.rmtree(folder, ignore_errors=True)
    if folder.exists():
        msg = f"cannot empty {folder}: a preview may still run there; stop it first"
        raise PreviewError(msg)
    folder.mkdir(parents=True)


def _resource(name: str, entry: ManifestResource) -> ServerlessResource:
    """The resource config the manifest recorded (its literal fields)."""
    from flash_actors.providers.local.daemon.catalog import resource_from_config

    try:
        resource = resource_from_config(
            {"class": entry.resource_type, "resource": {**entry.config, "name": name}}
        )
    except ConfigurationError as exc:
        msg = f"resource {name!r}: its config in the manifest does not load: {exc}"
        raise PreviewError(msg) from exc
    return resource


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ports(count: int, chosen: int | None, say: Callable[[str], None]) -> list[int]:
    """``count`` free ports: from ``chosen`` (must be free), else from 8000 (the next free)."""
    if chosen is not None:
        if not _port_free(chosen):
            msg = f"port {chosen} is taken: choose another with --port"
            raise PreviewError(msg)
        start = chosen
    else:
        start = DEFAULT_PORT
    ports: list[int] = []
    port = start
    while len(ports) < count:
        if port > 65535:
            msg = f"no free port from {start}: choose one with --port"
            raise PreviewError(msg)
        if _port_free(port):
            ports.append(port)
        elif not ports:
            say(f"port {port} is taken: trying {port + 1}")
        port += 1
    return ports


def _tail(log: Path) -> str:
    from flash_actors.providers.local.pool import log_tail

    text = log_tail(log) or ""
    lines = [line for line in text.splitlines() if line.strip()]
    return f": {lines[-1].strip()}" if lines else ""


class _Preview:
    """The processes of one preview, and their order of stopping."""

    def __init__(self, root: Path, archive: Path, say: Callable[[str], None]) -> None:
        self.root = root
        self.archive = archive
        self.say = say
        self.folder = root / PREVIEW_DIR
        self.app_dir = self.folder / "app"
        self.state_dir = self.folder / "state"
        self.daemon: Process | None = None
        self.load_balancers: dict[str, Process] = {}
        self.logs: dict[str, Path] = {}
        self.secret = secrets.token_hex(32)
        self.api_key = f"fl-{secrets.token_hex(16)}"
        self.transport: LoopbackTransport | None = None
        self.daemon_url = ""

    def env(self) -> dict[str, str]:
        """The processes' environment: this one's, without our settings or PYTHONPATH."""
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("FLASH_")
            and key not in ("PYTHONPATH", "PYTHONSAFEPATH")
        }
        env.update(
            FLASH_SECRET=self.secret,
            FLASH_LOCAL_API_KEY=self.api_key,
            PYTHONUNBUFFERED="1",
        )
        return env

    async def _spawn(
        self, command: list[str], *, cwd: Path, env: dict[str, str], log: Path
    ) -> Process:
        with os.fdopen(open_private(log), "ab") as out:
            return await anyio.open_process(
                command,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches us; we stop them in order
            )

    async def start_daemon(self) -> None:
        """The private daemon; its record says where it listens."""
        from flash_actors.providers.local._http import LoopbackTransport
        from flash_actors.providers.local.daemon.record import read_record

        log = self.logs["flash local"] = self.folder / "daemon.log"
        env = self.env()
        env["PYTHONSAFEPATH"] = (
            "1"  # its own runtime: the folder it runs in is not code
        )
        self.daemon = await self._spawn(
            [
                sys.executable,
                "-m",
                "flash_actors.providers.local.daemon",
                "--state-dir",
                str(self.state_dir),
                "--parent-pid",
                str(os.getpid()),
            ],
            cwd=self.folder,  # the folder it serves: the unpacked build is inside
            env=env,
            log=log,
        )
        with anyio.move_on_after(30):
            while self.daemon.returncode is None:
                record = read_record(self.state_dir)
                if record is not None and record.pid == self.daemon.pid:
                    self.daemon_url = record.url
                    self.transport = LoopbackTransport(record.port, record.api_key)
                    return
                await anyio.sleep(0.05)
        msg = f"the flash local daemon did not start (log: {log}){_tail(log)}"
        raise PreviewError(msg)

    async def _request(
        self, method: str, path: str, body: bytes = b""
    ) -> tuple[int, bytes]:
        assert self.transport is not None  # noqa: S101 (start_daemon set it)
        try:
            response = await self.transport.request(
                method, self.transport.origin + path, body=body
            )
        except DeliveryError as exc:
            msg = f"the flash local daemon stopped answering ({exc}); see {self.logs['flash local']}"
            raise PreviewError(msg) from exc
        return response.status, response.body

    async def register(self, name: str, resource: ServerlessResource) -> None:
        """Serve queue resource ``name`` from the unpacked build (one worker at once)."""
        from flash_actors.providers.local.daemon.catalog import deployed_config
        from flash_actors.providers.runpod.dataplane import error_text

        if resource.workersMax >= 1:
            resource = msgspec.structs.replace(
                resource, workersMin=max(1, resource.workersMin)
            )
        config = deployed_config(resource, self.app_dir, handler_name(name))
        status, body = await self._request(
            "PUT", f"/flash/v1/endpoints/{name}", msgspec.json.encode(config)
        )
        if status != 200:
            msg = (
                f"the flash local daemon refused resource {name!r}: {error_text(body)}"
            )
            raise PreviewError(msg)
        self.logs[name] = self.state_dir / "logs" / name

    async def wait_ready(self, names: list[str]) -> None:
        """Until each queue resource has a worker that answers; its start error otherwise."""
        waiting = set(names)
        with anyio.move_on_after(START_TIMEOUT_S):
            while waiting:
                self.check_alive()
                status, body = await self._request("GET", "/flash/v1/status")
                table = json.loads(body) if status == 200 else {}
                for endpoint in table.get("endpoints", []):
                    name = endpoint.get("name")
                    if name not in waiting:
                        continue
                    error = endpoint.get("start_error")
                    if error:
                        first = str(error).splitlines()[0]
                        last = str(error).strip().splitlines()[-1]
                        more = f" ... {last.strip()}" if last != first else ""
                        msg = f"resource {name!r} cannot start: {first}{more}"
                        raise PreviewError(msg)
                    if endpoint.get("workers", {}).get("ready", 0) >= 1:
                        waiting.discard(name)
                if waiting:
                    await anyio.sleep(0.1)
        if waiting:
            name = sorted(waiting)[0]
            msg = (
                f"resource {name!r} did not start within {START_TIMEOUT_S:g} s; see its "
                f"worker logs in {self.logs.get(name, self.state_dir)}"
            )
            raise PreviewError(msg)

    async def start_load_balancer(self, name: str, port: int) -> str:
        """Run load balancer ``name``'s app on 127.0.0.1:``port``; its URL once it answers."""
        from flash_actors.providers.local._http import LoopbackTransport

        log = self.logs[name] = self.folder / f"{name}.log"
        env = self.env()
        env.update(
            FLASH_HOST="127.0.0.1",
            PORT=str(port),
            FLASH_LOCAL_URL=self.daemon_url,
        )
        # The launcher runs the handler unmodified in a process group of its own, and
        # ends the group with it, or at once when this process dies (FLASH_PARENT_PID).
        env["FLASH_PARENT_PID"] = str(os.getpid())
        launcher = "flash_actors.providers.local.daemon.launch"
        process = self.load_balancers[name] = await self._spawn(
            [sys.executable, "-m", launcher, handler_name(name)],
            cwd=self.app_dir,
            env=env,
            log=log,
        )
        ping = LoopbackTransport(port, "")
        try:
            with anyio.move_on_after(START_TIMEOUT_S):
                while process.returncode is None:
                    with contextlib.suppress(DeliveryError):
                        answer = await ping.request(
                            "GET", f"http://127.0.0.1:{port}/ping"
                        )
                        if answer.status == 200:
                            return f"http://127.0.0.1:{port}"
                    await anyio.sleep(0.05)
        finally:
            await ping.aclose()
        what = "exited" if process.returncode is not None else "did not answer"
        msg = f"load balancer {name!r} {what} on port {port} (log: {log}){_tail(log)}"
        raise PreviewError(msg)

    def check_alive(self) -> None:
        """Raise `PreviewError` if a process of the preview has exited."""
        processes = {"the flash local daemon": self.daemon}
        processes.update(
            {f"load balancer {n!r}": p for n, p in self.load_balancers.items()}
        )
        for what, process in processes.items():
            if process is not None and process.returncode is not None:
                key = "flash local" if process is self.daemon else what.split("'")[1]
                log = self.logs.get(key, self.folder)
                msg = (
                    f"{what} exited with code {process.returncode} (log: {log})"
                    f"{_tail(log) if log.is_file() else ''}"
                )
                raise PreviewError(msg)

    async def stop(self) -> None:
        """Stop every process by PID: load balancers first, then the daemon (and workers)."""
        from flash_actors.providers.local._processes import stop_process

        with anyio.CancelScope(shield=True):
            if self.transport is not None:
                await self.transport.aclose()
            for process in self.load_balancers.values():
                await stop_process(process, STOP_GRACE_S)
            if self.daemon is not None:
                await stop_process(self.daemon, STOP_GRACE_S + 5)
            shutil.rmtree(self.state_dir, ignore_errors=True)
            (self.folder / "preview.json").unlink(missing_ok=True)


def _describe(
    manifest: Manifest, info: PreviewInfo, say: Callable[[str], None]
) -> None:
    key = info.api_key
    say(f"Preview of {manifest.project_name or 'the app'}, from {info.app_dir}:")
    if info.endpoints:
        say(f"  queue resources, on the flash local daemon at {info.daemon_url}/v2:")
        for name, url in info.endpoints.items():
            say(f"    {name}: POST {url}")
    if info.load_balancers:
        say("  load balancers:")
        for name, url in info.load_balancers.items():
            routes = ", ".join(info.routes.get(name, []))
            say(f"    {name}: {url} ({routes})")
    say("Try it (deployed input is JSON keyed by parameter name):")
    for url in info.endpoints.values():
        body = shlex.quote(json.dumps({"input": {"<parameter>": "<value>"}}))
        say(
            f"  curl -s {url} -H 'Authorization: Bearer {key}' "
            f"-H 'Content-Type: application/json' -d {body}"
        )
        break
    for name, url in info.load_balancers.items():
        for route in info.routes.get(name, [])[:1]:
            method, _, path = route.partition(" ")
            body = shlex.quote(json.dumps({"<parameter>": "<value>"}))
            data = (
                f" -H 'Content-Type: application/json' -d {body}"
                if method != "GET"
                else ""
            )
            say(f"  curl -s -X {method} {url}{path}{data}")
    say("Press Ctrl-C to stop.")


async def _run(
    root: Path,
    archive: Path,
    port: int | None,
    say: Callable[[str], None],
    on_ready: Callable[[PreviewInfo], None] | None,
) -> None:
    preview = _Preview(root, archive, say)
    _fresh(preview.folder)
    unpack_archive(archive, preview.app_dir)
    manifest = load_manifest(preview.app_dir / MANIFEST_FILE)
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    if manifest.python_version and manifest.python_version != running:
        msg = (
            f"the archive is built for Python {manifest.python_version}, and the preview "
            f"runs it with this Python {running}: build it with --python-version "
            f"{running} to preview it"
        )
        raise PreviewError(msg)
    queue = {
        name: entry
        for name, entry in sorted(manifest.resources.items())
        if entry.functions and not entry.is_load_balanced
    }
    balancers = {
        name: entry
        for name, entry in sorted(manifest.resources.items())
        if entry.functions and entry.is_load_balanced
    }
    if not queue and not balancers:
        msg = "the build has no resource with functions: nothing to preview"
        raise PreviewError(msg)
    resources = {name: _resource(name, entry) for name, entry in queue.items()}
    ports = _ports(len(balancers), port, say)
    failure: Exception | None = None

    async def serve() -> None:
        say(f"starting {len(queue) + len(balancers)} resource(s) from {archive}")
        await preview.start_daemon()
        for name, resource in resources.items():
            await preview.register(name, resource)
        await preview.wait_ready(list(resources))
        lb_urls = {
            name: await preview.start_load_balancer(name, lb_port)
            for name, lb_port in zip(balancers, ports, strict=True)
        }
        processes = (preview.daemon, *preview.load_balancers.values())
        info = PreviewInfo(
            app_dir=str(preview.app_dir),
            daemon_url=preview.daemon_url,
            api_key=preview.api_key,
            endpoints={
                name: f"{preview.daemon_url}/v2/{name}/runsync" for name in queue
            },
            load_balancers=lb_urls,
            routes={name: sorted(manifest.routes.get(name, {})) for name in balancers},
            pids=[p.pid for p in processes if p is not None],
        )
        write_private(preview.folder / "preview.json", msgspec.json.encode(info))
        _describe(manifest, info, say)
        if on_ready is not None:
            on_ready(info)
        while True:  # until a signal; a process that exits ends the preview
            preview.check_alive()
            await anyio.sleep(0.2)

    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        try:
            async with anyio.create_task_group() as tg:

                async def on_signal() -> None:
                    async for signum in signals:
                        say(f"{signal.Signals(signum).name}: stopping the preview")
                        tg.cancel_scope.cancel()
                        return

                tg.start_soon(on_signal)
                try:
                    await serve()
                except (
                    FlashRuntimeError,
                    OSError,
                ) as exc:  # raised below, after the stop
                    failure = exc
                tg.cancel_scope.cancel()
        finally:
            await preview.stop()
    if failure is not None:
        raise failure
    say("preview stopped")


def run_preview(
    project_dir: Path | str,
    archive: Path,
    *,
    port: int | None = None,
    say: Callable[[str], None] = print,
    on_ready: Callable[[PreviewInfo], None] | None = None,
) -> None:
    """Run the built ``archive`` of ``project_dir`` until SIGINT or SIGTERM (module doc).

    Args:
        project_dir: the project; the preview's folder is its ``.flash/.preview/``.
        archive: what `flash_actors.build.builder.build_project` wrote.
        port: the first load balancer's port (default: 8000, or the next free one).
        say: receives each line to show.
        on_ready: called once everything answers, with what runs where.

    Raises:
        PreviewError: a part could not start, or one of its processes exited; everything
            it had started is stopped.
        BuildError: another preview of the project runs.
        ManifestError: the archive's manifest does not load.
    """
    root = Path(project_dir).resolve()
    with project_lock(root, "preview"):  # one preview owns .flash/.preview/
        anyio.run(_run, root, archive, port, say, on_ready)
