"""What a generated ``handler_<resource>.py`` runs: `main` picks the worker that serves it.

- Started by our worker pool (``FLASH_WORKER_TOKEN`` set): our worker in deployed mode
  (`flash_actors.worker.server`, ``FLASH_RESOURCE_NAME``), with its ``--fd``/``--port``.
- A load-balanced resource: its HTTP app (`flash_actors.deployed.app`).
- Else the stock ``runpod.serverless.start`` worker, as on RunPod's workers (its own
  arguments, such as ``--test_input`` and ``--rp_serve_api``, work).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from flash_actors.build.manifest import MANIFEST_ENV, RESOURCE_ENV, find_manifest
from flash_actors.deployed.handler import DeployedHandler, key_from_env, load_resource
from flash_actors.errors import ConfigurationError, ManifestError

__all__ = ["main"]


def _has_runpod() -> bool:
    try:
        importlib.import_module("runpod")
    except ImportError:
        return False
    return True


def main(resource: str, handler_file: str, argv: list[str] | None = None) -> None:
    """Serve ``resource`` of the build that holds ``handler_file``, as the module says.

    ``argv`` goes to our worker or to the load balancer's app (default ``sys.argv``); the
    stock worker reads ``sys.argv`` itself.

    Raises:
        SystemExit: the manifest or the resource is missing (the message says what to do),
            or there is no ``runpod`` package and no worker token.
    """
    build_dir = Path(handler_file).resolve().parent
    manifest = find_manifest(build_dir)
    # Deployed code from here on: the Router reads this manifest, and calls to the app's
    # other resources go to their deployed endpoints (flash_actors.providers.deployed).
    os.environ[RESOURCE_ENV] = resource
    os.environ[MANIFEST_ENV] = str(manifest)
    if os.environ.get("FLASH_WORKER_TOKEN"):
        from flash_actors.worker.server import main as worker_main

        worker_main(argv)
        return
    try:
        loaded = load_resource(resource, build_dir=build_dir, manifest_path=manifest)
        handler = DeployedHandler(loaded, key_from_env(resource))
    except (ManifestError, ConfigurationError) as exc:
        raise SystemExit(f"{type(exc).__name__}: {exc}") from None
    if loaded.config.is_load_balanced:
        from flash_actors.deployed.app import serve_load_balancer

        serve_load_balancer(handler, argv)
        return
    if not _has_runpod():
        msg = (
            f"cannot serve resource {resource!r}: the runpod package is not installed "
            "(install it into the build: it is what RunPod's workers run), and no "
            "FLASH_WORKER_TOKEN is set for our own worker"
        )
        raise SystemExit(msg)
    import runpod

    config: dict[str, Any] = {"handler": handler}
    concurrency = loaded.config.config.get("max_concurrency")
    if isinstance(concurrency, int) and concurrency > 1:
        config["concurrency_modifier"] = lambda current: concurrency
    runpod.serverless.start(config)
