"""The real ``flash deploy``, ``env``, ``app`` and ``undeploy`` commands against ``flash local``.

Each command runs in a subprocess in a project folder (``myapp``, the default app name) and
talks to the daemon on 127.0.0.1 over runpod-flash's GraphQL operations.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from flash_actors.providers.local.daemon.record import read_record
from flash_actors_cli.main import build_parser
from tests._daemon import Daemon

if TYPE_CHECKING:
    from collections.abc import Iterator


@pytest.fixture
def project(tmp_path: Path) -> Path:
    folder = tmp_path / "myapp"
    folder.mkdir()
    return folder


@pytest.fixture
def daemon(project: Path) -> Iterator[Daemon]:
    running = Daemon(project / ".flash")
    try:
        yield running
    finally:
        running.stop()


def flash(
    *args: str,
    cwd: Path,
    stdin: str = "",
    timeout: float = 120,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flash_actors_cli.main", *args],
        cwd=cwd,
        env={**os.environ, **env} if env else None,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def ok(*args: str, cwd: Path, stdin: str = "") -> str:
    done = flash(*args, cwd=cwd, stdin=stdin)
    assert done.returncode == 0, done.stderr + done.stdout
    return done.stdout


def as_json(*args: str, cwd: Path) -> Any:
    return json.loads(ok(*args, "--json", cwd=cwd))


def fails(*args: str, cwd: Path, stdin: str = "") -> list[str]:
    """The stderr lines of a command that must fail with exit code 1."""
    done = flash(*args, cwd=cwd, stdin=stdin)
    assert done.returncode == 1, done.stderr + done.stdout
    return [
        line
        for line in done.stderr.splitlines()
        if line.startswith(("flash:", "  hint:"))
    ]


@pytest.mark.slow  # ~20 commands at ~1 s of interpreter start each
def test_environments_and_apps(daemon: Daemon, project: Path) -> None:
    out = ok("deploy", "new", "production", cwd=project)
    assert out.startswith("created environment 'production' in app 'myapp' (")
    staging = as_json("env", "create", "staging", cwd=project)
    assert staging["name"] == "staging"
    assert staging["app"] == "myapp"
    assert fails("deploy", "new", "production", cwd=project)[0] == (
        "flash: error: createFlashEnvironment failed: Flash environment "
        '"production" already exists in app "myapp"'
    )

    envs = as_json("deploy", "list", cwd=project)
    assert sorted(e["name"] for e in envs) == ["production", "staging"]
    assert {e["state"] for e in envs} == {"PENDING"}
    table = ok("env", "list", cwd=project)
    assert "environments of myapp" in table
    assert "production" in table
    assert "PENDING" in table

    apps = as_json("app", "list", cwd=project)
    assert [a["name"] for a in apps] == ["myapp"]
    assert "myapp" in ok("app", "list", cwd=project)
    got = as_json("app", "get", "myapp", cwd=project)
    assert sorted(e["name"] for e in got["flashEnvironments"]) == [
        "production",
        "staging",
    ]
    assert got["flashBuilds"] == []
    missing = fails("app", "get", "nope", cwd=project)
    assert missing[0].startswith("flash: error: flash local (http://127.0.0.1:")
    assert missing[0].endswith(") has no Flash app named 'nope'")

    # The same client code against "RunPod" (here the daemon, through RunPod's variables).
    record = daemon.record
    assert record is not None
    runpod = {
        "FLASH_PROVIDER": "runpod",
        "RUNPOD_API_BASE_URL": record.url,
        "RUNPOD_API_KEY": record.api_key,
        "RUNPOD_URL_MIXED_OK": "1",
    }
    done = flash("app", "list", "--json", cwd=project, env=runpod)
    assert done.returncode == 0, done.stderr
    assert [a["name"] for a in json.loads(done.stdout)] == ["myapp"]
    done = flash("app", "list", cwd=project, env=runpod)
    assert f"apps on RunPod ({record.url})" in done.stdout

    info = as_json("deploy", "info", "production", cwd=project)
    assert info["state"] == "PENDING"
    assert info["activeBuildId"] is None
    assert info["endpoints"] == []
    assert "state:   PENDING" in ok("env", "info", "production", cwd=project)
    unknown = fails("deploy", "info", "nope", cwd=project)
    assert unknown == [
        "flash: error: app 'myapp' has no environment named 'nope'",
        "  hint: known: production, staging",
    ]


@pytest.mark.slow  # ~20 commands at ~1 s of interpreter start each
def test_send_needs_a_build_and_delete_asks_twice(
    daemon: Daemon, project: Path
) -> None:
    ok("deploy", "new", "production", cwd=project)
    ok("deploy", "new", "staging", cwd=project)
    # A build is needed to send.
    assert fails("deploy", "send", "production", cwd=project) == [
        "flash: error: no build to send: .flash/artifact.tar.gz does not exist",
        "  hint: run `flash build` first (it writes .flash/artifact.tar.gz)",
    ]

    # delete asks twice: yes, then the environment's name; anything else deletes nothing.
    refused = [
        "flash: error: not deleted: not confirmed",
        "  hint: --yes deletes without asking",
    ]
    assert fails("deploy", "delete", "staging", cwd=project) == refused  # no answer
    assert fails("deploy", "delete", "staging", cwd=project, stdin="n\n") == refused
    assert (
        fails("deploy", "delete", "staging", cwd=project, stdin="y\nprod\n") == refused
    )
    assert len(as_json("deploy", "list", cwd=project)) == 2
    out = ok("deploy", "delete", "staging", cwd=project, stdin="y\nstaging\n")
    assert out.endswith("deleted environment 'staging' of app 'myapp'\n")
    assert json.loads(
        ok("env", "delete", "production", "--yes", "--json", cwd=project)
    ) == {
        "deleted": "production",
        "endpoints": [],
    }
    assert as_json("deploy", "list", cwd=project) == []


def test_undeploy_lists_and_deletes_endpoints(daemon: Daemon, project: Path) -> None:
    record = daemon.record
    assert record is not None
    save = (
        'mutation { saveEndpoint(input: {name: "live-worker", workersMin: 0, workersMax: 1, '
        'instanceIds: ["cpu3c-2-4"], template: {name: "t-worker", '
        'imageName: "runpod/flash-cpu:py3.12-latest"}}) { id name } }'
    )
    saved = httpx.post(
        f"{record.url}/graphql",
        json={"query": save},
        headers={"Authorization": f"Bearer {record.api_key}"},
    ).json()
    endpoint = saved["data"]["saveEndpoint"]
    listed = as_json("undeploy", "list", cwd=project)
    assert [(e["name"], e["id"]) for e in listed] == [("live-worker", endpoint["id"])]
    assert "live-worker" in ok("undeploy", "list", cwd=project)
    lines = fails("undeploy", "nope", cwd=project)
    assert lines[0].startswith(
        "flash: error: no endpoint named 'nope' on flash local ("
    )
    assert lines[1] == "  hint: known: live-worker"
    assert fails("undeploy", "worker", cwd=project, stdin="n\n")[0] == (
        "flash: error: not deleted: not confirmed"
    )
    out = ok("undeploy", "worker", "--yes", cwd=project)  # Flash's name without "live-"
    assert out == f"deleted endpoint live-worker ({endpoint['id']})\n"
    assert as_json("undeploy", "list", cwd=project) == []
    assert (
        fails("undeploy", "worker", cwd=project)[1]
        == "  hint: no endpoints are deployed"
    )


def test_flash_local_is_started_when_it_is_not_running(project: Path) -> None:
    done = flash("app", "list", cwd=project)
    record = read_record(project / ".flash")
    try:
        assert done.returncode == 0, done.stderr
        assert done.stderr.startswith("flash: started flash local at http://127.0.0.1:")
        assert "no apps on flash local" in done.stdout
        # A second command finds it running and says nothing about starting.
        again = flash("app", "list", cwd=project)
        assert again.returncode == 0
        assert "started" not in again.stderr
    finally:
        if record is not None:
            running = Daemon.__new__(Daemon)
            running.state_dir = project / ".flash"
            running.record = record
            running.stop()
    assert record is not None


def test_every_option_of_every_subcommand_says_its_default() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command")
    checked = 0
    for name in ("deploy", "undeploy", "env", "app"):
        command = commands.choices[name]  # type: ignore[index]
        subs = [a for a in command._actions if a.dest.endswith("_command")]
        parsers = list(subs[0].choices.values()) if subs else [command]
        for sub in parsers:
            for action in sub._actions:
                if action.option_strings and action.dest != "help":
                    assert "default" in (action.help or ""), (
                        name,
                        action.option_strings,
                    )
                    checked += 1
    assert checked > 40
    text = " ".join(flash("deploy", "send", "--help", cwd=Path.cwd()).stdout.split())
    assert "(default: .flash/artifact.tar.gz" in text
    assert "(default: local;" in text


MAIN = """\
from flash_actors import CpuLiveServerless, remote

cpu = CpuLiveServerless(name="cpu")


@remote(cpu)
async def add(a, b):
    return a + b


twice_config = CpuLiveServerless(name="twice")


@remote(twice_config)
async def twice(a, b):
    job = await add(a, b)  # another resource of the app: through the daemon
    return 2 * job.output
"""


@pytest.mark.network  # flash build downloads wheels (uv's cache makes it fast)
@pytest.mark.timeout(300)
def test_deploy_send_uploads_a_build_and_deploys_it(
    daemon: Daemon, project: Path
) -> None:
    (project / "main.py").write_text(MAIN)
    built = flash("build", cwd=project, timeout=240)
    assert built.returncode == 0, built.stderr
    dry = flash("deploy", "send", "production", "--dry-run", cwd=project)
    assert dry.returncode == 0, dry.stderr
    assert "flash: plan: add cpu" in dry.stderr
    assert as_json("app", "list", cwd=project) == []  # a dry run changes nothing

    done = flash("deploy", "send", "production", cwd=project)
    assert "flash: created app 'myapp'" in done.stderr
    assert (
        "flash: uploading .flash/artifact.tar.gz: uploading " in done.stderr
    )  # progress
    info = as_json("deploy", "info", "production", cwd=project)
    build_id = info["activeBuildId"]
    assert build_id is not None
    assert done.stdout.startswith(
        f"deployed build {build_id} to 'production' of app 'myapp'"
    )
    folder = project / ".flash" / "deployments" / info["id"] / build_id
    assert (folder / "flash_manifest.json").is_file()
    assert (folder / "handler_cpu.py").is_file()
    # The resource runs from the unpacked build, as a deployed endpoint of the daemon.
    assert info["state"] == "DEPLOYED", info
    assert done.returncode == 0, done.stderr
    endpoints = {e["name"]: e["id"] for e in info["endpoints"]}
    assert sorted(endpoints) == ["cpu", "twice"]
    with daemon.client() as client:
        answer = client.post(
            f"/v2/{endpoints['cpu']}/runsync?wait=60000",
            json={"input": {"a": 2, "b": 3}},
        ).json()
        assert answer["status"] == "COMPLETED", answer
        assert answer["output"] == 5
        answer = client.post(
            f"/v2/{endpoints['twice']}/runsync?wait=60000",
            json={"input": {"a": 2, "b": 3}},
        ).json()
        assert answer["status"] == "COMPLETED", answer.get("error")
        assert answer["output"] == 10
        endpoint = {"id": endpoints["cpu"]}
        # runpod-flash's deployed mode: one POST /v2/flash/runsync naming the app, the
        # environment and the resource in headers (PROTOCOL.md section 5)
        flash_headers = {
            "X-Flash-App": "myapp",
            "X-Flash-Environment": "production",
            "X-Flash-Endpoint": "twice",
        }
        answer = client.post(
            "/v2/flash/runsync", json={"input": {"a": 4, "b": 1}}, headers=flash_headers
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["output"] == 10
        not_running = client.post(
            "/v2/flash/runsync",
            json={"input": {}},
            headers={**flash_headers, "X-Flash-Endpoint": "nope"},
        )
        assert not_running.status_code == 404
        assert (
            "resource 'nope' does not run in myapp/production (running: cpu, twice)"
            in not_running.text
        )
        partial = client.post(
            "/v2/flash/runsync",
            json={"input": {}},
            headers={"X-Flash-Endpoint": "twice"},
        )
        assert partial.status_code == 400
        assert "without X-Flash-App, X-Flash-Environment" in partial.text
        # it runs only the code built into it
        refused = client.post(
            f"/v2/{endpoint['id']}/runsync",
            json={"input": {"function_name": "add", "function_code": "def add(): 0"}},
        )
        assert refused.status_code == 400, refused.text
    # A deployed process of the environment (here: resource "twice" run as a script in the
    # project) finds the others through the Flash control plane (FLASH_ENVIRONMENT_ID),
    # as on RunPod: getFlashEnvironment, then the data plane with a signed, code-less call.
    record = daemon.record
    assert record is not None
    deployed_env = {
        **{
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("FLASH_", "RUNPOD_"))
        },
        "FLASH_RESOURCE_NAME": "twice",
        "FLASH_ENVIRONMENT_ID": info["id"],
        "FLASH_SECRET": record.secret,
        "FLASH_MANIFEST_PATH": str(project / ".flash" / "flash_manifest.json"),
        "RUNPOD_API_KEY": record.api_key,
        "RUNPOD_API_BASE_URL": record.url,
        "RUNPOD_ENDPOINT_BASE_URL": f"{record.url}/v2",
        "FLASH_LOCAL": "0",
    }
    script = (
        "import asyncio, main\n"
        "async def go():\n"
        "    try:\n"
        "        job = await main.add(20, 1)\n"
        "        job.raise_for_error()\n"
        "        print(job.output)\n"
        "    except Exception as exc:\n"
        "        print(type(exc).__name__, exc)\n"
        "asyncio.run(go())\n"
    )

    def deployed(**changes: str) -> str:
        ran = subprocess.run(
            [sys.executable, "-c", script],
            cwd=project,
            env={**deployed_env, **changes},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert ran.returncode == 0, ran.stderr
        return ran.stdout.strip()

    assert deployed() == "21"
    unknown = deployed(FLASH_ENVIRONMENT_ID="no-such-environment")
    assert unknown.startswith("ManifestError the Flash control plane at"), unknown
    assert "deploy the app again" in unknown
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        gone = f"http://127.0.0.1:{closed.getsockname()[1]}"
    down = deployed(RUNPOD_API_BASE_URL=gone)
    assert down.startswith(
        "ManifestServiceUnavailableError cannot look up where this app's resources "
        "are deployed"
    ), down
    builds = as_json("app", "get", "myapp", cwd=project)["flashBuilds"]
    assert [b["id"] for b in builds] == [build_id]
    # Sending again with no change: the plan says so.
    again = flash("deploy", "send", "production", "--dry-run", cwd=project)
    assert "flash: plan: unchanged cpu" in again.stderr

    # Sending the same code again: a new build, and every resource left alone (same
    # endpoint, not saved again: its workers keep running the build they started with).
    def versions() -> dict[str, int]:
        with daemon.client() as client:
            answer = client.post(
                "/graphql",
                json={"query": "query { myself { endpoints { id version } } }"},
            ).json()
        return {e["id"]: e["version"] for e in answer["data"]["myself"]["endpoints"]}

    before = versions()
    assert flash("build", cwd=project, timeout=240).returncode == 0
    same = flash("deploy", "send", "production", "--json", cwd=project)
    assert same.returncode == 0, same.stderr
    result = json.loads(same.stdout)
    assert result["unchanged"] == ["cpu", "twice"]
    assert result["added"] == result["updated"] == result["removed"] == []
    assert result["endpoints"] == endpoints
    assert versions() == before
    assert folder.is_dir()  # the build the endpoints still serve stays unpacked
    with daemon.client() as client:
        answer = client.post(
            f"/v2/{endpoints['twice']}/runsync?wait=60000",
            json={"input": {"a": 1, "b": 1}},
        ).json()
        assert answer["output"] == 4, answer

    # Dropping a resource and changing the code: the dropped one's endpoint is removed
    # (saying so), the changed one updated in place (same id, saved again).
    (project / "main.py").write_text(MAIN.split("twice_config")[0] + "# changed\n")
    assert flash("build", cwd=project, timeout=240).returncode == 0
    changed = flash("deploy", "send", "production", cwd=project)
    assert changed.returncode == 0, changed.stderr
    assert "flash: plan: update cpu" in changed.stderr
    assert "flash: plan: remove twice" in changed.stderr
    assert "twice  removed (the build no longer has it)" in changed.stdout
    now = versions()
    assert endpoints["twice"] not in now
    assert now[endpoints["cpu"]] == before[endpoints["cpu"]] + 1
    assert not folder.exists()  # no endpoint serves the first build any more
    with daemon.client() as client:
        answer = client.post(
            f"/v2/{endpoints['cpu']}/runsync?wait=60000",
            json={"input": {"a": 20, "b": 3}},
        ).json()
        assert answer["output"] == 23, answer

    # --target runpod (FLASH_PROVIDER=runpod) runs the same client code against RunPod's
    # API: here flash local's, named by RUNPOD_API_BASE_URL as a RunPod stand-in.
    runpod = {
        "FLASH_PROVIDER": "runpod",
        "RUNPOD_API_KEY": record.api_key,
        "RUNPOD_API_BASE_URL": record.url,
    }
    staged = flash("deploy", "send", "staging", "--json", cwd=project, env=runpod)
    assert staged.returncode == 0, staged.stderr
    staging = json.loads(staged.stdout)
    assert staging["added"] == ["cpu"]
    assert staging["endpoints"]["cpu"] != endpoints["cpu"]
    with daemon.client() as client:
        answer = client.post(
            f"/v2/{staging['endpoints']['cpu']}/runsync?wait=60000",
            json={"input": {"a": 1, "b": 2}},
        ).json()
        assert answer["output"] == 3, answer


HALF = """\
from flash_actors import CpuLiveServerless, remote

first = CpuLiveServerless(name="first")
second = CpuLiveServerless(name="second", env={"LD_PRELOAD": "/tmp/evil.so"})


@remote(first)
async def one(x):
    return x + 1


@remote(second)
async def two(x):
    return x + 2
"""


@pytest.mark.network  # flash build downloads wheels (uv's cache makes it fast)
@pytest.mark.timeout(300)
def test_a_deploy_that_fails_halfway_says_so_and_sending_again_converges(
    daemon: Daemon, project: Path
) -> None:
    (project / "main.py").write_text(HALF)
    assert flash("build", cwd=project, timeout=240).returncode == 0
    lines = fails("deploy", "send", "production", cwd=project)
    # flash local refuses the second resource's env: the command fails naming it, after
    # the first resource's endpoint was saved whole
    assert any("LD_PRELOAD" in line for line in lines), lines
    info = as_json("deploy", "info", "production", cwd=project)
    assert [e["name"] for e in info["endpoints"]] == ["first"]
    first_id = info["endpoints"][0]["id"]

    (project / "main.py").write_text(
        HALF.replace(', env={"LD_PRELOAD": "/tmp/evil.so"}', "")
    )
    assert flash("build", cwd=project, timeout=240).returncode == 0
    done = flash("deploy", "send", "production", "--json", cwd=project)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["added"] == ["second"]
    assert result["updated"] == ["first"]  # the source changed
    assert result["endpoints"]["first"] == first_id  # the same endpoint, no second one
    info = as_json("deploy", "info", "production", cwd=project)
    assert sorted(e["name"] for e in info["endpoints"]) == ["first", "second"]
    with daemon.client() as client:
        for name, expected in (("first", 2), ("second", 3)):
            answer = client.post(
                f"/v2/{result['endpoints'][name]}/runsync?wait=60000",
                json={"input": {"x": 1}},
            ).json()
            assert answer["output"] == expected, answer
