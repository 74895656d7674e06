"""Jobs and their devices' outcomes in SQLite (`jobs.sqlite3` in the data dir, beside `commands.sqlite3`).

A file of its own rather than the command store's connection: the two never need one transaction (a job's device
finds its command again by idempotency key, whatever was committed first), and each keeps its own commit cadence.
Writes are queued in memory (`put_job`, `put_device`) and committed together by `flush` (the runner calls it from
a worker thread); reads flush first, so they see everything put before them.
"""

from __future__ import annotations

import builtins
import json
import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hub.fleet._job_states import JOB_ACTIVE_STATES, DeviceState, JobState
from hub.fleet._jobs import CommandSpec, DesiredSpec, DeviceOutcome, JobRecord, Rollout, parse_action

__all__ = ["JOBS_FILE", "JobStore"]

#: The jobs file in the hub's data dir.
JOBS_FILE = "jobs.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id        TEXT PRIMARY KEY,
    selector      TEXT NOT NULL,
    action        TEXT NOT NULL,
    rate          REAL NOT NULL,
    max_in_flight INTEGER NOT NULL,
    abort_percent REAL,
    state         TEXT NOT NULL,
    created       REAL NOT NULL,
    updated       REAL NOT NULL,
    total         INTEGER NOT NULL,
    counts        TEXT NOT NULL,
    operator      TEXT NOT NULL,
    reason        TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
CREATE TABLE IF NOT EXISTS job_devices (
    job_id   TEXT NOT NULL,
    seq      INTEGER NOT NULL,
    device   TEXT NOT NULL,
    state    TEXT NOT NULL,
    started  REAL,
    finished REAL,
    ref      TEXT NOT NULL,
    error    TEXT NOT NULL,
    PRIMARY KEY (job_id, device)
);
CREATE INDEX IF NOT EXISTS job_devices_order ON job_devices (job_id, seq);
CREATE INDEX IF NOT EXISTS job_devices_state ON job_devices (job_id, state, seq);
"""

_JOB_COLUMNS = (
    "job_id, selector, action, rate, max_in_flight, abort_percent, state, created, updated, total, counts, operator, "
    "reason"
)
_INSERT_JOB = f"INSERT OR REPLACE INTO jobs ({_JOB_COLUMNS}) VALUES ({', '.join('?' * 13)})"
_DEVICE_COLUMNS = "job_id, seq, device, state, started, finished, ref, error"
_INSERT_DEVICE = f"INSERT INTO job_devices ({_DEVICE_COLUMNS}) VALUES ({', '.join('?' * 8)})"
_UPDATE_DEVICE = (
    "UPDATE job_devices SET state = ?, started = ?, finished = ?, ref = ?, error = ? WHERE job_id = ? AND device = ?"
)


def _job_row(job: JobRecord) -> tuple[Any, ...]:
    r = job.rollout
    counts = {s.value: n for s, n in job.counts.items() if n}
    return (
        job.job_id,
        job.selector,
        json.dumps(job.action.as_dict()),
        r.rate,
        r.max_in_flight,
        r.abort_percent,
        job.state.value,
        job.created,
        job.updated,
        job.total,
        json.dumps(counts),
        job.operator,
        job.reason,
    )


def _job(row: tuple[Any, ...]) -> JobRecord:
    action: CommandSpec | DesiredSpec = parse_action(json.loads(row[2]))
    return JobRecord(
        job_id=row[0],
        selector=row[1],
        action=action,
        rollout=Rollout(row[3], row[4], row[5]),
        state=JobState(row[6]),
        created=row[7],
        updated=row[8],
        total=row[9],
        counts={DeviceState(s): n for s, n in json.loads(row[10]).items()},
        operator=row[11],
        reason=row[12],
    )


def _outcome(row: tuple[Any, ...]) -> DeviceOutcome:
    return DeviceOutcome(row[0], DeviceState(row[1]), row[2], row[3], row[4], row[5])


class JobStore:
    """Jobs and job devices in SQLite (WAL, synchronous=NORMAL: a committed write survives a process crash).

    Every method may block on SQLite: call them from a worker thread, but `put_job` and `put_device`, which only
    queue in memory. `create` commits at once.
    """

    def __init__(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # the connection
        self._queue_lock = threading.Lock()
        self._jobs: dict[str, JobRecord] = {}  # newest version not yet committed, by id
        self._devices: dict[tuple[str, str], DeviceOutcome] = {}  # (job, device) -> newest outcome not committed
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)

    @property
    def queued(self) -> int:
        """Writes put and not yet committed."""
        return len(self._jobs) + len(self._devices)

    def create(self, job: JobRecord, devices: Iterable[str]) -> None:
        """Commit a new job with its devices, all pending, in rollout order."""
        rows = [(job.job_id, seq, d, DeviceState.PENDING.value, None, None, "", "") for seq, d in enumerate(devices)]
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.execute(_INSERT_JOB, _job_row(job))
                self._db.executemany(_INSERT_DEVICE, rows)
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def put_job(self, job: JobRecord) -> None:
        """Queue the job's newest record for the next `flush`."""
        with self._queue_lock:
            self._jobs[job.job_id] = job

    def put_device(self, job_id: str, outcome: DeviceOutcome) -> None:
        """Queue a device's newest outcome in a job for the next `flush`."""
        with self._queue_lock:
            self._devices[(job_id, outcome.device)] = outcome

    def flush(self) -> int:
        """Commit everything put before this call in one transaction; the number of rows written."""
        with self._lock:
            return self._flush_locked()

    def active(self) -> list[tuple[JobRecord, list[DeviceOutcome]]]:
        """The jobs not final, oldest first, each with its devices in rollout order (to resume them)."""
        states = ", ".join(f"'{s.value}'" for s in sorted(JOB_ACTIVE_STATES))
        with self._lock:
            self._flush_locked()
            jobs = [
                _job(r)
                for r in self._db.execute(
                    f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state IN ({states}) ORDER BY created, rowid"
                )
            ]
            return [(job, self._outcomes_locked(job.job_id, None, -1, 0)) for job in jobs]

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            self._flush_locked()
            row = self._db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return None if row is None else _job(row)

    def list(self, state: str | None = None, limit: int = 50) -> builtins.list[JobRecord]:
        """Newest first."""
        where, params = ("WHERE state = ?", [state]) if state is not None else ("", [])
        with self._lock:
            self._flush_locked()
            rows = self._db.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs {where} ORDER BY created DESC, rowid DESC LIMIT ?", (*params, limit)
            ).fetchall()
        return [_job(r) for r in rows]

    def devices(
        self, job_id: str, state: str | None = None, limit: int = 100, offset: int = 0
    ) -> builtins.list[DeviceOutcome]:
        """A job's devices in rollout order, optionally only those in `state`."""
        with self._lock:
            self._flush_locked()
            return self._outcomes_locked(job_id, state, limit, offset)

    def close(self) -> None:
        """Commit what is queued, then close."""
        with self._lock:
            try:
                self._flush_locked()
            finally:
                self._db.close()

    def _outcomes_locked(self, job_id: str, state: str | None, limit: int, offset: int) -> builtins.list[DeviceOutcome]:
        where = "job_id = ?" + (" AND state = ?" if state is not None else "")
        params: tuple[object, ...] = (job_id, state) if state is not None else (job_id,)
        rows = self._db.execute(
            f"SELECT device, state, started, finished, ref, error FROM job_devices WHERE {where} ORDER BY seq "
            "LIMIT ? OFFSET ?",
            (*params, limit, offset),
        ).fetchall()
        return [_outcome(r) for r in rows]

    def _flush_locked(self) -> int:
        with self._queue_lock:
            jobs = list(self._jobs.values())
            devices = list(self._devices.items())
        if not jobs and not devices:
            return 0
        self._db.execute("BEGIN")
        try:
            self._db.executemany(
                _UPDATE_DEVICE,
                [(o.state.value, o.started, o.finished, o.ref, o.error, j, o.device) for (j, _), o in devices],
            )
            self._db.executemany(_INSERT_JOB, [_job_row(job) for job in jobs])
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        with self._queue_lock:
            for job in jobs:
                if self._jobs.get(job.job_id) is job:  # not replaced by a newer version meanwhile
                    del self._jobs[job.job_id]
            for key, outcome in devices:
                if self._devices.get(key) is outcome:
                    del self._devices[key]
        return len(jobs) + len(devices)
