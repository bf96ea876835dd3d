"""The gateway's durable store: endpoints, queued and finished jobs in one SQLite file.

Every change of a job's state is committed before it is reported: an answer that tells a
client (or a worker, or a webhook) about a job waits for `JobStore.wait_committed` first, so
a ``flash local down`` / ``up`` or a killed daemon (SIGKILL) loses no job that was reported
queued and no result that was reported or is still inside its retention time. WAL
journaling with ``synchronous=NORMAL``: a commit survives the death of the process (the
kernel has the pages); only a power cut could undo the last commits.

Group commit: a commit costs as much as several statements (it writes every page it
changed to the WAL, tens of microseconds), so job writes are not committed one by one. The
first write opens a transaction that the next writes join; it is committed for the answers
that wait for it, or by `JobStore.run_flusher` (the daemon's task), one turn of the event
loop after it was opened: the writes of that turn share the commit. Job state changes are
written only then, as they stand (a job that starts and ends in one turn costs one UPDATE).
So a SIGKILL loses at most the changes of the last moments (a few milliseconds) that nobody
has been told of yet: a job submitted but not yet acknowledged is gone (its
caller saw no answer and sends it again); a job whose start or finish was not committed is
found IN_QUEUE or IN_PROGRESS at restart and runs again, exactly as a job that was running
when the daemon died. Settings and endpoint configs (rare, and holding the keys) are
committed as they are written.

Jobs that were running when the daemon died are queued again at start-up (`JobStore.open`
reports them as recovered), since the worker that had them died with the daemon.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel

from flash_actors._logging import get_logger
from flash_actors._private import private_dir, private_file

if TYPE_CHECKING:
    from collections.abc import Iterable
    from pathlib import Path

    from anyio.abc import TaskStatus

__all__ = ["KEEP", "TERMINAL", "JobRecord", "JobStore"]

TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"})

# (status, finished): the janitor's `JobStore.expired` reads only the expired jobs' entries,
# not every finished job's row (tens of ms per sweep with 20,000 jobs kept; jobs_status,
# the index of older versions, could not do it).
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS endpoints (name TEXT PRIMARY KEY, config TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    endpoint TEXT NOT NULL,
    status TEXT NOT NULL,
    input BLOB NOT NULL,
    options TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    output BLOB,
    error TEXT,
    retries INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_status_finished ON jobs (status, finished);
DROP INDEX IF EXISTS jobs_status;
"""


class _Keep:
    """The type of `KEEP`."""


KEEP = _Keep()
"""`JobStore.update`'s default ``output``: leave the stored output as it is."""

log = get_logger(__name__)

_UPDATE = (
    "UPDATE jobs SET status = ?, started = ?, finished = ?, error = ?, retries = ? "
    "WHERE id = ?"
)
_UPDATE_OUTPUT = (
    "UPDATE jobs SET status = ?, started = ?, finished = ?, error = ?, retries = ?, "
    "output = ? WHERE id = ?"
)
_INSERT = (
    "INSERT INTO jobs (id, endpoint, status, input, options, created, retries) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)


class _Commit:
    """One group commit that answers wait for: done, and the error if it failed."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.error: sqlite3.Error | None = None


@dataclass(slots=True, eq=False)
class JobRecord:
    """One job's metadata as stored; ``options`` is JSON.

    ``options`` holds what the submitter asked for: ``executionTimeout`` and ``ttl`` (ms),
    ``webhook``, ``stream``. The job's input and output (raw JSON, up to tens of MB each)
    are not held here: they stay in the file, read with `JobStore.input` and
    `JobStore.output` when needed, so the daemon's memory does not grow with its queue
    (`flash_actors.providers.local.daemon.jobs.Job` keeps small ones for a moment, under a
    cap, to spare a read).
    """

    id: str
    endpoint: str
    status: str
    options: str
    created: float
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    retries: int = 0
    seq: int = field(default=0)


class JobStore:
    """The SQLite file ``<state_dir>/gateway.sqlite3``. Used from one thread (the loop's).

    Job writes (`insert`, `update`, `delete`) join the open transaction (see
    the module docstring); `commit` commits it, `wait_committed` waits for it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._wake: anyio.Event | None = None  # set by a write while the flusher runs
        self._next: _Commit | None = None  # what answers waiting now wait for
        # Jobs whose state changed since the last flush, written as they stand then (a job
        # that starts and ends in one commit window costs one UPDATE, not two), and the
        # outputs given with those changes.
        self._updates: dict[str, JobRecord] = {}
        self._outputs: dict[str, bytes | None] = {}

    @property
    def is_open(self) -> bool:
        """True between `open` and `close`."""
        return self._db is not None

    @property
    def db(self) -> sqlite3.Connection:
        """The open connection."""
        if self._db is None:
            msg = "the job store is closed"
            raise RuntimeError(msg)
        return self._db

    def open(self) -> list[JobRecord]:
        """Open (creating it if needed); requeue jobs left running. Returns the requeued ones."""
        self.close()  # opened again: what the first connection has pending is committed
        private_dir(self.path.parent)
        # 0600 before SQLite opens it: SQLite gives its -wal and -shm files the database
        # file's mode, and all three hold the API key, the secret and every job's data.
        private_file(self.path)
        for sidecar in self._sidecars():  # left by an older version: tighten them too
            if sidecar.exists():
                private_file(sidecar)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        self._db = db
        with db:
            db.execute("BEGIN IMMEDIATE")
            rows = db.execute(
                "SELECT id FROM jobs WHERE status = 'IN_PROGRESS'"
            ).fetchall()
            db.execute(
                "UPDATE jobs SET status = 'IN_QUEUE', started = NULL, "
                "retries = retries + 1 WHERE status = 'IN_PROGRESS'"
            )
        recovered = {row[0] for row in rows}
        return [job for job in self.jobs() if job.id in recovered]

    def _sidecars(self) -> tuple[Path, Path]:
        return (
            self.path.with_name(self.path.name + "-wal"),
            self.path.with_name(self.path.name + "-shm"),
        )

    def close(self) -> None:
        """Commit what is pending, checkpoint and close the file."""
        if self._db is None:
            return
        try:
            self.commit()
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            db, self._db = self._db, None
            db.close()

    # -- group commit ---------------------------------------------------------------------

    @property
    def pending(self) -> bool:
        """True while written changes wait for their commit."""
        return self._db is not None and (self._db.in_transaction or bool(self._updates))

    def _flush_updates(self) -> None:
        """Write the changed jobs' state into the open transaction (reads see it then)."""
        if not self._updates:
            return
        updates, outputs = self._updates, self._outputs
        self._updates, self._outputs = {}, {}
        plain: list[tuple[object, ...]] = []
        with_output: list[tuple[object, ...]] = []
        for job_id, job in updates.items():
            values = (job.status, job.started, job.finished, job.error, job.retries)
            if job_id in outputs:
                with_output.append((*values, outputs[job_id], job_id))
            else:
                plain.append((*values, job_id))
        db = self._begin()
        if plain:
            db.executemany(_UPDATE, plain)
        if with_output:
            db.executemany(_UPDATE_OUTPUT, with_output)

    def _begin(self) -> sqlite3.Connection:
        """The connection, in the open transaction (opened, and the flusher woken, if none)."""
        db = self.db
        if not db.in_transaction:
            db.execute("BEGIN")
            if self._wake is not None:
                self._wake.set()
        return db

    def commit(self) -> None:
        """Commit the pending changes now (nothing to do if none); wakes who waits for them.

        Raises:
            sqlite3.Error: the commit failed (the waiting answers fail with it too).
        """
        waiting, self._next = self._next, None
        try:
            self._flush_updates()
            if self.pending:
                self.db.execute("COMMIT")
        except sqlite3.Error as exc:
            if waiting is not None:
                waiting.error = exc
            raise
        finally:
            if waiting is not None:
                waiting.done.set()

    async def wait_committed(self) -> None:
        """Until every change written so far is committed (at once if nothing is pending).

        With the flusher running, the answers waiting in one turn of the event loop share
        one commit; without it, this commits now.

        Raises:
            sqlite3.Error: the commit failed.
        """
        if not self.pending:
            await anyio.lowlevel.checkpoint()
            return
        if self._wake is None:
            self.commit()
            await anyio.lowlevel.checkpoint()
            return
        if self._next is None:
            self._next = _Commit()
        waiting = self._next
        await waiting.done.wait()
        if waiting.error is not None:
            raise waiting.error

    async def run_flusher(
        self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Commit each transaction one turn of the event loop after it opens, until cancelled.

        One turn: the writes made by every task that runs in it join the same commit, and
        nothing written waits longer than that (a few milliseconds under load) to be
        committed. A failed commit is logged, its waiting answers fail with it, and it is
        tried again a moment later. Cancelled, it commits what is pending before it returns.
        """
        self._wake = wake = anyio.Event()
        task_status.started()
        try:
            while True:
                if not self.pending:
                    await wake.wait()
                self._wake = wake = anyio.Event()
                await anyio.lowlevel.checkpoint()  # this turn's writes join
                try:
                    self.commit()
                except sqlite3.Error:
                    log.exception("store.commit_failed", path=str(self.path))
                    await anyio.sleep(0.1)
        finally:
            self._wake = None
            try:  # what is pending, and whoever still waits for it
                if self.is_open:
                    self.commit()
            except sqlite3.Error:  # the cancellation goes on
                log.exception("store.commit_failed", path=str(self.path))

    # -- meta and endpoints ---------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        """A stored setting (the daemon's API key and secret live here)."""
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        """Store a setting (committed when this returns)."""
        self._begin().execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )
        self.commit()

    def endpoints(self) -> dict[str, str]:
        """Every registered endpoint's config (JSON), by name."""
        return {
            str(name): str(config)
            for name, config in self.db.execute("SELECT name, config FROM endpoints")
        }

    def put_endpoint(self, name: str, config: str) -> None:
        """Register (or replace) an endpoint's config (committed when this returns)."""
        self._begin().execute(
            "INSERT INTO endpoints (name, config) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET config = excluded.config",
            (name, config),
        )
        self.commit()

    def delete_endpoint(self, name: str) -> None:
        """Forget an endpoint's config, its jobs staying until they expire (committed)."""
        self._begin().execute("DELETE FROM endpoints WHERE name = ?", (name,))
        self.commit()

    # -- jobs -----------------------------------------------------------------------------

    def jobs(self) -> list[JobRecord]:
        """Every stored job's metadata, oldest first (inputs and outputs stay in the file)."""
        self._flush_updates()
        cursor = self.db.execute(
            "SELECT id, endpoint, status, options, created, started, finished, "
            "error, retries, seq FROM jobs ORDER BY seq"
        )
        return [
            JobRecord(
                id=row[0],
                endpoint=row[1],
                status=row[2],
                options=row[3],
                created=row[4],
                started=row[5],
                finished=row[6],
                error=row[7],
                retries=row[8],
                seq=row[9],
            )
            for row in cursor
        ]

    def input(self, job_id: str) -> bytes:
        """A job's input (raw JSON); empty if the job is gone."""
        self._flush_updates()
        row = self.db.execute(
            "SELECT input FROM jobs WHERE id = ?", (job_id,)
        ).fetchone()
        return b"" if row is None else bytes(row[0])

    def output(self, job_id: str) -> bytes | None:
        """A job's output (raw JSON), if it has one."""
        self._flush_updates()
        row = self.db.execute(
            "SELECT output FROM jobs WHERE id = ?", (job_id,)
        ).fetchone()
        return None if row is None or row[0] is None else bytes(row[0])

    def output_size(self, job_id: str) -> int:
        """The size of a job's output in bytes (0 if it has none)."""
        self._flush_updates()
        row = self.db.execute(
            "SELECT length(output) FROM jobs WHERE id = ?", (job_id,)
        ).fetchone()
        return 0 if row is None or row[0] is None else int(row[0])

    def insert(self, job: JobRecord, payload: bytes | memoryview) -> None:
        """Store a new job and its input (in the pending transaction); sets ``job.seq``."""
        cursor = self._begin().execute(
            _INSERT,
            (
                job.id,
                job.endpoint,
                job.status,
                payload,
                job.options,
                job.created,
                job.retries,
            ),
        )
        job.seq = cursor.lastrowid or 0

    def update(self, job: JobRecord, *, output: bytes | _Keep | None = KEEP) -> None:
        """Store a job's new state, and its ``output`` if given (in the pending transaction).

        Written at the next flush (a commit, or a read), as ``job`` stands then.
        """
        self._begin()  # the transaction is open and the flusher awake
        self._updates[job.id] = job
        if not isinstance(output, _Keep):
            self._outputs[job.id] = output

    def delete(self, ids: Iterable[str]) -> None:
        """Forget jobs (expired results), in the pending transaction."""
        self._flush_updates()
        self._begin().executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in ids])

    def expired(self, retention_s: float, now: float | None = None) -> list[str]:
        """Ids of finished jobs older than ``retention_s``."""
        self._flush_updates()
        cutoff = (time.time() if now is None else now) - retention_s
        placeholders = ",".join("?" * len(TERMINAL))
        return [
            row[0]
            for row in self.db.execute(
                f"SELECT id FROM jobs WHERE status IN ({placeholders}) AND finished < ?",  # noqa: S608 (fixed placeholders)
                (*sorted(TERMINAL), cutoff),
            )
        ]
