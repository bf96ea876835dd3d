"""The ``flash`` command's help, version, errors and progress, run as the real console script.

Every command and sub-command is found by walking ``flash``'s argument parser, so a new one
is checked without listing it here; a handful run as subprocesses (the installed ``flash``
script), the rest through the same parser in this process.
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import io
import json
import os
import pty
import re
import subprocess
import sys
import tarfile
import threading
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import flash_actors
from flash_actors.errors import DeliveryError
from flash_actors.providers.runpod.flash_apps import ByteProgress, FlashApps
from flash_actors.providers.runpod.graphql import ControlPlane
from flash_actors.providers.runpod.transport import (
    UPLOAD_CHUNK,
    FileUploader,
    HttpsTransport,
    RecordedRequest,
    RecordingTransport,
    Response,
    json_response,
)
from flash_actors_cli._target import StepProgress
from flash_actors_cli.main import build_parser
from tests._daemon import Daemon

if TYPE_CHECKING:
    from collections.abc import Iterator

SCRIPT = Path(sys.executable).parent / "flash"
pytestmark = pytest.mark.timeout(
    240
)  # several interpreter starts per test, on a busy machine
COLUMNS = "100"
ANSI = re.compile(r"\x1b\[")


def flash(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the installed ``flash`` script (``python -m`` where it is not installed).

    ``env``: the whole environment (default: this one).
    """
    command = (
        [str(SCRIPT)]
        if SCRIPT.is_file()
        else [sys.executable, "-m", "flash_actors_cli.main"]
    )
    return subprocess.run(
        [*command, *args],
        cwd=cwd,
        env={**(os.environ if env is None else env), "COLUMNS": COLUMNS},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """``flash`` and every command and sub-command below it, with its words."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, (*path, name))


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """A parser's options that take or switch something (not --help, not --version)."""
    return [
        action
        for action in parser._actions
        if action.option_strings
        and not isinstance(action, (argparse._HelpAction, argparse._VersionAction))
    ]


def test_every_option_of_every_command_says_its_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", COLUMNS)
    found = dict(commands(build_parser()))
    # every command of the README is there
    for words in [
        ("local", "up"),
        ("local", "status"),
        ("local", "down"),
        ("build",),
        ("init",),
        ("run",),
        ("deploy", "new"),
        ("deploy", "send"),
        ("deploy", "list"),
        ("deploy", "info"),
        ("deploy", "delete"),
        ("undeploy",),
        ("env", "list"),
        ("env", "create"),
        ("env", "info"),
        ("env", "delete"),
        ("app", "list"),
        ("app", "get"),
        ("app", "create"),
        ("app", "delete"),
    ]:
        assert words in found, words
    checked = 0
    for words, parser in found.items():
        for action in options(parser):
            assert "default" in (action.help or ""), (words, action.option_strings)
            checked += 1
        # a boolean switch says "off" or "ask": never a bare "(default: False)"
        assert "(default: False)" not in parser.format_help(), words
    assert checked > 70
    # The real script prints the same help, exit code 0, for a sample of commands.
    for words in [
        (),
        ("local", "up"),
        ("build",),
        ("deploy", "send"),
        ("app", "delete"),
    ]:
        done = flash(*words, "--help", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert done.stdout == found[words].format_help(), words
        assert done.stdout.count("default") >= len(options(found[words])), words


def test_version_is_the_package_version(tmp_path: Path) -> None:
    done = flash("--version", cwd=tmp_path)
    assert done.returncode == 0
    assert done.stdout == f"flash-actors {metadata.version('flash-actors')}\n"
    assert flash_actors.__version__ == metadata.version("flash-actors")


def _no_runpod_key(tmp_path: Path) -> dict[str, str]:
    """An environment where the RunPod provider finds no API key anywhere."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_")}
    return {**env, "HOME": str(home)}


@pytest.mark.parametrize(
    ("words", "setting", "code", "error", "hint"),
    [
        (
            ("deploy", "list", "--target", "runpod"),
            "no-key",
            1,
            "flash: error: no RunPod API key: set RUNPOD_API_KEY",
            "  hint: -v shows the traceback",
        ),
        (
            ("app", "list", "--state-dir", "link"),
            "link",
            1,
            "flash: error: state folder ",
            "  hint: give --state-dir a folder of your own that is not a symbolic link",
        ),
        (
            ("local", "--state-dir", "link", "up"),
            "link",
            1,
            "flash: error: state folder ",
            "  hint: give --state-dir a folder of your own that is not a symbolic link",
        ),
    ],
)
def test_an_error_is_one_line_and_a_hint_and_v_shows_the_traceback(
    tmp_path: Path,
    words: tuple[str, ...],
    setting: str,
    code: int,
    error: str,
    hint: str,
) -> None:
    folder = tmp_path / "myapp"
    folder.mkdir()
    env = _no_runpod_key(tmp_path)
    if setting == "link":  # a state folder that is a symbolic link is refused
        (tmp_path / "real").mkdir()
        (folder / "link").symlink_to(tmp_path / "real")
    done = flash(*words, cwd=folder, env=env)
    assert done.returncode == code, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 2, done.stderr
    assert lines[0].startswith(error), lines
    assert lines[1] == hint
    assert "Traceback" not in done.stderr
    if setting == "link":
        assert list((tmp_path / "real").iterdir()) == []  # nothing written through it
    # -v after the command, or before it: the traceback, then the same two lines
    for argv in ([*words, "-v"], ["-v", *words]):
        verbose = flash(*argv, cwd=folder, env=env)
        assert verbose.returncode == code, argv
        assert "Traceback (most recent call last)" in verbose.stderr, argv
        assert verbose.stderr.splitlines()[-2:] == lines, argv


def test_local_status_reports_a_stopped_daemon_as_an_error(tmp_path: Path) -> None:
    done = flash("local", "status", "--json", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        "flash: error: flash local is not running",
        "  hint: start it with `flash local up`",
    ]


# -- progress -------------------------------------------------------------------------------


def _fake_build(project: Path, size: int) -> None:
    """A build with no resources whose archive holds ``size`` incompressible bytes."""
    manifest: dict[str, Any] = {
        "version": "1.0",
        "project_name": project.name,
        "resources": {},
        "function_registry": {},
        "routes": {},
    }
    flash_dir = project / ".flash"
    flash_dir.mkdir(exist_ok=True)
    text = json.dumps(manifest).encode()
    (flash_dir / "flash_manifest.json").write_bytes(text)
    with tarfile.open(flash_dir / "artifact.tar.gz", "w:gz") as tar:
        for name, data in (
            ("flash_manifest.json", text),
            ("blob.bin", os.urandom(size)),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    running = Daemon(tmp_path / "myapp" / ".flash")
    try:
        yield running
    finally:
        running.stop()


def test_upload_shows_bytes_sent_as_plain_lines_off_a_terminal(
    daemon: Daemon, tmp_path: Path
) -> None:
    project = tmp_path / "myapp"
    _fake_build(project, 3 * 2**20)
    done = flash("deploy", "send", "production", cwd=project)
    assert done.returncode == 0, done.stderr
    assert not ANSI.search(done.stderr), done.stderr  # no spinner, no colours
    sent = [
        line
        for line in done.stderr.splitlines()
        if line.startswith("flash: uploading .flash/artifact.tar.gz: sent ")
    ]
    # a few lines (each quarter crossed), not one per chunk, ending at the whole archive
    assert 2 <= len(sent) <= 4, done.stderr
    size = (project / ".flash" / "artifact.tar.gz").stat().st_size
    assert sent[-1] == (
        f"flash: uploading .flash/artifact.tar.gz: sent {size / 2**20:.1f} MiB of "
        f"{size / 2**20:.1f} MiB (100%)"
    )
    percents = [int(re.findall(r"\((\d+)%\)$", line)[0]) for line in sent]
    assert percents == sorted(percents)
    assert percents[0] < 100


def test_upload_shows_a_bar_on_a_terminal(daemon: Daemon, tmp_path: Path) -> None:
    project = tmp_path / "myapp"
    _fake_build(project, 3 * 2**20)
    command = [str(SCRIPT)] if SCRIPT.is_file() else ["flash"]
    leader, follower = pty.openpty()
    out = bytearray()
    try:
        with subprocess.Popen(
            [*command, "deploy", "send", "production"],
            cwd=project,
            env={**os.environ, "COLUMNS": COLUMNS, "TERM": "xterm"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=follower,
        ) as proc:
            os.close(follower)
            follower = -1
            while True:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # EIO: the command closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            assert proc.stdout is not None
            stdout = proc.stdout.read().decode()
            assert proc.wait(timeout=60) == 0, out.decode(errors="replace")
    finally:
        os.close(leader)
        if follower != -1:
            os.close(follower)
    drawn = out.decode(errors="replace")
    assert "\x1b[" in drawn  # drawn live, not as lines
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", drawn)
    assert "flash: uploading .flash/artifact.tar.gz: sent" not in text
    assert "3.0 MiB/3.0 MiB" in text  # the bytes column of the bar
    assert "✓ uploading .flash/artifact.tar.gz (" in text
    assert stdout.startswith("deployed build ")


class Lines(StepProgress):
    """A `StepProgress` that keeps what it is told instead of printing it."""

    def __init__(self) -> None:
        super().__init__("uploading")
        self.lines: list[str] = []
        self.bytes: list[tuple[int, int]] = []

    def __call__(self, line: str) -> None:
        self.lines.append(line)

    def transferred(self, done: int, total: int) -> None:
        self.bytes.append((done, total))


async def test_upload_reports_bytes_through_a_transport_that_cannot_stream(
    tmp_path: Path,
) -> None:
    """`RecordingTransport` is no `FileUploader`: the archive goes in one body, reported."""
    archive = tmp_path / "artifact.tar.gz"
    _fake_build(tmp_path, 1000)
    (tmp_path / ".flash" / "artifact.tar.gz").rename(archive)

    def answer(request: RecordedRequest) -> Response:
        if request.method == "PUT":
            assert request.body == archive.read_bytes()
            return Response(200, b"", {})
        query = request.json()["query"]
        if "prepareFlashArtifactUpload" in query:
            target = {"uploadUrl": "https://upload.test/x", "objectKey": "k"}
            return json_response({"data": {"prepareFlashArtifactUpload": target}})
        return json_response({"data": {"finalizeFlashArtifactUpload": {"id": "b1"}}})

    transport = RecordingTransport(answer)
    apps = FlashApps(ControlPlane(transport, "https://api.test", "key"), transport)
    shown = Lines()
    assert isinstance(shown, ByteProgress)
    upload = await apps.upload_build("app", archive, {}, progress=shown)
    assert upload.build == {"id": "b1"}
    size = archive.stat().st_size
    assert shown.bytes == [(0, size), (size, size)]
    assert shown.lines[0] == "uploading 0.0 MiB"


def test_plain_step_progress_prints_each_quarter_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    shown = StepProgress("uploading x")
    for done in range(0, 101, 5):
        shown.transferred(done, 100)
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "flash: uploading x: sent 25 B of 100 B (25%)",
        "flash: uploading x: sent 50 B of 100 B (50%)",
        "flash: uploading x: sent 75 B of 100 B (75%)",
        "flash: uploading x: sent 100 B of 100 B (100%)",
    ]


def test_the_readme_shows_every_command_with_an_example() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    rows = [line for line in readme.splitlines() if line.startswith("| `flash ")]
    leaves = [
        words
        for words, parser in commands(build_parser())
        if words
        and not any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)
    ]
    assert len(leaves) >= 20
    for words in leaves:
        name = "flash " + " ".join(words)
        row = next((r for r in rows if r.startswith(f"| `{name}")), None)
        assert row is not None, f"README has no table row for {name}"
        example = row.split("|")[2]
        assert f"`{name}" in example, row  # the example runs that very command


@pytest.fixture
def put_server() -> Iterator[str]:
    """A plain HTTP server on 127.0.0.1 answering a PUT with what arrived, as JSON."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_PUT(self) -> None:
            size = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(size)
            answer = json.dumps(
                {
                    "length": len(body),
                    "content_length": self.headers.get("Content-Length"),
                    "transfer_encoding": self.headers.get("Transfer-Encoding"),
                    "content_type": self.headers.get("Content-Type"),
                    "sha256": hashlib.sha256(body).hexdigest(),
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args: Any) -> None:
            del args

    class Server(http.server.ThreadingHTTPServer):
        def handle_error(self, *args: Any) -> None:
            del args  # the shortened upload breaks its connection on purpose

    server = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/upload"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


async def test_https_transport_streams_a_file_with_its_length(
    put_server: str, tmp_path: Path
) -> None:
    path = tmp_path / "archive.tar.gz"
    data = os.urandom(2 * UPLOAD_CHUNK + 5)
    path.write_bytes(data)
    seen: list[int] = []
    transport = HttpsTransport()
    try:
        assert isinstance(transport, FileUploader)
        answer = await transport.upload_file(
            "PUT",
            put_server,
            path,
            len(data),
            headers={"Content-Type": "application/gzip"},
            sent=seen.append,
        )
        assert answer.status == 200
        got = json.loads(answer.body)
        # a Content-Length, never chunked: presigned upload URLs refuse chunked bodies
        assert got == {
            "length": len(data),
            "content_length": str(len(data)),
            "transfer_encoding": None,
            "content_type": "application/gzip",
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        assert seen == [UPLOAD_CHUNK, 2 * UPLOAD_CHUNK, len(data)]
        # a file shorter than announced fails the upload, naming the file
        with pytest.raises(DeliveryError, match="shrank to"):
            await transport.upload_file("PUT", put_server, path, len(data) + 10)
    finally:
        await transport.aclose()
