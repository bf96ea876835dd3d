"""What ``flash deploy``, ``env``, ``app`` and ``undeploy`` share: the target and the output.

The target is ``flash local`` (the default: started when it is not running, saying so) or
RunPod (``--target runpod`` or ``FLASH_PROVIDER=runpod``), both reached through the same
`FlashApps` client. Output: tables on stdout (``--json`` prints the data instead), steps and
notices on stderr (a spinner on a terminal, plain ``flash: ...`` lines otherwise), errors as
one ``flash: error: ...`` line and a hint, exit code 1 (``-v`` adds the traceback).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Column, Table
from rich.text import Text

from flash_actors._private import StateDirError
from flash_actors._progress import format_bytes, live as live_progress
from flash_actors.errors import FlashRuntimeError, GraphQLError
from flash_actors.providers.local.daemon.control import start_daemon
from flash_actors.providers.runpod.credentials import load_settings
from flash_actors.providers.runpod.flash_apps import FlashApps
from flash_actors.providers.runpod.graphql import ControlPlane
from flash_actors.providers.runpod.transport import HttpsTransport

if TYPE_CHECKING:
    import argparse
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence

    from rich.progress_bar import ProgressBar

__all__ = [
    "STATE_DIR_HINT",
    "CommandError",
    "StepProgress",
    "Target",
    "add_common",
    "confirm",
    "confirm_deletion",
    "connect",
    "fail",
    "print_json",
    "print_table",
    "run",
    "say",
    "short",
    "step",
]


STATE_DIR_HINT = "give --state-dir a folder of your own that is not a symbolic link"
"""What to do about a state folder that is refused (`StateDirError`)."""


class CommandError(Exception):
    """A command's failure: one line, and a hint saying what to do."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


def _default_target() -> str:
    return "runpod" if os.environ.get("FLASH_PROVIDER", "") == "runpod" else "local"


def add_common(parser: argparse.ArgumentParser, *, app: bool = True) -> None:
    """The options every control-plane command takes (``--target``, ``--json``, ...)."""
    default = _default_target()
    parser.add_argument(
        "--target",
        choices=("local", "runpod"),
        default=default,
        help=f"where the apps live: flash local or RunPod (default: {default}; "
        "FLASH_PROVIDER=runpod makes it runpod)",
    )
    parser.add_argument(
        "--state-dir",
        default=".flash",
        help="flash local's state folder (default: .flash)",
    )
    if app:
        parser.add_argument(
            "--app-name",
            "--app",
            "-a",
            dest="app_name",
            default=None,
            help="the Flash app (default: the current folder's name)",
        )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the answer as JSON instead of a table (default: off)",
    )
    parser.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="show a failure's traceback (default: off)",
    )


def app_name(args: argparse.Namespace) -> str:
    """The app the command is about: ``--app-name``, else the current folder's name."""
    return str(args.app_name or Path.cwd().name)


# -- output -----------------------------------------------------------------------------------


def _console(stream: Any) -> Console:
    terminal = stream.isatty()
    return Console(
        file=stream,
        highlight=False,
        soft_wrap=not terminal,
        width=None if terminal else 200,
    )


def fail(message: str, hint: str = "", *, verbose: bool = False, code: int = 1) -> int:
    """Report a failure: one ``flash: error: <message>`` line and ``  hint: <hint>``.

    With ``verbose`` (``-v``) the traceback of the exception being handled comes first.
    Returns ``code``, the command's exit code.
    """
    if verbose:
        traceback.print_exc()
    print(f"flash: error: {message}", file=sys.stderr)
    if hint:
        print(f"  hint: {hint}", file=sys.stderr)
    sys.stderr.flush()
    return code


def say(line: str) -> None:
    """A notice on stderr: ``flash: <line>``."""
    print(f"flash: {line}", file=sys.stderr, flush=True)


class StepProgress:
    """What `step` yields: call it with a line for the step's status; bytes go to `transferred`.

    Off a terminal each line is printed as ``flash: <step>: <line>``, and bytes as a few
    lines (at each quarter of the total); on a terminal both update the live display.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self._quarter = 0

    def __call__(self, line: str) -> None:
        """The step's status (``uploading 4.8 MiB``)."""
        say(f"{self.text}: {line}")

    def transferred(self, done: int, total: int) -> None:
        """``done`` of ``total`` bytes sent so far."""
        quarter = 4 * done // total if total > 0 else 4
        if quarter <= self._quarter:
            return
        self._quarter = quarter
        percent = 100 * done // total if total > 0 else 100
        say(
            f"{self.text}: sent {format_bytes(done)} of {format_bytes(total)} ({percent}%)"
        )


class _Bar(ProgressColumn):
    """The bar, once the step knows its bytes (nothing before: no bar for plain waits)."""

    def __init__(self) -> None:
        super().__init__()
        self._bar = BarColumn(bar_width=20)

    def render(self, task: Task) -> Text | ProgressBar:
        return Text("") if task.total is None else self._bar.render(task)


class _Sent(ProgressColumn):
    """``sent/total`` once the step knows its bytes."""

    def render(self, task: Task) -> Text:
        if task.total is None:
            return Text("")
        done, total = int(task.completed), int(task.total)
        return Text(
            f"{format_bytes(done)}/{format_bytes(total)}", style="progress.download"
        )


class _LiveStepProgress(StepProgress):
    """`StepProgress` on a terminal: a spinner, the status, and a bar for bytes."""

    def __init__(self, text: str, shown: Progress, task: TaskID) -> None:
        super().__init__(text)
        self._shown = shown
        self._task = task

    def __call__(self, line: str) -> None:
        self._shown.update(self._task, description=f"{self.text}: {line}")

    def transferred(self, done: int, total: int) -> None:
        self._shown.update(self._task, total=total, completed=done)


@contextlib.contextmanager
def step(text: str) -> Iterator[StepProgress]:
    """Long work: a spinner (and a bar for bytes) on a terminal, plain lines otherwise.

    Yields a `StepProgress`: call it with status lines; ``transferred(done, total)`` shows
    bytes. Ends with ``<text>: done in N s`` (or ``failed after N s``).
    """
    started = time.monotonic()
    err = _console(sys.stderr)
    if live_progress():
        shown = Progress(
            SpinnerColumn(),
            TextColumn(
                "{task.description}",
                table_column=Column(no_wrap=True, overflow="ellipsis"),
            ),
            _Bar(),
            _Sent(table_column=Column(no_wrap=True, min_width=19)),
            TimeElapsedColumn(),
            console=err,
            transient=True,
        )
        with shown:
            task = shown.add_task(f"{text}...", total=None)
            try:
                yield _LiveStepProgress(text, shown, task)
            except BaseException:
                shown.stop()
                err.print(
                    f"[red]x[/red] {text}: failed after {time.monotonic() - started:.1f} s"
                )
                raise
        err.print(f"[green]✓[/green] {text} ({time.monotonic() - started:.1f} s)")
        return
    say(f"{text}...")
    try:
        yield StepProgress(text)
    except BaseException:
        say(f"{text}: failed after {time.monotonic() - started:.1f} s")
        raise
    say(f"{text}: done in {time.monotonic() - started:.1f} s")


def print_json(data: Any) -> None:
    """``data`` as indented JSON on stdout."""
    print(json.dumps(data, indent=2, sort_keys=True, default=str))


def print_table(
    title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], empty: str
) -> None:
    """A table on stdout (``empty`` when there are no rows)."""
    out = _console(sys.stdout)
    if not rows:
        out.print(empty)
        return
    table = Table(title=title, box=box.SIMPLE, title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*("-" if cell in (None, "") else str(cell) for cell in row))
    out.print(table)


def short(identifier: Any) -> str:
    """An id cut to 12 characters, as Flash shows build ids."""
    text = str(identifier or "-")
    return text[:12]


def confirm(question: str, *, expect: str | None = None) -> bool:
    """Ask on the terminal (or read stdin); ``expect``: the exact text to type."""
    prompt = f"{question} " + ("" if expect else "[y/N] ")
    print(prompt, end="", file=sys.stderr, flush=True)
    try:
        answer = sys.stdin.readline()
    except (OSError, ValueError):
        answer = ""
    if not answer or not sys.stdin.isatty():
        print(file=sys.stderr)  # the answer was not echoed: end the prompt's line
    answer = answer.strip()
    if expect is not None:
        return answer == expect
    return answer.lower() in {"y", "yes"}


def confirm_deletion(question: str, name: str, what: str) -> None:
    """Ask twice (yes, then ``what``'s name typed back) before a deletion.

    Raises:
        CommandError: not confirmed (the hint names ``--yes``).
    """
    if not confirm(question) or not confirm(
        f"This cannot be undone. Type the {what}'s name ({name}) to confirm:",
        expect=name,
    ):
        raise CommandError("not deleted: not confirmed", "--yes deletes without asking")


# -- the target -------------------------------------------------------------------------------


class Target:
    """A connected target: its `FlashApps`, its GraphQL client and what to call it."""

    def __init__(self, name: str, apps: FlashApps, where: str) -> None:
        self.name = name
        self.apps = apps
        self.control = apps.control
        self.where = where


@contextlib.asynccontextmanager
async def connect(args: argparse.Namespace) -> AsyncIterator[Target]:
    """The target of ``args`` (``flash local`` started if needed), closed afterwards."""
    transport = HttpsTransport()
    try:
        if args.target == "runpod":
            settings = load_settings()
            control = ControlPlane(transport, settings.api_base_url, settings.api_key)
            where = f"RunPod ({settings.api_base_url})"
        else:
            start = await start_daemon(args.state_path)
            if start.started:
                say(
                    f"started flash local at {start.record.url} (pid {start.record.pid}); "
                    "`flash local down` stops it"
                )
            control = ControlPlane(transport, start.record.url, start.record.api_key)
            where = f"flash local ({start.record.url})"
        yield Target(args.target, FlashApps(control, transport), where)
    finally:
        with anyio.CancelScope(shield=True):
            await transport.aclose()


def run(
    args: argparse.Namespace, command: Callable[[argparse.Namespace], Awaitable[int]]
) -> int:
    """Run an async command; map its failures to one line, a hint and exit code 1."""
    args.state_path = Path(args.state_dir).absolute()  # not resolved: a link is refused
    try:
        return anyio.run(command, args)
    except KeyboardInterrupt:
        say("error: interrupted")
        return 130
    except (CommandError, FlashRuntimeError, OSError) as exc:
        if isinstance(exc, CommandError):
            text, hint = exc.message, exc.hint
        else:
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            hint = "-v shows the traceback"
            if isinstance(exc, StateDirError):
                hint = STATE_DIR_HINT
            elif isinstance(exc, GraphQLError):
                hint = f"{args.target} refused the request; " + hint
            elif args.target == "local":
                hint = f"see {Path(args.state_dir) / 'logs' / 'gateway.log'}; " + hint
        return fail(text, hint, verbose=getattr(args, "verbose", False))
