"""Batched jobs through the ``flash local`` daemon: ``runbatch`` and results feeds (issue 14).

The daemon's side is driven over HTTP as any client would (each job accepted or refused on
its own; a feed hands out ended jobs until they are acknowledged; a job sent again attaches
instead of running twice); the client's side (`JobFeed`) by gathered ``@remote`` calls on
asyncio and trio. Restarts and the reconnect window are in ``test_state_folder.py``,
cancellation in ``test_gateway.py``: both go through the feed too. Real processes only.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import httpx
import pytest

from flash_actors import CpuLiveServerless, remote, runtime
from flash_actors.providers.local.daemon_client import GatewayProvider
from tests._daemon import FILES, Daemon

if TYPE_CHECKING:
    from collections.abc import Iterator

    from flash_actors.providers.runpod.feed import JobFeed

COUNT = FILES / "count_handler.py"


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path / ".flash", f"count={COUNT}:1")
    yield d
    d.stop()


def _poll(
    client: httpx.Client, feed: str, wanted: set[str], ack: list[str] | None = None
) -> dict[str, dict[str, Any]]:
    """Poll (acknowledging nothing but ``ack``) until every job in ``wanted`` is handed out."""
    deadline = time.monotonic() + 60
    seen: dict[str, dict[str, Any]] = {}
    while not wanted <= set(seen):
        assert time.monotonic() < deadline, f"feed gave only {sorted(seen)}"
        answer = client.post(
            f"/v2/count/feed/{feed}?wait=5000", json={"ack": ack or []}
        )
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["known"] is True
        seen = {job["id"]: job for job in body["jobs"]}
    return seen


def test_runbatch_takes_each_job_alone_and_the_feed_loses_none(
    daemon: Daemon, tmp_path: Path
) -> None:
    log = tmp_path / "runs.log"
    job = {"log": str(log)}
    with daemon.client() as client:
        answer = client.post(
            "/v2/count/runbatch",
            json={
                "feed": "feed-0001",
                "jobs": [
                    {"id": "a1", "input": job},
                    {"id": "a2", "input": job, "policy": {"nope": 1}},
                    {"id": "bad id", "input": job},
                    {"id": "a3", "input": None},
                    {"id": "a4", "input": job, "policy": {"ttl": 0}},
                    {"id": "a5", "input": job, "policy": {"ttl": 60_000}},
                ],
            },
        )
        assert answer.status_code == 200, answer.text
        jobs = answer.json()["jobs"]
        assert [j["id"] for j in jobs] == ["a1", "a2", "bad id", "a3", "a4", "a5"]
        assert jobs[0] == {"id": "a1", "status": "IN_QUEUE"}
        assert jobs[5] == {"id": "a5", "status": "IN_QUEUE"}
        refused = {j["id"]: (j["code"], j["error"]) for j in jobs[1:5]}
        assert refused["a2"][0] == 400
        assert "unknown policy field(s) ['nope']" in refused["a2"][1]
        assert refused["bad id"][0] == 400
        assert "must be 1-128 letters" in refused["bad id"][1]
        assert refused["a3"] == (400, "invalid request: input is required")
        assert refused["a4"][0] == 400
        assert "policy.ttl must be a positive integer" in refused["a4"][1]

        ended = _poll(client, "feed-0001", {"a1", "a5"})
        for job_id, envelope in ended.items():
            assert envelope["status"] == "COMPLETED"
            assert envelope["output"] == {"id": job_id}
        # not acknowledged: handed out again; acknowledged: gone
        again = client.post("/v2/count/feed/feed-0001?wait=0", json={"ack": []})
        assert {j["id"] for j in again.json()["jobs"]} == {"a1", "a5"}
        acked = client.post(
            "/v2/count/feed/feed-0001?wait=0", json={"ack": ["a1", "a5"]}
        )
        assert acked.json() == {"known": True, "jobs": []}

        # sent again under its id: attached to the job the daemon has, not run again;
        # it has ended, so its envelope comes in the answer (and not on the feed)
        answer = client.post(
            "/v2/count/runbatch",
            json={"feed": "feed-0001", "jobs": [{"id": "a1", "input": job}]},
        )
        (again_a1,) = answer.json()["jobs"]
        assert (again_a1["id"], again_a1["status"]) == ("a1", "COMPLETED")
        assert again_a1["output"] == {"id": "a1"}
        empty = client.post("/v2/count/feed/feed-0001?wait=0", json={"ack": []})
        assert empty.json() == {"known": True, "jobs": []}

        # ?wait: the answer waits for the first to end and carries it (one request)
        answer = client.post(
            "/v2/count/runbatch?wait=30000",
            json={"feed": "feed-0001", "jobs": [{"id": "w1", "input": job}]},
        )
        (w1,) = answer.json()["jobs"]
        assert (w1["id"], w1["status"], w1["output"]) == (
            "w1",
            "COMPLETED",
            {"id": "w1"},
        )
        assert sorted(log.read_text().split()) == ["a1", "a5", "w1"]
        counts = client.get("/v2/count/health").json()["jobs"]
        assert counts["completed"] == 3


def test_feed_requests_are_checked(daemon: Daemon) -> None:
    with daemon.client() as client:
        unknown = client.post("/v2/count/feed/never-made-1?wait=0", json={"ack": []})
        assert unknown.json() == {"known": False, "jobs": []}
        bad_feed = client.post(
            "/v2/count/runbatch",
            json={"feed": "no/slash", "jobs": [{"id": "x1", "input": {}}]},
        )
        assert bad_feed.status_code == 400
        assert "feed id 'no/slash' must be 8-128" in bad_feed.json()["error"]
        too_many = client.post(
            "/v2/count/runbatch",
            json={
                "feed": "feed-0002",
                "jobs": [{"id": f"j{i}", "input": {}} for i in range(1001)],
            },
        )
        assert too_many.status_code == 400
        assert "at most 1000 jobs, got 1001" in too_many.json()["error"]
        assert client.get("/v2/count/health").json()["jobs"]["inQueue"] == 0
        for body in (b"{", b'{"feed": "feed-0003"}', b'{"feed": 1, "jobs": []}'):
            answer = client.post("/v2/count/runbatch", content=body)
            assert answer.status_code == 400, body
        assert (
            client.post("/v2/count/feed/feed-0002", content=b"[1]").status_code == 400
        )
        assert client.post("/v2/nope/runbatch", json={}).status_code == 404
    assert daemon.record is not None
    unauthenticated = httpx.post(
        f"{daemon.record.url}/v2/count/feed/feed-0002", json={"ack": []}
    )
    assert unauthenticated.status_code == 401


def test_a_runpod_only_daemon_has_no_batch_routes(tmp_path: Path) -> None:
    d = Daemon(tmp_path / ".flash", f"count={COUNT}:1", runpod_only=True)
    try:
        with d.client() as client:
            answer = client.post(
                "/v2/count/runbatch",
                json={"feed": "feed-0001", "jobs": [{"id": "a1", "input": {}}]},
            )
            assert answer.status_code == 404
            assert client.post("/v2/count/feed/feed-0001").status_code == 404
    finally:
        d.stop()


def _stopped(feed: JobFeed) -> bool:
    return not feed.running


cfg = CpuLiveServerless(name="feed-fanout", workersMax=2)


@remote(resource_config=cfg)
async def note(i: int, log: str) -> int:
    with open(log, "a") as out:
        out.write(f"{i}\n")
    return i * 2


@pytest.mark.anyio
@pytest.mark.timeout(120)
async def test_gathered_calls_travel_batched_and_each_runs_once(
    tmp_path: Path,
) -> None:
    d = Daemon(tmp_path / ".flash")
    try:
        assert d.record is not None
        log = tmp_path / "runs.log"
        results: dict[int, Any] = {}
        provider = GatewayProvider(d.record)
        async with runtime(provider=provider):

            async def one(i: int) -> None:
                results[i] = await note(i, str(log))

            async with anyio.create_task_group() as tg:
                for i in range(300):
                    tg.start_soon(one, i)
            feed = provider.feeds["feed-fanout"]
            assert feed.running
            assert feed.jobs_sent == 300
            assert feed.batches_sent < 300  # many jobs per request
        assert not provider.feeds
        assert _stopped(feed)  # with the provider
        assert {i: r.output for i, r in results.items()} == {
            i: 2 * i for i in range(300)
        }
        assert sorted(int(x) for x in log.read_text().split()) == list(range(300))
        with d.client() as client:
            counts = client.get("/v2/feed-fanout/health").json()["jobs"]
        assert counts["completed"] == 300
    finally:
        d.stop()


SLOW = CpuLiveServerless(name="feed-cancel", workersMax=1)


@remote(resource_config=SLOW)
async def mark_after(seconds: float, path: str) -> str:
    import asyncio

    await asyncio.sleep(seconds)
    with open(path, "w") as out:
        out.write("ran")
    return path


@pytest.mark.anyio
@pytest.mark.timeout(120)
async def test_a_cancelled_batched_call_never_runs(tmp_path: Path) -> None:
    d = Daemon(tmp_path / ".flash")
    try:
        assert d.record is not None
        first, second = tmp_path / "first", tmp_path / "second"
        provider = GatewayProvider(d.record)
        async with runtime(provider=provider):
            await mark_after(0, str(tmp_path / "warm"))
            feed = provider.feeds["feed-cancel"]
            async with anyio.create_task_group() as tg:
                tg.start_soon(mark_after, 2.0, str(first))
                await _sent(feed, 2)  # the first is on its way: the second waits for it
                with anyio.CancelScope() as scope:
                    tg.start_soon(_cancel_when_sent, feed, scope)
                    await mark_after(0, str(second))
                assert scope.cancel_called
        assert first.exists()
        await anyio.sleep(0.5)
        assert not second.exists()
        with d.client() as client:
            counts = client.get("/v2/feed-cancel/health").json()["jobs"]
        assert (
            counts["completed"] == 2
        )  # the warm-up and the first; the second CANCELLED
        assert counts["inQueue"] == counts["inProgress"] == counts["failed"] == 0
    finally:
        d.stop()


async def _sent(feed: JobFeed, count: int) -> None:
    with anyio.fail_after(30):
        while feed.jobs_sent < count:
            await anyio.sleep(0.01)


async def _cancel_when_sent(feed: JobFeed, scope: anyio.CancelScope) -> None:
    """Cancel ``scope`` once the feed has sent its third job (the one ``scope`` waits on)."""
    await _sent(feed, 3)
    await anyio.sleep(0.2)
    scope.cancel()
