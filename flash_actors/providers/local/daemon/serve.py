"""``python -m flash_actors.providers.local.daemon``: the ``flash local`` daemon.

It opens the durable store under the state folder, keeps its API key and master secret there
(so queued jobs' signatures and clients' keys stay valid across restarts), binds
127.0.0.1:PORT, writes ``local.json`` once it listens, and serves until SIGTERM/SIGINT,
``POST /flash/v1/shutdown`` or, with ``--parent-pid``, the death of that process (the private
gateway an embedded runtime starts for handler endpoints). Stopping stops every worker, puts
running jobs back in the queue, closes the store and removes the record.

It also answers RunPod's GraphQL control plane (``POST /graphql``, see
`flash_actors.providers.local.controlplane`): endpoints saved there are registered under
their ids, and registered again at start from ``controlplane.json``.

One state folder, one daemon: the folder's lock (`lock_state_dir`) is taken before the store
is opened and held for the daemon's life; a second daemon exits with code
`ALREADY_RUNNING` and a line naming the holder. Everything under the folder is its owner's
alone (`flash_actors._private`). Every second the daemon notes in the store that it is alive;
at start-up, queued jobs whose caller gave up while the daemon was down (the job's
``abandonAfter`` is shorter than that downtime, see `GatewayBackend`) are cancelled before
any job is dispatched, so a call reported failed does not run afterwards.
"""

from __future__ import annotations

import argparse
import gc
import os
import secrets
import signal
import socket
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import anyio

from flash_actors._lifeline import die_with_parent
from flash_actors._logging import get_logger, log_to_stderr
from flash_actors._private import StateDirError, secure_state_dir
from flash_actors.errors import ConfigurationError
from flash_actors.providers.local import LocalProvider
from flash_actors.providers.local.controlplane import ControlPlane
from flash_actors.providers.local.daemon.catalog import config_of
from flash_actors.providers.local.daemon.gateway import Gateway
from flash_actors.providers.local.daemon.httpserver import (
    HttpServer,
    max_connections_default,
)
from flash_actors.providers.local.daemon.record import (
    ALREADY_RUNNING,
    DaemonRecord,
    DaemonRunningError,
    lock_state_dir,
    pid_alive,
    remove_record,
    write_record,
)
from flash_actors.providers.local.daemon.server import make_app
from flash_actors.providers.local.daemon.store import JobStore
from flash_actors.resources import ServerlessEndpoint
from flash_actors.serialization import set_master_secret

__all__ = ["main", "serve"]

log = get_logger(__name__)
ALIVE_KEY = "alive_at"
HEARTBEAT_S = 1.0


def _setting(store: JobStore, name: str, env: str, make: str) -> str:
    value = os.environ.get(env) or store.meta(name)
    if not value:
        value = make
    store.set_meta(name, value)
    return value


async def serve(
    state_dir: Path,
    port: int = 0,
    *,
    parent_pid: int | None = None,
    handlers: list[tuple[str, str, int]] | None = None,
) -> None:
    """Run the daemon until it is told to stop (``state_dir`` and handler paths absolute).

    Raises:
        SystemExit: the state folder is not safely ours, another daemon holds it
            (code `ALREADY_RUNNING`), or the port is taken.
    """
    try:
        secure_state_dir(state_dir)
        lock = lock_state_dir(state_dir)  # held (fd open) until the process exits
    except StateDirError as exc:
        raise SystemExit(f"flash local: {exc}") from None
    except OSError as exc:  # e.g. its daemon.lock is a folder
        raise SystemExit(f"flash local: cannot use {state_dir}: {exc}") from None
    except DaemonRunningError as exc:
        print(exc, file=sys.stderr, flush=True)  # noqa: T201
        raise SystemExit(ALREADY_RUNNING) from None
    try:
        await _serve_locked(state_dir, port, parent_pid=parent_pid, handlers=handlers)
    finally:
        os.close(lock)


async def _serve_locked(
    state_dir: Path,
    port: int,
    *,
    parent_pid: int | None,
    handlers: list[tuple[str, str, int]] | None,
) -> None:
    store = JobStore(state_dir / "gateway.sqlite3")
    provider = LocalProvider(state_dir=state_dir)
    retention = float(os.environ.get("FLASH_LOCAL_RETENTION_S", "1800"))
    gateway = Gateway(
        store,
        provider,
        state_dir=state_dir,
        api_key="",
        retention_s=retention,
        max_queue=int(os.environ.get("FLASH_LOCAL_MAX_QUEUE", "100000")),
    )
    try:
        gateway.load()
    except sqlite3.DatabaseError as exc:
        msg = (
            f"flash local: the job store {store.path} cannot be read ({exc}); move it "
            "away to start with an empty queue"
        )
        raise SystemExit(msg) from None
    alive_before = store.meta(ALIVE_KEY)
    try:
        gateway.api_key = _setting(
            store, "api_key", "FLASH_LOCAL_API_KEY", f"fl-{secrets.token_hex(16)}"
        )
        secret = _setting(store, "secret", "FLASH_SECRET", secrets.token_hex(32))
        set_master_secret(bytes.fromhex(secret))
        for name, handler, workers_max in handlers or []:
            config = config_of(
                ServerlessEndpoint(
                    name=name,
                    handler=handler,
                    workersMax=workers_max,
                )
            )
            await gateway.register(name, config)
        control = await _control_plane(state_dir, gateway)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            sock.close()
            msg = f"flash local: cannot listen on 127.0.0.1:{port}: {exc.strerror}"
            raise SystemExit(msg) from None
        sock.listen(1024)
        sock.setblocking(False)  # noqa: FBT003
        gateway.base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        control.base_url = gateway.base_url  # where Flash build uploads go
        # Nested calls of flash workers (one remote function awaiting another's) go to the
        # data plane as any client's: the API key is the only credential the daemon has.
        provider.worker_env.update(
            FLASH_LOCAL_URL=gateway.base_url, FLASH_LOCAL_API_KEY=gateway.api_key
        )
        # Listening now, and nothing dispatched yet: a caller still waiting gets through.
        _drop_abandoned(gateway, alive_before)
        shutdown = anyio.Event()
        idle_s = float(os.environ.get("FLASH_LOCAL_IDLE_TIMEOUT_S", "75"))
        owner = os.environ.pop("FLASH_LOCAL_OWNER_TOKEN", "")
        http = HttpServer(
            make_app(
                gateway,
                gateway.api_key,
                shutdown,
                owner_token=owner,
                idle_timeout_s=idle_s,
                large_budget=int(os.environ.get("FLASH_LOCAL_LARGE_BUDGET_MB", "128"))
                * 1024
                * 1024,
                graphql=control.handle,
                upload=control.receive_upload,
                deployed=control.deployed_endpoint,
                runpod_only=runpod_only(),
            ),
            sock,
            idle_timeout_s=idle_s,
            max_connections=max_connections_default(),
        )
        async with provider, anyio.create_task_group() as tg:
            await tg.start(
                store.run_flusher
            )  # the store's group commits (closed below)
            await tg.start(gateway.run)
            await http.start()
            record = DaemonRecord(
                url=gateway.base_url,
                pid=os.getpid(),
                api_key=gateway.api_key,
                secret=secret,
            )
            write_record(state_dir, record)
            print(  # noqa: T201 (the daemon's log line for `flash local up`)
                f"flash local: serving {gateway.base_url}/v2",
                file=sys.stderr,
                flush=True,
            )
            tg.start_soon(_signals, shutdown)
            tg.start_soon(_heartbeat, store)
            if parent_pid:
                tg.start_soon(_watch_parent, parent_pid, shutdown)
            try:
                await shutdown.wait()
            finally:
                with anyio.CancelScope(shield=True):
                    gateway.close()  # waiting requests answer before the server stops
                    remove_record(state_dir, os.getpid())
                    await http.stop()
                tg.cancel_scope.cancel()
    finally:
        if store.is_open:
            store.set_meta(ALIVE_KEY, repr(time.time()))
        store.close()
        remove_record(state_dir, os.getpid())


async def _control_plane(state_dir: Path, gateway: Gateway) -> ControlPlane:
    """RunPod's GraphQL control plane; its endpoints are registered under their ids."""

    async def apply(endpoint_id: str, config: dict[str, Any] | None) -> None:
        if config is None:
            await gateway.unregister(endpoint_id)
        else:
            await gateway.register(endpoint_id, config)

    try:
        control = ControlPlane(state_dir, apply)
    except ConfigurationError as exc:
        raise SystemExit(f"flash local: {exc}") from None
    await control.restore()
    return control


def _drop_abandoned(gateway: Gateway, alive_before: str | None) -> None:
    """Cancel unfinished jobs whose caller has given up on them while the daemon was down.

    A `GatewayBackend` caller reconnects for ``abandonAfter`` ms from the moment it found
    the daemon gone, and only then reports the call failed. The daemon died at or after
    its last heartbeat, so once ``abandonAfter`` has passed since that heartbeat, the caller
    may have reported failure: the job must not run any more.
    """
    if alive_before is None:
        return
    try:
        down_ms = (time.time() - float(alive_before)) * 1000
    except ValueError:
        return
    dropped = 0
    for job in list(gateway.jobs.values()):
        window = job.options.get("abandonAfter")
        if job.terminal or not isinstance(window, int) or down_ms < window:
            continue
        gateway.book.fail(
            job,
            f"job {job.id} was abandoned: the daemon was down for {down_ms / 1000:.1f} s, "
            f"longer than its caller waits to reconnect ({window / 1000:.1f} s); "
            "the caller has reported it failed, so it does not run",
            status="CANCELLED",
        )
        dropped += 1
    if dropped:
        log.warning("gateway.abandoned", jobs=dropped, down_s=round(down_ms / 1000, 1))


async def _heartbeat(store: JobStore) -> None:
    """Note in the store, every second, that the daemon is alive (see `_drop_abandoned`)."""
    while True:
        store.set_meta(ALIVE_KEY, repr(time.time()))
        await anyio.sleep(HEARTBEAT_S)


async def _signals(shutdown: anyio.Event) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
        async for _ in received:
            shutdown.set()
            return


async def _watch_parent(pid: int, shutdown: anyio.Event) -> None:
    while pid_alive(pid):  # noqa: ASYNC110 (nothing to wait on for another process's death)
        await anyio.sleep(0.5)
    shutdown.set()


RUNPOD_ONLY_ENV = "FLASH_LOCAL_RUNPOD_ONLY"


def runpod_only() -> bool:
    """Whether the daemon hides its extensions and answers as RunPod (``--runpod-only``)."""
    return os.environ.get(RUNPOD_ONLY_ENV, "").strip().lower() in {"1", "true", "yes"}


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and serve."""
    parser = argparse.ArgumentParser(
        prog="python -m flash_actors.providers.local.daemon"
    )
    parser.add_argument("--state-dir", default=".flash")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument(
        "--endpoint",
        action="append",
        default=[],
        metavar="NAME=HANDLER.py[:WORKERS_MAX]",
    )
    parser.add_argument(
        "--runpod-only",
        action="store_true",
        help="answer as RunPod does: no caller job ids, long-polled status or stream flag",
    )
    args = parser.parse_args(argv)
    if args.runpod_only:
        os.environ[RUNPOD_ONLY_ENV] = "1"
    log_to_stderr()  # jobs that fail, time out or are requeued: .flash/logs/gateway.log
    handlers = []
    for spec in args.endpoint:
        name, sep, rest = spec.partition("=")
        if not sep or not name or not rest:
            parser.error(f"--endpoint wants NAME=HANDLER.py, got {spec!r}")
        path, _, workers = rest.partition(":")
        handlers.append((name, str(Path(path).resolve()), int(workers or 1)))
    try:
        secure_state_dir(
            Path(args.state_dir).absolute()
        )  # before resolve(): links refused
    except StateDirError as exc:
        raise SystemExit(f"flash local: {exc}") from None
    state_dir = Path(args.state_dir).resolve()
    stop = lambda: os.kill(os.getpid(), signal.SIGTERM)  # noqa: E731 (a graceful stop)
    if args.parent_pid and not die_with_parent(args.parent_pid, stop):
        raise SystemExit(1)  # the process that started this private gateway is gone
    # What start-up made (modules, the web framework's tables) stays for good: out of the
    # garbage collector's walks, which otherwise visit it all at each full collection.
    gc.freeze()
    anyio.run(
        lambda: serve(
            state_dir, args.port, parent_pid=args.parent_pid, handlers=handlers
        )
    )


if __name__ == "__main__":
    main()
