"""``flash build``: package a project for RunPod Serverless as ``.flash/artifact.tar.gz``.

Parses the options, calls `flash_actors.build.builder.build_project` and prints what was
built. A failure is one line on stderr, ``flash: error: <what>: <what to do>``, and exit
code 1 (``-v`` adds the traceback).
"""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flash_actors._progress import format_bytes, live
from flash_actors.build.builder import SUPPORTED_PYTHONS, BuildOptions, build_project
from flash_actors.errors import FlashRuntimeError

if TYPE_CHECKING:
    import argparse

    from flash_actors.build.builder import BuildResult

__all__ = ["add_parser", "run"]


def add_parser(commands: Any) -> None:
    """Add ``flash build`` to ``flash``'s sub-parsers."""
    build = commands.add_parser(
        "build",
        help="package the project's @remote functions for deployment",
        description=(
            "Scan the project for @remote functions (without running it), write "
            ".flash/flash_manifest.json, install the dependencies as Linux x86_64 wheels "
            "and pack everything into .flash/artifact.tar.gz (RunPod's limit: 500 MB)."
        ),
    )
    build.add_argument(
        "project",
        nargs="?",
        default=".",
        help="the project folder (default: the current folder)",
    )
    build.add_argument(
        "--output",
        "-o",
        metavar="PATH",
        help="where to write the archive (default: PROJECT/.flash/artifact.tar.gz)",
    )
    build.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PKG[,PKG...]",
        help="packages the base image has, left out of the archive (e.g. "
        "torch,torchvision; repeatable) (default: none, but apps with a GPU resource "
        "leave out torch, torchvision and torchaudio)",
    )
    build.add_argument(
        "--keep-build",
        action="store_true",
        help="keep the build folder .flash/.build/ (to inspect the generated handlers) "
        "(default: off: it is removed)",
    )
    build.add_argument(
        "--python-version",
        metavar="3.X",
        help=f"the workers' Python, one of {', '.join(SUPPORTED_PYTHONS)} "
        "(default: this interpreter's)",
    )
    build.add_argument(
        "--preview",
        action="store_true",
        help="then run the built archive here, with no Docker: every queue resource as "
        "local workers started from the unpacked archive, load balancers on "
        "localhost:8000; Ctrl-C stops it (default: off)",
    )
    build.add_argument(
        "--port",
        type=int,
        metavar="PORT",
        help="with --preview: the first load balancer's port (default: 8000, or the next "
        "free one)",
    )
    build.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="show a failure's traceback (default: off)",
    )


def _step(line: str) -> None:
    print(f"flash: {line}", file=sys.stderr, flush=True)


class _ProgressLines(logging.Formatter):
    """``progress.*`` events as the live line reads: ``flash: <task>: <step> (...)``."""

    def format(self, record: logging.LogRecord) -> str:
        event = str(record.msg).split(" ", 1)[0]
        data = record.__dict__
        task = data.get("task", "")
        seconds = float(data.get("seconds", 0.0))
        if event == "progress.start":
            return f"flash: {task}"
        if event == "progress.step":
            got = f", {data['bytes']}" if "bytes" in data else ""
            return f"flash: {task}: {data.get('step', '')} ({seconds:.1f} s{got})"
        if event == "progress.done":
            return f"flash: {task}: done in {seconds:.1f} s"
        if event == "progress.failed":
            return f"flash: {task}: failed after {seconds:.1f} s"
        return f"flash: {record.getMessage()}"


def _show_progress_lines() -> None:
    """Off a terminal, progress arrives as log events: print them as plain lines."""
    if live():
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_ProgressLines())
    logger = logging.getLogger("flash_actors._progress")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _relative(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _report(result: BuildResult) -> None:
    manifest = result.manifest
    functions = len(manifest.function_registry)
    resources = len(manifest.resources)
    print(
        f"Built {manifest.project_name} for Python {result.python_version} on Linux "
        f"x86_64: {resources} resource{'s' if resources != 1 else ''}, "
        f"{functions} function{'s' if functions != 1 else ''}"
    )
    for name, resource in manifest.resources.items():
        names = ", ".join(f"{fn.module}:{fn.qualname}" for fn in resource.functions)
        print(f"  {name} ({resource.resource_type}): {names or 'no functions'}")
    print(f"  sources: {len(result.sources)} file(s)")
    print(f"  dependencies: {len(result.installed)} package(s) installed")
    if result.excluded:
        left_out = ", ".join(f"{name} ({why})" for name, why in result.excluded.items())
        print(f"  left out: {left_out}")
    print(f"  handlers: {len(result.handlers)}")
    print(f"  manifest: {_relative(result.manifest_path)}")
    archive = result.archive
    print(
        f"  archive: {_relative(archive.path)} ({format_bytes(archive.size)}, "
        f"{archive.files} files, {format_bytes(archive.uncompressed)} unpacked)"
    )
    if result.build_dir is not None:
        print(f"  build folder kept: {_relative(result.build_dir)}")


def _preview(args: argparse.Namespace, result: BuildResult) -> int:
    from flash_actors.build.preview import run_preview

    def say(line: str) -> None:
        print(line, flush=True)

    try:
        run_preview(Path(args.project), result.archive.path, port=args.port, say=say)
    except KeyboardInterrupt:  # a second Ctrl-C while stopping
        return 130
    except (FlashRuntimeError, OSError) as exc:
        if args.verbose:
            traceback.print_exc()
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"flash: error: {text}", file=sys.stderr)
        return 1
    return 0


def run(args: argparse.Namespace) -> int:
    """Run ``flash build``; returns the exit code."""
    if args.port is not None and not args.preview:
        print("flash: error: --port goes with --preview", file=sys.stderr)
        return 2
    if args.port is not None and not 1 <= args.port <= 65535:
        print(f"flash: error: --port {args.port} is not a TCP port", file=sys.stderr)
        return 2
    options = BuildOptions(
        output=Path(args.output) if args.output else None,
        keep_build=args.keep_build,
        exclude=tuple(
            name.strip() for item in args.exclude for name in item.split(",")
        ),
        python_version=args.python_version,
    )
    _show_progress_lines()
    try:
        result = build_project(Path(args.project), options, progress=_step)
    except KeyboardInterrupt:
        print("flash: error: interrupted: no archive was written", file=sys.stderr)
        return 130
    except (FlashRuntimeError, OSError) as exc:
        if args.verbose:
            traceback.print_exc()
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, OSError):
            text += ": check the paths and permissions (-v shows where it failed)"
        print(f"flash: error: {text}", file=sys.stderr)
        return 1
    _report(result)
    if args.preview:
        sys.stdout.flush()
        return _preview(args, result)
    return 0
