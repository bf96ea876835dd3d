"""The daemon's job store: group commit, and the small inputs and outputs kept on jobs.

A real `JobStore` on a file in ``tmp_path``, read by a second ``sqlite3`` connection as a
restarted daemon would read it; jobs go through the real `DataPlane` and `JobBook`.
"""

from __future__ import annotations

import sqlite3
import time
from typing import TYPE_CHECKING

import anyio
import pytest

from flash_actors import ServerlessEndpoint
from flash_actors.messages import wire_encoder
from flash_actors.providers.local.daemon.catalog import Endpoint, config_of
from flash_actors.providers.local.daemon.dataplane import DataPlane
from flash_actors.providers.local.daemon.jobs import HOLD_LIMIT, JobBook
from flash_actors.providers.local.daemon.store import TERMINAL, JobRecord, JobStore
from tests._daemon import ECHO

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

pytestmark = pytest.mark.anyio


def _record(job_id: str) -> JobRecord:
    return JobRecord(
        id=job_id, endpoint="e", status="IN_QUEUE", options="{}", created=time.time()
    )


def _seen(path: Path) -> dict[str, str]:
    """The committed jobs' statuses, as another process would read them."""
    other = sqlite3.connect(path)
    try:
        return dict(other.execute("SELECT id, status FROM jobs").fetchall())
    finally:
        other.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[JobStore]:
    store = JobStore(tmp_path / "g.sqlite3")
    store.open()
    yield store
    store.close()


async def test_an_answer_waits_for_the_commit_of_what_it_reports(
    store: JobStore,
) -> None:
    async with anyio.create_task_group() as tg:
        await tg.start(store.run_flusher)
        record = _record("a")
        store.insert(record, b"{}")
        record.status = "IN_PROGRESS"
        store.update(record)
        assert _seen(store.path) == {}  # nothing committed before the loop turns
        await store.wait_committed()
        assert not store.pending
        assert _seen(store.path) == {"a": "IN_PROGRESS"}
        tg.cancel_scope.cancel()


async def test_the_flusher_commits_a_change_nobody_waits_for(store: JobStore) -> None:
    async with anyio.create_task_group() as tg:
        await tg.start(store.run_flusher)
        store.insert(_record("a"), b"{}")
        with anyio.fail_after(10):
            while _seen(store.path) != {"a": "IN_QUEUE"}:
                await anyio.sleep(0.01)
        assert not store.pending
        store.insert(_record("b"), b"{}")  # and again, once it has slept
        with anyio.fail_after(10):
            while "b" not in _seen(store.path):
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()


async def test_a_stopped_flusher_commits_what_is_pending(store: JobStore) -> None:
    async with anyio.create_task_group() as tg:
        await tg.start(store.run_flusher)
        store.insert(_record("a"), b"{}")
        tg.cancel_scope.cancel()  # before it could commit on its own
    assert _seen(store.path) == {"a": "IN_QUEUE"}


async def test_without_a_flusher_waiting_commits_at_once(store: JobStore) -> None:
    store.insert(_record("a"), b"{}")
    await store.wait_committed()
    assert _seen(store.path) == {"a": "IN_QUEUE"}
    await store.wait_committed()  # nothing pending: returns
    store.commit()  # nothing pending: nothing to do
    assert not store.pending


def test_settings_and_endpoints_are_committed_as_written(store: JobStore) -> None:
    store.insert(_record("a"), b"{}")  # pending, then committed with the setting
    store.set_meta("k", "v")
    store.put_endpoint("e", "{}")
    assert not store.pending
    assert _seen(store.path) == {"a": "IN_QUEUE"}


def test_delete_joins_the_pending_changes(store: JobStore) -> None:
    for job_id in ("old", "kept"):
        store.insert(_record(job_id), b"{}")
    store.commit()
    store.insert(_record("new"), b"{}")
    store.delete(["old", "new"])  # one of them committed, one still pending
    assert _seen(store.path) == {"old": "IN_QUEUE", "kept": "IN_QUEUE"}
    store.commit()
    assert _seen(store.path) == {"kept": "IN_QUEUE"}


def test_close_and_a_second_open_commit_what_is_pending(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "g.sqlite3")
    store.open()
    store.insert(_record("a"), b'{"x": 1}')
    store.open()  # the pending insert is committed before the old connection goes
    store.insert(_record("b"), b"{}")
    store.close()
    assert not store.is_open
    reopened = JobStore(tmp_path / "g.sqlite3")
    reopened.open()
    assert [job.id for job in reopened.jobs()] == ["a", "b"]
    assert reopened.input("a") == b'{"x": 1}'
    reopened.close()


def test_a_change_not_committed_is_lost_as_the_job_left_running(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "g.sqlite3")
    store.open()
    record = _record("a")
    store.insert(record, b"{}")
    record.status = "IN_PROGRESS"
    record.started = time.time()
    store.update(record)
    store.commit()
    record.status = "COMPLETED"
    record.finished = time.time()
    store.update(record, output=b"1")
    store.db.close()  # the daemon dies before the finish was committed
    reopened = JobStore(tmp_path / "g.sqlite3")
    assert [job.id for job in reopened.open()] == ["a"]  # queued again
    assert reopened.output("a") is None
    reopened.close()


def test_expired_jobs_are_found_through_the_index(store: JobStore) -> None:
    now = time.time()
    for job_id, status, age in [
        ("old", "COMPLETED", 100.0),
        ("young", "FAILED", 1.0),
        ("queued", "IN_QUEUE", 0.0),
    ]:
        record = _record(job_id)
        store.insert(record, b"{}")
        record.status = status
        record.finished = now - age if status != "IN_QUEUE" else None
        store.update(record)
    assert store.expired(50, now) == ["old"]
    plan = store.db.execute(
        "EXPLAIN QUERY PLAN SELECT id FROM jobs "
        "WHERE status IN (?, ?, ?, ?) AND finished < ?",  # as `expired` asks
        (*sorted(TERMINAL), now),
    ).fetchall()
    assert "USING INDEX jobs_status_finished (status=? AND finished<?)" in str(plan)


# -- inputs and outputs kept on jobs -------------------------------------------------------


def _plane(store: JobStore, hold_budget: int) -> tuple[DataPlane, JobBook, Endpoint]:
    endpoint = Endpoint("e", config_of(ServerlessEndpoint(name="e", handler=str(ECHO))))
    book = JobBook(store, {"e": endpoint}, hold_budget=hold_budget)
    return DataPlane(book, anyio.Event(), max_queue=100), book, endpoint


async def test_small_inputs_are_kept_until_handed_out_within_the_budget(
    store: JobStore,
) -> None:
    plane, book, endpoint = _plane(store, hold_budget=2 * 1000)
    inputs = [b'{"x": "' + bytes([97 + i]) * 990 + b'"}' for i in range(3)]
    jobs = [plane.submit(endpoint, memoryview(raw), {}) for raw in inputs]
    big = plane.submit(endpoint, b'"' + b"y" * HOLD_LIMIT + b'"', {})
    assert [job.held_input is not None for job in [*jobs, big]] == [
        True,
        True,
        False,  # over the budget
        False,  # over the limit of one
    ]
    assert book.held == sum(len(raw) for raw in inputs[:2])
    for job, raw in zip(jobs, inputs, strict=True):
        assert endpoint.pop() is job
        book.start(job, "w")
        assert book.input_of(job) == raw == store.input(job.id)
        assert job.held_input is None
    assert book.input_of(big) == store.input(big.id)
    assert book.held == 0
    again = plane.submit(endpoint, b'{"z": 1}', {})
    book.cancel(endpoint, again)  # ended while queued: its input is let go
    assert again.held_input is None
    assert book.held == 0
    assert book.input_of(again) == b'{"z": 1}'


async def test_a_kept_output_answers_as_the_stored_one_once(store: JobStore) -> None:
    plane, book, endpoint = _plane(store, hold_budget=3 * 1024)
    outputs = [b'{"r": "' + bytes([97 + i]) * 1500 + b'"}' for i in range(3)]
    jobs = [plane.submit(endpoint, b"{}", {}) for _ in outputs]
    for job, output in zip(jobs, outputs, strict=True):
        book.start(job, "w")
        book.input_of(job)
        book.complete(job, output)
    assert [job.held_output is not None for job in jobs] == [True, True, False]
    for job, output in zip(jobs, outputs, strict=True):
        assert book.output_size(job) == len(output) == store.output_size(job.id)
        first = wire_encoder.encode(book.envelope(job))  # the kept one, let go
        assert job.held_output is None
        assert wire_encoder.encode(book.envelope(job)) == first  # read back: the same
        assert b'"output":' + output in first
    assert book.held == 0
    last = plane.submit(endpoint, b"{}", {})
    book.start(last, "w")
    book.complete(last, b"7")
    assert book.held == 1
    store.delete([last.id])
    book.forget([last.id])  # expired before anyone asked: let go with it
    assert book.held == 0


def test_changes_in_one_commit_window_are_written_once_as_they_stand(
    store: JobStore,
) -> None:
    started, retried = _record("started"), _record("retried")
    store.insert(started, b"{}")
    store.insert(retried, b"{}")
    store.commit()
    # started, then finished with an output, then touched without one: output kept
    started.status = "IN_PROGRESS"
    store.update(started)
    started.status = "COMPLETED"
    store.update(started, output=b'{"ok": 1}')
    started.retries = 1
    store.update(started)
    # finished with an output, then queued again without it (a retry): output gone
    retried.status = "FAILED"
    store.update(retried, output=b'{"no": 1}')
    retried.status = "IN_QUEUE"
    store.update(retried, output=None)
    assert _seen(store.path) == {"started": "IN_QUEUE", "retried": "IN_QUEUE"}
    assert store.output("started") == b'{"ok": 1}'  # a read sees what is pending
    store.commit()
    assert _seen(store.path) == {"started": "COMPLETED", "retried": "IN_QUEUE"}
    assert store.output("retried") is None
    assert {j.id: j.retries for j in store.jobs()} == {"started": 1, "retried": 0}
