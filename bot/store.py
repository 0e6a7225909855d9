"""The one place that speaks SQL: schema and migrations, and the durable job queue.

Job states: queued → running → done | failed | cancelled. A job found `running` at start-up was
interrupted and goes back to `queued`; it resumes from its checkpoint.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import aiosqlite

ACTIVE = ("queued", "running")
FINISHED = ("done", "failed", "cancelled")

# Each entry upgrades the schema by one version (PRAGMA user_version); never edit a released one.
MIGRATIONS = [
    """
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        status TEXT NOT NULL DEFAULT 'queued'
            CHECK (status IN ('queued', 'running', 'done', 'failed', 'cancelled')),
        request_json TEXT NOT NULL,
        guild_id INTEGER,
        channel_id INTEGER NOT NULL,
        user_id INTEGER NOT NULL,
        application_id INTEGER,
        interaction_id INTEGER,
        interaction_token TEXT,
        message_id INTEGER,
        parent_job_id INTEGER REFERENCES jobs(id),
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        step INTEGER NOT NULL DEFAULT 0,
        total_steps INTEGER NOT NULL,
        seconds_per_step REAL,
        checkpoint_path TEXT,
        output_path TEXT,
        latent_path TEXT,
        error TEXT,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        cancelled_by INTEGER,
        final_posted INTEGER NOT NULL DEFAULT 0,
        deleted_at REAL,
        deleted_by INTEGER
    );
    CREATE INDEX jobs_by_status ON jobs (status, id);
    CREATE INDEX jobs_by_user ON jobs (user_id, status);
    """,
    # 2: retention removes old output files; the row stays, marked expired.
    """
    ALTER TABLE jobs ADD COLUMN expired_at REAL;
    CREATE INDEX jobs_by_finish ON jobs (finished_at);
    """,
]


@dataclass(frozen=True)
class Job:
    id: int
    status: str
    request_json: str
    guild_id: int | None
    channel_id: int
    user_id: int
    application_id: int | None
    interaction_id: int | None
    interaction_token: str | None = dataclasses.field(repr=False)  # a secret: never log it
    message_id: int | None
    parent_job_id: int | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    step: int
    total_steps: int
    seconds_per_step: float | None
    checkpoint_path: str | None
    output_path: str | None
    latent_path: str | None
    error: str | None
    cancel_requested: int
    cancelled_by: int | None
    final_posted: int
    deleted_at: float | None
    deleted_by: int | None
    expired_at: float | None

    @property
    def remaining_steps(self) -> int:
        return max(0, self.total_steps - self.step)


@dataclass(frozen=True)
class NewJob:
    request_json: str
    channel_id: int
    user_id: int
    total_steps: int
    guild_id: int | None = None
    application_id: int | None = None
    interaction_id: int | None = None
    interaction_token: str | None = dataclasses.field(default=None, repr=False)
    parent_job_id: int | None = None


class QueueFull(Exception):
    """Enqueueing would break a queue limit: `limit` is "per_member" or "queue_length"."""

    def __init__(self, limit: str, value: int) -> None:
        super().__init__(f"{limit} ({value}) reached")
        self.limit = limit
        self.value = value


class Store:
    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db

    @classmethod
    async def open(cls, path: Path | str) -> Store:
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(path, isolation_level=None)  # explicit transactions only
        db.row_factory = aiosqlite.Row
        await db.execute("PRAGMA journal_mode = WAL")
        await db.execute("PRAGMA busy_timeout = 5000")
        await db.execute("PRAGMA foreign_keys = ON")
        store = cls(db)
        await store.migrate()
        return store

    async def close(self) -> None:
        await self.db.close()

    async def migrate(self) -> int:
        async with self.db.execute("PRAGMA user_version") as cursor:
            (version,) = await cursor.fetchone()
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            await self.db.executescript(f"BEGIN IMMEDIATE; {script}; PRAGMA user_version = {number}; COMMIT;")
        return len(MIGRATIONS)

    async def _one(self, sql: str, *params: object) -> Job | None:
        async with self.db.execute(sql, params) as cursor:
            row = await cursor.fetchone()
        return Job(**dict(row)) if row else None

    async def _all(self, sql: str, *params: object) -> list[Job]:
        async with self.db.execute(sql, params) as cursor:
            return [Job(**dict(row)) for row in await cursor.fetchall()]

    # --- the queue -------------------------------------------------------------------------------

    async def enqueue(self, job: NewJob, max_per_user: int, max_queue_length: int) -> Job:
        """Insert a queued job unless a limit is reached; one statement, so it holds under races."""
        row = await self._one(
            """
            INSERT INTO jobs (request_json, guild_id, channel_id, user_id, application_id,
                              interaction_id, interaction_token, parent_job_id, total_steps, created_at)
            SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ?
            WHERE (SELECT count(*) FROM jobs WHERE user_id = ? AND status IN ('queued', 'running')) < ?
              AND (SELECT count(*) FROM jobs WHERE guild_id IS ? AND status IN ('queued', 'running')) < ?
            RETURNING *
            """,
            job.request_json, job.guild_id, job.channel_id, job.user_id, job.application_id,
            job.interaction_id, job.interaction_token, job.parent_job_id, job.total_steps, time.time(),
            job.user_id, max_per_user, job.guild_id, max_queue_length,
        )
        if row is not None:
            return row
        if len(await self.active_jobs(user_id=job.user_id)) >= max_per_user:
            raise QueueFull("per_member", max_per_user)
        raise QueueFull("queue_length", max_queue_length)

    async def claim_next_job(self) -> Job | None:
        """Atomically move the oldest queued job to running."""
        return await self._one(
            """
            UPDATE jobs SET status = 'running', started_at = coalesce(started_at, ?)
            WHERE id = (SELECT id FROM jobs WHERE status = 'queued' ORDER BY id LIMIT 1)
            RETURNING *
            """,
            time.time(),
        )

    async def requeue_interrupted(self) -> list[int]:
        """At start-up: jobs left running by a crash or a stop go back to the queue (or, if a
        cancel was already asked for, end cancelled)."""
        async with self.db.execute(
                """UPDATE jobs SET
                       status = CASE WHEN cancel_requested THEN 'cancelled' ELSE 'queued' END,
                       finished_at = CASE WHEN cancel_requested THEN ? ELSE finished_at END
                   WHERE status = 'running' RETURNING id, status""", (time.time(),)) as cursor:
            return sorted(row[0] for row in await cursor.fetchall() if row[1] == "queued")

    async def save_progress(self, job_id: int, step: int, checkpoint_path: str | None = None,
                            seconds_per_step: float | None = None) -> None:
        await self.db.execute(
            """UPDATE jobs SET step = ?, checkpoint_path = coalesce(?, checkpoint_path),
                   seconds_per_step = coalesce(?, seconds_per_step) WHERE id = ?""",
            (step, checkpoint_path, seconds_per_step, job_id))

    async def set_message(self, job_id: int, message_id: int) -> None:
        await self.db.execute("UPDATE jobs SET message_id = ? WHERE id = ?", (message_id, job_id))

    async def forget_interaction_token(self, job_id: int) -> None:
        """The token stopped working (expired, or its message is gone): don't keep a dead secret."""
        await self.db.execute("UPDATE jobs SET interaction_token = NULL WHERE id = ?", (job_id,))

    async def finish(self, job_id: int, status: str, *, output_path: str | None = None,
                     latent_path: str | None = None, error: str | None = None) -> Job:
        assert status in FINISHED, status
        job = await self._one(
            """UPDATE jobs SET status = ?, finished_at = ?, output_path = ?, latent_path = ?, error = ?
               WHERE id = ? RETURNING *""",
            status, time.time(), output_path, latent_path, error, job_id)
        assert job is not None, f"job {job_id} vanished"
        return job

    async def requeue(self, job_id: int) -> None:
        """A running job stopped by shutdown waits for the next start."""
        await self.db.execute("UPDATE jobs SET status = 'queued' WHERE id = ? AND status = 'running'",
                              (job_id,))

    async def mark_posted(self, job_id: int) -> None:
        await self.db.execute("UPDATE jobs SET final_posted = 1 WHERE id = ?", (job_id,))

    async def unposted_finished(self) -> list[Job]:
        """Finished jobs whose final reply was not confirmed sent (e.g. a crash right after)."""
        return await self._all(
            "SELECT * FROM jobs WHERE status IN ('done', 'failed', 'cancelled') AND final_posted = 0 "
            "ORDER BY id")

    async def mark_deleted(self, job_id: int, by_user: int) -> None:
        """The picture and its files are gone; the row stays, saying who deleted it and when."""
        await self.db.execute("UPDATE jobs SET deleted_at = ?, deleted_by = ? WHERE id = ?",
                              (time.time(), by_user, job_id))

    async def request_cancel(self, job_id: int, by_user: int) -> Job | None:
        """A queued job is cancelled at once; a running one is flagged for the engine to stop."""
        return await self._one(
            """
            UPDATE jobs SET
                cancel_requested = 1,
                cancelled_by = ?,
                status = CASE status WHEN 'queued' THEN 'cancelled' ELSE status END,
                finished_at = CASE status WHEN 'queued' THEN ? ELSE finished_at END
            WHERE id = ? AND status IN ('queued', 'running')
            RETURNING *
            """,
            by_user, time.time(), job_id)

    # --- reading ---------------------------------------------------------------------------------

    async def get(self, job_id: int) -> Job | None:
        return await self._one("SELECT * FROM jobs WHERE id = ?", job_id)

    async def active_jobs(self, user_id: int | None = None) -> list[Job]:
        """Running first, then queued in order: the position of a job is its index here."""
        sql = "SELECT * FROM jobs WHERE status IN ('queued', 'running')"
        params: tuple = ()
        if user_id is not None:
            sql += " AND user_id = ?"
            params = (user_id,)
        return await self._all(sql + " ORDER BY status = 'queued', id", *params)

    async def recent_seconds_per_step(self, sample: int = 20) -> float | None:
        """The median measured speed of recent jobs, for ETAs; None until one has run."""
        async with self.db.execute(
                "SELECT seconds_per_step FROM jobs WHERE seconds_per_step IS NOT NULL "
                "ORDER BY coalesce(finished_at, started_at) DESC LIMIT ?", (sample,)) as cursor:
            values = [row[0] for row in await cursor.fetchall()]
        return statistics.median(values) if values else None

    async def position_and_eta(self, job_id: int) -> tuple[int, float | None]:
        """1-based place among active jobs (the running one is 1) and seconds until it is done."""
        active = await self.active_jobs()
        ids = [job.id for job in active]
        if job_id not in ids:
            return 0, None
        place = ids.index(job_id)
        speed = await self.recent_seconds_per_step()
        if speed is None:
            return place + 1, None
        return place + 1, sum(job.remaining_steps for job in active[: place + 1]) * speed

    # --- operations ------------------------------------------------------------------------------

    async def backup_to(self, target: Path | str) -> None:
        """A consistent copy of the live database through SQLite's online backup API."""
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        async with aiosqlite.connect(target) as copy:
            await self.db.backup(copy)

    async def jobs_with_files(self, finished_before: float | None = None) -> list[Job]:
        """Finished jobs whose output files may still be on disk, oldest first."""
        sql = ("SELECT * FROM jobs WHERE status IN ('done', 'failed', 'cancelled') AND expired_at IS NULL "
               "AND deleted_at IS NULL AND (output_path IS NOT NULL OR latent_path IS NOT NULL)")
        if finished_before is not None:
            return await self._all(sql + " AND finished_at < ? ORDER BY finished_at", finished_before)
        return await self._all(sql + " ORDER BY finished_at")

    async def mark_expired(self, job_ids: list[int]) -> None:
        """Retention removed these jobs' files; their rows stay for the generation log."""
        now = time.time()
        await self.db.executemany("UPDATE jobs SET expired_at = ? WHERE id = ?",
                                  [(now, job_id) for job_id in job_ids])
