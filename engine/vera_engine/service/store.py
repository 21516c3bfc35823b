"""Durable job state in SQLite: what survives an engine restart, even after ``kill -9``.

Every state change is one committed transaction, so a crash leaves each job either in its old or its new
state, never in between. Jobs found RUNNING at start-up were interrupted by the crash and go back to the
queue (up to ``max_attempts`` starts, so a job that crashes the engine cannot crash it forever).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from vera_engine.service.errors import QueueFull
from vera_engine.service.limits import MAX_ERROR_CHARS
from vera_proto.vera.v1 import engine_pb2 as pb

QUEUED = pb.JOB_STATE_QUEUED
RUNNING = pb.JOB_STATE_RUNNING
SUCCEEDED = pb.JOB_STATE_SUCCEEDED
FAILED = pb.JOB_STATE_FAILED
CANCELLED = pb.JOB_STATE_CANCELLED
FINAL_STATES = frozenset({SUCCEEDED, FAILED, CANCELLED})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    state INTEGER NOT NULL,
    header BLOB NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL NOT NULL DEFAULT 0,
    finished_at REAL NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT NOT NULL DEFAULT '',
    outputs TEXT NOT NULL DEFAULT '[]',
    step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER NOT NULL DEFAULT 0,
    progress REAL NOT NULL DEFAULT 0,
    worker TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, seq);
"""
# Columns added after the first release, with their definitions: a spool written by an older engine gains them.
_ADDED_COLUMNS = {
    "step": "INTEGER NOT NULL DEFAULT 0",
    "total_steps": "INTEGER NOT NULL DEFAULT 0",
    "progress": "REAL NOT NULL DEFAULT 0",
    "worker": "TEXT NOT NULL DEFAULT ''",
}


@dataclass
class JobRecord:
    """One row of the jobs table."""

    seq: int
    id: str
    state: int
    header: pb.JobHeader
    created_at: float
    started_at: float = 0.0
    finished_at: float = 0.0
    attempts: int = 0
    error: str = ""
    outputs: list[str] = field(default_factory=list)
    # Where a finished job stopped: denoising steps done of the total, and progress 0..1.
    step: int = 0
    total_steps: int = 0
    progress: float = 0.0
    worker: str = ""  # the worker that ran (or runs) it: WorkerInfo.name

    @property
    def final(self) -> bool:
        """True once the job can no longer change state."""
        return self.state in FINAL_STATES


class JobStore:
    """Thread-safe access to the jobs table of one spool."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        # WAL keeps readers (Watch, ListJobs) off the writer's back; FULL sync makes each commit durable.
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        present = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        for name, definition in _ADDED_COLUMNS.items():
            if name not in present:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {definition}")

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._db.close()

    # -- reading -------------------------------------------------------------------------------------------

    @staticmethod
    def _record(row: tuple) -> JobRecord:
        (
            seq,
            job_id,
            state,
            header,
            created,
            started,
            finished,
            attempts,
            error,
            outputs,
            step,
            total,
            progress,
            worker,
        ) = row
        return JobRecord(
            seq=seq,
            id=job_id,
            state=state,
            header=pb.JobHeader.FromString(header),
            created_at=created,
            started_at=started,
            finished_at=finished,
            attempts=attempts,
            error=error,
            outputs=json.loads(outputs),
            step=step,
            total_steps=total,
            progress=progress,
            worker=worker,
        )

    _COLUMNS = (
        "seq, id, state, header, created_at, started_at, finished_at, attempts, error, outputs, "
        "step, total_steps, progress, worker"
    )

    def get(self, job_id: str) -> JobRecord | None:
        """The job with this id, or None."""
        with self._lock:
            row = self._db.execute(f"SELECT {self._COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._record(row) if row else None

    def jobs(self, states: Iterable[int] = (), limit: int = 0) -> list[JobRecord]:
        """Jobs in submission order, optionally only some states and only the newest ``limit``."""
        states = list(states)
        sql = f"SELECT {self._COLUMNS} FROM jobs"
        if states:
            sql += f" WHERE state IN ({','.join('?' * len(states))})"
        sql += " ORDER BY seq DESC"
        if limit:
            sql += f" LIMIT {int(limit)}"
        with self._lock:
            rows = self._db.execute(sql, states).fetchall()
        return [self._record(r) for r in reversed(rows)]

    def page(self, states: Iterable[int], after_seq: int, count: int) -> list[JobRecord]:
        """Up to ``count`` jobs with ``seq > after_seq`` in submission order, optionally only some states."""
        states = list(states)
        sql = f"SELECT {self._COLUMNS} FROM jobs WHERE seq > ?"
        if states:
            sql += f" AND state IN ({','.join('?' * len(states))})"
        sql += " ORDER BY seq LIMIT ?"
        with self._lock:
            rows = self._db.execute(sql, (after_seq, *states, count)).fetchall()
        return [self._record(r) for r in rows]

    def newest_seq(self, states: Iterable[int], newest: int) -> int:
        """The seq of the ``newest``-th newest job (in ``states`` if given); 0 when there are fewer jobs."""
        states = list(states)
        sql = "SELECT seq FROM jobs"
        if states:
            sql += f" WHERE state IN ({','.join('?' * len(states))})"
        sql += " ORDER BY seq DESC LIMIT 1 OFFSET ?"
        with self._lock:
            row = self._db.execute(sql, (*states, newest - 1)).fetchone()
        return row[0] if row else 0

    def queued_ids(self) -> list[str]:
        """Ids of the waiting jobs in the order they will run."""
        with self._lock:
            rows = self._db.execute("SELECT id FROM jobs WHERE state = ? ORDER BY seq", (QUEUED,)).fetchall()
        return [r[0] for r in rows]

    def count(self, state: int) -> int:
        """Number of jobs in ``state``."""
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM jobs WHERE state = ?", (state,)).fetchone()[0]

    # -- writing -------------------------------------------------------------------------------------------

    def add(self, job_id: str, header: pb.JobHeader, capacity: int) -> JobRecord:
        """Queue a new job unless ``capacity`` jobs are already waiting (then :class:`QueueFull`)."""
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                waiting = self._db.execute("SELECT COUNT(*) FROM jobs WHERE state = ?", (QUEUED,)).fetchone()[
                    0
                ]
                if waiting >= capacity:
                    raise QueueFull(f"the queue is full ({waiting} of {capacity} jobs waiting)")
                cur = self._db.execute(
                    "INSERT INTO jobs (id, state, header, created_at) VALUES (?, ?, ?, ?)",
                    (job_id, QUEUED, header.SerializeToString(), now),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return JobRecord(seq=cur.lastrowid or 0, id=job_id, state=QUEUED, header=header, created_at=now)

    def claim_next(self, worker: str = "") -> JobRecord | None:
        """Atomically move the oldest queued job to RUNNING on ``worker`` (counting the attempt) and return it."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    "SELECT id FROM jobs WHERE state = ? ORDER BY seq LIMIT 1", (QUEUED,)
                ).fetchone()
                if row is not None:
                    self._db.execute(
                        "UPDATE jobs SET state = ?, started_at = ?, attempts = attempts + 1, worker = ? WHERE id = ?",
                        (RUNNING, time.time(), worker, row[0]),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return self.get(row[0]) if row else None

    def cancel_if_queued(self, job_id: str) -> bool:
        """Cancel a job that has not started; False if it is not (or no longer) queued."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE jobs SET state = ?, finished_at = ? WHERE id = ? AND state = ?",
                (CANCELLED, time.time(), job_id, QUEUED),
            )
        return cur.rowcount == 1

    def finish(
        self,
        job_id: str,
        state: int,
        error: str = "",
        outputs: Iterable[str] = (),
        progress: tuple[int, int, float] = (0, 0, 0.0),
    ) -> None:
        """Record a job's final state, and ``progress`` (step, total steps, fraction) where it stopped."""
        if state not in FINAL_STATES:
            raise ValueError(f"finish() needs a final state, got {pb.JobState.Name(state)}")
        step, total, fraction = progress
        # The full text is in the log; every JobStatus repeats the stored one.
        if len(error) > MAX_ERROR_CHARS:
            error = error[: MAX_ERROR_CHARS - 3] + "..."
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET state = ?, finished_at = ?, error = ?, outputs = ?, step = ?, total_steps = ?, "
                "progress = ? WHERE id = ?",
                (state, time.time(), error, json.dumps(list(outputs)), step, total, fraction, job_id),
            )

    def requeue(self, job_id: str) -> None:
        """Put a job interrupted by a clean shutdown back in the queue without counting the attempt."""
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET state = ?, attempts = MAX(attempts - 1, 0) WHERE id = ? AND state = ?",
                (QUEUED, job_id, RUNNING),
            )

    def requeue_lost(self, job_id: str, max_attempts: int, cause: str) -> bool:
        """Put a job whose worker died back in the queue (the attempt counts, as after a crash); after
        ``max_attempts`` starts, fail it with ``cause`` instead. Returns True if it was requeued.

        The queue runs in submission order, so the job is at its head again.
        """
        with self._lock:
            row = self._db.execute(
                "SELECT attempts FROM jobs WHERE id = ? AND state = ?", (job_id, RUNNING)
            ).fetchone()
            if row is None:
                return False
            if row[0] >= max_attempts:
                self._db.execute(
                    "UPDATE jobs SET state = ?, finished_at = ?, error = ? WHERE id = ?",
                    (
                        FAILED,
                        time.time(),
                        f"the worker running this job was lost {row[0]} times; not retrying (last: {cause})",
                        job_id,
                    ),
                )
                return False
            self._db.execute("UPDATE jobs SET state = ? WHERE id = ?", (QUEUED, job_id))
            return True

    def recover(self, max_attempts: int) -> tuple[list[str], list[str]]:
        """After a restart: requeue jobs a crash left RUNNING; fail those started ``max_attempts`` times.

        Returns (requeued ids, failed ids).
        """
        with self._lock:
            rows = self._db.execute("SELECT id, attempts FROM jobs WHERE state = ?", (RUNNING,)).fetchall()
            requeued, failed = [], []
            for job_id, attempts in rows:
                if attempts >= max_attempts:
                    self._db.execute(
                        "UPDATE jobs SET state = ?, finished_at = ?, error = ? WHERE id = ?",
                        (
                            FAILED,
                            time.time(),
                            f"the engine stopped while running this job {attempts} times; not retrying",
                            job_id,
                        ),
                    )
                    failed.append(job_id)
                else:
                    self._db.execute("UPDATE jobs SET state = ? WHERE id = ?", (QUEUED, job_id))
                    requeued.append(job_id)
        return requeued, failed

    def expired(self, finished_before: float) -> list[str]:
        """Finished jobs whose retention ran out."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT id FROM jobs WHERE state IN ({','.join('?' * len(FINAL_STATES))}) AND finished_at < ?",
                (*sorted(FINAL_STATES), finished_before),
            ).fetchall()
        return [r[0] for r in rows]

    def delete(self, job_id: str) -> None:
        """Forget a job."""
        with self._lock:
            self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
