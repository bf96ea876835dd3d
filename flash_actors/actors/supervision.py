"""Supervision: when and how patiently a crashed actor is restarted.

An actor crashes when an exception escapes it outside an ``ask`` (in `Actor.on_start`, or while
handling a ``tell``); an exception raised while answering an ``ask`` is that ask's answer. A
crashed actor's calls in flight fail with `ActorStoppedError`; messages still in its mailbox
wait for the new instance, which starts after an exponential backoff. Too many crashes within
the window stop it for good, and every waiting call then fails: nothing hangs.
"""

from __future__ import annotations

import msgspec

__all__ = ["RestartPolicy"]


class RestartPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """How a supervisor restarts a crashed actor.

    Attributes:
        max_restarts: restarts allowed within ``window_s``; one more crash stops the actor.
        window_s: the sliding window for ``max_restarts``.
        backoff_s: delay before the first restart, doubled for each further one in a row.
        backoff_max_s: the largest delay.
    """

    max_restarts: int = 5
    window_s: float = 60.0
    backoff_s: float = 0.05
    backoff_max_s: float = 2.0

    def delay(self, crashes_in_a_row: int) -> float:
        """Seconds to wait before restarting after the given number of crashes in a row."""
        return float(
            min(
                self.backoff_max_s,
                self.backoff_s * (2.0 ** max(0, crashes_in_a_row - 1)),
            )
        )

    @classmethod
    def never(cls) -> RestartPolicy:
        """Do not restart: the first crash stops the actor."""
        return cls(max_restarts=0)
