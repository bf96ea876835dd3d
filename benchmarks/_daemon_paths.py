"""The `flash local` paths of the benchmarks: a daemon started for the run, in a temporary
state folder, and the two providers that reach it.

``daemon``: the runtime's own client of the daemon (`GatewayProvider`: long-polled status,
caller ids). ``runpod``: the RunPod provider (`RunPodProvider`, HTTPS transport, RunPod's
protocol only) against a daemon started with ``--runpod-only``, as a RunPod user would see it.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from flash_actors.providers.base import Provider
from flash_actors.providers.local.daemon.control import start_daemon, stop_daemon
from flash_actors.providers.local.daemon_client import GatewayProvider
from flash_actors.providers.runpod.provider import RunPodProvider
from flash_actors.providers.runpod.transport import HttpsTransport

PATHS = ("daemon", "runpod")
"""The daemon paths, by the name the benchmarks print."""


@asynccontextmanager
async def daemon_provider(path: str) -> AsyncIterator[Provider]:
    """A provider for ``path`` (one of `PATHS`) on a daemon of its own, stopped after."""
    with tempfile.TemporaryDirectory(prefix="flash-bench-") as folder:
        state_dir = Path(folder) / ".flash"
        started = await start_daemon(state_dir, runpod_only=path == "runpod")
        record = started.record
        try:
            if path == "daemon":
                yield GatewayProvider(record)
            else:
                yield RunPodProvider(
                    api_key=record.api_key,
                    api_url=record.url,
                    endpoint_url=f"{record.url}/v2",
                    transport=HttpsTransport(),
                )
        finally:
            await stop_daemon(state_dir)
