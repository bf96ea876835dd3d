"""Entry point of the ``flash`` command."""

from __future__ import annotations

import argparse
import sys

import flash_actors
from flash_actors_cli import (
    apps,
    build,
    deploy,
    init as init_command,
    local,
    run as run_command,
)

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``flash`` (sub-commands are added as they are built)."""
    parser = argparse.ArgumentParser(
        prog="flash",
        description="flash-actors: await Python functions on remote GPU and CPU workers.",
        epilog="`flash COMMAND --help` lists a command's options and their defaults. A "
        "failure is one `flash: error:` line and a hint, exit code 1 (2: a bad option); "
        "-v shows its traceback.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"flash-actors {flash_actors.__version__}",
        help="print the version (flash-actors X.Y.Z) and exit",
    )
    parser.add_argument(
        "--verbose",
        "-v",
        dest="verbose_all",
        action="store_true",
        help="show a failure's traceback, for any command (default: off; `flash "
        "COMMAND -v` does the same)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    local.add_parser(commands)
    build.add_parser(commands)
    init_command.add_parser(commands)
    run_command.add_parser(commands)
    deploy.add_parser(commands)
    deploy.add_undeploy_parser(commands)
    apps.add_parsers(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``flash``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.verbose_all:  # `flash -v COMMAND`: the sub-command's own -v defaults to off
        args.verbose = True
    runners = {
        "build": build.run,
        "init": init_command.run,
        "run": run_command.run,
        "deploy": deploy.run_deploy,
        "undeploy": deploy.run_undeploy,
        "env": apps.run_env,
        "app": apps.run_app,
        "local": local.run,
    }
    return runners[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
