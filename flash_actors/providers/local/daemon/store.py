"""The gateway's durable store: endpoints, queued and finished jobs in one SQLite file.

Every change of a job's state is committed before the gateway answers the request that caused
it, so a ``flash local down`` / ``up`` or a killed daemon (SIGKILL) loses no queued job and no
result still inside its retention time. WAL journaling with ``synchronous=NORMAL``: a commit
survives the death of the process (the kernel has the pages); only a power cut could undo
the last commits.

Jobs that were running when the daemon died are queued again at start-up (`JobStore.open`
reports them as recovered), since the worker that had them died with the daemon.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from flash_actors._private import private_dir, private_file

if TYPE_CHECKING:
    from collections.abc import Iterable
    from pathlib import Path

__all__ = ["KEEP", "TERMINAL", "JobRecord", "JobStore"]

TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"})

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
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status);
"""


class _Keep:
    """The type of `KEEP`."""


KEEP = _Keep()
"""`JobStore.update`'s default ``output``: leave the stored output as it is."""


@dataclass(slots=True, eq=False)
class JobRecord:
    """One job's metadata as stored; ``options`` is JSON.

    ``options`` holds what the submitter asked for: ``executionTimeout`` and ``ttl`` (ms),
    ``webhook``, ``stream``. The job's input and output (raw JSON, up to tens of MB each)
    are not held here: they stay in the file, read with `JobStore.input` and
    `JobStore.output` when needed, so the daemon's memory does not grow with its queue.
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
    """The SQLite file ``<state_dir>/gateway.sqlite3``. Used from one thread (the loop's)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None

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
        """Checkpoint and close the file."""
        db, self._db = self._db, None
        if db is not None:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            db.close()

    # -- meta and endpoints ---------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        """A stored setting (the daemon's API key and secret live here)."""
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        """Store a setting."""
        self.db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def endpoints(self) -> dict[str, str]:
        """Every registered endpoint's config (JSON), by name."""
        return {
            str(name): str(config)
            for name, config in self.db.execute("SELECT name, config FROM endpoints")
        }

    def put_endpoint(self, name: str, config: str) -> None:
        """Register (or replace) an endpoint's config."""
        self.db.execute(
            "INSERT INTO endpoints (name, config) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET config = excluded.config",
            (name, config),
        )

    def delete_endpoint(self, name: str) -> None:
        """Forget an endpoint's config (its jobs stay until they expire)."""
        self.db.execute("DELETE FROM endpoints WHERE name = ?", (name,))

    # -- jobs -----------------------------------------------------------------------------

    def jobs(self) -> list[JobRecord]:
        """Every stored job's metadata, oldest first (inputs and outputs stay in the file)."""
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
        row = self.db.execute(
            "SELECT input FROM jobs WHERE id = ?", (job_id,)
        ).fetchone()
        return b"" if row is None else bytes(row[0])

    def output(self, job_id: str) -> bytes | None:
        """A job's output (raw JSON), if it has one."""
        row = self.db.execute(
            "SELECT output FROM jobs WHERE id = ?", (job_id,)
        ).fetchone()
        return None if row is None or row[0] is None else bytes(row[0])

    def output_size(self, job_id: str) -> int:
        """The size of a job's output in bytes (0 if it has none)."""
        row = self.db.execute(
            "SELECT length(output) FROM jobs WHERE id = ?", (job_id,)
        ).fetchone()
        return 0 if row is None or row[0] is None else int(row[0])

    def insert(self, job: JobRecord, payload: bytes | memoryview) -> None:
        """Store a new job and its input (committed when this returns)."""
        cursor = self.db.execute(
            "INSERT INTO jobs (id, endpoint, status, input, options, created, retries) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
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
        """Store a job's new state, and its ``output`` if given (committed when this returns)."""
        values = (job.status, job.started, job.finished, job.error, job.retries)
        if isinstance(output, _Keep):
            self.db.execute(
                "UPDATE jobs SET status = ?, started = ?, finished = ?, error = ?, "
                "retries = ? WHERE id = ?",
                (*values, job.id),
            )
        else:
            self.db.execute(
                "UPDATE jobs SET status = ?, started = ?, finished = ?, error = ?, "
                "retries = ?, output = ? WHERE id = ?",
                (*values, output, job.id),
            )

    def delete(self, ids: Iterable[str]) -> None:
        """Forget jobs (expired results)."""
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in ids])

    def expired(self, retention_s: float, now: float | None = None) -> list[str]:
        """Ids of finished jobs older than ``retention_s``."""
        cutoff = (time.time() if now is None else now) - retention_s
        placeholders = ",".join("?" * len(TERMINAL))
        return [
            row[0]
            for row in self.db.execute(
                f"SELECT id FROM jobs WHERE status IN ({placeholders}) AND finished < ?",  # noqa: S608 (fixed placeholders)
                (*sorted(TERMINAL), cutoff),
            )
        ]
