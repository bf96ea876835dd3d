"""Progress of provisioning that takes a while: a live line on a terminal, log lines otherwise.

A `Progress` shows one task (``installing scipy for 'ep'``): its current step (``downloading
scipy``), bytes where known (``16.1/49.8 MiB (32%)``) and the elapsed time.

- When standard error is a terminal (and ``FLASH_NO_PROGRESS`` is unset), a live line there,
  redrawn as steps arrive and every quarter second for the clock, and replaced at the end by
  ``flash: <task>: done in 2.3 s`` or ``flash: <task>: failed after 1.2 s``.
- Otherwise, log events through `flash_actors._logging` (quiet until the application
  configures logging): ``progress.start``, ``progress.step`` (each step, and every
  `HEARTBEAT_S` seconds while one lasts), then ``progress.done`` or ``progress.failed``.

A task that raises always ends as "failed", never "done". Callers log their own events
(``deps.install``...) either way.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from flash_actors._logging import get_logger

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["HEARTBEAT_S", "Progress", "format_bytes", "live", "progress"]

log = get_logger(__name__)

HEARTBEAT_S = 5.0
"""Seconds between ``progress.step`` log lines while one step lasts (off a terminal)."""

_REDRAW_S = 0.25


def live() -> bool:
    """Whether progress is a live line (standard error is a terminal, no ``FLASH_NO_PROGRESS``)."""
    return sys.stderr.isatty() and not os.environ.get("FLASH_NO_PROGRESS")


def format_bytes(n: float) -> str:
    """``n`` bytes in binary units, as uv prints them (``33.7 MiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover (the loop returns)


class Progress:
    """One task's progress, shown live on a terminal or as log lines (see the module).

    Thread-safe: the installer reports from the thread that reads its output. Use as a
    context manager; an exception leaving the block ends it as failed.

    Args:
        task: what is being done, e.g. ``"installing six for 'ep'"``.
        data: extra fields for every log line (``endpoint="ep"``).
    """

    def __init__(self, task: str, **data: Any) -> None:
        self.task = task
        self.data = data
        self.step = ""
        self.done_bytes = 0
        self.total_bytes = 0
        self.started = time.monotonic()
        self._live = live()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._last_log = self.started
        self._ticker: threading.Thread | None = None
        self._ended = False

    def __enter__(self) -> Progress:
        self.start()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.end(ok=exc_type is None, reason=repr(exc) if exc is not None else "")

    @property
    def elapsed(self) -> float:
        """Seconds since the task started."""
        return time.monotonic() - self.started

    def start(self) -> None:
        """Begin: draw the line, or log ``progress.start``; start the clock's ticker."""
        self.started = self._last_log = time.monotonic()
        if self._live:
            self._draw()
        else:
            log.info("progress.start", task=self.task, **self.data)
        self._ticker = threading.Thread(
            target=self._tick, name="flash-progress", daemon=True
        )
        self._ticker.start()

    def update(
        self,
        step: str | None = None,
        *,
        add_total: int = 0,
        add_done: int = 0,
    ) -> None:
        """A new step and/or bytes: ``add_total`` bytes announced, ``add_done`` finished."""
        with self._lock:
            if self._ended:
                return
            if step is not None:
                self.step = step
            self.total_bytes += add_total
            self.done_bytes += add_done
            if self._live:
                self._draw()
            elif step is not None:
                self._log_step()

    def end(self, *, ok: bool, reason: str = "", summary: str = "") -> None:
        """Finish: ``done in N s`` or ``failed after N s`` (``reason`` says why)."""
        with self._lock:
            if self._ended:
                return
            self._ended = True
            self._stop.set()
            seconds = round(self.elapsed, 2)
            if self._live:
                tail = f" ({summary})" if summary else ""
                if ok:
                    line = f"flash: {self.task}: done in {seconds:.1f} s{tail}"
                else:
                    line = f"flash: {self.task}: failed after {seconds:.1f} s{tail}"
                sys.stderr.write(f"\r{line}\x1b[K\n")
                sys.stderr.flush()
            elif ok:
                log.info(
                    "progress.done",
                    task=self.task,
                    seconds=seconds,
                    **self._bytes(),
                    **({"summary": summary} if summary else {}),
                    **self.data,
                )
            else:
                log.warning(
                    "progress.failed",
                    task=self.task,
                    seconds=seconds,
                    reason=reason.splitlines()[0] if reason else "",
                    **self.data,
                )
        if self._ticker is not None and self._ticker is not threading.current_thread():
            self._ticker.join()

    def _bytes(self) -> dict[str, str]:
        if not self.total_bytes:
            return {}
        return {"bytes": self._bytes_text()}

    def _bytes_text(self) -> str:
        done, total = self.done_bytes, self.total_bytes
        percent = f" ({100 * done / total:.0f}%)" if total else ""
        return f"{format_bytes(done)}/{format_bytes(total)}{percent}"

    def _log_step(self) -> None:
        self._last_log = time.monotonic()
        log.info(
            "progress.step",
            task=self.task,
            step=self.step,
            seconds=round(self.elapsed, 1),
            **self._bytes(),
            **self.data,
        )

    def _draw(self) -> None:
        parts = [f"flash: {self.task}"]
        if self.step:
            parts.append(self.step)
        if self.total_bytes:
            parts.append(self._bytes_text())
        parts.append(f"{self.elapsed:.1f} s")
        line = " | ".join(parts)  # ASCII: any terminal encoding can show it
        width = shutil.get_terminal_size((100, 20)).columns - 1
        if len(line) > width:
            line = line[: max(width - 3, 0)] + "..."
        sys.stderr.write(f"\r{line}\x1b[K")
        sys.stderr.flush()

    def _tick(self) -> None:
        """Redraw the clock on a terminal; a heartbeat log line otherwise."""
        interval = _REDRAW_S if self._live else HEARTBEAT_S / 5
        while not self._stop.wait(interval):
            with self._lock:
                if self._ended:
                    return
                if self._live:
                    self._draw()
                elif time.monotonic() - self._last_log >= HEARTBEAT_S:
                    self._log_step()


@contextmanager
def progress(task: str, **data: Any) -> Iterator[Progress]:
    """Show ``task`` while the block runs (see `Progress`); "failed" if the block raises."""
    with Progress(task, **data) as shown:
        yield shown
