"""Results feeds: one long poll hands a client the results of many of its jobs at once.

Our own client sends small jobs many at a time (``POST /v2/{endpoint}/runbatch``, naming a
feed of its choosing) and, instead of one waiting request per job, long-polls its feed
(``POST /v2/{endpoint}/feed/{feed}``): each answer carries every job of that feed that has
ended and was not yet acknowledged; the next poll acknowledges them by id. Nothing is lost
between polls: a job stays on its feed until acknowledged (or the feed is dropped), so an
answer lost on the way is sent again. A feed the daemon does not know (it restarted, or the
feed sat unused for `IDLE_S`) is answered ``known: false``: the client submits its unfinished
jobs again under their ids, which attaches them to the jobs the daemon already has.

A feed holds references to jobs the `JobBook` keeps anyway; at most `MAX_FEEDS` feeds exist
at once (the least recently used is dropped beyond that).
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING

import anyio

from flash_actors.providers.local.daemon.errors import GatewayError

if TYPE_CHECKING:
    from flash_actors.providers.local.daemon.jobs import Job

__all__ = ["IDLE_S", "MAX_FEEDS", "Feed", "Feeds"]

IDLE_S = 600.0
"""A feed neither polled nor submitted to for this long is dropped."""
MAX_FEEDS = 10_000
MAX_ANSWER_JOBS = 1_000
"""The most jobs one feed answer carries."""

LINGER_FROM = 16
LINGER_UNTIL = 64
LINGER_S = 0.002
"""A feed with `LINGER_FROM` jobs or more still running waits this long after the first
ended job, unless `LINGER_UNTIL` have ended: a fan-out's results then come many per answer."""

_FEED_ID = re.compile(r"[A-Za-z0-9_-]{8,128}")


class Feed:
    """One client's feed on one endpoint: its jobs still running, and those ended, unacknowledged."""

    __slots__ = ("changed", "ended", "key", "touched", "watched")

    def __init__(self, key: tuple[str, str]) -> None:
        self.key = key
        self.watched: set[str] = set()
        self.ended: dict[str, Job] = {}  # in the order they ended
        self.changed = anyio.Event()
        self.touched = time.monotonic()

    def put(self, job: Job) -> None:
        """``job`` has ended: hand it out with the next answer."""
        self.watched.discard(job.id)
        self.ended[job.id] = job
        self.wake()

    def wake(self) -> None:
        """Wake everyone waiting on this feed (they look again)."""
        self.changed.set()
        self.changed = anyio.Event()

    async def wait_any(
        self, jobs: list[Job], wait_s: float, closing: anyio.Event
    ) -> None:
        """Until one of ``jobs`` has ended, the daemon closes, or ``wait_s`` passes."""
        with anyio.move_on_after(wait_s):
            while not closing.is_set() and not any(job.terminal for job in jobs):
                await self.changed.wait()

    def hand_out(self, job: Job) -> None:
        """``job``'s result went out another way (a ``runbatch`` answer): not on the feed."""
        self.ended.pop(job.id, None)


class Feeds:
    """Every feed of the daemon, and which feed each watched job ends on.

    Args:
        closing: set when the daemon stops: polls answer at once.
    """

    def __init__(self, closing: anyio.Event) -> None:
        self.closing = closing
        self._feeds: dict[tuple[str, str], Feed] = {}
        self._of_job: dict[str, Feed] = {}
        self._swept = time.monotonic()

    def __len__(self) -> int:
        return len(self._feeds)

    def open(self, endpoint: str, feed_id: str) -> Feed:
        """The feed ``feed_id`` of ``endpoint``, created if new.

        Raises:
            GatewayError: 400 for a feed id that is not 8-128 letters, digits, '-' or '_'.
        """
        key = (endpoint, feed_id)
        feed = self._feeds.get(key)
        if feed is None:
            if not _FEED_ID.fullmatch(feed_id):
                msg = f"feed id {feed_id!r} must be 8-128 letters, digits, '-' or '_'"
                raise GatewayError(400, msg)
            self._sweep()
            feed = self._feeds[key] = Feed(key)
        feed.touched = time.monotonic()
        return feed

    def find(self, endpoint: str, feed_id: str) -> Feed | None:
        """The feed if the daemon has it (touched: it stays)."""
        feed = self._feeds.get((endpoint, feed_id))
        if feed is not None:
            feed.touched = time.monotonic()
        return feed

    def watch(self, feed: Feed, job: Job) -> None:
        """Hand ``job``'s result out on ``feed`` once it ends (at once if it has)."""
        previous = self._of_job.get(job.id)
        if previous is not None and previous is not feed:
            previous.watched.discard(job.id)
        if job.terminal:
            self._of_job.pop(job.id, None)
            feed.put(job)
            return
        self._of_job[job.id] = feed
        feed.watched.add(job.id)

    def ended(self, job: Job) -> None:
        """A job has ended (`JobBook`'s ``on_end``): onto its feed, if it has one."""
        feed = self._of_job.pop(job.id, None)
        if feed is not None:
            feed.put(job)

    async def take(self, feed: Feed, ack: list[str], wait_s: float) -> list[Job]:
        """Drop the acknowledged jobs, then the ended ones, waiting up to ``wait_s`` for one."""
        for job_id in ack:
            feed.ended.pop(job_id, None)
        with anyio.move_on_after(wait_s):
            while not feed.ended and not self.closing.is_set():
                await feed.changed.wait()
        if len(feed.ended) < LINGER_UNTIL and len(feed.watched) >= LINGER_FROM:
            # A fan-out: more will end in a moment; one answer for them all is cheaper.
            await anyio.sleep(LINGER_S)
        feed.touched = time.monotonic()
        jobs: list[Job] = []
        for job in feed.ended.values():
            jobs.append(job)
            if len(jobs) >= MAX_ANSWER_JOBS:
                break
        return jobs

    def close(self) -> None:
        """The daemon stops: every waiting poll answers now."""
        for feed in self._feeds.values():
            feed.wake()

    def _sweep(self) -> None:
        """Drop idle feeds (at most once a minute), and the oldest beyond `MAX_FEEDS`."""
        now = time.monotonic()
        if now - self._swept < 60 and len(self._feeds) < MAX_FEEDS:
            return
        self._swept = now
        keep = sorted(
            (f for f in self._feeds.values() if now - f.touched < IDLE_S),
            key=lambda f: f.touched,
        )[-(MAX_FEEDS - 1) :]
        kept = {f.key for f in keep}
        for key, feed in list(self._feeds.items()):
            if key not in kept:
                del self._feeds[key]
                for job_id in feed.watched:
                    if self._of_job.get(job_id) is feed:
                        del self._of_job[job_id]
                feed.wake()
