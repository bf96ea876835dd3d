"""The daemon's results feeds (`Feeds`) on their own: watch, end, acknowledge, drop.

Real `Job` objects on a real event loop; the HTTP side is in ``test_job_feed.py``.
"""

from __future__ import annotations

import time

import anyio
import pytest

from flash_actors.providers.local.daemon import feeds as feeds_module
from flash_actors.providers.local.daemon.errors import GatewayError
from flash_actors.providers.local.daemon.feeds import IDLE_S, Feeds
from flash_actors.providers.local.daemon.jobs import Job
from flash_actors.providers.local.daemon.store import JobRecord

pytestmark = pytest.mark.anyio


def _job(job_id: str, status: str = "IN_QUEUE") -> Job:
    record = JobRecord(
        id=job_id, endpoint="e", status=status, options="{}", created=time.time()
    )
    return Job(record, {})


async def test_ended_jobs_stay_on_their_feed_until_acknowledged() -> None:
    feeds = Feeds(anyio.Event())
    feed = feeds.open("e", "feed-0001")
    running, done = _job("r1"), _job("d1", "COMPLETED")
    feeds.watch(feed, running)
    feeds.watch(feed, done)  # ended already: on the feed at once
    assert [j.id for j in await feeds.take(feed, [], 0)] == ["d1"]
    running.record.status = "FAILED"
    feeds.ended(running)
    assert [j.id for j in await feeds.take(feed, [], 0)] == ["d1", "r1"]
    assert [j.id for j in await feeds.take(feed, ["d1"], 0)] == ["r1"]
    assert await feeds.take(feed, ["r1"], 0) == []
    feeds.ended(_job("unknown", "COMPLETED"))  # not watched: nothing happens
    assert feed.ended == {}


async def test_a_poll_waits_for_the_next_ended_job_or_the_daemon_closing() -> None:
    closing = anyio.Event()
    feeds = Feeds(closing)
    feed = feeds.open("e", "feed-0001")
    job = _job("j1")
    feeds.watch(feed, job)
    taken: list[list[str]] = []

    async def poll() -> None:
        taken.append([j.id for j in await feeds.take(feed, [], 30)])

    async with anyio.create_task_group() as tg:
        tg.start_soon(poll)
        await anyio.sleep(0.05)
        assert taken == []
        job.record.status = "COMPLETED"
        feeds.ended(job)
    assert taken == [["j1"]]
    async with anyio.create_task_group() as tg:
        tg.start_soon(poll)
        await anyio.sleep(0.05)
        closing.set()
        feeds.close()
    assert taken[-1] == ["j1"]  # not acknowledged: handed out again
    with anyio.fail_after(5):
        assert await feeds.take(feed, ["j1"], 30) == []  # closing: at once


async def test_a_job_watched_again_moves_to_the_new_feed() -> None:
    feeds = Feeds(anyio.Event())
    old, new = feeds.open("e", "feed-0001"), feeds.open("e", "feed-0002")
    job = _job("j1")
    feeds.watch(old, job)
    feeds.watch(new, job)
    job.record.status = "COMPLETED"
    feeds.ended(job)
    assert (list(old.ended), list(new.ended)) == ([], ["j1"])
    assert old.watched == set()


async def test_idle_feeds_and_the_oldest_beyond_the_limit_are_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    feeds = Feeds(anyio.Event())
    idle = feeds.open("e", "feed-idle")
    job = _job("j1")
    feeds.watch(idle, job)
    idle.touched -= IDLE_S + 1
    feeds._swept -= 61  # the once-a-minute sweep is due
    feeds.open("e", "feed-0002")
    assert feeds.find("e", "feed-idle") is None
    job.record.status = "COMPLETED"
    feeds.ended(job)  # its feed is gone: nothing holds it
    assert idle.ended == {}

    monkeypatch.setattr(feeds_module, "MAX_FEEDS", 3)
    for name in ("feed-0003", "feed-0004", "feed-0005"):
        feeds.open("e", name)
    assert len(feeds) == 3
    assert feeds.find("e", "feed-0002") is None  # the least recently used


def test_feed_ids_are_checked() -> None:
    feeds = Feeds(anyio.Event())
    for bad in ("short", "x" * 129, "no/slash", "dot.s-are-out"):
        with pytest.raises(GatewayError, match="must be 8-128 letters"):
            feeds.open("e", bad)
