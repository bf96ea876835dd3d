"""Dependencies are signed, checked and refused safely; a refused job is final, not retried.

The daemon tests POST FunctionRequests to a real ``flash local`` daemon; the hostile
dependency is a local folder whose build backend writes a marker file when pip loads it
(it does, offline, on a build that acts on unsigned dependencies).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import msgspec
import pytest

from flash_actors import (
    ConfigurationError,
    CpuLiveServerless,
    JobStatus,
    PayloadSignatureError,
    RetryPolicy,
    remote,
    runtime,
)
from flash_actors.messages import FunctionRequest, wire_encoder
from flash_actors.providers.local import LocalProvider
from flash_actors.providers.local.daemon.catalog import config_of
from flash_actors.serialization import (
    RequestSigner,
    derive_key,
    endpoint_key,
    master_secret,
    set_master_secret,
    verify_request,
)
from flash_actors.worker.installer import (
    apt_install_command,
    check_requirement,
    check_system_package,
)
from tests._daemon import Daemon, wait_for

KEY = b"k" * 32

FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}

CODE = "def hello():\n    return 'hello'\n"


def template(**fields: Any) -> FunctionRequest:
    return FunctionRequest(function_name="hello", function_code=CODE, **fields)


# --- the signature covers what installs -----------------------------------------------------


@pytest.mark.parametrize(
    "changed",
    [
        {"dependencies": ["six", "requests"]},
        {"dependencies": ["six>=1"]},
        {"dependencies": None},
        {"system_dependencies": ["curl"]},
        {"system_dependencies": []},
        {"accelerate_downloads": False},
    ],
)
def test_the_signature_covers_dependencies_and_options(changed: dict[str, Any]) -> None:
    signed = RequestSigner(KEY, template(dependencies=["six"])).sign([1], {})
    verify_request(signed, KEY)
    swapped = msgspec.structs.replace(signed, **changed)
    with pytest.raises(PayloadSignatureError, match=r"^refusing request for 'hello'"):
        verify_request(swapped, KEY)


# --- package specs --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "canonical"),
    [
        ("numpy", "numpy"),
        ("NumPy>=1.26", "numpy>=1.26"),
        ("Pillow[AVIF, jpeg] >=10, <12", "pillow[avif,jpeg]<12,>=10"),
        ("zope.interface==6.*", "zope-interface==6.*"),
        ("torch~=2.3.0", "torch~=2.3.0"),
        ("uvloop; sys_platform != 'win32'", 'uvloop; sys_platform != "win32"'),
        ("a.tar.gz", "a-tar-gz"),  # never a file name for pip
    ],
)
def test_good_requirements_are_canonical(spec: str, canonical: str) -> None:
    assert check_requirement(spec) == canonical


@pytest.mark.parametrize(
    "spec",
    [
        "./dir",
        "/abs/path",
        "../up",
        "dir/sub",
        "file:///tmp/x",
        "git+https://example.com/x.git",
        "https://example.com/x-1.0-py3-none-any.whl",
        "pkg @ https://example.com/x.whl",
        "pkg@file:///tmp/x",
        "-e .",
        "-e",
        "--index-url https://evil.example",
        "--extra-index-url=https://evil.example",
        "-r requirements.txt",
        "numpy --index-url https://evil.example",
        "numpy\n--index-url=https://evil.example",
        "numpy\t",
        "nump\u0443",  # a Cyrillic u
        "numpy==1.0 --hash=sha256:00",
        "numpy==1.0+local.whl",  # pip would read it as a file name
        "numpy==1.0+a.tar.gz",
        "a===/srv/x.whl",
        "numpy===1.0",
        "",
        "   ",
        "x" * 501,
    ],
)
def test_hostile_requirements_are_refused_by_name(spec: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        check_requirement(spec)
    assert str(info.value).startswith(f"dependency {spec!r} ")


@pytest.mark.parametrize(
    "name",
    ["ffmpeg", "libgl1", "g++", "libstdc++6", "python3.11", "curl=7.88.1-10+deb12u5",
     "libc6:amd64", "tzdata=2024a-0+deb12u1", "openssl=1:3.0.11-1"],
)  # fmt: skip
def test_good_debian_names(name: str) -> None:
    assert check_system_package(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "-oAPT::Update::Pre-Invoke::=touch /tmp/x",
        "-o",
        "--allow-unauthenticated",
        "./evil.deb",
        "/var/cache/evil.deb",
        "evil.deb",
        "curl-",  # apt reads it as "remove curl"
        "Curl",
        "curl/bookworm",
        "lib*",
        "a",
        "curl=",
        "curl=version",
        "curl foo",
        "curl\n",
        "",
    ],
)
def test_hostile_debian_names_are_refused(name: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        check_system_package(name)
    assert str(info.value).startswith(f"system dependency {name!r} is not a Debian")


def test_apt_get_gets_double_dash_before_the_names() -> None:
    command = apt_install_command(["curl", "g++"])
    assert command[0] == "apt-get"
    assert command[-3:] == ["--", "curl", "g++"]
    assert all(arg.startswith("-") or arg == "install" for arg in command[1:-3])
    with pytest.raises(ConfigurationError, match=r"^system dependency '-o"):
        apt_install_command(["-oDebug::pkgProblemResolver=1", "curl"])


def test_remote_refuses_bad_dependencies_at_decoration_time() -> None:
    cfg = CpuLiveServerless(name="sign-decoration")
    with pytest.raises(
        ConfigurationError,
        match=r"^@remote function '\S+\.f': dependency 'pkg @ https://x\.example/p\.whl' is a direct reference",
    ):

        @remote(cfg, dependencies=["numpy", "pkg @ https://x.example/p.whl"])
        async def f() -> None: ...

    with pytest.raises(
        ConfigurationError,
        match=r"^@remote class '\S+\.C': system dependency '--allow-unauthenticated' is not",
    ):

        @remote(cfg, system_dependencies=["--allow-unauthenticated"])
        class C:
            def m(self) -> None: ...


# --- a real daemon ----------------------------------------------------------------------------


def hostile_folder(tmp_path: Path) -> tuple[Path, Path]:
    """A local project whose in-tree build backend writes ``marker`` when pip loads it."""
    folder = tmp_path / "hostile"
    folder.mkdir()
    marker = tmp_path / "marker"
    (folder / "pyproject.toml").write_text(
        '[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n'
    )
    code = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
    (folder / "backend.py").write_text(code)
    (folder / "setup.py").write_text(code)
    return folder, marker


@pytest.mark.timeout(120)
def test_the_daemon_installs_nothing_unsigned_and_refusals_are_final(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLASH_CACHE_DIR", str(tmp_path / "envs"))
    folder, marker = hostile_folder(tmp_path)
    name = "sign-e2e"
    d = Daemon(tmp_path / ".flash")
    try:
        assert d.record is not None
        key = derive_key(bytes.fromhex(d.record.secret), name)
        with d.client() as client:
            config = wire_encoder.encode(config_of(CpuLiveServerless(name=name)))
            answer = client.put(f"/flash/v1/endpoints/{name}", content=config)
            assert answer.status_code == 200, answer.text

            def run(request: FunctionRequest) -> dict[str, Any]:
                body = b'{"input":' + wire_encoder.encode(request) + b"}"
                posted = client.post(
                    f"/v2/{name}/run",
                    content=body,
                    headers={"Content-Type": "application/json"},
                )
                assert posted.status_code == 200, posted.text
                return wait_for(client, name, posted.json()["id"], FINAL)

            # 1. unsigned, with a local folder as its dependency: the daemon signs what a
            # holder of its API key sends, and the package check still refuses the path
            unsigned = template(dependencies=[str(folder)])
            body = run(unsigned)
            assert body["status"] == "FAILED"
            assert body["error"].startswith(f"dependency {str(folder)!r} is not a")
            assert body["retries"] == 0
            # 2. signed over other dependencies, then swapped for the folder
            signed = RequestSigner(key, template(dependencies=["six"])).sign([], {})
            swapped = msgspec.structs.replace(signed, dependencies=[str(folder)])
            body = run(swapped)
            assert body["error"].startswith(
                "refusing request for 'hello': its signature does not match"
            )
            assert body["retries"] == 0
            # 3. signed with the endpoint's key, but the spec is a path: refused by the check
            hostile = RequestSigner(key, template(dependencies=[str(folder)]))
            body = run(hostile.sign([], {}))
            assert body["error"].startswith(f"dependency {str(folder)!r} is not a")
            assert body["retries"] == 0
            assert not marker.exists()
            assert not (tmp_path / "envs").exists()  # no environment was even made
            # 4. item 12: a job its worker refuses fails once, with the refusal
            # (signed wrongly, with no dependencies: it reaches a worker)
            body = run(template(signature="v2:" + "0" * 64))
            assert body["status"] == "FAILED"
            assert body["error"].startswith("worker sign-e2e-")
            assert (
                "refused the job: PayloadSignatureError: refusing request for 'hello': "
                "its signature does not match" in (body["error"])
            )
            assert body["retries"] == 0
        assert not marker.exists()
    finally:
        d.stop()


# --- the embedded provider ------------------------------------------------------------------

ROTATED = CpuLiveServerless(
    name="sign-rotated", retryPolicy=RetryPolicy(attempts=3, backoff_s=0.01)
)


@remote(ROTATED)
async def rotated() -> str:
    return "ok"


async def test_a_refused_call_is_not_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="flash_actors")
    provider = LocalProvider(state_dir=tmp_path / ".flash")
    old = master_secret()
    async with runtime(provider=provider):
        assert (await rotated()).output == "ok"
        try:
            # The workers keep the old endpoint key; the caller now signs with a new one.
            set_master_secret(bytes(32))
            assert endpoint_key("sign-rotated") != derive_key(old, "sign-rotated")
            job = await rotated()
        finally:
            set_master_secret(old)
    assert job.status == JobStatus.FAILED
    assert isinstance(job.exception, PayloadSignatureError)
    assert job.error is not None
    assert job.error.startswith("worker sign-rotated-")
    assert "refused the job: PayloadSignatureError: refusing request" in job.error
    retries = [r for r in caplog.records if "job.retry" in r.getMessage()]
    assert retries == []  # one attempt: the refusal is final
