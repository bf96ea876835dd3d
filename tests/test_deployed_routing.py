"""Deployed code calls the app's other resources at their deployed endpoints (issue 11, item 5).

In a deployed process (``FLASH_RESOURCE_NAME`` set) a call to another resource's function
goes, signed and without code, to that resource's endpoint, which the resolver service names
(here a ``flash local`` daemon). A -> B -> A fails with `CallCycleError` at once; a resolver
that cannot be reached is `ManifestServiceUnavailableError`; a function the manifest does
not list is `ManifestError`.
"""

from __future__ import annotations

import json
import re
import secrets
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import pytest

from flash_actors.build.manifest import write_manifest
from flash_actors.messages import Call, FunctionRequest
from flash_actors.policies import CallPolicy
from flash_actors.providers.deployed import DeployedProvider, codeless
from flash_actors.serialization import RequestSigner, decode_request, verify_request
from tests._daemon import Daemon, wait_gone
from tests._preview import Preview, clean_env, cleanup, free_port, write_app

if TYPE_CHECKING:
    from collections.abc import Iterator

CYCLE_APP = {
    "app_config.py": """
        from flash_actors import CpuLiveServerless

        a = CpuLiveServerless(name="a")
        b = CpuLiveServerless(name="b")
    """,
    "on_a.py": """
        from flash_actors import remote

        from app_config import a


        @remote(a)
        async def ping(n):
            from on_b import pong

            job = await pong(n)
            if job.exception is not None:
                raise job.exception
            return job.output


        @remote(a)
        async def back(n):
            return n * 10
    """,
    "on_b.py": """
        from flash_actors import remote

        from app_config import b
        from on_a import back


        @remote(b)
        async def pong(n):
            return (await back(n)).output
    """,
}


@pytest.fixture(scope="module")
def cycle_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Preview]:
    project = write_app(tmp_path_factory.mktemp("routing") / "cycle", CYCLE_APP)
    running = Preview(project)
    try:
        running.wait_ready()
        yield running
    finally:
        cleanup(running)


@pytest.mark.network  # the build installs wheels from PyPI (uv caches them)
@pytest.mark.timeout(180)
def test_a_deployed_a_b_a_cycle_fails_with_call_cycle_error(cycle_app: Preview) -> None:
    failed = cycle_app.runsync("a", {"function_name": "ping", "n": 1}).json()
    assert failed["status"] == "FAILED", failed
    # b refused to call back into a (a's worker waits on b), typed, and a re-raised it
    assert re.match(
        r"RemoteExecutionError\[CallCycleError\]: call cycle a -> b -> a: endpoint 'a' is "
        r"already waiting on this chain of calls",
        failed["error"],
    ), failed["error"]
    # nothing is stuck: b's worker calls a (nobody waits on a now), a answers
    fine = cycle_app.runsync("b", {"n": 2}).json()
    assert fine["status"] == "COMPLETED", fine
    assert fine["output"] == 20
    pids = cycle_app.pids
    assert cycle_app.stop(signal.SIGTERM) == 0  # SIGTERM stops it as Ctrl-C does
    assert wait_gone(pids) == []


ROUTED = {
    "app_config.py": CYCLE_APP["app_config.py"],
    "on_b.py": """
        from flash_actors import remote

        from app_config import b


        @remote(b)
        async def pong(n):
            return n + 1
    """,
}

UNLISTED = """
from flash_actors import remote

from app_config import b


@remote(b)
async def added_after_the_build(n):
    return n
"""

SCRIPT = """
import asyncio, json, sys

sys.path.insert(0, sys.argv[1])
import on_b, unlisted


async def main():
    out = {}
    for name, fn in (("pong", on_b.pong), ("unlisted", unlisted.added_after_the_build)):
        try:
            job = await fn(1)
            error = job.exception
        except Exception as exc:
            error = exc
        out[name] = [type(error).__name__, str(error)]
    print(json.dumps(out))


asyncio.run(main())
"""


def deployed_calls(tmp_path: Path, **env: str) -> dict[str, Any]:
    """Calls made from deployed code of resource ``a`` (a real process), with ``env``."""
    app = write_app(tmp_path / "app", ROUTED)
    manifest = tmp_path / "flash_manifest.json"
    write_manifest(app, manifest)
    (app / "unlisted.py").write_text(UNLISTED)  # after the build: not in the manifest
    (tmp_path / "script.py").write_text(SCRIPT)
    done = subprocess.run(
        [sys.executable, str(tmp_path / "script.py"), str(app)],
        cwd=tmp_path,
        env={
            **clean_env(),
            "FLASH_RESOURCE_NAME": "a",
            "FLASH_MANIFEST_PATH": str(manifest),
            "FLASH_SECRET": secrets.token_hex(32),
            **env,
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out: dict[str, Any] = json.loads(done.stdout)
    return out


def test_an_unreachable_resolver_is_manifest_service_unavailable(
    tmp_path: Path,
) -> None:
    port = free_port()  # nothing listens there
    out = deployed_calls(
        tmp_path,
        FLASH_LOCAL_URL=f"http://127.0.0.1:{port}",
        FLASH_LOCAL_API_KEY="fl-key",
    )
    kind, message = out["pong"]
    assert kind == "ManifestServiceUnavailableError"
    assert re.match(
        rf"cannot look up where resource 'b' is deployed: the flash local daemon at "
        rf"http://127\.0\.0\.1:{port}, which resolves the app's endpoints, cannot be "
        r"reached \(.*; 4 tries\): start it again",
        message,
    ), message


def test_a_function_the_manifest_does_not_list_is_a_manifest_error(
    tmp_path: Path,
) -> None:
    out = deployed_calls(tmp_path, FLASH_LOCAL="0")
    kind, message = out["unlisted"]
    assert kind == "ManifestError"
    assert re.match(
        r"function 'unlisted:added_after_the_build' \(called from resource 'a'\) is not "
        r"in the manifest: rebuild the app with `flash build`",
        message,
    ), message
    # no resolver configured at all: unavailable, with what to set
    kind, message = out["pong"]
    assert kind == "ManifestServiceUnavailableError"
    assert re.match(
        r"this deployed app has no service to resolve its endpoints: set FLASH_LOCAL_URL",
        message,
    ), message


def test_calls_to_another_resource_go_without_code_signed_for_it() -> None:
    secret = secrets.token_hex(32)
    provider = DeployedProvider(secret=secret)
    key = provider.signing_key("b")
    assert key is not None
    template = FunctionRequest(
        function_name="pong",
        function_code="async def pong(n):\n    return n + 1\n",
        dependencies=["humanize"],
    )
    signed = RequestSigner(key, template).sign((41,), {})
    call = Call(
        endpoint="b",
        function="pong",
        request=signed,
        policy=CallPolicy(),
        key="on_b:pong",
    )
    sent = codeless(call, key)
    assert sent.function_code is None
    assert sent.dependencies is None
    assert sent.function_name == "on_b:pong"
    verify_request(sent, key)  # signed for b's workers
    assert decode_request(sent, key).args == [41]
    again = msgspec.structs.replace(call, request=sent)
    assert codeless(again, key) is sent  # already in that form: no second signature
    # another resource's key does not open it
    other = provider.signing_key("a")
    assert other is not None
    assert other != key


def test_a_resource_the_resolver_does_not_serve_is_a_manifest_error(
    tmp_path: Path,
) -> None:
    daemon = Daemon(tmp_path / "state")  # a flash local daemon with no endpoint
    try:
        assert daemon.record is not None
        out = deployed_calls(
            tmp_path,
            FLASH_LOCAL_URL=daemon.record.url,
            FLASH_LOCAL_API_KEY=daemon.record.api_key,
        )
    finally:
        daemon.stop()
    kind, message = out["pong"]
    assert kind == "ManifestError"
    assert re.match(
        rf"resource 'b' is not deployed on the flash local daemon at "
        rf"{re.escape(daemon.record.url)} \(endpoint 'b' not found",
        message,
    ), message


def test_without_the_app_secret_a_deployed_call_says_what_to_set(
    tmp_path: Path,
) -> None:
    out = deployed_calls(tmp_path, FLASH_SECRET="", FLASH_LOCAL="0")
    kind, message = out["pong"]
    assert kind == "ConfigurationError"
    assert re.match(
        r"pong\(\) is on resource 'b', and deployed resources sign their calls to each "
        r"other with the app's secret: set FLASH_SECRET",
        message,
    ), message
