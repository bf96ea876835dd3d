"""The template process: the worker runtime imported once, forked for each new worker.

``python -m flash_actors.worker.template --control-fd N`` imports the worker server (aiohttp,
msgspec, cloudpickle) and then serves fork requests on the control socket (a socketpair end
inherited from the client): each request is a JSON line with the worker's environment, log
path and routes file, carrying the worker's listening socket as an attached file descriptor.
The template forks, answers with the child's pid, and goes on. Children are reaped by the
kernel (SIGCHLD ignored here, restored in each child). The template exits when the control
socket closes, which its client's death does at once; each worker dies with the template
(parent-death signal, `flash_actors._lifeline`), so killing the client stops them all.

Unlike ``multiprocessing``'s forkserver, nothing of the client's ``__main__`` is re-run.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import sys

from flash_actors._lifeline import die_with_parent
from flash_actors.worker import isolation, server  # the point: imported once, here

__all__ = ["main"]


def _serve_forks(control: socket.socket) -> None:
    while True:
        message, fds, _, _ = socket.recv_fds(control, 1 << 20, 1)
        if not message:
            return  # the client closed the control socket
        request = json.loads(message)
        template = os.getpid()
        pid = os.fork()
        if pid == 0:  # the worker
            if not die_with_parent(template):
                os._exit(1)  # the template is already gone
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            control.close()
            sock = socket.socket(fileno=fds[0])
            try:
                server.forked_main(
                    sock, request["env"], request["log"], request["routes"]
                )
            finally:
                os._exit(0)
        for fd in fds:
            os.close(fd)
        control.sendall(json.dumps({"pid": pid}).encode() + b"\n")


def main() -> None:
    """Entry point (see the module docstring)."""
    if sys.argv[1:2] != ["--control-fd"] or len(sys.argv) != 3:
        sys.exit("usage: python -m flash_actors.worker.template --control-fd N")
    control = socket.socket(fileno=int(sys.argv[2]))
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the workers
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the client's to handle
    isolation.prepare()  # package metadata read once, for every fork
    # Imported objects live as long as the workers: kept out of their collections (and
    # their pages shared with each fork rather than copied when a collection touches them).
    gc.freeze()
    try:
        _serve_forks(control)
    except (OSError, ValueError):
        pass
    finally:
        control.close()


if __name__ == "__main__":
    main()
