"""Starting worker processes: fresh interpreters, or forks of a pre-started template.

A fresh ``python -m flash_actors.worker`` spends ~0.4 s importing aiohttp and the runtime.
The template (`flash_actors.worker.template`) imports all that once; every later worker is a
fork of it that serves within milliseconds. The template starts with the first worker and
stops with the provider; a template that died (killed, say) or does not answer a fork within
``fork_timeout_s`` (stopped, say) is replaced at the next fork. Forked workers are not our
children (the kernel reaps them for the template), so they are followed through a pidfd,
which becomes readable when they exit.
Both kinds are driven through the same small `WorkerProcess` interface.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from typing import TYPE_CHECKING, Protocol

import anyio
import anyio.to_thread

from flash_actors._logging import get_logger

if TYPE_CHECKING:
    from pathlib import Path

    from anyio.abc import Process

__all__ = ["PidfdProcess", "Template", "WorkerProcess", "template_supported"]

log = get_logger(__name__)


def template_supported() -> bool:
    """Forking from a template needs ``os.fork``, ``os.pidfd_open`` and fd passing (Linux)."""
    return (
        hasattr(os, "pidfd_open")
        and hasattr(socket, "send_fds")
        and hasattr(os, "fork")
    )


class WorkerProcess(Protocol):
    """What the pool needs of a worker process."""

    @property
    def pid(self) -> int:
        """The process id."""
        ...

    @property
    def returncode(self) -> int | None:
        """The exit status once it has exited (-1 when it is not ours to know)."""
        ...

    def send_signal(self, signum: signal.Signals, /) -> None:
        """Send a signal."""
        ...

    def kill(self) -> None:
        """SIGKILL."""
        ...

    async def wait(self) -> int:
        """Wait for the exit."""
        ...

    async def aclose(self) -> None:
        """Release what is left once it has exited."""
        ...


async def stop_process(process: WorkerProcess, grace_s: float = 3.0) -> None:
    """SIGTERM, SIGKILL if it is still there after ``grace_s``; always reaped (shielded)."""
    with anyio.CancelScope(shield=True):
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            with anyio.move_on_after(grace_s):
                await process.wait()
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        await process.aclose()


class PidfdProcess:
    """A process followed through a pidfd; several tasks may wait on it at once."""

    def __init__(self, pid: int, template_pid: int | None = None) -> None:
        self._pid = pid
        self.template_pid = template_pid  # the template it was forked from, if any
        self._fd = os.pidfd_open(pid)
        self._exited = anyio.Event()
        self._polling = False

    @property
    def pid(self) -> int:
        """The process id."""
        return self._pid

    @property
    def returncode(self) -> int | None:
        """-1 once exited (its status went to the template), else ``None``."""
        return -1 if self._exited.is_set() else None

    def send_signal(self, signum: signal.Signals, /) -> None:
        """Send a signal (ignored once it has exited)."""
        if not self._exited.is_set():
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._fd, signum)

    def kill(self) -> None:
        """SIGKILL."""
        self.send_signal(signal.SIGKILL)

    async def wait(self) -> int:
        """Wait until the pidfd says the process has exited."""
        while not self._exited.is_set():
            if self._polling:
                with anyio.move_on_after(0.05):
                    await self._exited.wait()
                continue
            self._polling = True
            try:
                await anyio.wait_readable(self._fd)
                self._exited.set()
            finally:
                self._polling = False
        return -1

    async def aclose(self) -> None:
        """Close the pidfd."""
        if self._fd >= 0 and self._exited.is_set():
            os.close(self._fd)
            self._fd = -1


class Template:
    """The template process of one provider: started on first use, stopped by `aclose`.

    Args:
        fork_timeout_s: how long a fork may take to be answered; a template that does not
            answer by then (stopped with SIGSTOP, say) is killed and replaced, so that one
            frozen process cannot hold up every worker start, or the provider's exit.
    """

    def __init__(self, fork_timeout_s: float = 10.0) -> None:
        self.fork_timeout_s = fork_timeout_s
        self._lock = anyio.Lock()
        self._process: Process | None = None
        self._control: socket.socket | None = None

    @property
    def pid(self) -> int | None:
        """The template process's id, while it is started."""
        return self._process.pid if self._process is not None else None

    async def _start(self) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._process = await anyio.open_process(
                [
                    sys.executable, "-m", "flash_actors.worker.template",
                    "--control-fd", str(theirs.fileno()),
                ],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=None,
            )  # fmt: skip
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._control = ours
        return ours

    async def fork(
        self,
        sock: socket.socket,
        env: dict[str, str],
        log_path: Path,
        routes: Path | None,
    ) -> PidfdProcess:
        """A new worker serving on ``sock`` (the template gets a duplicate of it).

        A template that has died is started again once, here.

        Raises:
            OSError: the template could not be started or did not answer within
                ``fork_timeout_s`` (the caller may start the worker as a fresh interpreter
                instead).
            ProcessLookupError: the worker was gone before it could be followed.
        """
        request = json.dumps(
            {
                "env": env,
                "log": str(log_path),
                "routes": str(routes) if routes else None,
            }
        ).encode()
        async with self._lock:
            for attempt in (1, 2):
                control = self._control or await self._start()
                try:
                    reply = await anyio.to_thread.run_sync(
                        _exchange,
                        control,
                        request,
                        sock.fileno(),
                        self.fork_timeout_s,
                    )
                except OSError as exc:
                    code = await self._discard()
                    log.warning(
                        "template.lost",
                        returncode=code,
                        error=repr(exc),
                        retry=attempt == 1,
                    )
                    if attempt == 2:
                        raise
                    continue
                return PidfdProcess(json.loads(reply)["pid"], self.pid)
        raise AssertionError("unreachable")  # pragma: no cover

    def lost(self, template_pid: int | None) -> bool:
        """Whether the template with ``template_pid`` has died or been replaced.

        A worker forked from a template dies with it (parent-death signal): such a death
        says nothing of whether the endpoint's workers can start, so the pool does not
        count it as a failed start.
        """
        process = self._process
        if process is None or template_pid is None or process.pid != template_pid:
            return True
        try:  # WNOWAIT: looks without reaping (the event loop's watcher reaps it)
            return (
                os.waitid(os.P_PID, template_pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
                is not None
            )
        except ChildProcessError:  # already reaped
            return True

    async def _discard(self) -> int | None:
        """Forget a template that stopped answering (killed if it still runs), reaped."""
        control, self._control = self._control, None
        process, self._process = self._process, None
        if control is not None:
            control.close()
        if process is None:
            return None
        with anyio.CancelScope(shield=True):
            await stop_process(process, 1.0)
        return process.returncode

    async def aclose(self) -> None:
        """Stop the template (its workers are stopped by the pool)."""
        control, self._control = self._control, None
        process, self._process = self._process, None
        if control is not None:
            control.close()
        if process is not None:
            with anyio.CancelScope(shield=True):
                with anyio.move_on_after(3):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()
                await process.aclose()


def _exchange(control: socket.socket, request: bytes, fd: int, timeout: float) -> bytes:
    control.settimeout(timeout)  # a TimeoutError (an OSError) when it does not answer
    socket.send_fds(control, [request], [fd])
    reply = control.recv(4096)
    if not reply:
        msg = "the worker template process exited"
        raise OSError(msg)
    return reply
