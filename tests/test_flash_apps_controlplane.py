"""RunPod's Flash control plane on a real ``flash local`` daemon, over HTTP on 127.0.0.1.

Apps, environments and builds as runpod-flash 1.21 sends them (its queries, both request
forms), the archive upload to the daemon's one-time URL, deployBuildToEnvironment unpacking
the build, and a daemon killed mid-upload leaving a consistent store.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import tarfile
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
import pytest

from flash_actors.providers.runpod import flash_apps as q
from tests._daemon import Daemon, wait_gone

if TYPE_CHECKING:
    from collections.abc import Iterator

MANIFEST = {"version": "1.0", "resources": {"cpu_worker": {"resource_type": "x"}}}


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    project = tmp_path / "demo"
    project.mkdir()
    running = Daemon(project / ".flash")
    try:
        yield running
    finally:
        running.stop()


def url_of(daemon: Daemon) -> str:
    assert daemon.record is not None
    return daemon.record.url


def gql(daemon: Daemon, query: str, variables: dict[str, Any] | None = None) -> Any:
    with daemon.client() as client:
        answer = client.post(
            "/graphql", json={"query": query, "variables": variables or {}}
        )
    assert answer.status_code == 200, answer.text
    return answer.json()


def ok(daemon: Daemon, query: str, variables: dict[str, Any] | None = None) -> Any:
    body = gql(daemon, query, variables)
    assert "errors" not in body, body
    return body["data"]


def error(daemon: Daemon, query: str, variables: dict[str, Any] | None = None) -> str:
    body = gql(daemon, query, variables)
    assert body["data"] is None, body
    message: str = body["errors"][0]["message"]
    return message


def archive(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def upload(daemon: Daemon, app_id: str, blob: bytes) -> dict[str, Any]:
    """prepare, PUT (no API key, as Flash sends it), finalize: the build."""
    target = ok(
        daemon,
        q.PREPARE_UPLOAD,
        {"input": {"flashAppId": app_id, "tarballSize": len(blob)}},
    )["prepareFlashArtifactUpload"]
    answer = httpx.put(
        target["uploadUrl"], content=blob, headers={"Content-Type": "application/gzip"}
    )
    assert answer.status_code == 200, answer.text
    build: dict[str, Any] = ok(
        daemon,
        q.FINALIZE_UPLOAD,
        {
            "input": {
                "flashAppId": app_id,
                "objectKey": target["objectKey"],
                "manifest": MANIFEST,
            }
        },
    )["finalizeFlashArtifactUpload"]
    return build


def test_apps_and_environments_in_both_request_forms(daemon: Daemon) -> None:
    app = ok(daemon, q.CREATE_APP, {"input": {"name": "demo"}})["createFlashApp"]
    assert len(app["id"]) == 36  # a UUID, as RunPod's
    assert app["name"] == "demo"
    # The inline form (values written into the document) gives the same answers.
    inline = 'mutation { createFlashEnvironment(input: {flashAppId: "%s", name: "prod"}) { id name } }'
    env = ok(daemon, inline % app["id"])["createFlashEnvironment"]
    assert env["name"] == "prod"
    staging = ok(
        daemon,
        q.CREATE_ENVIRONMENT,
        {"input": {"flashAppId": app["id"], "name": "staging"}},
    )["createFlashEnvironment"]

    assert error(daemon, q.CREATE_APP, {"input": {"name": "demo"}}) == (
        'Flash app with name "demo" already exists'
    )
    assert error(daemon, inline % app["id"]) == (
        'Flash environment "prod" already exists in app "demo"'
    )
    # runpod-flash tells "missing" from "failed" by these words.
    missing = error(daemon, q.GET_APP_BY_NAME, {"flashAppName": "nope"})
    assert "app not found" in missing.lower()
    assert "not found" in error(
        daemon,
        q.GET_ENVIRONMENT_BY_NAME,
        {"input": {"flashAppId": app["id"], "name": "x"}},
    )
    assert "build not found" in error(daemon, q.GET_BUILD, {"input": "nope"}).lower()
    assert "app not found" in error(daemon, q.GET_APP, {"input": "nope"}).lower()

    listed = ok(daemon, q.LIST_APPS)["myself"]["flashApps"]
    assert [a["name"] for a in listed] == ["demo"]
    assert {e["name"] for e in listed[0]["flashEnvironments"]} == {"prod", "staging"}
    assert {e["state"] for e in listed[0]["flashEnvironments"]} == {"PENDING"}
    by_name = ok(daemon, q.GET_APP_BY_NAME, {"flashAppName": "demo"})["flashAppByName"]
    assert by_name["id"] == app["id"]
    assert by_name["flashBuilds"] == []
    envs = ok(daemon, q.LIST_ENVIRONMENTS, {"flashAppId": app["id"]})["flashApp"]
    assert len(envs["flashEnvironments"]) == 2
    one = ok(daemon, q.GET_ENVIRONMENT, {"flashEnvironmentId": env["id"]})[
        "flashEnvironment"
    ]
    assert one["activeBuildId"] is None
    assert one["endpoints"] == []
    inline_by_name = (
        f'query {{ flashEnvironmentByName(input: {{flashAppId: "{app["id"]}", '
        'name: "staging"}) { id state } }'
    )
    assert ok(daemon, inline_by_name)["flashEnvironmentByName"]["id"] == staging["id"]

    # Deleting the environment forgets it; deleting the app forgets the rest.
    assert ok(daemon, q.DELETE_ENVIRONMENT, {"flashEnvironmentId": staging["id"]}) == {
        "deleteFlashEnvironment": True
    }
    assert "not found" in error(
        daemon, q.GET_ENVIRONMENT, {"flashEnvironmentId": staging["id"]}
    )
    ok(daemon, q.DELETE_APP, {"flashAppId": app["id"]})
    assert ok(daemon, q.LIST_APPS)["myself"]["flashApps"] == []
    # Records survive a restart (they are in controlplane.json).
    ok(daemon, q.CREATE_APP, {"input": {"name": "kept"}})
    daemon.down()
    daemon.up()
    assert [a["name"] for a in ok(daemon, q.LIST_APPS)["myself"]["flashApps"]] == [
        "kept"
    ]


def test_upload_and_deploy_unpack_the_build_per_environment(daemon: Daemon) -> None:
    app = ok(daemon, q.CREATE_APP, {"input": {"name": "demo"}})["createFlashApp"]
    env = ok(
        daemon,
        q.CREATE_ENVIRONMENT,
        {"input": {"flashAppId": app["id"], "name": "prod"}},
    )["createFlashEnvironment"]
    blob = archive(
        {"flash_manifest.json": json.dumps(MANIFEST).encode(), "pkg/a.py": b"x = 1\n"}
    )
    build = upload(daemon, app["id"], blob)
    assert build["manifest"] == MANIFEST
    deployed = ok(
        daemon,
        q.DEPLOY_BUILD,
        {"input": {"flashEnvironmentId": env["id"], "flashBuildId": build["id"]}},
    )["deployBuildToEnvironment"]
    assert deployed["activeArtifact"]["objectKey"].endswith(".tar.gz")
    folder = daemon.state_dir / "deployments" / env["id"] / build["id"]
    assert (folder / "pkg" / "a.py").read_text() == "x = 1\n"

    state = ok(daemon, q.GET_ENVIRONMENT, {"flashEnvironmentId": env["id"]})[
        "flashEnvironment"
    ]
    assert state["activeBuildId"] == build["id"]
    # As on RunPod, deploying starts nothing: the deploying client saves the endpoints.
    assert state["state"] == "DEPLOYED"
    assert state["endpoints"] == []
    builds = ok(daemon, q.LIST_BUILDS, {"flashAppId": app["id"]})["flashApp"][
        "flashBuilds"
    ]
    assert [b["id"] for b in builds] == [build["id"]]
    new_manifest = {**MANIFEST, "resources_endpoints": {"cpu_worker": "http://x"}}
    ok(
        daemon,
        q.UPDATE_BUILD_MANIFEST,
        {"input": {"flashBuildId": build["id"], "manifest": new_manifest}},
    )
    assert (
        ok(daemon, q.GET_BUILD, {"input": build["id"]})["flashBuild"]["manifest"]
        == new_manifest
    )

    # A second build replaces the first one's folder.
    second = upload(daemon, app["id"], archive({"b.txt": b"two"}))
    ok(
        daemon,
        q.DEPLOY_BUILD,
        {"input": {"flashEnvironmentId": env["id"], "flashBuildId": second["id"]}},
    )
    assert (
        daemon.state_dir / "deployments" / env["id"] / second["id"] / "b.txt"
    ).exists()
    assert not folder.exists()

    # An archive leaving its folder is refused (tarfile's "data" filter); nothing changes.
    evil = upload(daemon, app["id"], archive({"../../escaped.txt": b"no"}))
    message = error(
        daemon,
        q.DEPLOY_BUILD,
        {"input": {"flashEnvironmentId": env["id"], "flashBuildId": evil["id"]}},
    )
    assert message.startswith(f"the archive of build {evil['id']} cannot be unpacked: ")
    assert not list(daemon.state_dir.rglob("escaped.txt"))
    after = ok(daemon, q.GET_ENVIRONMENT, {"flashEnvironmentId": env["id"]})[
        "flashEnvironment"
    ]
    assert after["activeBuildId"] == second["id"]

    # Deleting the app removes its folders and archives.
    ok(daemon, q.DELETE_APP, {"flashAppId": app["id"]})
    assert not (daemon.state_dir / "deployments" / env["id"]).exists()
    assert list((daemon.state_dir / "builds").iterdir()) == []


def test_uploads_are_refused_without_a_valid_token_or_with_the_wrong_size(
    daemon: Daemon,
) -> None:
    app = ok(daemon, q.CREATE_APP, {"input": {"name": "demo"}})["createFlashApp"]
    blob = archive({"a.txt": b"a" * 1000})
    target = ok(
        daemon,
        q.PREPARE_UPLOAD,
        {"input": {"flashAppId": app["id"], "tarballSize": len(blob)}},
    )["prepareFlashArtifactUpload"]
    url = target["uploadUrl"]
    assert url.startswith(url_of(daemon) + "/flash/v1/uploads/")
    bad = url[:-4] + ("aaaa" if not url.endswith("aaaa") else "bbbb")
    answer = httpx.put(bad, content=blob)
    assert answer.status_code == 403
    assert answer.json() == {
        "error": "this upload URL is not valid (unknown or expired)"
    }
    assert (
        httpx.put(url, content=blob + b"x").status_code == 400
    )  # not the size announced
    assert httpx.put(url, content=blob[:-1]).status_code == 400
    finalize = {
        "input": {
            "flashAppId": app["id"],
            "objectKey": target["objectKey"],
            "manifest": {},
        }
    }
    assert "no archive arrived" in error(daemon, q.FINALIZE_UPLOAD, finalize)
    assert (
        httpx.put(url, content=blob).status_code == 200
    )  # a failed PUT may be sent again
    again = httpx.put(url, content=blob)
    assert again.status_code == 403
    assert again.json()["error"] == "this upload URL was used already"
    assert ok(daemon, q.FINALIZE_UPLOAD, finalize)["finalizeFlashArtifactUpload"]["id"]
    # Over RunPod's 500 MiB: refused when asking for the URL, and from Content-Length.
    too_big = {"input": {"flashAppId": app["id"], "tarballSize": 500 * 2**20 + 1}}
    assert error(daemon, q.PREPARE_UPLOAD, too_big).startswith(
        "prepareFlashArtifactUpload: tarballSize 524288001 is out of range"
    )
    small = ok(
        daemon,
        q.PREPARE_UPLOAD,
        {"input": {"flashAppId": app["id"], "tarballSize": 10}},
    )
    # A Content-Length over the limit is refused before any byte of the body is read.
    huge = urlsplit(small["prepareFlashArtifactUpload"]["uploadUrl"])
    with socket.create_connection((huge.hostname, huge.port)) as sock:
        sock.sendall(
            f"PUT {huge.path} HTTP/1.1\r\nHost: {huge.netloc}\r\n"
            f"Content-Length: {600 * 2**20}\r\n\r\n".encode()
        )
        assert sock.recv(100).startswith(b"HTTP/1.1 413 ")
    # Every other route still needs the API key.
    assert (
        httpx.post(url_of(daemon) + "/graphql", json={"query": q.LIST_APPS}).status_code
        == 401
    )


def test_a_daemon_killed_mid_upload_leaves_a_consistent_store(daemon: Daemon) -> None:
    app = ok(daemon, q.CREATE_APP, {"input": {"name": "demo"}})["createFlashApp"]
    blob = archive({"a.bin": os.urandom(200_000)})
    target = ok(
        daemon,
        q.PREPARE_UPLOAD,
        {"input": {"flashAppId": app["id"], "tarballSize": len(blob)}},
    )["prepareFlashArtifactUpload"]
    url = urlsplit(target["uploadUrl"])
    uploads = daemon.state_dir / "uploads"
    with socket.create_connection((url.hostname, url.port)) as sock:
        head = (
            f"PUT {url.path} HTTP/1.1\r\nHost: {url.netloc}\r\n"
            f"Content-Type: application/gzip\r\nContent-Length: {len(blob)}\r\n\r\n"
        )
        sock.sendall(head.encode() + blob[: len(blob) // 2])
        deadline = time.monotonic() + 10
        while not list(uploads.glob(".*.part")):
            assert time.monotonic() < deadline, "the upload never started"
            time.sleep(0.02)
        pid = daemon.pid
        os.kill(pid, signal.SIGKILL)
        assert wait_gone([pid]) == []
    stored = json.loads((daemon.state_dir / "controlplane.json").read_text())
    assert [a["name"] for a in stored["apps"]] == ["demo"]
    assert stored["builds"] == []
    daemon.up()
    assert list(uploads.iterdir()) == []  # the partial file is gone
    # The old URL died with the daemon; a new upload works.
    assert (
        httpx.put(
            target["uploadUrl"].replace(
                str(url.port), str(urlsplit(url_of(daemon)).port)
            ),
            content=blob,
        ).status_code
        == 403
    )
    build = upload(daemon, app["id"], blob)
    builds = ok(daemon, q.LIST_BUILDS, {"flashAppId": app["id"]})["flashApp"][
        "flashBuilds"
    ]
    assert [b["id"] for b in builds] == [build["id"]]


FLASH_CLIENT = textwrap.dedent(
    """
    import asyncio, json, sys
    from pathlib import Path
    from runpod_flash.core.resources.app import FlashApp, FlashAppNotFoundError

    async def main():
        out = {}
        app, env = await FlashApp.create_environment_and_app("rf-app", "production")
        out["env"] = env["name"]
        build = await app.upload_build(Path(".flash/artifact.tar.gz"))
        out["manifest"] = build["manifest"]
        deployed = await app.deploy_build_to_environment(build["id"], environment_name="production")
        out["artifact"] = deployed["activeArtifact"]["objectKey"]
        found = await app.get_environment_by_name("production")
        out["active"] = found["activeBuildId"] == build["id"]
        out["builds"] = len(await app.list_builds())
        out["apps"] = [a["name"] for a in await FlashApp.list()]
        await app.update_build_manifest(build["id"], {"resources": {}})
        out["updated"] = await app.get_build_manifest(build["id"])
        try:
            await FlashApp.from_name("missing-app")
        except FlashAppNotFoundError:
            out["missing"] = True
        out["deleted_env"] = await app.delete_environment("production")
        out["deleted_app"] = await FlashApp.delete(app_name="rf-app")
        print(json.dumps(out))

    asyncio.run(main())
    """
)


@pytest.mark.slow
@pytest.mark.timeout(1200)  # the first run builds runpod-flash's environment
def test_runpod_flash_own_client_drives_the_flash_operations(daemon: Daemon) -> None:
    from tests.test_runpod_flash_program import runpod_flash_env

    python = runpod_flash_env()
    project = daemon.state_dir.parent
    (daemon.state_dir / "artifact.tar.gz").write_bytes(archive({"a.py": b"x = 1\n"}))
    (daemon.state_dir / "flash_manifest.json").write_text(json.dumps(MANIFEST))
    record = daemon.record
    assert record is not None
    home = project.parent / "home"
    home.mkdir()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "RUNPOD_API_KEY": record.api_key,
        "RUNPOD_API_BASE_URL": record.url,
        "RUNPOD_ENDPOINT_BASE_URL": f"{record.url}/v2",
        "RUNPOD_URL_MIXED_OK": "1",
    }
    done = subprocess.run(
        [str(python), "-c", FLASH_CLIENT],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out == {
        "env": "production",
        "manifest": MANIFEST,
        "artifact": out["artifact"],
        "active": True,
        "builds": 1,
        "apps": ["rf-app"],
        "updated": {"resources": {}},
        "missing": True,
        "deleted_env": True,
        "deleted_app": True,
    }
    assert out["artifact"].endswith(".tar.gz")


def test_a_restart_unpacks_deployed_builds_again_and_drops_leftovers(
    daemon: Daemon,
) -> None:
    app = ok(daemon, q.CREATE_APP, {"input": {"name": "demo"}})["createFlashApp"]
    env = ok(
        daemon,
        q.CREATE_ENVIRONMENT,
        {"input": {"flashAppId": app["id"], "name": "prod"}},
    )["createFlashEnvironment"]
    build = upload(daemon, app["id"], archive({"a.txt": b"a"}))
    deploy = {"flashEnvironmentId": env["id"], "flashBuildId": build["id"]}
    ok(daemon, q.DEPLOY_BUILD, {"input": deploy})
    daemon.down()
    folder = daemon.state_dir / "deployments" / env["id"]
    for entry in (folder / build["id"]).iterdir():
        entry.unlink()
    (folder / build["id"]).rmdir()  # as if killed before the folder was renamed in
    (folder / ".half.unpacking").mkdir()
    (daemon.state_dir / "builds" / "orphan.tar.gz").write_bytes(b"x")
    (daemon.state_dir / "deployments" / "gone-env").mkdir()
    daemon.up()
    assert (folder / build["id"] / "a.txt").read_text() == "a"
    assert sorted(p.name for p in folder.iterdir()) == [build["id"]]
    assert not (daemon.state_dir / "builds" / "orphan.tar.gz").exists()
    assert not (daemon.state_dir / "deployments" / "gone-env").exists()
    state = ok(daemon, q.GET_ENVIRONMENT, {"flashEnvironmentId": env["id"]})
    assert state["flashEnvironment"]["activeBuildId"] == build["id"]


SAVE_DEPLOYED = (
    "mutation saveEndpoint($input: EndpointInput!) { saveEndpoint(input: $input) "
    "{ id name flashEnvironmentId } }"
)


def deployed_input(env_id: str, resource: str) -> dict[str, Any]:
    """A deployed resource's endpoint as runpod-flash 1.21's deploy saves it."""
    return {
        "input": {
            "name": resource,
            "flashEnvironmentId": env_id,
            "workersMin": 0,
            "workersMax": 1,
            "instanceIds": ["cpu3c-1-2"],
            "template": {
                "name": f"{resource}-{env_id}",
                "imageName": "runpod/flash-cpu:py3.12-latest",
                "env": [
                    {"key": "FLASH_RESOURCE_NAME", "value": resource},
                    {"key": "FLASH_APP", "value": "demo"},
                ],
            },
        }
    }


def test_a_deployed_endpoint_needs_its_environment_build_and_resource(
    daemon: Daemon,
) -> None:
    app = ok(daemon, q.CREATE_APP, {"input": {"name": "demo"}})["createFlashApp"]
    env = ok(
        daemon,
        q.CREATE_ENVIRONMENT,
        {"input": {"flashAppId": app["id"], "name": "prod"}},
    )["createFlashEnvironment"]
    gone = error(daemon, SAVE_DEPLOYED, deployed_input("no-such-env", "cpu_worker"))
    assert 'Flash environment not found: no environment with id "no-such-env"' in gone
    early = error(daemon, SAVE_DEPLOYED, deployed_input(env["id"], "cpu_worker"))
    assert "Flash environment 'prod' has no build yet" in early
    build = upload(daemon, app["id"], archive({"flash_manifest.json": b"{}"}))
    ok(
        daemon,
        q.DEPLOY_BUILD,
        {"input": {"flashEnvironmentId": env["id"], "flashBuildId": build["id"]}},
    )
    unknown = error(daemon, SAVE_DEPLOYED, deployed_input(env["id"], "gpu_worker"))
    assert "has no resource 'gpu_worker' (it has: cpu_worker)" in unknown
    # nothing of the refused saves was kept
    listed = ok(daemon, "query { myself { endpoints { id } } }")["myself"]["endpoints"]
    assert listed == []
