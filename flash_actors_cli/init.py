"""``flash init [NAME|.]``: write a new Flash project from the template in ``templates/project``.

The template (package data, one ``.tmpl`` file per project file; ``dot-x`` becomes ``.x``) is
a FastAPI app (``main.py``) whose routers (``workers/gpu``, ``workers/cpu``) await the
``@remote`` functions of their endpoints, with ``.env``, ``.gitignore``, ``.flashignore``,
``requirements.txt`` and a README. It imports ``flash_actors`` and runs on the local provider
with no account. A folder that already has files is refused, naming the first ones, unless
``--force`` (which overwrites the template's files and leaves the others alone).
"""

from __future__ import annotations

import re
import sys
import traceback
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import argparse
    from importlib.resources.abc import Traversable

__all__ = ["add_parser", "project_files", "run"]

_TEMPLATE = "templates/project"
_SHOWN = 5

#: the tree printed after init (and in the project's README): (line, what it is)
_TREE = (
    ("├── main.py", "FastAPI entry point"),
    ("├── workers/", ""),
    ("│   ├── gpu/__init__.py", "GPU router"),
    ("│   │   └── endpoint.py", "GPU @remote function"),
    ("│   └── cpu/__init__.py", "CPU router"),
    ("│       └── endpoint.py", "CPU @remote function"),
    ("├── .env", "settings: provider, API key"),
    ("├── .gitignore", ""),
    ("├── .flashignore", "what `flash build` leaves out"),
    ("├── requirements.txt", ""),
    ("└── README.md", ""),
)


def add_parser(commands: Any) -> None:
    """Add ``flash init`` to ``flash``'s sub-parsers."""
    init = commands.add_parser(
        "init",
        help="create a new Flash project (FastAPI app + GPU and CPU workers)",
        description=(
            "Write a new Flash project: main.py (a FastAPI app), workers/gpu and "
            "workers/cpu (a router and an @remote endpoint each), .env, .gitignore, "
            ".flashignore, requirements.txt and README.md. It runs as written with "
            "`flash run`, on this machine, with no account."
        ),
    )
    init.add_argument(
        "name",
        nargs="?",
        default=".",
        help="the new project's folder, or . for the current folder (default: .)",
    )
    init.add_argument(
        "--force",
        "-f",
        action="store_true",
        help="write into a folder that has files, overwriting the template's files "
        "(default: off: a non-empty folder is refused)",
    )
    init.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="show a failure's traceback (default: off)",
    )


def _target_name(rel: PurePosixPath) -> PurePosixPath:
    name = rel.name.removesuffix(".tmpl")
    if name.startswith("dot-"):
        name = "." + name.removeprefix("dot-")
    return rel.with_name(name)


def _walk(folder: Traversable, rel: PurePosixPath) -> list[tuple[PurePosixPath, str]]:
    out: list[tuple[PurePosixPath, str]] = []
    for item in sorted(folder.iterdir(), key=lambda t: t.name):
        if item.is_dir():
            out += _walk(item, rel / item.name)
        elif item.name.endswith(".tmpl"):
            out.append(
                (_target_name(rel / item.name), item.read_text(encoding="utf-8"))
            )
    return out


def _slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "flash-app"


def _tree(name: str) -> str:
    width = max(len(line) for line, _ in _TREE) + 2
    lines = [f"{name}/"]
    lines += [f"{line:<{width}}# {what}" if what else line for line, what in _TREE]
    return "\n".join(lines)


def _has_gpu() -> bool:
    """True when the local provider sees an NVIDIA GPU here (its own detection)."""
    try:
        from flash_actors.providers.local.gpus import (
            detect_gpus,
        )

        return bool(detect_gpus())
    except Exception:  # noqa: BLE001 (no GPU stack here: run GPU endpoints on the CPU)
        return False


def project_files(name: str, *, gpu: bool) -> dict[str, str]:
    """The project's files (relative POSIX path -> text) for a project called ``name``."""
    root = resources.files("flash_actors_cli").joinpath(_TEMPLATE)
    gpu_line = (
        "# This machine has an NVIDIA GPU: each GPU worker gets one of its own. On a machine\n"
        "# without one, run GPU endpoints on the CPU:\n# FLASH_LOCAL_GPU=cpu"
        if gpu
        else "# No NVIDIA GPU was found here when this project was made: GPU endpoints run on\n"
        "# the CPU (remove this line on a machine with a GPU).\nFLASH_LOCAL_GPU=cpu"
    )
    values = {
        "{{name}}": name,
        "{{slug}}": _slug(name),
        "{{gpu_line}}": gpu_line,
        "{{tree}}": _tree(name),
    }
    out: dict[str, str] = {}
    for rel, text in _walk(root, PurePosixPath()):
        for key, value in values.items():
            text = text.replace(key, value)
        out[str(rel)] = text
    return out


def _existing(folder: Path) -> list[str]:
    if not folder.exists():
        return []
    return sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())


_NAME_MAX = 191
"""The longest Flash app name (``createFlashApp``): the project's folder name is its app's."""


def _init(args: argparse.Namespace) -> int:
    here = args.name in (".", "")
    folder = Path.cwd() if here else Path(args.name)
    name = folder.resolve().name
    if not name.isprintable() or not 1 <= len(name) <= _NAME_MAX:
        print(
            f"flash: error: {name!r} cannot name a Flash project (it becomes the app's "
            f"name): use 1-{_NAME_MAX} printable characters, no control characters",
            file=sys.stderr,
        )
        return 1
    if folder.exists() and not folder.is_dir():
        print(
            f"flash: error: {folder} is a file, not a folder: give another project name",
            file=sys.stderr,
        )
        return 1
    existing = _existing(folder)
    if existing and not args.force:
        shown = ", ".join(existing[:_SHOWN]) + (
            f" and {len(existing) - _SHOWN} more" if len(existing) > _SHOWN else ""
        )
        where = "the current folder" if here else f"{folder}"
        print(
            f"flash: error: {where} is not empty ({shown}): pick a new folder name, or "
            "add --force to write the template's files into it (overwriting them)",
            file=sys.stderr,
        )
        return 1
    files = project_files(name, gpu=_has_gpu())
    overwritten = [rel for rel in files if (folder / rel).exists()]
    for rel, text in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    if here:
        print(f"Created the Flash project {name!r} in the current folder:")
    else:
        print(f"Created the Flash project {name!r} in {folder}/:")
    print(_tree(name))
    if overwritten:
        print(f"Overwritten (--force): {', '.join(overwritten)}")
    print("\nNext steps:")
    step = 1
    if not here:
        print(f"  {step}. cd {folder}")
        step += 1
    print(f"  {step}. pip install -r requirements.txt")
    print(f"  {step + 1}. flash run          # then open http://localhost:8888/docs")
    print(
        "  (workers run on this machine, no account needed; for RunPod set "
        "FLASH_PROVIDER=runpod and RUNPOD_API_KEY in .env)"
    )
    return 0


def run(args: argparse.Namespace) -> int:
    """Run ``flash init``; returns the exit code."""
    try:
        return _init(args)
    except OSError as exc:
        if args.verbose:
            traceback.print_exc()
        where = f"{exc.filename}: " if exc.filename else ""
        print(
            f"flash: error: {where}{exc.strerror or exc}: check the folder's permissions "
            "(-v shows where it failed)",
            file=sys.stderr,
        )
        return 1
