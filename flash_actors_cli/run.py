"""``flash run``: serve the project in the current folder on this machine, as Flash's dev server.

Loads ``.env`` (python-dotenv, found from the current folder upwards, never overriding the
shell's variables, as runpod-flash does), picks the address (``--host``/``--port``, else
``FLASH_HOST``/``FLASH_PORT``, else localhost:8888; the next free port when that one is taken,
saying so) and serves `flash_actors.devserver`'s app with uvicorn: the project's ``main.py``
app, a dev route per ``@remote`` function, the offline API explorer at ``/docs``. With
``--reload`` (the default) uvicorn's supervisor restarts the server process when a ``.py``
file of the project changes; the server's lifespan stops its workers each time. Ctrl-C stops
everything. A failure is one line on stderr, ``flash: error: <what>: <what to do>``, exit 1
(``-v`` adds the traceback).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import traceback
from pathlib import Path
from typing import Any

from dotenv import find_dotenv, load_dotenv

from flash_actors.errors import FlashRuntimeError

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "add_parser", "find_free_port", "run"]

DEFAULT_HOST = "localhost"
DEFAULT_PORT = 8888
HOST_ENV = "FLASH_HOST"
PORT_ENV = "FLASH_PORT"
#: how many ports after the asked one are tried when it is taken (as Flash)
PORT_TRIES = 20


def add_parser(commands: Any) -> None:
    """Add ``flash run`` to ``flash``'s sub-parsers."""
    run = commands.add_parser(
        "run",
        help="serve this project's app and @remote functions locally (API explorer at /docs)",
        description=(
            "Serve the project in the current folder on this machine: the FastAPI app of "
            "main.py (if any), a route per @remote function (a queue function in foo.py at "
            'POST /foo/runsync with {"input": {...}}; a load-balancer route under /foo/), '
            "and an API explorer at /docs that needs no internet. Workers run on the local "
            "provider (no account) unless FLASH_PROVIDER says otherwise; .env is loaded."
        ),
    )
    run.add_argument(
        "--host",
        metavar="HOST",
        help=f"the address to serve on (default: ${HOST_ENV}, else {DEFAULT_HOST})",
    )
    run.add_argument(
        "--port",
        metavar="PORT",
        help=f"the port to serve on; the next free one when it is taken (default: "
        f"${PORT_ENV}, else {DEFAULT_PORT})",
    )
    run.add_argument(
        "--reload",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="restart the server when a .py file of the project changes (default: on)",
    )
    run.add_argument(
        "--auto-provision",
        action="store_true",
        help="start every endpoint's workers before serving, so first calls do not wait "
        "for them (default: off; workers start on the first call)",
    )
    run.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="show a failure's traceback (default: off)",
    )


class _Refused(Exception):
    """A usage error: one line for the user."""


def _error(text: str) -> int:
    print(f"flash: error: {text}", file=sys.stderr, flush=True)
    return 1


def _say(text: str) -> None:
    print(f"flash: {text}", file=sys.stderr, flush=True)


def _port(value: str, where: str) -> int:
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 0 < port < 65536:
        msg = f"{where} {value!r} is not a port: give a number from 1 to 65535"
        raise _Refused(msg)
    return port


def find_free_port(host: str, port: int, tries: int = PORT_TRIES) -> int:
    """The first port from ``port`` on that ``host`` can bind.

    Raises:
        _Refused: none of ``tries`` ports is free, or ``host`` cannot be bound at all.
    """
    last: OSError | None = None
    for candidate in range(port, min(port + tries, 65536)):
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.bind((host, candidate))
        except socket.gaierror as exc:
            msg = f"cannot serve on host {host!r}: {exc.strerror or exc}: give an address of this machine (--host 127.0.0.1)"
            raise _Refused(msg) from exc
        except OSError as exc:
            last = exc
            continue
        return candidate
    why = f" ({last.strerror})" if last is not None and last.strerror else ""
    msg = f"ports {port}-{port + tries - 1} on {host} are all in use{why}: stop what uses them or give another --port"
    raise _Refused(msg)


def _check_extra() -> None:
    missing = []
    for module, package in (
        ("fastapi", "fastapi"),
        ("uvicorn", "uvicorn"),
        ("swagger_ui", "swagger-ui-py"),
    ):
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    if missing:
        msg = (
            f"flash run needs {', '.join(missing)}, not installed here: "
            "pip install 'flash-actors[dev]' (or the project's requirements.txt)"
        )
        raise _Refused(msg)


def _show(
    routes: list[Any], skipped: list[str], url: str, *, auto_provision: bool
) -> None:
    print(f"Serving on {url}  (API explorer: {url}/docs)", flush=True)
    if auto_provision:
        names = sorted({route.resource for route in routes})
        print(f"Starting the workers of {', '.join(names) or 'no endpoint'} now")
    for route in routes:
        kind = "queue" if route.kind == "queue" else "load balancer"
        print(f"  {route.method:<6} {url}{route.path}  -> {route.key} ({kind})")
    for key in skipped:
        print(f"  (no dev route for the @remote class {key})")
    if not routes:
        print("  (no @remote functions found: only main.py's routes, if any)")
    print("Press Ctrl-C to stop.", flush=True)


def _serve(args: argparse.Namespace) -> int:
    from flash_actors.devserver.app import (
        AUTO_PROVISION_ENV,
        PROJECT_ENV,
        build_app,
        dev_routes,
    )

    _check_extra()
    import uvicorn

    dotenv = find_dotenv(usecwd=True)
    if dotenv:
        load_dotenv(dotenv)
        _say(f"loaded {os.path.relpath(dotenv)}")
    host = args.host or os.environ.get(HOST_ENV) or DEFAULT_HOST
    if args.port is not None:
        asked = _port(args.port, "--port")
    elif os.environ.get(PORT_ENV):
        asked = _port(os.environ[PORT_ENV], PORT_ENV)
    else:
        asked = DEFAULT_PORT
    port = find_free_port(host, asked)
    if port != asked:
        _say(f"port {asked} is in use on {host}; serving on port {port} instead")
    project = Path.cwd()
    routes, skipped = dev_routes(project)  # BuildError: a file that does not parse
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}"
    os.environ[PROJECT_ENV] = str(project)
    os.environ[AUTO_PROVISION_ENV] = "1" if args.auto_provision else "0"
    if args.reload:
        _show(routes, skipped, url, auto_provision=args.auto_provision)
        uvicorn.run(
            "flash_actors.devserver:create_app",
            factory=True,
            host=host,
            port=port,
            reload=True,
            reload_dirs=[str(project)],
            log_level="info" if args.verbose else "warning",
        )
        return 0
    try:
        app = build_app(project, auto_provision=args.auto_provision)
    except FlashRuntimeError:
        raise
    except Exception as exc:
        if args.verbose:
            traceback.print_exc()
        msg = f"cannot import the project: {type(exc).__name__}: {exc}: fix it (-v shows the traceback)"
        raise _Refused(msg) from exc
    _show(routes, skipped, url, auto_provision=args.auto_provision)
    uvicorn.run(
        app, host=host, port=port, log_level="info" if args.verbose else "warning"
    )
    return 0


def run(args: argparse.Namespace) -> int:
    """Run ``flash run``; returns the exit code."""
    try:
        return _serve(args)
    except KeyboardInterrupt:
        return 130
    except (_Refused, FlashRuntimeError, OSError) as exc:
        if args.verbose and not isinstance(exc, _Refused):
            traceback.print_exc()
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return _error(text)
